"""LARS (timm's Lars) as the weight optimizer: the parameter groups exclude biases and norm parameters from adaptation
and weight decay, the update is the one timm's formula gives, the choice reaches the plans and the engines, and a
missing timm is refused in one line."""

import sys

import pytest
import torch
from torch import nn

from nasiam_hf.optimization import build_weight_optimizer, lars_param_groups, predictor_param_groups

TRUST, EPS = 0.02, 1e-8


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()


def set_grads(model, step):
    """Random gradients, larger for later parameters (so that LARC's clipping binds for some weights only)."""
    generator = torch.Generator().manual_seed(10 + step)
    for index, p in enumerate(model.parameters()):
        p.grad = (1 + 4 * index) * torch.randn(p.shape, generator=generator, dtype=p.dtype)


def by_hand(w, g, buf, lr, wd, momentum, adapted, clip):
    """One LARS step written from timm's formula (adapted weights) or plain SGD with momentum (excluded ones);
    returns the new weight, the new momentum buffer and whether the clipping bound."""
    clipped = False
    if adapted:
        w_norm, g_norm = w.norm().item(), g.norm().item()
        ratio = TRUST * w_norm / (g_norm + wd * w_norm + EPS) if w_norm > 0 and g_norm > 0 else 1.0
        if clip:
            clipped = ratio / lr > 1.0
            ratio = min(ratio / lr, 1.0)
        g = (g + wd * w) * ratio
    buf = g.clone() if buf is None else momentum * buf + g
    return w - lr * buf, buf, clipped


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("implementation", ["foreach", "for_loop"])
def test_lars_steps_match_timms_formula_with_the_exclusions(clip, implementation):
    model = tiny_model()
    lr, wd, momentum = (0.005 if clip else 0.4), 1e-2, 0.9
    optimizer, fixed = build_weight_optimizer("lars", [{"params": list(model.parameters())}], lr, wd, momentum,
                                              implementation=implementation, trust_coefficient=TRUST, trust_clip=clip)
    assert type(optimizer).__module__.startswith("timm.optim") and fixed == ()
    adapted, excluded = optimizer.param_groups
    assert [p.ndim for p in adapted["params"]] == [2, 2] and [p.ndim for p in excluded["params"]] == [1, 1, 1]
    assert (adapted["weight_decay"], adapted["always_adapt"]) == (wd, True)
    assert (excluded["weight_decay"], excluded["always_adapt"]) == (0.0, False)
    expected = {id(p): (p.detach().clone(), None, False) for p in model.parameters()}
    clipped = set()
    for step in range(3):
        set_grads(model, step)
        for p in model.parameters():
            w, buf, _ = expected[id(p)]
            is_adapted = p.ndim > 1
            expected[id(p)] = by_hand(w, p.grad, buf, lr, wd if is_adapted else 0.0, momentum, is_adapted, clip)
            if is_adapted:
                clipped.add(expected[id(p)][2])
        optimizer.step()
        for name, p in model.named_parameters():
            assert torch.allclose(p.detach(), expected[id(p)][0], rtol=0, atol=1e-12), (step, name)
    # with clipping, the adapted rate was capped at the global one for some weights and not for others
    assert clipped == ({True, False} if clip else {False})


def test_the_excluded_group_is_plain_sgd_with_momentum():
    """timm's Lars on the excluded group and torch's SGD on the same biases and norm parameters move them alike."""
    model, reference = tiny_model(), tiny_model()
    optimizer, _ = build_weight_optimizer("lars", [{"params": list(model.parameters())}], 0.3, 1e-3,
                                          implementation="foreach")
    excluded = [p for p in reference.parameters() if p.ndim == 1]
    sgd = torch.optim.SGD(excluded, lr=0.3, momentum=0.9, weight_decay=0.0)
    for step in range(2):
        set_grads(model, step)
        set_grads(reference, step)
        optimizer.step()
        sgd.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.ndim == 1:
            assert torch.allclose(a, b, rtol=0, atol=1e-14), name
        else:
            assert not torch.equal(a, b), name  # the weights were adapted (the reference left them alone)


