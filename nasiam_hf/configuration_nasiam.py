"""NASiamConfig: one configuration for the backbone, the searched heads and the siamese objective."""

from __future__ import annotations

import copy
import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

try:  # transformers >= 5.20 moved the backbone helpers to the top level
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:  # pragma: no cover - older 5.x
    from transformers.utils.backbone_utils import BackboneConfigMixin

from .backbones import BACKBONES, STAGE_NAMES, backbone_width
from .heads import HeadSpec
from .objectives import FRAMEWORKS
from .presets import PRESETS
from .search_space import resolve_search_space, validate_genotype

# Per-framework defaults (paper and official code). ``projector_output`` is the fixed layer after the searched cell:
# SimSiam's Linear + BN(affine=False), a plain Linear, or none (SimCLR: the cell's last layer is the output).
FRAMEWORK_DEFAULTS: dict[str, dict] = {
    "simsiam": dict(projector_layers=6, predictor_layers=4, projection_dim=2048, predictor_hidden_size=512,
                    projector_output="linear_bn"),
    "byol": dict(projector_layers=6, predictor_layers=4, projection_dim=256, predictor_hidden_size=512,
                 projector_output="linear", momentum=0.99),
    "simclr": dict(projector_layers=6, predictor_layers=0, projection_dim=128, projector_hidden_size=512,
                   projector_output=None, temperature=0.5),
    "mocov2": dict(projector_layers=4, predictor_layers=0, projection_dim=128, projector_output="linear",
                   temperature=0.1, queue_size=4096, momentum=0.99),
}


def check_framework(framework: object) -> str:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; allowed frameworks: {list(FRAMEWORKS)}")
    return framework


def check_preset(name: object) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@strict
class NASiamConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a NASiam model.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (torchvision).
        cifar_stem: 3x3 stride-1 first conv and no max-pool (for 32x32 images), at every depth.
        framework: ``"simsiam"``, ``"simclr"``, ``"mocov2"`` or ``"byol"``.
        projector_genotype / predictor_genotype: one op name per layer (``None``: every layer ``linear_relu``).
            SimCLR and MoCo v2 have no predictor.
        projector_layers / predictor_layers: layer counts (default 6/4; MoCo v2 projector 4; 0 predictor layers for
            SimCLR and MoCo v2). A genotype must have exactly this many ops.
        projector_hidden_size: width of the projector's layers (default: backbone width; SimCLR 512).
        predictor_hidden_size: width of the predictor's inner layers (default 512).
        projection_dim: output width of the projector (SimSiam 2048, BYOL 256, SimCLR and MoCo v2 128).
        search_space: the ops searched over (``"S"``, ``"S_no_pool"``, or e.g. ``"S,linear_mish"``).
        temperature: SimCLR / MoCo v2 softmax temperature. queue_size: MoCo v2 queue length.
        momentum: MoCo v2 key-encoder momentum, BYOL's base EMA momentum (it rises to 1 along a cosine).
        image_size: the training resolution, used by the image processor and the card.
    """

    model_type = "nasiam"

    backbone: str = "resnet18"
    cifar_stem: bool = True
    num_channels: int = 3
    image_size: int = 32
    framework: str = "simsiam"
    projector_layers: int | None = None
    predictor_layers: int | None = None
    projector_genotype: list[str] | None = None
    predictor_genotype: list[str] | None = None
    projector_hidden_size: int | None = None
    predictor_hidden_size: int | None = None
    projection_dim: int | None = None
    search_space: str = "S"
    temperature: float | None = None
    queue_size: int | None = None
    momentum: float | None = None

    def __post_init__(self, **kwargs):
        check_framework(self.framework)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; allowed backbones: {sorted(BACKBONES)}")
        defaults = FRAMEWORK_DEFAULTS[self.framework]
        for key in ("projector_layers", "predictor_layers", "projection_dim", "predictor_hidden_size",
                    "temperature", "queue_size", "momentum"):
            if getattr(self, key) is None and defaults.get(key) is not None:
                setattr(self, key, defaults[key])
        if self.projector_hidden_size is None:
            self.projector_hidden_size = defaults.get("projector_hidden_size") or backbone_width(self.backbone)
        self._validate()
        self.stage_names = list(STAGE_NAMES)
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        resolve_search_space(self.search_space)
        for key in ("image_size", "num_channels", "projection_dim", "projector_hidden_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.projector_layers, int) or self.projector_layers < 1:
            raise ValueError(f"projector_layers must be a positive integer, got {self.projector_layers!r}")
        if self.has_predictor:
            if not isinstance(self.predictor_layers, int) or self.predictor_layers < 1:
                raise ValueError(
                    f"predictor_layers must be a positive integer for {self.framework}, got {self.predictor_layers!r}"
                )
            if not isinstance(self.predictor_hidden_size, int) or self.predictor_hidden_size < 1:
                raise ValueError(
                    f"predictor_hidden_size must be a positive integer, got {self.predictor_hidden_size!r}")
        elif self.predictor_layers or self.predictor_genotype:
            raise ValueError(
                f"framework {self.framework!r} has no predictor; got predictor_layers={self.predictor_layers!r}, "
                f"predictor_genotype={self.predictor_genotype!r} (only simsiam and byol use a predictor)"
            )
        if self.projector_genotype is not None:
            self.projector_genotype = validate_genotype(self.projector_genotype, self.projector_layers, "projector")
        if self.predictor_genotype is not None:
            self.predictor_genotype = validate_genotype(self.predictor_genotype, self.predictor_layers, "predictor")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.momentum is not None and not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.queue_size is not None and (not isinstance(self.queue_size, int) or self.queue_size < 1):
            raise ValueError(f"queue_size must be a positive integer, got {self.queue_size!r}")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "NASiamConfig":
        # transformers only warns on a config of another model type; a NASiam model built from it would be wrong
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"this config.json describes a {model_type!r} model, not a NASiam one (model_type 'nasiam'); "
                "pass a folder saved by nasiam_hf (save_pretrained, or the output_dir of training/search.py or "
                "training/pretrain.py)"
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "NASiamConfig":
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
    def has_predictor(self) -> bool:
        return self.framework in ("simsiam", "byol")

    @property
    def has_momentum_encoder(self) -> bool:
        return self.framework in ("mocov2", "byol")

    @property
    def hidden_size(self) -> int:
        """Width of the pooled backbone features (the ``pooler_output``)."""
        return backbone_width(self.backbone)

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


__all__ = ["NASiamConfig", "FRAMEWORKS", "FRAMEWORK_DEFAULTS"]
