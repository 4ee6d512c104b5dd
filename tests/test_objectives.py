"""The objectives at the scale the recipes assume, and MoCo v2's key encoder with BatchNorm groups its queries do not
share (split on one process, shuffled across two real gloo processes)."""

import os
import socket

import pytest
import torch
from torch import multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from nasiam_hf.objectives import (
    byol_loss,
    mocov2_loss,
    negative_cosine,
    nt_xent_loss,
    shuffled_key_encode,
    siamese_loss,
    simsiam_loss,
)


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def test_byol_loss_is_the_sgd_scale_of_the_papers_form():
    p1, p2, t1, t2 = tensors((6, 5), (6, 5), (6, 5), (6, 5))
    paper = sum(2 - 2 * F.cosine_similarity(p, t, dim=-1).mean() for p, t in ((p1, t2), (p2, t1)))
    ours = byol_loss(p1, p2, t1, t2)
    assert ours.item() == pytest.approx(0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1)).item(), abs=1e-12)
    assert paper.item() == pytest.approx(4 + 4 * ours.item(), abs=1e-12)  # same minimiser, a quarter of the gradient
    assert byol_loss(p1, p2, p2, p1).item() == pytest.approx(-1.0, abs=1e-12)


def test_mocov2_loss_sums_both_directions_by_hand():
    q1, q2, k1, k2, queue = tensors((4, 3), (4, 3), (4, 3), (4, 3), (7, 3))
    queue = F.normalize(queue, dim=1)  # the queue holds normalised keys
    n = [F.normalize(t, dim=1) for t in (q1, q2, k1, k2, queue)]

    def info_nce(q, k, negatives, temperature=0.2):
        positive = (q * k).sum(1, keepdim=True) / temperature
        logits = torch.cat([positive, q @ negatives.T / temperature], dim=1)
        return (torch.logsumexp(logits, dim=1) - positive[:, 0]).mean()

    expected = info_nce(n[0], n[3], n[4]) + info_nce(n[1], n[2], n[4])
    assert mocov2_loss(q1, q2, k1, k2, queue, 0.2).item() == pytest.approx(expected.item(), abs=1e-12)


def test_losses_keep_float64_and_lift_half_precision():
    z1, z2 = tensors((4, 3), (4, 3))
    assert nt_xent_loss(z1, z2, 0.5).dtype == torch.float64
    assert nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("framework", ["simsiam", "byol", "simclr", "mocov2", "barlowtwins", "vicreg"])
def test_an_active_autocast_leaves_every_loss_in_float32(framework):
    """The model's forward runs under autocast; the loss inside it must not: the same float32 embeddings give the
    same loss, to the bit, with a bf16 autocast active or not (the matrix products were bf16 before)."""
    z1, z2, p1, p2, t1, t2, queue = [t.float() for t in tensors(*[(16, 64)] * 6, (32, 64))]
    z2 = z1 + 0.1 * z2  # close views, where half precision loses the most
    kwargs = dict(p1=p1, p2=p2, t1=t1, t2=t2, queue=F.normalize(queue, dim=1), temperature=0.2)
    expected = siamese_loss(framework, z1, z2, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = siamese_loss(framework, z1, z2, **kwargs)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_siamese_loss_dispatches_to_each_objective():
    z1, z2, p1, p2, t1, t2, queue = tensors(*[(4, 3)] * 6, (5, 3))
    assert torch.equal(siamese_loss("simsiam", z1, z2, p1=p1, p2=p2), simsiam_loss(p1, p2, z1, z2))
    assert torch.equal(siamese_loss("byol", z1, z2, p1=p1, p2=p2, t1=t1, t2=t2), byol_loss(p1, p2, t1, t2))
    assert torch.equal(siamese_loss("simclr", z1, z2, temperature=0.5), nt_xent_loss(z1, z2, 0.5))
    assert torch.equal(siamese_loss("mocov2", z1, z2, t1=t1, t2=t2, queue=queue, temperature=0.1),
                       mocov2_loss(z1, z2, t1, t2, queue, 0.1))
    with pytest.raises(ValueError, match="unknown framework 'dino'"):
        siamese_loss("dino", z1, z2)


def group_normalised(x):
    return F.batch_norm(x, None, None, training=True)


def test_split_key_encoder_normalises_each_shuffled_group_on_its_own():
    images = torch.randn(16, 3, dtype=torch.float64) * 3 + 1
    encoder = nn.BatchNorm1d(3, affine=False).double().train()
    torch.manual_seed(5)
    order = torch.randperm(16)
    torch.manual_seed(5)
    keys = shuffled_key_encode(encoder, images, num_splits=4)
    assert keys.shape == images.shape
    for group in order.view(4, 4):
        assert torch.allclose(keys[group], group_normalised(images[group]), atol=1e-12)
    # not the full-batch statistics a query is normalised with
    assert (keys - group_normalised(images)).abs().max() > 1e-2
    # a per-image encoder gives the keys back in input order
    linear = nn.Linear(3, 2).double()
    assert torch.allclose(shuffled_key_encode(linear, images, num_splits=4), linear(images), atol=1e-12)


def test_small_key_batches_use_fewer_groups_of_at_least_two():
    images = torch.randn(6, 3, dtype=torch.float64)
    encoder = nn.BatchNorm1d(3, affine=False).double().train()
    torch.manual_seed(2)
    order = torch.randperm(6)
    torch.manual_seed(2)
    keys = shuffled_key_encode(encoder, images, num_splits=8)  # 3 groups of 2
    for group in order.view(3, 2):
        assert torch.allclose(keys[group], group_normalised(images[group]), atol=1e-12)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        shuffled_key_encode(encoder, images, num_splits=0)


def _two_process_worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(11 + rank)  # different generators: the broadcast permutation must win
        everything = torch.arange(24, dtype=torch.float64).view(8, 3) ** 1.5
        local = everything[rank * 4:(rank + 1) * 4]
        encoder = nn.BatchNorm1d(3, affine=False).double().train()
        keys = shuffled_key_encode(encoder, local, num_splits=2)  # one group per rank: the MoCo reference
        torch.save(keys, os.path.join(out, f"keys{rank}.pt"))
        if rank == 0:
            torch.manual_seed(11)
            torch.save(torch.randperm(8), os.path.join(out, "order.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that each import torch (about 20 s here)
def test_two_processes_shuffle_the_key_batch_across_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    keys = torch.cat([torch.load(tmp_path / f"keys{r}.pt") for r in (0, 1)])
    order = torch.load(tmp_path / "order.pt")
    everything = torch.arange(24, dtype=torch.float64).view(8, 3) ** 1.5
    for group in order.view(2, 4):  # each rank normalised one half of rank 0's permutation of the global batch
        assert torch.allclose(keys[group], group_normalised(everything[group]), atol=1e-12)