def test_groups_keep_their_options_and_the_fixed_predictor_group():
    backbone, predictor = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    params = [*backbone.parameters(), *predictor.parameters()]
    groups, fixed = predictor_param_groups(params, predictor, fix_predictor_lr=True)
    assert fixed == (1,)
    split, fixed = lars_param_groups([{**g, "lr": 0.5} for g in groups], 1e-4, fixed)
    assert [len(g["params"]) for g in split] == [1, 1, 1, 3] and fixed == (2, 3)
    assert all(g["lr"] == 0.5 for g in split)
    assert [g["weight_decay"] for g in split] == [1e-4, 0.0, 1e-4, 0.0]
    sgd, same = build_weight_optimizer("sgd", groups, 0.1, 1e-4, fixed_groups=(1,))
    assert isinstance(sgd, torch.optim.SGD) and same == (1,) and len(sgd.param_groups) == 2


def test_fused_kernels_are_refused_for_lars():
    with pytest.raises(ValueError, match="--optimizer_implementation fused: timm's Lars has no fused kernel"):
        build_weight_optimizer("lars", [{"params": list(tiny_model().parameters())}], 0.1, 0.0,
                               implementation="fused")
    with pytest.raises(ValueError, match=r"--optimizer must be one of \['sgd', 'lars'\], got 'adam'"):
        build_weight_optimizer("adam", [{"params": list(tiny_model().parameters())}], 0.1, 0.0)


def test_the_optimizer_flag_reaches_every_plan(tmp_path):
    from nasiam_hf import FinetuneCommand, PretrainCommand, SearchCommand
    from nasiam_hf.plans import plan_finetune, plan_pretrain, plan_search

    out = ["--dataset_name", "demo", "--output_dir", str(tmp_path)]
    plan = plan_pretrain(PretrainCommand.parse([*out, "--genotype", "byol-baseline", "--optimizer", "lars"]),
                         "cifar", 32, 1).optimization
    assert (plan.optimizer, plan.trust_coefficient, plan.trust_clip) == ("lars", 0.001, False)  # timm's defaults
    assert "LARS (trust coefficient 0.001" in plan.describe()
    plan = plan_search(SearchCommand.parse([*out, "--framework", "vicreg", "--optimizer", "sgd"]), "cifar", 32,
                       1).optimization
    assert (plan.optimizer, plan.trust_coefficient, plan.trust_clip) == ("sgd", None, None)
    assert plan.describe().startswith("global batch 256, SGD,")
    plan = plan_search(SearchCommand.parse([*out, "--framework", "barlowtwins"]), "cifar", 32, 1).optimization
    assert (plan.optimizer, plan.trust_coefficient, plan.trust_clip) == ("lars", 0.02, True)  # solo-learn's
    plan = plan_finetune(FinetuneCommand.parse([*out, "--model_name_or_path", "m", "--optimizer", "lars"]), 1)
    assert plan.optimization.optimizer == "lars"


def test_lars_without_timm_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from nasiam_hf.commands import pretrain, search

    monkeypatch.setitem(sys.modules, "timm.optim", None)  # importing it fails, as where timm is not installed
    missing = tmp_path / "not-there.parquet"  # reading the data first would fail on this file instead
    for main, argv, why in (
        (pretrain.main, ["--genotype", "simsiam-baseline", "--optimizer", "lars"], "--optimizer lars"),
        (search.main, ["--framework", "vicreg"], "the vicreg recipe (LARS; --optimizer sgd to train without it)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--train_file", str(missing), "--output_dir", str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {why} uses timm's Lars and timm is not installed (") and "\n" not in err
        assert err.endswith(': pip install "nasiam-hf[timm]"'), err
    assert not (tmp_path / "out").exists()  # refused before anything was written
