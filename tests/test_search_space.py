import pytest
import torch
from torch import nn

from nasiam_hf import search_space as ss
from nasiam_hf.heads import HeadSpec, MLPHead, SearchCell


def count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_paper_search_spaces_in_official_order():
    assert ss.SEARCH_SPACES["S"] == (
        "max_pool_3x3", "avg_pool_3x3", "identity", "linear_relu", "linear_silu", "linear_hardswish", "linear_elu",
    )
    assert ss.SEARCH_SPACES["S_no_pool"] == tuple(op for op in ss.SEARCH_SPACES["S"] if "pool" not in op)


@pytest.mark.parametrize("op", ss.SEARCH_SPACES["S"])
@pytest.mark.parametrize("d_in,d_out", [(16, 16), (16, 24), (24, 8)])
@pytest.mark.parametrize("output", [False, True])
def test_every_op_keeps_the_shape_contract(op, d_in, d_out, output):
    module = ss.build_op(op, d_in, d_out, output=output)
    y = module(torch.randn(5, d_in))
    assert y.shape == (5, d_out)


@pytest.mark.parametrize("op", ss.SEARCH_SPACES["S"])
def test_batchnorm_rule(op):
    hidden = ss.build_op(op, 16, 16)
    out = ss.build_op(op, 16, 32, output=True)
    linear_or_pool = op.startswith("linear") or "pool" in op
    assert count(hidden, nn.BatchNorm1d) == (1 if linear_or_pool else 0)
    assert count(out, nn.BatchNorm1d) == 0  # the output layer never has BN
    if op.startswith("linear"):
        assert count(out, nn.Linear) == 1 and out.bias is not None  # a plain Linear with bias
        assert hidden[0].bias is None  # Linear(bias=False) before BN
    # A parameter-free op that changes width gets one adapter Linear (+ BN + ReLU unless it is the output layer).
    narrowing = ss.build_op(op, 24, 8)
    if not op.startswith("linear"):
        assert count(narrowing, nn.Linear) == 1 and count(narrowing, nn.ReLU) == 1
        assert count(narrowing, nn.BatchNorm1d) == (2 if "pool" in op else 1)


def test_pools_run_along_the_feature_axis():
    x = torch.tensor([[1.0, 5.0, 2.0, 0.0]])
    avg = ss.FeaturePool1d("avg")(x)
    mx = ss.FeaturePool1d("max")(x)
    # kernel 3, stride 1, zero padding 1, counted in the average
    assert torch.allclose(avg, torch.tensor([[6 / 3, 8 / 3, 7 / 3, 2 / 3]]))
    assert torch.equal(mx, torch.tensor([[5.0, 5.0, 5.0, 2.0]]))
    # samples do not mix: each row pooled on its own
    batch = torch.randn(4, 10)
    assert torch.allclose(ss.FeaturePool1d("avg")(batch)[2], ss.FeaturePool1d("avg")(batch[2:3])[0])


def test_unknown_op_and_wrong_length_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown op 'linear_tanh'.*allowed ops: \[.*'linear_relu'"):
        ss.validate_genotype(["linear_tanh"], 1, "projector")
    with pytest.raises(ValueError, match=r"projector_genotype has 2 ops .* projector_layers is 6"):
        ss.validate_genotype(["identity", "identity"], 6, "projector")
    with pytest.raises(ValueError, match="must be a list of op names"):
        ss.validate_genotype("identity", 1, "predictor")
    with pytest.raises(ValueError, match="unknown search space or op 'T'"):
        ss.resolve_search_space("T")


def test_registered_op_can_be_searched_and_used():
    ss.register_op("linear_tanh_test", activation=nn.Tanh)
    try:
        ops = ss.resolve_search_space("S_no_pool,linear_tanh_test")
        assert ops[-1] == "linear_tanh_test" and len(ops) == 6
        spec = HeadSpec(widths=(8, 8, 8))
        cell = SearchCell(ops, spec)
        with torch.no_grad():
            cell.alphas.zero_()
            cell.alphas[:, -1] = 5.0
        assert cell.genotype() == ["linear_tanh_test", "linear_tanh_test"]
        head = MLPHead(cell.genotype(), spec)
        assert count(head, nn.Tanh) == 2
        with pytest.raises(ValueError, match="already registered"):
            ss.register_op("linear_tanh_test", activation=nn.Tanh)
    finally:
        ss.OPS.pop("linear_tanh_test")


def test_width_adapters_go_in_front_of_parameter_free_ops_only():
    assert ss.has_width_adapter("identity", 512, 2048) and ss.has_width_adapter("avg_pool_3x3", 2048, 512)
    assert not ss.has_width_adapter("avg_pool_3x3", 512, 512) and not ss.has_width_adapter("linear_relu", 512, 2048)
    ss.register_op("tanh_mlp_test", activation=nn.Tanh)  # a linear op whose name does not say so
    try:
        assert not ss.has_width_adapter("tanh_mlp_test", 512, 2048)
    finally:
        ss.OPS.pop("tanh_mlp_test")
    with pytest.raises(ValueError, match="unknown op 'linear_foo'"):
        ss.has_width_adapter("linear_foo", 8, 16)


def test_identity_share_counts_only_width_keeping_layers():
    widths = (32, 16, 16, 16, 32)
    assert ss.identity_share(["identity", "identity", "linear_relu", "identity"], widths) == pytest.approx(1 / 2)
    assert ss.identity_share(["linear_relu"] * 4, widths) == 0.0


def test_genotype_json_is_validated():
    g = ss.Genotype.from_dict({"projector": ["identity", "linear_elu"], "predictor": None})
    assert g.to_dict() == {"projector": ["identity", "linear_elu"], "predictor": None}
    with pytest.raises(ValueError, match="unknown op .__import__"):
        ss.Genotype.from_dict({"projector": ["__import__('os')"]})
    with pytest.raises(ValueError, match="'projector' list"):
        ss.Genotype.from_dict(["identity"])
