"""NASiamConfig: one configuration for the backbone, the searched heads and the siamese objective.

A strict v5 config: field types are checked on construction and on assignment (no ``from __future__ import
annotations`` here, which would turn the types into strings the checks skip), the cross-field checks are the
``validate_*`` methods that ``config.validate()`` (and ``save_pretrained``) runs, and every error is a
:class:`NASiamConfigError` (a ``ValueError``) naming the field.
"""

import copy
import functools
import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

try:  # recent transformers declare sub-configs with a spec
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - 5.17 (the GPU machine's) and earlier: a plain class mapping
    SubConfigSpec = None

from .backbone_specs import (
    TORCHVISION,
    BackboneInfo,
    backbone_kind,
    check_timm_kwargs,
    describe_backbone,
    required_packages,
    transformers_config_from_dict,
    with_all_stages,
)
from .fileio import publish_problem
from .heads import HeadSpec
from . import objectives
from .objectives import FRAMEWORKS
from .presets import PRESETS
from .search_space import resolve_search_space, validate_genotype

# Per-framework defaults (paper and official code). ``projector_output`` is the fixed layer after the searched cell:
# SimSiam's Linear + BN(affine=False), a plain Linear, a Linear without bias (Barlow Twins, VICReg: their embeddings
# are standardised or centred, which cancels a bias), or none (SimCLR: the cell's last layer is the output).
FRAMEWORK_DEFAULTS: dict[str, dict] = {
    "simsiam": dict(projector_layers=6, predictor_layers=4, projection_dim=2048, predictor_hidden_size=512,
                    projector_output="linear_bn"),
    "byol": dict(projector_layers=6, predictor_layers=4, projection_dim=256, predictor_hidden_size=512,
                 projector_output="linear", momentum=0.99),
    "simclr": dict(projector_layers=6, predictor_layers=0, projection_dim=128, projector_hidden_size=512,
                   projector_output=None, temperature=0.5),
    "mocov2": dict(projector_layers=4, predictor_layers=0, projection_dim=128, projector_output="linear",
                   temperature=0.1, queue_size=4096, momentum=0.99),
    # Barlow Twins and VICReg: the searched cell runs at the projector's hidden width (its first layer widens from
    # the backbone's), then a fixed Linear to the embedding; their standard 3-layer projector is 2 linear_relu layers
    # + that Linear. Widths: 2048 (the CIFAR recipes'; ImageNet's are 8192, set by the imagenet recipe).
    "barlowtwins": dict(projector_layers=4, predictor_layers=0, projection_dim=2048, projector_hidden_size=2048,
                        projector_output="linear_no_bias", off_diagonal_weight=objectives.OFF_DIAGONAL_WEIGHT,
                        correlation_scale=objectives.CORRELATION_SCALE),
    "vicreg": dict(projector_layers=4, predictor_layers=0, projection_dim=2048, projector_hidden_size=2048,
                   projector_output="linear_no_bias", invariance_weight=objectives.INVARIANCE_WEIGHT,
                   variance_weight=objectives.VARIANCE_WEIGHT, covariance_weight=objectives.COVARIANCE_WEIGHT,
                   variance_target=objectives.VARIANCE_TARGET, variance_eps=objectives.VARIANCE_EPS),
}
# The constants of each framework's loss: config field -> keyword of its loss function in nasiam_hf.objectives.
LOSS_CONSTANTS: dict[str, dict[str, str]] = {
    "barlowtwins": {"off_diagonal_weight": "off_diagonal_weight", "correlation_scale": "scale"},
    "vicreg": {"invariance_weight": "invariance_weight", "variance_weight": "variance_weight",
               "covariance_weight": "covariance_weight", "variance_target": "variance_target",
               "variance_eps": "eps"},
}
# Values derived from the backbone and written to config.json for its readers; recomputed on load.
DERIVED_KEYS = ("stage_names", "backbone_requires")


class NASiamConfigError(ValueError):
    """A wrong NASiamConfig value; the message names the field."""


def check_framework(framework: object) -> str:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; allowed frameworks: {list(FRAMEWORKS)}")
    return framework


def check_preset(name: object) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _positive_int(config: "NASiamConfig", key: str, why: str = "") -> None:
    value = getattr(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer{why}, got {value!r}")


def _type_text(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("NoneType", "None")


def raise_value_errors(cls):
    """Turn the strict-dataclass errors (which derive from ``Exception`` only) into :class:`NASiamConfigError`s
    naming the field, on construction and assignment (type checks) and in ``validate()`` (cross-field checks)."""
    strict_init, strict_setattr, strict_validate = cls.__init__, cls.__setattr__, cls.validate

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassError as error:  # pragma: no cover - setattr and validate already convert theirs
            raise NASiamConfigError(f"{cls.__name__}: {error.__cause__ or error}") from error

    @functools.wraps(strict_setattr)
    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassError as error:
            expected = _type_text(cls.__dataclass_fields__[name].type)
            raise NASiamConfigError(
                f"{cls.__name__}.{name} must be {expected}, got {value!r} ({type(value).__name__})"
            ) from error

    @functools.wraps(strict_validate)
    def validate(self):
        try:
            strict_validate(self)
        except StrictDataclassError as error:
            raise NASiamConfigError(str(error.__cause__ or error)) from error

    validate.__is_defined_by_strict_decorator__ = True  # a subclass may be decorated with @strict again
    cls.__init__, cls.__setattr__, cls.validate = __init__, __setattr__, validate
    return cls


@raise_value_errors
@strict
class NASiamConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a NASiam model.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (torchvision, the default ResNet-18),
            ``"timm/<model name>"`` (any timm model, a pretrained tag allowed), or, with ``backbone_config``, the
            folder or Hub id a transformers backbone was read from (see
            :func:`nasiam_hf.backbones.backbone_config_values`).
        backbone_kwargs: keyword arguments of ``timm.create_model`` (e.g. ``{"img_size": 32, "patch_size": 4}``),
            stored so that a saved folder rebuilds the same model. timm backbones only.
        backbone_config: a transformers backbone config (ConvNeXt, DINOv2, Swin, ResNet...) that AutoBackbone builds;
            its ``out_features`` are set to all its stages. ``stage_names`` (and so ``out_features``) follow the
            backbone: ``stem, stage1 ... stage4`` for torchvision ResNets, timm's feature_info names for timm
            models, the sub-config's for transformers backbones.
        cifar_stem: 3x3 stride-1 first conv and no max-pool (for 32x32 images), at every depth; torchvision ResNets
            only (default True there).
        zero_init_residual: start the last BatchNorm of every residual block at zero (torchvision ResNets; timm's
            ResNets do it themselves), as torchvision's ``zero_init_residual=True`` and the SimSiam reference do.
        framework: ``"simsiam"``, ``"simclr"``, ``"mocov2"``, ``"byol"``, ``"barlowtwins"`` or ``"vicreg"``.
        projector_genotype / predictor_genotype: one op name per layer (``None``: every layer ``linear_relu``).
            SimCLR, MoCo v2, Barlow Twins and VICReg have no predictor.
        projector_layers / predictor_layers: layer counts (default 6/4; MoCo v2, Barlow Twins and VICReg projector 4;
            0 predictor layers for the frameworks without one). A genotype must have exactly this many ops.
        projector_hidden_size: width of the projector's layers (default: backbone width; SimCLR 512; Barlow Twins
            and VICReg 2048).
        predictor_hidden_size: width of the predictor's inner layers (default 512).
        projection_dim: output width of the projector (SimSiam 2048, BYOL 256, SimCLR and MoCo v2 128, Barlow Twins
            and VICReg 2048).
        search_space: the ops searched over (``"S"``, ``"S_no_pool"``, or e.g. ``"S,linear_mish"``).
        temperature: SimCLR / MoCo v2 softmax temperature. queue_size: MoCo v2 queue length.
        momentum: MoCo v2 key-encoder momentum, BYOL's base EMA momentum (it rises to 1 along a cosine).
        key_bn_splits: MoCo v2: the key batch is shuffled and cut into this many BatchNorm groups (Shuffle-BN /
            SplitBatchNorm, :func:`nasiam_hf.objectives.shuffled_key_encode`); None: one group, as the query's.
        off_diagonal_weight: Barlow Twins' lambda, the weight of the off-diagonal cross-correlations (5e-3).
        correlation_scale: a constant factor on the Barlow Twins loss (1; solo-learn's CIFAR recipe 0.1).
        invariance_weight / variance_weight / covariance_weight: VICReg's coefficients (25 / 25 / 1).
        variance_target / variance_eps: VICReg's hinge on each feature's standard deviation (1) and the eps under
            its square root (1e-4).
        image_size: the training resolution, used by the image processor and the card.
    """

    model_type = "nasiam"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="convnext", optional=True),
        }
    else:  # pragma: no cover - transformers without SubConfigSpec
        sub_configs = {"backbone_config": AutoConfig}

    backbone: str | None = None
    backbone_kwargs: dict | None = None
    backbone_config: dict | PreTrainedConfig | None = None
    cifar_stem: bool | None = None
    zero_init_residual: bool = True
    num_channels: int = 3
    image_size: int = 32
    framework: str = "simsiam"
    projector_layers: int | None = None
    predictor_layers: int | None = None
    projector_genotype: list[str] | tuple[str, ...] | None = None
    predictor_genotype: list[str] | tuple[str, ...] | None = None
    projector_hidden_size: int | None = None
    predictor_hidden_size: int | None = None
    projection_dim: int | None = None
    search_space: str = "S"
    temperature: float | int | None = None
    queue_size: int | None = None
    momentum: float | int | None = None
    key_bn_splits: int | None = None
    off_diagonal_weight: float | int | None = None
    correlation_scale: float | int | None = None
    invariance_weight: float | int | None = None
    variance_weight: float | int | None = None
    covariance_weight: float | int | None = None
    variance_target: float | int | None = None
    variance_eps: float | int | None = None

    def __post_init__(self, **kwargs):
        for key in DERIVED_KEYS:
            kwargs.pop(key, None)
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        if isinstance(self.backbone_config, dict):  # config.json holds the sub-config as a dict
            self.backbone_config = transformers_config_from_dict(self.backbone_config)
        super().__post_init__(**kwargs)
        # The checks the defaults depend on run first; strict runs every validator again once this returns.
        self.validate_framework()
        self.validate_backbone()
        if self.backbone_config is not None:
            self.backbone_config = with_all_stages(self.backbone_config)
        if self.backbone is None:
            self.backbone = "resnet18" if self.backbone_config is None else self.backbone_config.model_type
        if self.backbone_kind == TORCHVISION and self.cifar_stem is None:
            self.cifar_stem = True
        for key in ("projector_genotype", "predictor_genotype"):
            if isinstance(getattr(self, key), tuple):
                setattr(self, key, list(getattr(self, key)))
        defaults = FRAMEWORK_DEFAULTS[self.framework]
        for key in ("projector_layers", "predictor_layers", "projection_dim", "predictor_hidden_size",
                    "temperature", "queue_size", "momentum", *LOSS_CONSTANTS.get(self.framework, {})):
            if getattr(self, key) is None and defaults.get(key) is not None:
                setattr(self, key, defaults[key])
        if self.projector_hidden_size is None:
            self.projector_hidden_size = defaults.get("projector_hidden_size") or self.hidden_size
        self.stage_names = list(self.backbone_info.stage_names)
        self.backbone_requires = required_packages(self.backbone_kind)
        self.set_output_features_output_indices(out_indices=out_indices, out_features=out_features)

    # -- validators (run by validate(), on construction and before every save) ------------------------------------
    def validate_framework(self) -> None:
        check_framework(self.framework)

    def validate_backbone(self) -> None:
        kind = backbone_kind(self.backbone, self.backbone_config)
        if kind != TORCHVISION and self.cifar_stem:
            raise ValueError(f"cifar_stem applies to torchvision ResNets only; backbone {self.backbone!r} is a {kind} "
                             "backbone (leave cifar_stem unset)")
        if self.backbone_kwargs is not None:
            if kind != "timm":
                raise ValueError(f"backbone_kwargs apply to timm backbones only (a transformers backbone keeps its "
                                 f"values in backbone_config); backbone {self.backbone!r} is a {kind} backbone")
            check_timm_kwargs(self.backbone_kwargs)
        _positive_int(self, "num_channels")
        if kind == "transformers":
            sub_channels = getattr(self.backbone_config, "num_channels", self.num_channels)
            if sub_channels != self.num_channels:
                raise ValueError(f"num_channels is {self.num_channels} but backbone_config.num_channels is "
                                 f"{sub_channels}; set them equal")
        describe_backbone(self.backbone, self.backbone_kwargs, self.backbone_config, self.num_channels)

    def validate_stage_names(self) -> None:
        stages = list(self.backbone_info.stage_names)
        if getattr(self, "stage_names", stages) != stages:
            raise ValueError(f"stage_names {self.stage_names} are not those of backbone {self.backbone!r} ({stages}): "
                             "the backbone changed after the config was built; build a new config")

    def validate_sizes(self) -> None:
        resolve_search_space(self.search_space)
        for key in ("image_size", "projection_dim", "projector_hidden_size", "projector_layers"):
            _positive_int(self, key)

    def validate_heads(self) -> None:
        if self.has_predictor:
            _positive_int(self, "predictor_layers", f" for {self.framework}")
            _positive_int(self, "predictor_hidden_size")
        elif self.predictor_layers or self.predictor_genotype:
            raise ValueError(
                f"framework {self.framework!r} has no predictor; got predictor_layers={self.predictor_layers!r}, "
                f"predictor_genotype={self.predictor_genotype!r} (only simsiam and byol use a predictor)"
            )
        if self.projector_genotype is not None:
            validate_genotype(self.projector_genotype, self.projector_layers, "projector")
        if self.predictor_genotype is not None:
            validate_genotype(self.predictor_genotype, self.predictor_layers, "predictor")

    def validate_method_constants(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.momentum is not None and not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.queue_size is not None:
            _positive_int(self, "queue_size")
        if self.key_bn_splits is not None:
            if self.framework != "mocov2":
                raise ValueError(f"key_bn_splits applies to mocov2 only, not to framework {self.framework!r}")
            _positive_int(self, "key_bn_splits")
        for framework, keys in LOSS_CONSTANTS.items():
            for key in keys:
                value = getattr(self, key)
                if value is None:
                    continue
                if self.framework != framework:
                    raise ValueError(f"{key} applies to {framework} only, not to framework {self.framework!r}")
                strict = key in ("correlation_scale", "variance_target", "variance_eps")
                if isinstance(value, bool) or not math.isfinite(value) or (value <= 0 if strict else value < 0):
                    raise ValueError(f"{key} must be a {'positive' if strict else 'non-negative'} finite number, "
                                     f"got {value!r}")

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "NASiamConfig":
        # transformers only warns on a config of another model type; a NASiam model built from it would be wrong
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"this config.json describes a {model_type!r} model, not a NASiam one (model_type 'nasiam'); "
                "pass a folder saved by nasiam_hf (save_pretrained, or the output_dir of nasiam-search or "
                "nasiam-pretrain)"
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "NASiamConfig":
        problem = publish_problem(pretrained_model_name_or_path)
        if problem:
            raise OSError(problem)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ValueError as error:
            if "not a NASiam one" in str(error):
                raise ValueError(f"{str(pretrained_model_name_or_path)!r}: {error}") from None
            raise

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NASiamConfig":
        """A config from a paper genotype (``"simsiam-cifar10-resnet18"``) or standard heads (``"byol-baseline"``)."""
        values = check_preset(name)
        values.update(overrides)
        return cls(**values)

    # -- derived quantities -------------------------------------------------------------------------------------
    @property
    def backbone_kind(self) -> str:
        """``"torchvision"``, ``"timm"`` or ``"transformers"``."""
        return backbone_kind(self.backbone, self.backbone_config)

    @property
    def backbone_info(self) -> BackboneInfo:
        return describe_backbone(self.backbone, self.backbone_kwargs, self.backbone_config, self.num_channels)

    @property
    def has_predictor(self) -> bool:
        return self.framework in ("simsiam", "byol")

    @property
    def has_momentum_encoder(self) -> bool:
        return self.framework in ("mocov2", "byol")

    def loss_constants(self) -> dict[str, float]:
        """The keyword arguments of this framework's loss in :mod:`nasiam_hf.objectives` (Barlow Twins, VICReg; empty
        for the others, whose constants are the temperature, queue and momentum)."""
        return {argument: getattr(self, key) for key, argument in LOSS_CONSTANTS.get(self.framework, {}).items()}

    @property
    def hidden_size(self) -> int:
        """Width of the pooled backbone features (the ``pooler_output``)."""
        return self.backbone_info.hidden_size

    @property
    def search_ops(self) -> tuple[str, ...]:
        return resolve_search_space(self.search_space)

    def head_spec(self, cell: str) -> HeadSpec:
        """Widths and output layer of the ``"projector"`` or ``"predictor"`` cell."""
        if cell == "projector":
            n, hidden, out = self.projector_layers, self.projector_hidden_size, self.projection_dim
            output = FRAMEWORK_DEFAULTS[self.framework]["projector_output"]
            if output is None:
                return HeadSpec(widths=(self.hidden_size, *[hidden] * (n - 1), out), output_last=True)
            return HeadSpec(widths=(self.hidden_size, *[hidden] * n), output=output, output_dim=out)
        if cell == "predictor" and self.has_predictor:
            m, hidden, out = self.predictor_layers, self.predictor_hidden_size, self.projection_dim
            return HeadSpec(widths=(out, *[hidden] * (m - 1), out), output_last=True)
        raise ValueError(f"no {cell!r} cell for framework {self.framework!r}")

    def genotype(self, cell: str) -> list[str]:
        """The cell's genotype, ``linear_relu`` in every layer when none was given."""
        spec = self.head_spec(cell)
        given = self.projector_genotype if cell == "projector" else self.predictor_genotype
        return list(given) if given is not None else ["linear_relu"] * spec.num_layers

    @property
    def collapse_floor(self) -> float:
        """The collapse statistic of well-spread outputs, ``1/sqrt(projection_dim)``."""
        return 1.0 / math.sqrt(self.projection_dim)


__all__ = ["NASiamConfig", "NASiamConfigError", "FRAMEWORKS", "FRAMEWORK_DEFAULTS", "LOSS_CONSTANTS"]
