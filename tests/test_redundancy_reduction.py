"""Barlow Twins and VICReg: their losses against hand-written references (exact values on tiny batches, loops for the
values and the gradients), the global batch over two real gloo processes, the heads of their presets, what the
gradients reach, and their config constants."""

import math
import os
import socket

import pytest
import torch
from torch import multiprocessing as mp
from torch import nn

from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch, NASiamForPreTraining
from nasiam_hf.objectives import barlow_twins_loss, siamese_loss, vicreg_loss

BN_EPS, VAR_EPS = 1e-5, 1e-4
CORNERS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Exact values on batches whose statistics are known in closed form
# ----------------------------------------------------------------------------------------------------------------------
def test_barlow_twins_exact_values():
    # the corners of a square: every feature has mean 0 and biased variance 1, the two features are uncorrelated
    c = 1 / math.sqrt(1 + BN_EPS) ** 2  # the correlation of a standardised feature with itself
    assert barlow_twins_loss(CORNERS, CORNERS).item() == pytest.approx(2 * (1 - c) ** 2, abs=1e-15)
    # the second feature a copy of the first: the off-diagonal correlation is c too, weighted by lambda
    copies = CORNERS[:, [0, 0]]
    assert barlow_twins_loss(copies, copies, off_diagonal_weight=0.1, scale=2.0).item() == pytest.approx(
        2.0 * (2 * (1 - c) ** 2 + 0.1 * 2 * c ** 2), abs=1e-15)
    # the second view's features swapped: C is the anti-diagonal, (1 - 0)^2 on the diagonal, c^2 off it
    assert barlow_twins_loss(CORNERS, CORNERS[:, [1, 0]], off_diagonal_weight=5e-3).item() == pytest.approx(
        2 * 1.0 + 5e-3 * 2 * c ** 2, abs=1e-15)
    # a shift of either view changes nothing (the embeddings are centred), a scale only through the eps
    assert barlow_twins_loss(CORNERS + 7, CORNERS - 2).item() == pytest.approx(
        barlow_twins_loss(CORNERS, CORNERS).item(), abs=1e-15)
    c3 = 3 / math.sqrt(9 + BN_EPS) / math.sqrt(1 + BN_EPS)
    assert barlow_twins_loss(3 * CORNERS, CORNERS).item() == pytest.approx(2 * (1 - c3) ** 2, abs=1e-15)


def test_vicreg_exact_values():
    z = 0.5 * CORNERS  # unbiased variance 4 * 0.25 / 3 = 1/3 per feature, covariance 0
    std = math.sqrt(1 / 3 + VAR_EPS)
    assert vicreg_loss(z, z).item() == pytest.approx(25 * (1 - std), abs=1e-15)  # only the variance hinge
    # wide enough (std > 1): the hinge is 0; the views differ by 1 everywhere: the invariance term is 1
    wide = 2 * CORNERS
    assert vicreg_loss(wide, wide + 1).item() == pytest.approx(25 * 1.0, abs=1e-15)
    # the second feature a copy of the first: covariance 4/3 off the diagonal, twice per view, over dimension 2
    copies = wide[:, [0, 0]]
    assert vicreg_loss(copies, copies, covariance_weight=3.0).item() == pytest.approx(
        3.0 * 2 * (2 * (16 / 3) ** 2 / 2), abs=1e-12)
    # the hinge target and eps are the config's
    assert vicreg_loss(z, z, variance_weight=1.0, variance_target=2.0, eps=0.0).item() == pytest.approx(
        2 - math.sqrt(1 / 3), abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# Loop references: values and gradients on random embeddings
# ----------------------------------------------------------------------------------------------------------------------
def barlow_reference(z1, z2, lam, scale):
    n, d = z1.shape
    columns = []
    for z in (z1, z2):
        standardised = []
        for j in range(d):
            mean = sum(z[k, j] for k in range(n)) / n
            var = sum((z[k, j] - mean) ** 2 for k in range(n)) / n
            standardised.append([(z[k, j] - mean) / torch.sqrt(var + BN_EPS) for k in range(n)])
        columns.append(standardised)
    a, b = columns
    total = 0
    for i in range(d):
        for j in range(d):
            correlation = sum(a[i][k] * b[j][k] for k in range(n)) / n
            total = total + ((1 - correlation) ** 2 if i == j else lam * correlation ** 2)
    return scale * total


def vicreg_reference(z1, z2, weights, target=1.0):
    n, d = z1.shape
    invariance = sum((z1[k, j] - z2[k, j]) ** 2 for k in range(n) for j in range(d)) / (n * d)
    variance = covariance = 0
    for z in (z1, z2):
        means = [sum(z[k, j] for k in range(n)) / n for j in range(d)]
        for i in range(d):
            var = sum((z[k, i] - means[i]) ** 2 for k in range(n)) / (n - 1)
            variance = variance + torch.relu(target - torch.sqrt(var + VAR_EPS)) / d / 2
            for j in range(d):
                if i != j:
                    cov = sum((z[k, i] - means[i]) * (z[k, j] - means[j]) for k in range(n)) / (n - 1)
                    covariance = covariance + cov ** 2 / d
    return weights[0] * invariance + weights[1] * variance + weights[2] * covariance


@pytest.mark.parametrize("framework", ["barlowtwins", "vicreg"])
def test_loss_and_gradients_match_the_loop_reference(framework):
    generator = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(6, 4, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(2))
    if framework == "barlowtwins":
        ours = barlow_twins_loss(z1, z2, off_diagonal_weight=0.3, scale=0.5)
        reference = barlow_reference(z1, z2, 0.3, 0.5)
    else:
        ours = vicreg_loss(z1, z2, invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5,
                           variance_target=1.5)
        reference = vicreg_reference(z1, z2, (2.0, 3.0, 0.5), target=1.5)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-12)
    grads = torch.autograd.grad(ours, (z1, z2))
    expected = torch.autograd.grad(reference, (z1, z2))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
        assert got.abs().sum() > 0  # both views receive a gradient: no stop-gradient in either loss


