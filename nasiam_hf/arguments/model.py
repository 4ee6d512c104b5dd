"""What is trained: the backbone, the objective's constants, the search, the pretraining, the kNN monitor, and the
model that fine-tuning and linear evaluation start from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .fields import DISCRETIZATIONS, FRAMEWORK_CHOICES, RECIPE_CHOICES, SEARCH_METHODS, _json_object, _positive, flag, \
    parse_every


@dataclass(frozen=True)
class BackboneArguments:
    """The backbone of the searched or pretrained model and its starting point."""

    _argument_group_name: ClassVar[str] = "backbone"

    backbone: str = flag(
        "resnet18", "resnet18|resnet34|resnet50 (torchvision), 'timm/<model name>' (any timm architecture, e.g. "
                    "timm/vit_tiny_patch16_224), or a folder / Hub id of a transformers backbone config "
                    "(ConvNeXt, DINOv2, Swin, ...).")
    backbone_kwargs: str | None = flag(
        None, "JSON object of timm.create_model keyword arguments, e.g. '{\"img_size\": 32, \"patch_size\": 4}'.")
    backbone_weights: str | None = flag(
        None, "Start the backbone from existing weights: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), "
              "'timm' (timm's pretrained weights of the named tag, from the Hub), or a local .safetensors file or "
              "model folder.")
    no_zero_init_residual: bool = flag(
        False, "torchvision ResNets: start the last BatchNorm of every residual block at 1 instead of 0 (the "
               "reference recipes zero it; zeroed, a ResNet-18 learns more slowly in its first epochs).")

    def __post_init__(self):
        _json_object("backbone_kwargs", self.backbone_kwargs)

    @property
    def kwargs(self) -> dict | None:
        """``--backbone_kwargs`` as a dict."""
        return _json_object("backbone_kwargs", self.backbone_kwargs)


@dataclass(frozen=True)
class PretrainBackboneArguments(BackboneArguments):
    """Pretraining takes its backbone from the genotype unless told otherwise."""

    backbone: str | None = flag(
        None, "Override the genotype's backbone (the paper transfers CIFAR genotypes to ImageNet): same values as "
              "for nasiam-search.")


@dataclass(frozen=True)
class ObjectiveArguments:
    """Constants of the siamese objective and the projector's widths; unset values come from the recipe and the
    framework (or, for the widths, the genotype)."""

    _argument_group_name: ClassVar[str] = "objective"

    temperature: float | None = flag(None, "SimCLR / MoCo v2 softmax temperature (default: recipe; 0.5 / 0.1).")
    queue_size: int | None = flag(None, "MoCo v2 queue length (default: recipe; 4096 on CIFAR, 65536 on ImageNet).")
    momentum: float | None = flag(
        None, "MoCo v2 key-encoder momentum, or BYOL's base EMA momentum (it rises to 1 along a cosine).")
    off_diagonal_weight: float | None = flag(
        None, "Barlow Twins: weight of the off-diagonal cross-correlations, the paper's lambda (default 5e-3).")
    correlation_scale: float | None = flag(
        None, "Barlow Twins: a constant factor on the loss (default: recipe; 0.1 on CIFAR, 0.024 on ImageNet).")
    invariance_weight: float | None = flag(None, "VICReg: weight of the invariance (MSE) term (default 25).")
    variance_weight: float | None = flag(None, "VICReg: weight of the variance hinge (default 25).")
    covariance_weight: float | None = flag(None, "VICReg: weight of the covariance term (default 1).")
    projector_hidden_size: int | None = flag(
        None, "Width of the projector's layers (default: the genotype's, else the recipe's for Barlow Twins and "
              "VICReg, 2048 on CIFAR and 8192 on ImageNet, else the framework's).")
    projection_dim: int | None = flag(
        None, "Width of the projector's output, the embedding (default: as --projector_hidden_size; SimSiam 2048, "
              "BYOL 256, SimCLR and MoCo v2 128).")

    def __post_init__(self):
        _positive("temperature", self.temperature, 0, strict=True)
        _positive("queue_size", self.queue_size)
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("off_diagonal_weight", "invariance_weight", "variance_weight", "covariance_weight"):
            _positive(name, getattr(self, name), 0)
        _positive("correlation_scale", self.correlation_scale, 0, strict=True)
        _positive("projector_hidden_size", self.projector_hidden_size)
        _positive("projection_dim", self.projection_dim)

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SearchArguments:
    """The architecture search (the paper's Algorithm 1 and the collapse-resistant variants)."""

    _argument_group_name: ClassVar[str] = "search"

    framework: FRAMEWORK_CHOICES = flag("simsiam", "The siamese learner whose heads are searched.")
    recipe: RECIPE_CHOICES | None = flag(
        None, "Search recipe (see docs/recipes.md): batch, lr, weight decay, epochs; default: from the data's "
              "policy (cifar or imagenet).")
    search_space: str = flag(
        "S", "'S' (7 ops), 'S_no_pool' (the paper's S'), or a comma list of spaces/ops, e.g. 'S,linear_mish'.")
    projector_layers: int | None = flag(None, "Searched projector layers (default 6; MoCo v2: 4).")
    predictor_layers: int | None = flag(None, "Searched predictor layers (default 4; SimSiam and BYOL only).")
    train_portion: float | None = flag(
        None, "Share of the training data for the weight steps; the rest drives the alphas (default: recipe, 0.5).")
    arch_learning_rate: float | None = flag(
        None, "Alpha learning rate (default: recipe; AdamW 1e-3, Adam 3e-4 for MoCo v2, as in the paper's code).")
    arch_weight_decay: float | None = flag(None, "Weight decay of the alpha optimiser (default: recipe, 1e-3).")
    search_method: SEARCH_METHODS = flag(
        "darts", "'darts' (the paper: first-order DARTS), 'darts-minus' (an auxiliary skip whose weight decays "
                 "from --aux_skip_weight to 0), 'beta-darts' (the logsumexp regulariser on the alphas).")
    aux_skip_weight: float | None = flag(
        None, "DARTS- only: initial weight of the auxiliary skip connection (default 1).")
    beta_darts_weight: float | None = flag(
        None, "beta-DARTS only: final weight of the regulariser, reached along a linear rise from 0 over the search "
              "(default 50, as in the beta-DARTS code).")
    discretization: DISCRETIZATIONS = flag(
        "argmax", "How the genotype is read off the supernet: 'argmax' of the alphas (the paper), or "
                  "'perturbation' (DARTS-PT: per layer, the op whose removal hurts the validation loss most).")
    max_parameter_free_layers: int | None = flag(
        None, "At most this many identity/pool layers per head in the genotype (default: no cap).")
    hessian_every: int = flag(
        1, "Epochs between measurements of the largest eigenvalue of the alpha Hessian (0: off).", resume="free")

    def __post_init__(self):
        if self.train_portion is not None and not 0.0 < self.train_portion < 1.0:
            raise ValueError(f"--train_portion must be strictly between 0 and 1, got {self.train_portion}")
        for name in ("projector_layers", "predictor_layers"):
            _positive(name, getattr(self, name))
        _positive("arch_learning_rate", self.arch_learning_rate, 0, strict=True)
        _positive("arch_weight_decay", self.arch_weight_decay, 0)
        from ..search_space import resolve_search_space

        resolve_search_space(self.search_space)
        self.variant()  # its own checks: which method each flag applies to, ranges

    def variant(self):
        """The search variant these flags choose (:class:`nasiam_hf.search_methods.SearchVariant`)."""
        from ..search_methods import SearchVariant

        return SearchVariant(search_method=self.search_method, aux_skip_weight=self.aux_skip_weight,
                             beta_darts_weight=self.beta_darts_weight, discretization=self.discretization,
                             max_parameter_free_layers=self.max_parameter_free_layers,
                             hessian_every=self.hessian_every)


@dataclass(frozen=True)
class PretrainArguments:
    """Self-supervised pretraining from a genotype."""

    _argument_group_name: ClassVar[str] = "pretraining"

    genotype: str = flag(
        "simsiam-cifar10-resnet18", "A search output folder, a paper preset (e.g. simsiam-cifar10-resnet18) or "
                                    "'<framework>-baseline' for the framework's standard heads.")
    recipe: RECIPE_CHOICES | None = flag(
        None, "Training recipe (see docs/recipes.md); default: from the data's policy (cifar or imagenet).")
    no_fix_predictor_lr: bool = flag(False, "Decay SimSiam's predictor lr too (by default it stays fixed).")
    collapse_threshold: float = flag(
        0.1, "Warn when the collapse std stays below this fraction of 1/sqrt(dim)...", resume="free")
    collapse_patience: int = flag(3, "...for this many epochs in a row.", resume="free")

    def __post_init__(self):
        _positive("collapse_threshold", self.collapse_threshold, 0)
        _positive("collapse_patience", self.collapse_patience)


@dataclass(frozen=True)
class KnnArguments:
    """The weighted kNN classifier on frozen backbone features (k 200, temperature 0.2: InstDisc / SimSiam)."""

    _argument_group_name: ClassVar[str] = "kNN"

    knn_k: int = flag(200, "Neighbours of the kNN classifier (capped at the memory size, with a note).",
                      resume="free")
    knn_temperature: float = flag(0.2, "Temperature of the kNN vote weights.", resume="free")

    def __post_init__(self):
        _positive("knn_k", self.knn_k)
        _positive("knn_temperature", self.knn_temperature, 0, strict=True)


@dataclass(frozen=True)
class MonitorArguments(KnnArguments):
    """The kNN monitor of a pretraining."""

    knn_every: str = flag(
        "1", "kNN monitor every N epochs, or every N optimizer updates with 'Nsteps' (for streams of unknown "
             "length); 0: off.", resume="free")

    def __post_init__(self):
        super().__post_init__()
        parse_every("knn_every", self.knn_every, allow_epoch_word=True)

    @property
    def every(self) -> tuple[str, int] | None:
        return parse_every("knn_every", self.knn_every, allow_epoch_word=True)


@dataclass(frozen=True)
class FinetuneModelArguments:
    """The model to fine-tune."""

    _argument_group_name: ClassVar[str] = "model"

    model_name_or_path: str = flag(
        None, "A NASiam model folder (pretraining, search-derived or a classifier) or a Hub id.", required=True)
    freeze_backbone: bool = flag(
        False, "Train only the linear classifier; the backbone (BatchNorm statistics included) stays fixed.")

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required")


@dataclass(frozen=True)
class EvalModelArguments:
    """The model to evaluate."""

    _argument_group_name: ClassVar[str] = "model"

    model_name_or_path: str = flag(None, "A saved model folder or a Hub id.", required=True)

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required")
