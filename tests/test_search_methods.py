"""The collapse-resistant search variants, checked against values computed by hand on tiny cells: DARTS-'s skip,
beta-DARTS' regulariser, DARTS-PT's masking, the cap on parameter-free layers and the exact alpha Hessian."""

import pytest
import torch
from torch.nn import functional as F

from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch
from nasiam_hf.heads import HeadSpec, SearchCell
from nasiam_hf.search_methods import (
    SearchVariant,
    alpha_hessian,
    alpha_hessian_top_eigenvalue,
    alpha_objective,
    apply_schedule,
    argmax_genotype,
    aux_skip_schedule,
    beta_darts_schedule,
    beta_regularizer,
    cache_backbone_features,
    derive_genotype,
    genotype_shares,
    mean_head_loss,
    perturbation_genotype,
    perturbation_select,
)

OPS = ("identity", "avg_pool_3x3", "linear_relu")


def output_cell(widths=(4, 4), alphas=(0.1, -0.3, 0.4)):
    """One output layer (no BatchNorm anywhere): identity, avg pool and a plain Linear, in float64."""
    cell = SearchCell(OPS, HeadSpec(widths=widths, output_last=True)).double()
    with torch.no_grad():
        cell.alphas.copy_(torch.tensor([alphas], dtype=torch.float64))
    return cell


def by_hand_outputs(cell, x):
    """identity, kernel-3 average pool with zero padding (divided by 3), Linear: written out, not run by the cell."""
    padded = F.pad(x, (1, 1))
    pool = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3
    layer = cell.layers[0]
    return [x, pool, x @ layer.front.weight.T + layer.front.bias]


def by_hand_alpha_gradient(weights, outputs, y):
    """d(0.5 |y|^2)/d alpha_j = sum_k <y, o_k> w_k (delta_kj - w_j), for y = sum_k w_k o_k (+ any skip)."""
    inner = torch.stack([(y * o).sum() for o in outputs])
    return torch.stack([(inner * weights * ((torch.arange(3) == j).double() - weights[j])).sum() for j in range(3)])


# --------------------------------------------------------------------------------------------------------------------
# DARTS-
# --------------------------------------------------------------------------------------------------------------------


def test_darts_minus_skip_changes_the_alpha_gradient_as_the_paper_defines():
    cell = output_cell()
    x = torch.randn(5, 4, dtype=torch.float64)
    weights = torch.softmax(cell.alphas.detach()[0], dim=-1)
    outputs = by_hand_outputs(cell, x)
    gradients = {}
    for beta in (0.0, 0.7):
        cell.aux_skip_weight = beta
        y = cell(x)
        expected_y = sum(w * o for w, o in zip(weights, outputs)) + beta * x
        assert torch.allclose(y, expected_y, atol=1e-12)
        (grad,) = torch.autograd.grad(0.5 * (y ** 2).sum(), cell.alphas)
        assert torch.allclose(grad[0], by_hand_alpha_gradient(weights, outputs, expected_y.detach()), atol=1e-10)
        gradients[beta] = grad[0]
    # the skip moves the gradient by far more than rounding
    assert (gradients[0.7] - gradients[0.0]).abs().max() > 1e-2


def test_darts_minus_skip_only_on_width_keeping_layers_and_on_every_cell():
    cell = output_cell(widths=(4, 6))
    x = torch.randn(3, 4, dtype=torch.float64)
    plain = cell(x)
    cell.aux_skip_weight = 1.0
    assert torch.equal(cell(x), plain)
    assert cell.width_keeping_layers() == [False]

    model = NASiamForArchitectureSearch(NASiamConfig(framework="mocov2", image_size=8, queue_size=16,
                                                     projector_layers=2))
    variant = SearchVariant("darts-minus", aux_skip_weight=0.8)
    assert apply_schedule(model, variant, 0.25) == {"aux_skip_weight": pytest.approx(0.6), "beta_darts_weight": 0.0}
    assert model.nasiam.projector.aux_skip_weight == pytest.approx(0.6)
    assert model.momentum_projector.aux_skip_weight == pytest.approx(0.6)  # the key encoder shares the architecture
    apply_schedule(model, variant, 1.0)
    assert model.nasiam.projector.aux_skip_weight == 0.0