def test_losses_run_in_float32_from_half_precision():
    z = CORNERS.to(torch.bfloat16)
    for framework in ("barlowtwins", "vicreg"):
        assert siamese_loss(framework, z, z).dtype == torch.float32
        assert siamese_loss(framework, CORNERS, CORNERS).dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Two processes: statistics and gradients of the global batch
# ----------------------------------------------------------------------------------------------------------------------
def _global_batch_step(framework, z1, z2, layer):
    loss = siamese_loss(framework, layer(z1), layer(z2))
    loss.backward()
    return loss.detach(), layer.weight.grad.clone()


def _two_process_worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(0)
        z1, z2 = (torch.randn(8, 5, generator=generator, dtype=torch.float64) for _ in range(2))
        results = {}
        for framework in ("barlowtwins", "vicreg"):
            torch.manual_seed(1)
            layer = nn.Linear(5, 3).double()
            mine = slice(rank * 4, (rank + 1) * 4)
            loss, grad = _global_batch_step(framework, z1[mine], z2[mine], layer)
            dist.all_reduce(loss)  # what the trainer reports: the mean over ranks
            dist.all_reduce(grad)  # what DDP does with the gradients: the mean over ranks
            results[framework] = (loss / 2, grad / 2)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that each import torch (about 20 s here)
def test_two_processes_take_the_step_of_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    for framework in ("barlowtwins", "vicreg"):
        torch.manual_seed(1)
        loss, grad = _global_batch_step(framework, z1, z2, nn.Linear(5, 3).double())
        for results in ranks:
            got_loss, got_grad = results[framework]
            assert got_loss.item() == pytest.approx(loss.item(), abs=1e-12), framework
            assert torch.allclose(got_grad, grad, rtol=0, atol=1e-12), framework


# ----------------------------------------------------------------------------------------------------------------------
# Heads, gradients, config
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["barlowtwins", "vicreg"])
def test_the_baseline_preset_is_the_reference_projector(framework):
    config = NASiamConfig.from_preset(f"{framework}-baseline", image_size=8)
    assert (config.projector_hidden_size, config.projection_dim, config.has_predictor) == (2048, 2048, False)
    narrow = NASiamConfig.from_preset(f"{framework}-baseline", image_size=8, projector_hidden_size=16,
                                      projection_dim=12)
    projector = NASiamForPreTraining(narrow).nasiam.projector
    layers = [type(m).__name__ for m in projector.modules() if not list(m.children())]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 16), (16, 16), (16, 12)]
    assert all(m.bias is None for m in linears)  # the BatchNorm or the loss's centring would cancel a bias


@pytest.mark.parametrize("framework", ["barlowtwins", "vicreg"])
def test_gradients_reach_the_backbone_and_the_projector_and_nothing_else(framework):
    config = NASiamConfig(framework=framework, image_size=8, projector_hidden_size=16, projection_dim=12,
                          zero_init_residual=False)  # zeroed residual norms would hold inner gradients at 0
    model = NASiamForPreTraining(config).train()
    assert model.nasiam.predictor is None and not hasattr(model, "momentum_backbone") and not hasattr(model, "queue")
    generator = torch.Generator().manual_seed(0)
    out = model(torch.randn(8, 3, 8, 8, generator=generator), torch.randn(8, 3, 8, 8, generator=generator))
    assert out.momentum_keys is None and 0 < out.collapse_std.item() < 1
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the search: the alphas of the projector cell (no predictor cell) and every weight take part
    search = NASiamForArchitectureSearch(config).train()
    assert list(search.cells()) == ["projector"]
    search(torch.randn(8, 3, 8, 8, generator=generator), torch.randn(8, 3, 8, 8, generator=generator)).loss.backward()
    assert search.arch_parameters()[0].grad.abs().sum() > 0
    assert all(p.grad is not None for p in search.weight_parameters())


def test_constants_are_config_fields_with_checks(tmp_path):
    config = NASiamConfig(framework="barlowtwins", off_diagonal_weight=0.01, correlation_scale=0.1)
    assert config.loss_constants() == {"off_diagonal_weight": 0.01, "scale": 0.1}
    config.save_pretrained(tmp_path)
    assert NASiamConfig.from_pretrained(tmp_path).loss_constants() == {"off_diagonal_weight": 0.01, "scale": 0.1}
    assert NASiamConfig(framework="vicreg").loss_constants() == {
        "invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0, "variance_target": 1.0,
        "eps": 1e-4}
    assert NASiamConfig(framework="simclr").loss_constants() == {}
    with pytest.raises(ValueError, match="off_diagonal_weight applies to barlowtwins only, not to framework 'vicreg'"):
        NASiamConfig(framework="vicreg", off_diagonal_weight=0.1)
    with pytest.raises(ValueError, match="variance_weight applies to vicreg only, not to framework 'simsiam'"):
        NASiamConfig(variance_weight=1.0)
    with pytest.raises(ValueError, match="correlation_scale must be a positive finite number, got 0"):
        NASiamConfig(framework="barlowtwins", correlation_scale=0)
    with pytest.raises(ValueError, match="covariance_weight must be a non-negative finite number, got -1"):
        NASiamConfig(framework="vicreg", covariance_weight=-1)
    with pytest.raises(ValueError, match="variance_eps must be a positive finite number, got inf"):
        NASiamConfig(framework="vicreg", variance_eps=float("inf"))
    assert NASiamConfig(framework="vicreg", covariance_weight=0).covariance_weight == 0  # the paper's ablation
