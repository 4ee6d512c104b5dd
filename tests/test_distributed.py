"""Real 2-process CPU runs (gloo): ranks agree, and a DDP step equals one process accumulating both shards."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch
from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch
from nasiam_hf.objectives import nt_xent_loss

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def launch(mode, out, flags):
    result = accelerate_launch("tests/ddp_worker.py", mode, out, "--", *flags, num_processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def assert_ranks_agree(out):
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text())["world_size"] == 2
    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert a.keys() == b.keys()
    compared = [k for k in a if not k.endswith(BN_STATS)]  # per-rank BatchNorm statistics legitimately differ
    for key in compared:
        assert torch.equal(a[key], b[key]), key
    return a


@pytest.fixture(scope="module")
def search_run(tiny_parquet, tmp_path_factory):
    train, _ = tiny_parquet
    out = tmp_path_factory.mktemp("ddp-search")
    flags = ["--train_file", str(train), "--output_dir", str(out / "run"), "--framework", "simclr",
             "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--image_size", "8", "--seed", "0"]
    return out, launch("search", out, flags)


@pytest.mark.slow  # a two-process accelerate launch of a search (about 35 s here)
def test_two_process_search_ranks_hold_the_same_alphas_and_weights(search_run):
    out, result = search_run
    assert "global batch 8" in result.stdout + result.stderr
    state = assert_ranks_agree(out)
    assert any(k.endswith("alphas") for k in state)
    assert (out / "run" / "genotype.json").exists() and (out / "run" / "search_history.json").exists()


@pytest.mark.slow  # uses the two-process search run
def test_ddp_steps_equal_one_process_accumulating_both_shards(search_run):
    out, _ = search_run
    before = load_file(out / "step_before.safetensors")
    views = load_file(out / "step_batch.safetensors")["views"]
    ranks = [load_file(out / f"step_rank{r}.safetensors") for r in (0, 1)]
    model = NASiamForArchitectureSearch(NASiamConfig(framework="simclr", image_size=8, projector_layers=2,
                                                       zero_init_residual=False)).train()
    model.load_state_dict(before)
    shards = [(views[0, i * 4:(i + 1) * 4], views[1, i * 4:(i + 1) * 4]) for i in range(2)]

    def global_loss(backbone_grad):
        # per-shard forwards (each rank normalises its own batch), one NT-Xent over the gathered batch
        z1 = torch.cat([model._encode(x1, backbone_grad) for x1, _ in shards])
        z2 = torch.cat([model._encode(x2, backbone_grad) for _, x2 in shards])
        return nt_xent_loss(z1, z2, model.config.temperature)

    arch_opt = torch.optim.Adam(model.arch_parameters(), lr=0.01)
    grads = torch.autograd.grad(global_loss(False), model.arch_parameters())
    for p, g in zip(model.arch_parameters(), grads):
        p.grad = g
    arch_opt.step()
    weight_opt = torch.optim.SGD(model.weight_parameters(), lr=0.1)
    weight_opt.zero_grad()
    global_loss(True).backward()
    weight_opt.step()

    params = dict(model.named_parameters())
    checked = [n for n, p in params.items() if p.requires_grad]
    assert any(n.endswith("alphas") for n in checked) and len(checked) > 50
    moved = 0
    for name in checked:
        for rank in ranks:
            assert torch.allclose(rank[name], params[name].detach(), atol=2e-5, rtol=1e-4), name
        moved += not torch.equal(before[name], params[name].detach())
    assert moved > 0.9 * len(checked)  # the step really changed the weights it compared


@pytest.mark.slow  # a two-process accelerate launch of a pretraining (about 30 s here)
def test_two_process_pretraining_shares_the_moco_queue(tiny_parquet, tmp_path):
    train, test = tiny_parquet
    flags = ["--train_file", str(train), "--validation_file", str(test), "--output_dir", str(tmp_path / "run"),
             "--genotype", "mocov2-baseline", "--queue_size", "64", "--per_device_train_batch_size", "4",
             "--num_train_epochs", "1", "--image_size", "8", "--seed", "0", "--knn_k", "10"]
    launch("pretrain", tmp_path, flags)
    state = assert_ranks_agree(tmp_path)
    steps = 48 // (4 * 2)
    # every step writes both views' keys of both ranks: 2 views x 4 images x 2 ranks
    assert state["queue.ptr"].item() == (steps * 2 * 4 * 2) % 64
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert "knn_top1" in history["epochs"][0]