def test_schedules_run_linearly_over_the_search():
    assert [aux_skip_schedule(p, 1.0) for p in (0.0, 0.5, 1.0, 1.5)] == [1.0, 0.5, 0.0, 0.0]
    assert [beta_darts_schedule(p, 50.0) for p in (-1.0, 0.0, 0.4, 1.0)] == [0.0, 0.0, 20.0, 50.0]
    assert SearchVariant("darts-minus").aux_skip_at(0.0) == 1.0  # DARTS-'s beta_0
    assert SearchVariant("beta-darts").regularizer_weight_at(1.0) == 50.0  # beta-DARTS' code: 0 -> 50
    assert SearchVariant().aux_skip_at(0.0) == 0.0 and SearchVariant().regularizer_weight_at(1.0) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# beta-DARTS
# --------------------------------------------------------------------------------------------------------------------


def test_beta_regularizer_value_and_gradient_by_hand():
    projector = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 0.5], [0.3, 0.3, 0.3]], dtype=torch.float64,
                             requires_grad=True)
    predictor = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64, requires_grad=True)
    value = beta_regularizer([projector, predictor], weight=3.0)
    rows = torch.cat([projector, predictor]).detach()
    expected = 3.0 * torch.log(torch.exp(rows).sum(dim=1)).mean()
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    grads = torch.autograd.grad(value, [projector, predictor])
    by_hand = 3.0 * torch.softmax(rows, dim=1) / 5  # five layers in all
    assert torch.allclose(torch.cat(grads), by_hand, atol=1e-12)


def test_beta_darts_adds_exactly_its_term_to_the_alpha_gradient():
    model = NASiamForArchitectureSearch(NASiamConfig(framework="simsiam", image_size=8, projector_layers=2,
                                                     predictor_layers=2)).train()
    views = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    params = model.arch_parameters()
    with torch.no_grad():
        for p in params:
            p.normal_()
    plain = torch.autograd.grad(model(*views, backbone_grad=False).loss, params)
    loss = model(*views, backbone_grad=False).loss
    regularised = torch.autograd.grad(alpha_objective(loss, model, SearchVariant("beta-darts", beta_darts_weight=10.0),
                                                      progress=0.5), params)
    layers = sum(p.shape[0] for p in params)
    for p, g_plain, g_reg in zip(params, plain, regularised):
        expected = g_plain + 5.0 * torch.softmax(p.detach(), dim=-1) / layers  # weight 10 x progress 0.5
        assert torch.allclose(g_reg, expected, atol=1e-6)
    assert alpha_objective(loss, model, SearchVariant(), 0.5) is loss


# --------------------------------------------------------------------------------------------------------------------
# DARTS-PT and the cap
# --------------------------------------------------------------------------------------------------------------------


def identity_target_loss(cell, x):
    """A loss the identity op alone minimises, with the Linear's weights zeroed (its output is 0)."""
    with torch.no_grad():
        cell.layers[0].front.weight.zero_()
        cell.layers[0].front.bias.zero_()

    def loss_of(weights):
        return ((cell(x, weights["projector"]) - x) ** 2).sum().item()
    return loss_of


def test_perturbation_keeps_the_op_whose_masking_hurts_most_not_the_argmax():
    cell = output_cell(alphas=(0.0, 0.2, 0.9))  # the Linear has the largest alpha ...
    x = torch.randn(6, 4, dtype=torch.float64)
    loss_of = identity_target_loss(cell, x)
    result = perturbation_select({"projector": cell}, loss_of)
    w = torch.softmax(cell.alphas.detach()[0], dim=-1)
    pool = by_hand_outputs(cell, x)[1]
    by_hand = {  # ... but masking it changes nothing, and masking identity hurts most
        "identity": ((w[1] * pool - x) ** 2).sum().item(),
        "avg_pool_3x3": ((w[0] * x - x) ** 2).sum().item(),
        "linear_relu": ((w[0] * x + w[1] * pool - x) ** 2).sum().item(),
    }
    entry = result.table[0]
    assert entry["masked_loss"] == pytest.approx(by_hand, abs=1e-10)
    assert entry["base_loss"] == pytest.approx(by_hand["linear_relu"], abs=1e-10)
    assert result.genotype == {"projector": ["identity"]} and result.capped == []
    assert argmax_genotype_of(cell) == ["linear_relu"]


