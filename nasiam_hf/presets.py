"""The paper's discovered genotypes, each framework's standard heads, and the training recipes, by name.

Plain data only: :meth:`NASiamConfig.from_preset` reads the genotype tables, the engines :func:`resolve_recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Genotypes found by the paper's authors (their official repository's genotype files), searched on CIFAR.
PAPER_PRESETS: dict[str, dict] = {
    "simsiam-cifar10-resnet18": {
        "framework": "simsiam",
        "backbone": "resnet18",
        "projector_genotype": ["linear_relu", "linear_silu", "linear_elu", "identity", "identity", "linear_relu"],
        "predictor_genotype": ["linear_hardswish", "avg_pool_3x3", "avg_pool_3x3", "linear_hardswish"],
    },
    "simsiam-cifar10-resnet50": {
        "framework": "simsiam",
        "backbone": "resnet50",
        "projector_genotype": [
            "linear_silu", "linear_hardswish", "linear_hardswish", "linear_hardswish", "linear_silu", "linear_silu",
        ],
        "predictor_genotype": ["linear_hardswish", "linear_hardswish", "avg_pool_3x3", "linear_silu"],
    },
    "simsiam-cifar100-resnet50": {
        "framework": "simsiam",
        "backbone": "resnet50",
        "projector_genotype": ["identity", "linear_silu", "linear_silu", "linear_elu", "linear_silu", "linear_elu"],
        "predictor_genotype": ["linear_elu", "linear_elu", "linear_elu", "linear_hardswish"],
    },
    "mocov2-cifar10-resnet18": {
        "framework": "mocov2",
        "backbone": "resnet18",
        "projector_genotype": ["avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3"],
    },
    "mocov2-cifar10-resnet50": {
        "framework": "mocov2",
        "backbone": "resnet50",
        "projector_genotype": ["identity", "avg_pool_3x3", "avg_pool_3x3", "avg_pool_3x3"],
    },
    "simclr-cifar10-resnet50": {
        "framework": "simclr",
        "backbone": "resnet50",
        "projector_genotype": [
            "linear_hardswish", "linear_hardswish", "avg_pool_3x3", "linear_relu", "linear_relu", "linear_relu",
        ],
    },
}

# Each framework's standard heads, written as genotypes of the same head code (backbone left to the caller).
BASELINE_PRESETS: dict[str, dict] = {
    # SimSiam (CIFAR variant): 2-layer projector at backbone width + Linear/BN(affine=False) to 2048;
    # predictor 2048 -> 512 -> 2048.
    "simsiam-baseline": {
        "framework": "simsiam",
        "projector_layers": 2,
        "projector_genotype": ["linear_relu", "linear_relu"],
        "predictor_layers": 2,
        "predictor_genotype": ["linear_relu", "linear_relu"],
    },
    # SimCLR: 2048-2048-128 MLP with BN (SimCLR v2 style), no BN or ReLU on the output.
    "simclr-baseline": {
        "framework": "simclr",
        "projector_layers": 3,
        "projector_hidden_size": 2048,
        "projector_genotype": ["linear_relu", "linear_relu", "linear_relu"],
    },
    # MoCo v2: Linear + ReLU at backbone width, then Linear to 128 (BN added, as in our linear op).
    "mocov2-baseline": {
        "framework": "mocov2",
        "projector_layers": 1,
        "projector_genotype": ["linear_relu"],
    },
    # BYOL: projector and predictor Linear(4096) + BN + ReLU + Linear(256).
    "byol-baseline": {
        "framework": "byol",
        "projector_layers": 1,
        "projector_hidden_size": 4096,
        "projector_genotype": ["linear_relu"],
        "predictor_layers": 2,
        "predictor_hidden_size": 4096,
        "predictor_genotype": ["linear_relu", "linear_relu"],
    },
    # Barlow Twins' projector and VICReg's expander: Linear + BN + ReLU twice, then a Linear (no bias), all at one
    # width: the recipe's (2048 on CIFAR, 8192 on ImageNet), or --projector_hidden_size / --projection_dim.
    "barlowtwins-baseline": {
        "framework": "barlowtwins",
        "projector_layers": 2,
        "projector_genotype": ["linear_relu", "linear_relu"],
    },
    "vicreg-baseline": {
        "framework": "vicreg",
        "projector_layers": 2,
        "projector_genotype": ["linear_relu", "linear_relu"],
    },
}

PRESETS: dict[str, dict] = {**PAPER_PRESETS, **BASELINE_PRESETS}

# ---------------------------------------------------------------------------------------------------------------------
# Training recipes: every value a run takes from ``--recipe``, per framework. docs/recipes.md sets each one beside the
# paper's and the authors' code's and says why where they differ; tests/test_recipes.py checks the two agree.
# ---------------------------------------------------------------------------------------------------------------------

RECIPE_NAMES = ("cifar", "imagenet")
WEIGHT_OPTIMIZERS = ("sgd", "lars")
ARCH_OPTIMIZERS = ("adamw", "adam")
KEY_MOMENTUM_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class SearchRecipe:
    """The bilevel search: ``optimizer`` (SGD or LARS, with the recipe's LARS settings) on the weights (``base_lr``
    per 256 images, scaled by the global batch), an Adam-type optimizer on the alphas at the absolute ``arch_lr``, the
    training split cut into a weight half and an alpha half (``train_portion``)."""

    optimizer: str
    epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    momentum: float
    fix_predictor_lr: bool
    arch_optimizer: str
    arch_lr: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    train_portion: float


@dataclass(frozen=True)
class ProbeRecipe:
    """The linear probe on frozen features: SGD at ``base_lr`` per 256 images of the global batch."""

    epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    momentum: float
    feature_norm: str


@dataclass(frozen=True)
class Recipe:
    """Everything one ``--recipe`` fixes for one framework; ``resolve_recipe`` returns it.

    ``base_lr`` is the rate per 256 images; the run uses ``scaled_lr(global batch)`` (``lr_scaling`` "linear":
    ``base_lr x global batch / 256``), unless ``--learning_rate`` gives the rate itself. ``batch_size`` is the
    global batch. ``optimizer`` is "sgd" or "lars" (``timm.optim.Lars`` with ``lars_trust_coefficient`` and, when
    ``lars_trust_clip``, LARC's clipping; biases and norm parameters excluded from adaptation and weight decay).
    ``key_momentum`` is MoCo v2's key-encoder momentum or BYOL's base EMA rate (``key_momentum_schedule`` "cosine":
    it rises to 1). ``loss`` names the form :mod:`~nasiam_hf.objectives` computes. ``key_bn_splits`` is the number of
    BatchNorm groups MoCo v2's key batch is cut into (:func:`~nasiam_hf.objectives.shuffled_key_encode`); ``None``
    where there is no key encoder. ``projector_width`` (Barlow Twins, VICReg) is the width of every projector layer
    and of the embedding, where the genotype does not fix them; ``off_diagonal_weight`` and ``correlation_scale`` are
    Barlow Twins' constants, ``invariance_weight`` / ``variance_weight`` / ``covariance_weight`` VICReg's.
    """

    name: str
    framework: str
    image_size: int
    cifar_stem: bool
    epochs: int
    batch_size: int
    base_lr: float
    lr_scaling: str
    weight_decay: float
    momentum: float
    optimizer: str
    lars_trust_coefficient: float | None
    lars_trust_clip: bool | None
    warmup_epochs: int
    temperature: float | None
    queue_size: int | None
    key_momentum: float | None
    key_momentum_schedule: str | None
    loss: str
    key_bn_splits: int | None
    zero_init_residual: bool
    fix_predictor_lr: bool
    projector_width: int | None
    off_diagonal_weight: float | None
    correlation_scale: float | None
    invariance_weight: float | None
    variance_weight: float | None
    covariance_weight: float | None
    search: SearchRecipe
    probe: ProbeRecipe

    def scaled_lr(self, global_batch: int) -> float:
        """The pretraining learning rate for ``global_batch`` images per step."""
        return self.base_lr * global_batch / 256

    def method_values(self) -> dict[str, float | int]:
        """The framework constants the recipe sets, under their NASiamConfig names (temperature, queue_size,
        momentum, the Barlow Twins and VICReg loss constants); those a framework does not use are left out."""
        values = {"temperature": self.temperature, "queue_size": self.queue_size, "momentum": self.key_momentum,
                  "off_diagonal_weight": self.off_diagonal_weight, "correlation_scale": self.correlation_scale,
                  "invariance_weight": self.invariance_weight, "variance_weight": self.variance_weight,
                  "covariance_weight": self.covariance_weight}
        return {key: value for key, value in values.items() if value is not None}

    def head_values(self) -> dict[str, int]:
        """The projector widths the recipe sets (Barlow Twins, VICReg), under their NASiamConfig names; a genotype
        that fixes its own widths (a search output) keeps them."""
        if self.projector_width is None:
            return {}
        return {"projector_hidden_size": self.projector_width, "projection_dim": self.projector_width}


_CIFAR_SEARCH = SearchRecipe(optimizer="sgd", epochs=100, batch_size=512, base_lr=0.06, weight_decay=5e-4,
                             momentum=0.9,
                             fix_predictor_lr=False, arch_optimizer="adamw", arch_lr=1e-3, arch_betas=(0.9, 0.999),
                             arch_weight_decay=1e-3, train_portion=0.5)
_PROBE = ProbeRecipe(epochs=100, batch_size=256, base_lr=0.03, weight_decay=0.0, momentum=0.9,
                     feature_norm="batchnorm")
_CIFAR = dict(name="cifar", image_size=32, cifar_stem=True, epochs=800, batch_size=512, base_lr=0.06,
              lr_scaling="linear", weight_decay=5e-4, momentum=0.9, optimizer="sgd", lars_trust_coefficient=None,
              lars_trust_clip=None, warmup_epochs=0, temperature=None, queue_size=None, key_momentum=None,
              key_momentum_schedule=None, key_bn_splits=None, zero_init_residual=True, fix_predictor_lr=False,
              projector_width=None, off_diagonal_weight=None, correlation_scale=None, invariance_weight=None,
              variance_weight=None, covariance_weight=None, search=_CIFAR_SEARCH, probe=_PROBE)
_IMAGENET = dict(_CIFAR, name="imagenet", image_size=224, cifar_stem=False, epochs=100, base_lr=0.05,
                 weight_decay=1e-4, search=replace(_CIFAR_SEARCH, base_lr=0.05, weight_decay=1e-4))

_SIAMESE_LOSS = "0.5 (D(p1, z2) + D(p2, z1))"  # D = negative cosine, targets stop-gradient: the loss lies in [-1, 1]
_MOCO_LOSS = "L12 + L21"  # InfoNCE of each view's query against the other view's key, summed (not averaged)
_NT_XENT = "NT-Xent, mean over the 2B views"
# C: the cross-correlation of the batch-standardised embeddings over the global batch
_BARLOW_LOSS = "scale (sum_i (1 - C_ii)^2 + lambda sum_i!=j C_ij^2)"
# I: MSE of the two views' embeddings; V: mean hinge on each feature's std, averaged over the views; C: squared
# off-diagonal covariances / dimension, summed over the views (V and C over the global batch)
_VICREG_LOSS = "25 I + 25 V + 1 C"


def _simsiam(base: dict) -> dict:
    return dict(base, framework="simsiam", loss=_SIAMESE_LOSS, fix_predictor_lr=True,
                search=replace(base["search"], fix_predictor_lr=True))


def _simclr(base: dict, temperature: float, **changes) -> dict:
    return dict(base, framework="simclr", loss=_NT_XENT, temperature=temperature, **changes)


def _mocov2(base: dict, **changes) -> dict:
    values = dict(base, framework="mocov2", loss=_MOCO_LOSS, key_momentum_schedule="constant", key_bn_splits=8,
                  **changes)
    # the search steps the weights as pretraining does, and the alphas with Adam(3e-4) as the authors' MoCo search
    values["search"] = replace(values["search"], base_lr=values["base_lr"], batch_size=values["batch_size"],
                               arch_optimizer="adam", arch_lr=3e-4)
    return values


def _byol(base: dict, **changes) -> dict:
    return dict(base, framework="byol", loss=_SIAMESE_LOSS, key_momentum_schedule="cosine", **changes)


def _lars(base: dict, *, trust_coefficient: float, trust_clip: bool, **changes) -> dict:
    """LARS for pretraining and for the search's weights, which step as pretraining does (batch, lr, weight decay);
    the alphas keep the base's Adam-type optimizer."""
    values = dict(base, optimizer="lars", lars_trust_coefficient=trust_coefficient, lars_trust_clip=trust_clip,
                  **changes)
    values["search"] = replace(values["search"], optimizer="lars", base_lr=values["base_lr"],
                               batch_size=values["batch_size"], weight_decay=values["weight_decay"])
    return values


def _barlowtwins(base: dict, **changes) -> dict:
    return _lars(base, framework="barlowtwins", loss=_BARLOW_LOSS, off_diagonal_weight=5e-3, **changes)


def _vicreg(base: dict, **changes) -> dict:
    return _lars(base, framework="vicreg", loss=_VICREG_LOSS, invariance_weight=25.0, variance_weight=25.0,
                 covariance_weight=1.0, **changes)


# solo-learn's CIFAR configs of both methods (scripts/pretrain/cifar/barlow.yaml, vicreg.yaml): LARS at 0.3 per 256
# images, batch 256, weight decay 1e-4, trust coefficient 0.02 with clipping, 10 warm-up epochs, 1000 epochs,
# 2048-wide projectors. The references' ImageNet runs: LARS at 0.2 per 256, batch 2048, trust coefficient 0.001,
# 10 warm-up epochs, 1000 epochs, 8192-wide projectors.
_CIFAR_REDUNDANCY = dict(epochs=1000, batch_size=256, base_lr=0.3, weight_decay=1e-4, warmup_epochs=10,
                         trust_coefficient=0.02, trust_clip=True, projector_width=2048)
_IMAGENET_REDUNDANCY = dict(epochs=1000, batch_size=2048, base_lr=0.2, warmup_epochs=10, trust_coefficient=0.001,
                            trust_clip=False, projector_width=8192)


RECIPE_TABLE: dict[str, dict[str, Recipe]] = {
    name: {values["framework"]: Recipe(**values) for values in table}
    for name, table in {
        "cifar": [
            _simsiam(_CIFAR),
            _simclr(_CIFAR, temperature=0.5),
            _mocov2(_CIFAR, base_lr=0.03, temperature=0.1, queue_size=4096, key_momentum=0.99),
            _byol(_CIFAR, base_lr=0.12, key_momentum=0.99),
            _barlowtwins(_CIFAR, correlation_scale=0.1, **_CIFAR_REDUNDANCY),
            _vicreg(_CIFAR, **_CIFAR_REDUNDANCY),
        ],
        "imagenet": [
            _simsiam(_IMAGENET),
            _simclr(_IMAGENET, temperature=0.1, warmup_epochs=10),
            _mocov2(_IMAGENET, base_lr=0.03, batch_size=256, temperature=0.2, queue_size=65536, key_momentum=0.999),
            _byol(_IMAGENET, key_momentum=0.996, warmup_epochs=10),
            _barlowtwins(_IMAGENET, weight_decay=1.5e-6, correlation_scale=0.024, **_IMAGENET_REDUNDANCY),
            _vicreg(_IMAGENET, weight_decay=1e-6, **_IMAGENET_REDUNDANCY),
        ],
    }.items()
}


def resolve_recipe(recipe: str, framework: str) -> Recipe:
    """The recipe ``recipe`` ("cifar" or "imagenet") for ``framework``; a ValueError names a bad value."""
    if recipe not in RECIPE_TABLE:
        raise ValueError(f"unknown recipe {recipe!r}; allowed recipes: {list(RECIPE_NAMES)}")
    table = RECIPE_TABLE[recipe]
    if framework not in table:
        raise ValueError(f"unknown framework {framework!r} for recipe {recipe!r}; allowed frameworks: {list(table)}")
    return table[framework]


def recipe_for_policy(policy: str) -> str:
    """The recipe a dataset's augmentation policy implies when ``--recipe`` is not given."""
    return "imagenet" if policy == "imagenet" else "cifar"
