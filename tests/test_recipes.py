"""docs/recipes.md and resolve_recipe agree for every (framework, recipe) pair, and each recipe's loss form is the one
the objectives compute."""

import math
import re

import pytest
import torch
from torch.nn import functional as F

from conftest import REPO_ROOT
from nasiam_hf import NASiamConfig
from nasiam_hf.objectives import FRAMEWORKS, siamese_loss
from nasiam_hf.presets import RECIPE_NAMES, Recipe, recipe_for_policy, resolve_recipe

DOC = REPO_ROOT / "docs" / "recipes.md"

# row of the doc's tables -> the Recipe value it states
ROWS = {
    "image size": lambda r: r.image_size,
    "CIFAR stem": lambda r: r.cifar_stem,
    "epochs": lambda r: r.epochs,
    "batch (global)": lambda r: r.batch_size,
    "base lr per 256 images": lambda r: r.base_lr,
    "weight decay": lambda r: r.weight_decay,
    "SGD momentum": lambda r: r.momentum,
    "optimizer": lambda r: r.optimizer,
    "LARS trust coefficient": lambda r: r.lars_trust_coefficient,
    "LARS trust clipping": lambda r: r.lars_trust_clip,
    "warmup epochs": lambda r: r.warmup_epochs,
    "temperature": lambda r: r.temperature,
    "queue": lambda r: r.queue_size,
    "key momentum / EMA base": lambda r: r.key_momentum,
    "key momentum schedule": lambda r: r.key_momentum_schedule,
    "loss": lambda r: r.loss,
    "key BatchNorm groups": lambda r: r.key_bn_splits,
    "projector width": lambda r: r.projector_width,
    "off-diagonal weight": lambda r: r.off_diagonal_weight,
    "loss scale": lambda r: r.correlation_scale,
    "invariance weight": lambda r: r.invariance_weight,
    "variance weight": lambda r: r.variance_weight,
    "covariance weight": lambda r: r.covariance_weight,
    "zero-init residual BN": lambda r: r.zero_init_residual,
    "fixed predictor lr": lambda r: r.fix_predictor_lr,
    "search epochs": lambda r: r.search.epochs,
    "search batch": lambda r: r.search.batch_size,
    "search base lr per 256 images": lambda r: r.search.base_lr,
    "search weight decay": lambda r: r.search.weight_decay,
    "search optimizer": lambda r: r.search.optimizer,
    "search fixed predictor lr": lambda r: r.search.fix_predictor_lr,
    "alpha optimizer": lambda r: r.search.arch_optimizer,
    "alpha lr": lambda r: r.search.arch_lr,
    "alpha weight decay": lambda r: r.search.arch_weight_decay,
    "train portion": lambda r: r.search.train_portion,
    "probe epochs": lambda r: r.probe.epochs,
    "probe batch": lambda r: r.probe.batch_size,
    "probe base lr per 256 images": lambda r: r.probe.base_lr,
    "probe weight decay": lambda r: r.probe.weight_decay,
    "probe features": lambda r: r.probe.feature_norm,
}
# values the tables do not repeat: the doc states them once, under "Unchanged across all tables"
CONSTANT = {"name": None, "framework": None, "lr_scaling": "linear", "search.momentum": 0.9,
            "search.arch_betas": (0.9, 0.999), "probe.momentum": 0.9}