def argmax_genotype_of(cell):
    return [cell.op_names[i] for i in cell.alphas.detach().argmax(dim=-1).tolist()]


def test_perturbation_under_a_cap_keeps_the_best_linear_op_and_records_it():
    cell = output_cell(alphas=(0.0, 0.2, 0.9))
    x = torch.randn(6, 4, dtype=torch.float64)
    result = perturbation_select({"projector": cell}, identity_target_loss(cell, x), max_parameter_free_layers=0)
    assert result.genotype == {"projector": ["linear_relu"]}
    assert result.capped == [{"cell": "projector", "layer": 0, "from": "identity", "to": "linear_relu"}]


def test_perturbation_is_progressive():
    """The second layer is decided with the first fixed to its choice (one-hot)."""
    cell = SearchCell(OPS, HeadSpec(widths=(4, 4, 4), output_last=True)).double()
    seen = []

    def loss_of(weights):
        seen.append(weights["projector"].clone())
        return -float(weights["projector"][:, 0].sum())  # masking identity raises it: identity everywhere

    result = perturbation_select({"projector": cell}, loss_of)
    assert result.genotype == {"projector": ["identity", "identity"]}
    second_layer_trials = seen[4:]
    assert all(torch.equal(w[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) for w in second_layer_trials)


def test_argmax_cap_switches_the_cheapest_parameter_free_layers():
    ops = ("identity", "max_pool_3x3", "linear_relu", "linear_silu")
    cell = SearchCell(ops, HeadSpec(widths=(6, 4, 4, 4, 4)))  # layer 0 changes width: it does not count
    alphas = torch.tensor([
        [3.0, 0.0, 0.0, 0.0],  # identity with an adapter (width 6 -> 4): not parameter-free here
        [2.0, 0.0, 1.5, 0.0],  # identity, 0.5 above the best linear op
        [0.0, 3.0, 0.0, 1.0],  # max pool, 2.0 above
        [1.2, 0.0, 0.0, 1.0],  # identity, 0.2 above
    ])
    with torch.no_grad():
        cell.alphas.copy_(alphas)

    class Model:  # the two methods argmax_genotype reads
        def cells(self):
            return {"projector": cell}

    result = argmax_genotype(Model(), max_parameter_free_layers=1)
    assert result.genotype == {"projector": ["identity", "linear_relu", "max_pool_3x3", "linear_silu"]}
    assert result.capped == [
        {"cell": "projector", "layer": 1, "from": "identity", "to": "linear_relu"},
        {"cell": "projector", "layer": 3, "from": "identity", "to": "linear_silu"},
    ]
    assert argmax_genotype(Model()).genotype == {"projector": ["identity", "identity", "max_pool_3x3", "identity"]}
    free_only = SearchCell(("identity", "avg_pool_3x3"), HeadSpec(widths=(4, 4)))

    class FreeOnly:
        def cells(self):
            return {"projector": free_only}

    with pytest.raises(ValueError, match="no linear op"):
        argmax_genotype(FreeOnly(), max_parameter_free_layers=0)


# --------------------------------------------------------------------------------------------------------------------
# the real model: cached features, PT, shares, the exact Hessian
# --------------------------------------------------------------------------------------------------------------------


def tiny_supernet(framework="simclr", **kw):
    values = dict(framework=framework, image_size=8, projector_layers=2, projector_hidden_size=8, projection_dim=4)
    if framework == "mocov2":
        values["queue_size"] = 16
    values.update(kw)
    return NASiamForArchitectureSearch(NASiamConfig(**values)).train()


def batches(n=2, size=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(size, 3, 8, 8, generator=g, dtype=dtype),
             "pixel_values_2": torch.randn(size, 3, 8, 8, generator=g, dtype=dtype)} for _ in range(n)]


