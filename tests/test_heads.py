import pytest
import torch
from torch import nn

from nasiam_hf import NASiamConfig
from nasiam_hf.heads import HeadSpec, MLPHead, SearchCell
from nasiam_hf.search_space import SEARCH_SPACES


def test_mixed_layer_is_the_softmax_weighted_sum_of_its_ops():
    spec = HeadSpec(widths=(12, 12))
    cell = SearchCell(SEARCH_SPACES["S"], spec).eval()
    with torch.no_grad():
        cell.alphas.copy_(torch.randn_like(cell.alphas))
    x = torch.randn(6, 12)
    weights = torch.softmax(cell.alphas, dim=-1)[0]
    expected = sum(w * op(x) for w, op in zip(weights, cell.layers[0].ops))
    assert torch.allclose(cell(x), expected, atol=1e-6)


def test_alphas_are_parameters_in_state_dict_and_move_with_to():
    cell = SearchCell(SEARCH_SPACES["S"], HeadSpec(widths=(8, 8, 8)))
    assert isinstance(cell.alphas, nn.Parameter) and cell.alphas.shape == (2, 7)
    assert "alphas" in cell.state_dict()
    assert any(p is cell.alphas for p in cell.parameters())
    cell.to(torch.float64)
    assert cell.alphas.dtype == torch.float64


def test_genotype_follows_the_largest_alpha_of_each_layer():
    ops = SEARCH_SPACES["S"]
    cell = SearchCell(ops, HeadSpec(widths=(8, 8, 8, 8)))
    picks = [2, 0, 6]
    with torch.no_grad():
        cell.alphas.zero_()
        for layer, op in enumerate(picks):
            cell.alphas[layer, op] = 1.0
    assert cell.genotype() == [ops[i] for i in picks]


def test_discrete_head_follows_genotype_and_output_rule():
    config = NASiamConfig.from_preset("simsiam-cifar10-resnet18")
    projector = MLPHead(config.genotype("projector"), config.head_spec("projector"))
    predictor = MLPHead(config.genotype("predictor"), config.head_spec("predictor"))
    assert projector(torch.randn(4, 512)).shape == (4, 2048)
    assert predictor(torch.randn(4, 2048)).shape == (4, 2048)
    # identity layers that keep the width add no module
    assert isinstance(projector.layers[3], nn.Identity) and isinstance(projector.layers[4], nn.Identity)
    # SimSiam projector output: Linear(no bias) + BN(affine=False)
    assert projector.output[0].bias is None and projector.output[1].affine is False
    # predictor: Linear+BN+Hardswish 2048->512, two avg pools + BN, then a plain Linear 512->2048 (no BN)
    assert isinstance(predictor.layers[0][2], nn.Hardswish)
    last = predictor.layers[-1]
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (512, 2048)
    assert last.bias is not None


@pytest.mark.parametrize("framework,out_dim", [("simsiam", 2048), ("simclr", 128), ("mocov2", 128), ("byol", 256)])
def test_default_heads_per_framework(framework, out_dim):
    config = NASiamConfig(framework=framework)
    spec = config.head_spec("projector")
    assert spec.num_layers == (4 if framework == "mocov2" else 6)
    assert spec.out_features == out_dim
    assert config.has_predictor == (framework in ("simsiam", "byol"))
    if config.has_predictor:
        assert config.head_spec("predictor").num_layers == 4


def test_baselines_are_the_standard_heads():
    simsiam = NASiamConfig.from_preset("simsiam-baseline")
    projector = MLPHead(simsiam.genotype("projector"), simsiam.head_spec("projector"))
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 2048)]
    simclr = NASiamConfig.from_preset("simclr-baseline")
    head = MLPHead(simclr.genotype("projector"), simclr.head_spec("projector"))
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048), (2048, 128)]
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm1d)) for m in head.layers[-1].modules())
    byol = NASiamConfig.from_preset("byol-baseline", backbone="resnet50")
    assert byol.head_spec("projector").widths == (2048, 4096) and byol.head_spec("predictor").widths == (256, 4096, 256)


def test_search_cell_weights_can_be_given_instead_of_the_alphas():
    cell = SearchCell(SEARCH_SPACES["S"], HeadSpec(widths=(12, 12, 12))).eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        cell.alphas.copy_(torch.randn_like(cell.alphas))
    assert torch.equal(cell(x, cell.op_weights()), cell(x))
    one_hot = torch.zeros_like(cell.alphas)
    one_hot[0, 3] = one_hot[1, 2] = 1.0  # linear_relu, then identity
    expected = cell.layers[1].ops[2](cell.layers[0].ops[3](x))
    assert torch.allclose(cell(x, one_hot), expected, atol=1e-6)