def parse_cell(text: str):
    text = text.strip()
    if text == "–":
        return None
    if text in ("yes", "no"):
        return text == "yes"
    if text.startswith("`") and text.endswith("`"):
        return text[1:-1]
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def doc_tables() -> dict[tuple[str, str], dict[str, object]]:
    tables, current = {}, None
    for line in DOC.read_text().splitlines():
        heading = re.fullmatch(r"### (\w+) / (\w+)", line.strip())
        if heading:
            current = tables.setdefault((heading.group(2), heading.group(1)), {})
        elif current is not None and line.startswith("| ") and not line.startswith(("| setting", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 5, line
            current[cells[0]] = parse_cell(cells[3])
    return tables


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_the_doc_has_one_table_per_framework_and_recipe():
    assert set(doc_tables()) == {(r, f) for r in RECIPE_NAMES for f in FRAMEWORKS}


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resolve_recipe_matches_the_doc(recipe, framework):
    table = doc_tables()[(recipe, framework)]
    assert set(table) == set(ROWS)
    resolved = resolve_recipe(recipe, framework)
    wrong = {row: (table[row], get(resolved)) for row, get in ROWS.items() if not same(table[row], get(resolved))}
    assert not wrong, f"docs/recipes.md (doc, code) disagree for {framework} / {recipe}: {wrong}"


def test_every_recipe_field_is_in_the_tables_or_stated_once():
    recipe = resolve_recipe("cifar", "simsiam")
    fields = {f for f in Recipe.__dataclass_fields__ if f not in ("search", "probe")}
    fields |= {f"search.{f}" for f in type(recipe.search).__dataclass_fields__}
    fields |= {f"probe.{f}" for f in type(recipe.probe).__dataclass_fields__}
    shown = {"image_size", "cifar_stem", "epochs", "batch_size", "base_lr", "weight_decay", "momentum", "warmup_epochs",
             "temperature", "queue_size", "key_momentum", "key_momentum_schedule", "loss", "key_bn_splits",
             "zero_init_residual", "fix_predictor_lr", "search.epochs", "search.batch_size", "search.base_lr",
             "search.weight_decay", "search.fix_predictor_lr", "search.arch_optimizer", "search.arch_lr",
             "search.arch_weight_decay", "search.train_portion", "probe.epochs", "probe.batch_size",
             "probe.base_lr", "probe.weight_decay", "probe.feature_norm", "optimizer", "lars_trust_coefficient",
             "lars_trust_clip", "projector_width", "off_diagonal_weight", "correlation_scale", "invariance_weight",
             "variance_weight", "covariance_weight", "search.optimizer"}
    assert len(shown) == len(ROWS) and fields == shown | set(CONSTANT)
    for r in (resolve_recipe(name, framework) for name in RECIPE_NAMES for framework in FRAMEWORKS):
        for key, value in CONSTANT.items():
            if value is not None:
                obj, _, attr = key.rpartition(".")
                assert getattr(getattr(r, obj) if obj else r, attr) == value, key
    assert "SGD momentum 0.9 and the alpha optimizers' betas (0.9, 0.999)" in DOC.read_text()


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def negative_cosine(p, z):
    return -F.cosine_similarity(p, z, dim=-1).mean()


def info_nce(q, k, queue, t):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def barlow_twins(z1, z2, lam, scale):
    """Written out entry by entry: standardise every feature over the batch, correlate, compare with the identity."""
    def standardised(z):
        return (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt()

    a, b = standardised(z1), standardised(z2)
    n, d = a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1 - c) ** 2 if i == j else lam * c ** 2
    return scale * total


def vicreg(z1, z2, weights):
    """Written out feature by feature (the authors' form: variance averaged, covariance summed over the views)."""
    n, d = z1.shape
    invariance = ((z1 - z2) ** 2).sum() / (n * d)
    variance = covariance = 0.0
    for z in (z1, z2):
        centred = z - z.mean(0)
        for i in range(d):
            std = ((centred[:, i] ** 2).sum() / (n - 1) + 1e-4).sqrt()
            variance += max(0.0, 1 - std.item()) / d / 2
            for j in range(d):
                if i != j:
                    covariance += ((centred[:, i] * centred[:, j]).sum() / (n - 1)) ** 2 / d
    return weights[0] * invariance + weights[1] * variance + weights[2] * covariance


def nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / t
    logits.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    return F.cross_entropy(logits, torch.cat([torch.arange(b) + b, torch.arange(b)]))


# each recipe's loss, written out from its formula
LOSS_FORMS = {
    "0.5 (D(p1, z2) + D(p2, z1))": lambda z1, z2, p1, p2, t1, t2, queue, t: (
        0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))),  # z = the target branch (t for BYOL)
    "L12 + L21": lambda z1, z2, p1, p2, t1, t2, queue, t: info_nce(z1, t2, queue, t) + info_nce(z2, t1, queue, t),
    "NT-Xent, mean over the 2B views": lambda z1, z2, p1, p2, t1, t2, queue, t: nt_xent(z1, z2, t),
}
# the loss forms whose constants come from the recipe (Barlow Twins' lambda and scale, VICReg's three weights)
RECIPE_LOSS_FORMS = {
    "scale (sum_i (1 - C_ii)^2 + lambda sum_i!=j C_ij^2)": lambda z1, z2, r: barlow_twins(
        z1, z2, r.off_diagonal_weight, r.correlation_scale),
    "25 I + 25 V + 1 C": lambda z1, z2, r: vicreg(z1, z2, (r.invariance_weight, r.variance_weight,
                                                             r.covariance_weight)),
}


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_recipe_loss_is_what_the_objective_computes(recipe, framework):
    r = resolve_recipe(recipe, framework)
    z1, z2, p1, p2, t1, t2 = tensors(6)
    queue = F.normalize(tensors(1, seed=1)[0], dim=1)
    if framework == "simsiam":
        t1, t2 = z1, z2  # SimSiam's targets are the other view's projections
    if r.loss in RECIPE_LOSS_FORMS:
        expected = RECIPE_LOSS_FORMS[r.loss](z1, z2, r)
        config = NASiamConfig(framework=framework, **r.method_values())
        assert config.loss_constants()  # the recipe's constants, under the loss function's names
    else:
        expected = LOSS_FORMS[r.loss](z1, z2, p1, p2, t1, t2, queue, r.temperature)
        config = None
    constants = config.loss_constants() if config is not None else {}
    got = siamese_loss(framework, z1, z2, p1=p1, p2=p2, t1=t1, t2=t2, queue=queue, temperature=r.temperature,
                       **constants)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_resolve_recipe_rejects_unknown_names_and_scales_lr():
    with pytest.raises(ValueError, match="unknown recipe 'cifar100'; allowed recipes: \\['cifar', 'imagenet'\\]"):
        resolve_recipe("cifar100", "simsiam")
    with pytest.raises(ValueError, match="unknown framework 'dino' for recipe 'cifar'"):
        resolve_recipe("cifar", "dino")
    moco = resolve_recipe("cifar", "mocov2")
    assert moco.scaled_lr(512) == pytest.approx(0.06)  # the MoCo demo's rate at batch 512
    assert moco.method_values() == {"temperature": 0.1, "queue_size": 4096, "momentum": 0.99}
    assert resolve_recipe("imagenet", "mocov2").method_values() == {"temperature": 0.2, "queue_size": 65536,
                                                                    "momentum": 0.999}
    assert resolve_recipe("cifar", "simsiam").method_values() == {}
    assert recipe_for_policy("imagenet") == "imagenet" and recipe_for_policy("cifar") == "cifar"