@pytest.mark.parametrize("framework", ["simclr", "mocov2", "byol", "simsiam"])
def test_perturbation_on_a_supernet_leaves_it_unchanged(framework):
    kw = {"predictor_layers": 2, "predictor_hidden_size": 8} if framework in ("simsiam", "byol") else {}
    model = tiny_supernet(framework, **kw)
    with torch.no_grad():
        for p in model.arch_parameters():
            p.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cached = cache_backbone_features(model, batches())
    assert (cached[0].momentum_features is not None) == (framework in ("mocov2", "byol"))
    result = perturbation_genotype(model, cached)
    assert set(result.genotype) == set(model.cells())
    for entry in result.table:
        assert entry["chosen"] == max(entry["masked_loss"], key=entry["masked_loss"].get)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights, BN statistics, queue
    assert derive_genotype(model, SearchVariant(discretization="perturbation"), cached).genotype == result.genotype
    with pytest.raises(ValueError, match="cached validation features"):
        derive_genotype(model, SearchVariant(discretization="perturbation"))


def test_genotype_shares_count_width_keeping_layers():
    model = tiny_supernet(projector_layers=3)  # widths 512 -> 8 -> 8 -> 4: only layer 1 keeps its width
    assert model.nasiam.projector.width_keeping_layers() == [False, True, False]
    with torch.no_grad():
        model.nasiam.projector.alphas.zero_()
        model.nasiam.projector.alphas[:, model.nasiam.projector.op_names.index("identity")] = 1.0
    assert genotype_shares(model) == {"identity_share": 1.0, "parameter_free_share": 1.0}
    with torch.no_grad():
        model.nasiam.projector.alphas[1, model.nasiam.projector.op_names.index("max_pool_3x3")] = 2.0
    assert genotype_shares(model) == {"identity_share": 0.0, "parameter_free_share": 1.0}


def test_alpha_hessian_matches_finite_differences():
    model = tiny_supernet().double()
    with torch.no_grad():
        model.nasiam.projector.alphas.normal_(std=0.5)
    cached = cache_backbone_features(model, batches(size=8, dtype=torch.float64))
    hessian = alpha_hessian(model, cached)
    alphas = model.nasiam.projector.alphas
    assert hessian.shape == (alphas.numel(), alphas.numel())

    def gradient():  # through the cell's own softmax of its alphas, not the weights path the Hessian uses
        return torch.autograd.grad(mean_head_loss(model, cached), alphas)[0].reshape(-1)

    step, columns = 1e-5, []
    for i in range(alphas.numel()):
        with torch.no_grad():
            alphas.view(-1)[i] += step
        plus = gradient()
        with torch.no_grad():
            alphas.view(-1)[i] -= 2 * step
        minus = gradient()
        with torch.no_grad():
            alphas.view(-1)[i] += step
        columns.append((plus - minus) / (2 * step))
    finite = torch.stack(columns, dim=1)
    finite = 0.5 * (finite + finite.T)
    scale = finite.abs().max().item()
    assert scale > 1e-4  # a curvature worth measuring
    assert torch.allclose(hessian, finite, atol=1e-6 * max(scale, 1.0), rtol=1e-5)
    top = alpha_hessian_top_eigenvalue(model, cached)
    assert top == pytest.approx(torch.linalg.eigvalsh(finite).max().item(), rel=1e-5, abs=1e-8)


# --------------------------------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"search_method": "pc-darts"}, "--search_method 'pc-darts'"),
    ({"discretization": "topk"}, "--discretization 'topk'"),
    ({"aux_skip_weight": 0.5}, "--aux_skip_weight applies to --search_method darts-minus only"),
    ({"search_method": "beta-darts", "aux_skip_weight": 0.5}, "darts-minus only, not 'beta-darts'"),
    ({"beta_darts_weight": 1.0}, "--beta_darts_weight applies to --search_method beta-darts only"),
    ({"search_method": "darts-minus", "aux_skip_weight": -1.0}, "--aux_skip_weight must be a number >= 0"),
    ({"max_parameter_free_layers": -1}, "--max_parameter_free_layers must be an integer >= 0"),
    ({"max_parameter_free_layers": True}, "--max_parameter_free_layers"),
    ({"hessian_every": 1.5}, "--hessian_every must be an integer >= 0"),
])
def test_bad_variant_flags_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SearchVariant(**kwargs)


def test_hessian_every_picks_the_epochs():
    assert [e for e in range(6) if SearchVariant(hessian_every=2).hessian_due(e)] == [1, 3, 5]
    assert not any(SearchVariant().hessian_due(e) for e in range(6))