# ----------------------------------------------------------------------------------------------------------------------
# The same table, through the commands' own argument resolution (flags -> frozen arguments -> plan -> optimizer)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_recipe_reaches_the_pretraining_config_and_optimizer(framework, recipe, tmp_path):
    from nasiam_hf import NASiamConfig, NASiamForPreTraining, PretrainCommand
    from nasiam_hf.optimization import build_weight_optimizer, predictor_param_groups
    from nasiam_hf.plans import plan_pretrain

    expected = resolve_recipe(recipe, framework)
    command = PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", str(tmp_path), "--genotype",
                                     f"{framework}-baseline", "--recipe", recipe])
    plan = plan_pretrain(command, policy="cifar", image_size=8, num_processes=2)
    opt = plan.optimization
    assert (opt.recipe, opt.global_batch, opt.per_device_batch) == (recipe, expected.batch_size,
                                                                    expected.batch_size // 2)
    assert (opt.base_lr, opt.weight_decay, opt.epochs, opt.momentum, opt.warmup_epochs) == (
        expected.base_lr, expected.weight_decay, expected.epochs, expected.momentum, expected.warmup_epochs)
    assert opt.lr == pytest.approx(expected.scaled_lr(expected.batch_size))
    assert plan.fix_predictor_lr == expected.fix_predictor_lr
    config = NASiamConfig(**plan.config)
    for key, value in expected.method_values().items():  # temperature, queue, key momentum
        assert getattr(config, key) == value, key
    assert config.key_bn_splits == expected.key_bn_splits
    assert config.zero_init_residual is expected.zero_init_residual
    for key, value in expected.head_values().items():  # Barlow Twins' and VICReg's projector widths
        assert getattr(config, key) == value, key
    # the optimizer over the same heads at a width that builds in a moment (ImageNet's 8192 does not)
    model = NASiamForPreTraining(NASiamConfig(**{**plan.config, **{k: 16 for k in expected.head_values()}}))
    groups, fixed = predictor_param_groups(model.parameters(), model.nasiam.predictor, plan.fix_predictor_lr)
    optimizer, fixed = build_weight_optimizer(opt.optimizer, groups, opt.lr, opt.weight_decay, opt.momentum,
                                              fixed_groups=fixed, trust_coefficient=opt.trust_coefficient,
                                              trust_clip=opt.trust_clip)
    assert type(optimizer).__name__ == {"sgd": "SGD", "lars": "Lars"}[expected.optimizer]
    lars = expected.optimizer == "lars"
    for group in optimizer.param_groups:
        excluded = lars and all(p.ndim == 1 for p in group["params"])
        assert (group["lr"], group["momentum"]) == (opt.lr, expected.momentum)
        assert group["weight_decay"] == (0.0 if excluded else expected.weight_decay)
        if lars:
            assert (group["trust_coeff"], group["trust_clip"]) == (expected.lars_trust_coefficient,
                                                                    expected.lars_trust_clip)
            assert group["always_adapt"] is not excluded
    assert len(optimizer.param_groups) == (1 + bool(fixed)) * (2 if lars else 1)
    assert fixed == ((1,) if expected.fix_predictor_lr else ())


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_recipe_reaches_the_search(framework, recipe, tmp_path):
    from nasiam_hf import NASiamConfig, SearchCommand
    from nasiam_hf.plans import plan_search

    expected = resolve_recipe(recipe, framework)
    block = expected.search
    command = SearchCommand.parse(["--dataset_name", "demo", "--output_dir", str(tmp_path), "--framework", framework,
                                   "--recipe", recipe])
    plan = plan_search(command, policy="cifar", image_size=8, num_processes=1)
    opt = plan.optimization
    assert (opt.global_batch, opt.base_lr, opt.weight_decay, opt.epochs, opt.momentum) == (
        block.batch_size, block.base_lr, block.weight_decay, block.epochs, block.momentum)
    lars = block.optimizer == "lars"
    assert (opt.optimizer, opt.trust_coefficient, opt.trust_clip) == (
        block.optimizer, expected.lars_trust_coefficient if lars else None, expected.lars_trust_clip if lars else None)
    assert {k: plan.config[k] for k in expected.head_values()} == expected.head_values()
    assert (plan.fix_predictor_lr, plan.train_portion) == (block.fix_predictor_lr, block.train_portion)
    assert (plan.arch_optimizer, plan.arch_lr, plan.arch_weight_decay, plan.arch_betas) == (
        block.arch_optimizer, block.arch_lr, block.arch_weight_decay, block.arch_betas)
    config = NASiamConfig(**plan.config)
    for key, value in expected.method_values().items():
        assert getattr(config, key) == value, key


def test_explicit_flags_win_over_the_recipe(tmp_path):
    from nasiam_hf import PretrainCommand
    from nasiam_hf.plans import plan_pretrain

    command = PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", str(tmp_path), "--genotype",
                                     "mocov2-baseline", "--recipe", "imagenet", "--queue_size", "128",
                                     "--base_learning_rate", "0.5", "--per_device_train_batch_size", "16",
                                     "--gradient_accumulation_steps", "4"])
    plan = plan_pretrain(command, policy="imagenet", image_size=8, num_processes=2)
    assert plan.config["queue_size"] == 128 and plan.config["temperature"] == 0.2  # flag, then recipe
    assert plan.optimization.global_batch == 16 * 2 * 4 and plan.optimization.lr == pytest.approx(0.5 * 128 / 256)


@pytest.mark.parametrize("command_name", ["search", "pretrain"])
def test_no_zero_init_residual_starts_the_residual_norms_at_one(command_name, tmp_path):
    from nasiam_hf import NASiamConfig, PretrainCommand, SearchCommand
    from nasiam_hf.backbones import is_last_residual_norm
    from nasiam_hf.modeling_nasiam import NASiamModel
    from nasiam_hf.plans import check_pretrain_flags, check_search_flags, plan_pretrain, plan_search

    cls, check, plan_of = ((SearchCommand, check_search_flags, plan_search) if command_name == "search"
                           else (PretrainCommand, check_pretrain_flags, plan_pretrain))
    base = ["--dataset_name", "demo", "--output_dir", str(tmp_path)]
    for flags, zeroed in (([], True), (["--no_zero_init_residual"], False)):
        command = cls.parse(base + flags)
        config = NASiamConfig(**{**plan_of(command, policy="cifar", image_size=8, num_processes=1).config,
                                 "image_size": 8})
        assert config.zero_init_residual is zeroed
        norms = [m.weight for m in NASiamModel(config).backbone.modules() if is_last_residual_norm(m)]
        assert len(norms) == 8  # ResNet-18: two blocks in each of four stages
        assert all(bool((w == 0).all()) is zeroed and bool((w == 1).all()) is not zeroed for w in norms)
    timm = cls.parse(base + ["--backbone", "timm/resnet18", "--no_zero_init_residual"])
    with pytest.raises(ValueError, match=r"--no_zero_init_residual applies to the torchvision ResNets.*timm/resnet18"):
        check(timm)
