"""The commands' typed arguments: one frozen dataclass per concern, parsed with transformers' ``HfArgumentParser``.

Every flag lives in exactly one dataclass, and a command is a bundle of them (:class:`SearchCommand`,
:class:`PretrainCommand`, :class:`LinearEvalCommand`, :class:`FinetuneCommand`). The objects are frozen: what a run
derives from them (recipe values, framework constants, the image policy) goes into a separate resolved plan
(:mod:`nasiam_hf.plans`), never back into the arguments. From Python, build a bundle directly or from flags:

    from nasiam_hf import run_search
    from nasiam_hf.arguments import SearchCommand
    run_search(SearchCommand.parse(["--dataset_name", "demo", "--output_dir", "runs/x"]))

This module only needs the standard library and ``transformers.HfArgumentParser`` (imported when parsing), so
``--help`` does not import the model code, ``datasets`` or ``accelerate``.

Each field's ``metadata["resume"]`` says whether it may change when a run is resumed in the same ``output_dir``:
``"fixed"`` (default: part of the run's identity), ``"free"`` (runtime options: workers, logging, Hub, tracking) or
``"extend"`` (the run's length: it may change, and the schedule is then recomputed over the new length).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

FRAMEWORK_CHOICES = Literal["simsiam", "simclr", "mocov2", "byol"]
SEARCH_METHODS = Literal["darts", "darts-minus", "beta-darts"]
DISCRETIZATIONS = Literal["argmax", "perturbation"]
RECIPE_CHOICES = Literal["cifar", "imagenet"]
FEATURE_NORMS = Literal["batchnorm", "none"]
RESUME_RULES = ("fixed", "free", "extend")


def flag(default: Any, help: str, resume: str = "fixed", **metadata) -> Any:
    """A dataclass field with its ``--help`` text and its resume rule (see the module docstring)."""
    if resume not in RESUME_RULES:  # pragma: no cover - a programming error
        raise ValueError(f"resume rule must be one of {RESUME_RULES}, got {resume!r}")
    return field(default=default, metadata={"help": help, "resume": resume, **metadata})


def _positive(name: str, value: float | int | None, minimum: float = 1, strict: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or (value <= minimum if strict else value < minimum):
        relation = "positive" if strict and minimum == 0 else f"{'greater than' if strict else 'at least'} {minimum:g}"
        raise ValueError(f"--{name} must be {relation}, got {value!r}")


def _json_object(name: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object such as '{{\"img_size\": 32}}', got {text!r} ({error})")
    if not isinstance(value, dict):
        raise ValueError(f"--{name} must be a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def parse_every(name: str, value: str, allow_epoch_word: bool = False) -> tuple[str, int] | None:
    """``"2"`` -> ("epochs", 2), ``"500steps"`` -> ("steps", 500), ``"epoch"`` -> ("epochs", 1), ``"no"``/"0" -> None.

    The frequency syntax of ``--checkpointing_steps`` and ``--knn_every``.
    """
    text = str(value).strip().lower().replace(" ", "")
    if text in ("no", "0", "off"):
        return None
    if text == "epoch":
        return ("epochs", 1)
    for suffix, unit in (("steps", "steps"), ("step", "steps"), ("epochs", "epochs"), ("epoch", "epochs")):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            count = int(text[: -len(suffix)])
            return (unit, count) if count > 0 else None
    if text.isdigit():
        return ("steps" if not allow_epoch_word else "epochs", int(text))
    raise ValueError(f"--{name} must be a positive integer, 'Nsteps', 'Nepochs', 'epoch' or 'no', got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# One dataclass per concern
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataArguments:
    """Where the images come from and how they are served."""

    _argument_group_name: ClassVar[str] = "data"

    dataset_name: str | None = flag(
        None, "A Hub dataset id or alias (cifar10, cifar100, imagenet), or 'demo' (embedded digits, no download).")
    dataset_config_name: str | None = flag(None, "Config name of the Hub dataset.")
    train_file: str | None = flag(
        None, "Local training data: a parquet/arrow/JSON-lines file, a webdataset .tar, a folder or glob of them.")
    validation_file: str | None = flag(None, "Local labelled evaluation data (same formats as --train_file).")
    train_dir: str | None = flag(
        None, "A folder of images in any layout (jpg/jpeg/png/webp/bmp); class sub-folders give labels "
              "(see --folder_labels).")
    validation_dir: str | None = flag(None, "A folder of labelled evaluation images (class sub-folders).")
    folder_labels: Literal["auto", "yes", "no"] = flag(
        "auto", "Whether the folder names under --train_dir are labels: 'auto' only when every image sits one level "
                "below a folder and there are at least two folders.")
    image_column: str | None = flag(None, "Image column (default: img/image/pixel_values, or the only image column).")
    label_column: str | None = flag(None, "Label column (default: label/fine_label/labels; none: unlabelled).")
    train_split: str = flag("train", "Split used for training.")
    eval_split: str | None = flag(None, "Split used for evaluation (default: the first labelled of test/validation).")
    streaming: bool = flag(
        False, "Stream the training data (Hub ids, parquet/webdataset shards, image folders) instead of loading it: "
               "the order of each epoch is derived from (seed, epoch), so a resumed run continues exactly.")
    shuffle_buffer_size: int | None = flag(
        None, "With --streaming: mix samples through a shuffle buffer of this size. This trades exact resume for "
              "mixing (the buffer's content is lost when a run stops).")
    max_train_samples: int | None = flag(None, "Keep a fixed seeded subset of n training samples.")
    max_eval_samples: int | None = flag(None, "Keep a fixed seeded subset of n evaluation samples.")
    image_size: int | None = flag(
        None, "Training resolution (default: the policy's size, CIFAR 32 or ImageNet 224, chosen from a sample of "
              "images, or what the pretrained weights expect).")
    image_mean: str | None = flag(
        None, "Normalisation mean, three comma-separated values (default: the pretrained weights' statistics with "
              "--backbone_weights, else the dataset's: CIFAR or ImageNet).")
    image_std: str | None = flag(None, "Normalisation std, three comma-separated values (default: as --image_mean).")
    no_augmentation: bool = flag(
        False, "Ablation (paper Table II): no augmentation, both views are the same image; for linear evaluation, "
               "the probe trains on cached features.")
    on_bad_image: Literal["error", "skip"] = flag(
        "error", "An image that cannot be decoded: stop with its file and row ('error'), or skip it and count it "
                 "('skip', for scraped data).", resume="free")
    cache_dir: str | None = flag(None, "Where datasets caches downloads and arrow files.", resume="free")
    dataloader_num_workers: int | None = flag(
        None, "DataLoader workers (default: from the CPU count and dataset size).", resume="free")
    preprocessing_num_workers: int | None = flag(
        None, "Processes datasets uses to prepare a non-streamed dataset (num_proc).", resume="free")

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "image_size", "shuffle_buffer_size",
                     "preprocessing_num_workers"):
            _positive(name, getattr(self, name))
        _positive("dataloader_num_workers", self.dataloader_num_workers, minimum=0)
        if self.shuffle_buffer_size is not None and not self.streaming:
            raise ValueError("--shuffle_buffer_size applies to --streaming only")
        sources = {f"--{k}": getattr(self, k) for k in ("dataset_name", "train_file", "train_dir")}
        given = {k: v for k, v in sources.items() if v is not None}
        if len(given) > 1:
            raise ValueError(f"pass exactly one of --dataset_name, --train_file, --train_dir; got {given}")
        if self.validation_file is not None and self.validation_dir is not None:
            raise ValueError("pass at most one of --validation_file and --validation_dir")
        self.statistics()

    def statistics(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """``--image_mean`` and ``--image_std`` as tuples of three floats (None when not given)."""
        values = []
        for name in ("image_mean", "image_std"):
            text = getattr(self, name)
            if text is None:
                values.append(None)
                continue
            try:
                numbers = tuple(float(v) for v in text.split(","))
            except ValueError:
                numbers = ()
            if len(numbers) != 3 or (name == "image_std" and min(numbers) <= 0):
                raise ValueError(f"--{name} must be three comma-separated numbers"
                                 + (" above 0" if name == "image_std" else "") + f", e.g. 0.5,0.5,0.5; got {text!r}")
            values.append(numbers)
        return values[0], values[1]

    def require_source(self) -> None:
        """The training data source is needed by every command; checked before anything is loaded."""
        if self.dataset_name is None and self.train_file is None and self.train_dir is None:
            raise ValueError("no training data: pass --dataset_name, --train_file or --train_dir "
                             "(or --dataset_name demo for the embedded digits)")


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
    """Constants of the siamese objective; unset values come from the recipe and the framework."""

    _argument_group_name: ClassVar[str] = "objective"

    temperature: float | None = flag(None, "SimCLR / MoCo v2 softmax temperature (default: recipe; 0.5 / 0.1).")
    queue_size: int | None = flag(None, "MoCo v2 queue length (default: recipe; 4096 on CIFAR, 65536 on ImageNet).")
    momentum: float | None = flag(
        None, "MoCo v2 key-encoder momentum, or BYOL's base EMA momentum (it rises to 1 along a cosine).")

    def __post_init__(self):
        _positive("temperature", self.temperature, 0, strict=True)
        _positive("queue_size", self.queue_size)
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum!r}")

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
        from .search_space import resolve_search_space

        resolve_search_space(self.search_space)
        self.variant()  # its own checks: which method each flag applies to, ranges

    def variant(self):
        """The search variant these flags choose (:class:`nasiam_hf.search_methods.SearchVariant`)."""
        from .search_methods import SearchVariant

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
class OptimizationArguments:
    """Batch, schedule and optimiser of the weights. Unset values (None) come from the recipe."""

    _argument_group_name: ClassVar[str] = "optimisation"

    per_device_train_batch_size: int | None = flag(
        None, "Training batch per device (default: the recipe's global batch, 512, divided over the processes and "
              "the accumulation steps).")
    per_device_eval_batch_size: int = flag(256, "Batch per device for feature extraction and evaluation.",
                                           resume="free")
    gradient_accumulation_steps: int = flag(
        1, "Micro-batches per optimizer update: the effective batch is per-device x processes x this, and drives "
           "the lr scaling. Not reproduced by accumulation: BatchNorm statistics and contrastive negatives are per "
           "micro-batch.")
    num_train_epochs: int | None = flag(None, "Epochs (default: recipe).", resume="extend")
    max_train_steps: int | None = flag(
        None, "Stop after this many optimizer updates (overrides --num_train_epochs; needed for streams of unknown "
              "length).", resume="extend")
    learning_rate: float | None = flag(
        None, "Base learning rate for a global batch of 256; the effective rate scales linearly (default: recipe).")
    weight_decay: float | None = flag(None, "Weight decay (default: recipe).")
    num_warmup_epochs: float | None = flag(
        None, "Linear warm-up before the cosine schedule, in epochs (default: recipe).")
    max_grad_norm: float | None = flag(None, "Clip the gradient norm of each update to this value (default: off).")

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "max_train_steps"):
            _positive(name, getattr(self, name))
        _positive("learning_rate", self.learning_rate, 0, strict=True)
        _positive("weight_decay", self.weight_decay, 0)
        _positive("num_warmup_epochs", self.num_warmup_epochs, 0)
        _positive("max_grad_norm", self.max_grad_norm, 0, strict=True)


@dataclass(frozen=True)
class FinetuneOptimizationArguments(OptimizationArguments):
    """Fine-tuning: SGD, momentum 0.9, cosine; lr per 256 images."""

    per_device_train_batch_size: int | None = flag(128, "Training batch per device.")
    num_train_epochs: int | None = flag(30, "Epochs.", resume="extend")
    learning_rate: float | None = flag(0.05, "Base learning rate for a global batch of 256 (scaled linearly).")
    weight_decay: float | None = flag(5e-4, "Weight decay.")
    classifier_lr_multiplier: float = flag(10.0, "The new classifier's learning rate is this many times the "
                                                 "backbone's.")

    def __post_init__(self):
        super().__post_init__()
        _positive("classifier_lr_multiplier", self.classifier_lr_multiplier, 0, strict=True)


@dataclass(frozen=True)
class ProbeArguments:
    """The linear probe on frozen backbone features."""

    _argument_group_name: ClassVar[str] = "linear probe"

    num_train_epochs: int | None = flag(None, "Probe epochs (default: recipe, 100).")
    per_device_train_batch_size: int | None = flag(
        None, "Probe batch per device (default: recipe, 256; a smaller labelled set is used whole).")
    per_device_eval_batch_size: int = flag(256, "Batch per device for feature extraction.")
    learning_rate: float | None = flag(
        None, "Probe lr (default: the recipe's 0.03 x global batch / 256 on batch-normalised features; 30 with "
              "--feature_norm none).")
    recipe: RECIPE_CHOICES | None = flag(
        None, "Probe recipe (see docs/recipes.md); default: from the data's policy (cifar or imagenet).")
    weight_decay: float | None = flag(None, "Probe weight decay (default: recipe, 0).")
    feature_norm: FEATURE_NORMS | None = flag(
        None, "'batchnorm': a non-affine BatchNorm in front of the classifier; 'none': raw features (default: "
              "recipe, batchnorm).")

    def __post_init__(self):
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            _positive(name, getattr(self, name))
        _positive("learning_rate", self.learning_rate, 0, strict=True)
        _positive("weight_decay", self.weight_decay, 0)


@dataclass(frozen=True)
class PrecisionArguments:
    """Numeric precision and memory layout."""

    _argument_group_name: ClassVar[str] = "precision"

    mixed_precision: Literal["no", "bf16", "fp16"] | None = flag(
        None, "bf16/fp16 autocast through Accelerate (default: the accelerate config, or 'no').")
    channels_last: bool = flag(False, "channels_last memory format for the backbone and its input batches.",
                               resume="free")


@dataclass(frozen=True)
class SpeedArguments:
    """Where the work happens and with which kernels; none of these changes what is computed."""

    _argument_group_name: ClassVar[str] = "speed"

    augmentation_device: Literal["loader", "accelerator"] = flag(
        "loader", "Where the random views are drawn: 'loader' (torchvision on each image in the DataLoader) or "
                  "'accelerator' (the loader only decodes; whole batches are augmented on the training device, "
                  "seeded per sample).")
    torch_compile: bool = flag(False, "torch.compile the backbone in place (state-dict keys unchanged).",
                               resume="free")
    optimizer_implementation: Literal["auto", "fused", "foreach", "for_loop"] = flag(
        "auto", "Optimizer kernels: 'fused', 'foreach', 'for_loop'; 'auto' takes fused where this torch build has "
                "it for the device.", resume="free")


@dataclass(frozen=True)
class RunArguments:
    """Output folder, seed, checkpoints, logging."""

    _argument_group_name: ClassVar[str] = "run"

    output_dir: str = flag(None, "Where outputs and checkpoints go.", resume="free", required=True)
    overwrite_output_dir: bool = flag(
        False, "Replace what an earlier run (or another tool) left in --output_dir: our run files, checkpoints and "
               "model files are deleted, other files are kept.", resume="free")
    seed: int = flag(42, "Seed of the data order, the views and the initialisation.")
    checkpointing_steps: str = flag(
        "epoch", "Save a resumable checkpoint every N optimizer updates, at every epoch ('epoch'), or never ('no').",
        resume="free")
    checkpoints_total_limit: int = flag(2, "How many checkpoints to keep.", resume="free")
    resume_from_checkpoint: str | None = flag(
        None, "A checkpoint folder, or 'latest' for the newest intact one in --output_dir.", resume="free")
    logging_steps: int = flag(
        25, "Refresh the progress-bar losses every N updates (reading them waits for the device).", resume="free")
    debug: bool = flag(False, "Print the full traceback of an error (also: NASIAM_DEBUG=1).", resume="free")

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required")
        _positive("checkpoints_total_limit", self.checkpoints_total_limit)
        _positive("logging_steps", self.logging_steps)
        parse_every("checkpointing_steps", self.checkpointing_steps)

    @property
    def checkpoint_every(self) -> tuple[str, int] | None:
        return parse_every("checkpointing_steps", self.checkpointing_steps)


@dataclass(frozen=True)
class EvalRunArguments:
    """Output and seed of an evaluation."""

    _argument_group_name: ClassVar[str] = "run"

    output_dir: str | None = flag(
        None, "Where eval_results.json goes (default: the model folder, whose card is refreshed).", resume="free")
    seed: int = flag(0, "Seed of the probe's initialisation and shuffling.")
    debug: bool = flag(False, "Print the full traceback of an error (also: NASIAM_DEBUG=1).", resume="free")


@dataclass(frozen=True)
class TrackingArguments:
    """Experiment tracking through Accelerate's trackers."""

    _argument_group_name: ClassVar[str] = "tracking"

    with_tracking: bool = flag(False, "Log metrics to the trackers of --report_to.", resume="free")
    report_to: str = flag("all", "Trackers: tensorboard, wandb, ... or 'all' installed ones.", resume="free")


@dataclass(frozen=True)
class HubArguments:
    """Publishing to the Hugging Face Hub."""

    _argument_group_name: ClassVar[str] = "Hub"

    push_to_hub: bool = flag(False, "Upload the output folder at the end of the run.", resume="free")
    hub_model_id: str | None = flag(None, "The repository, e.g. your-name/nasiam-simsiam-r18.", resume="free")
    hub_token: str | None = flag(None, "A write token (default: the one of `hf auth login`); never saved.",
                                 resume="free")
    hub_private_repo: bool = flag(False, "Create the repository as private.", resume="free")
    hub_revision: str | None = flag(None, "The branch to push to (default: main).", resume="free")
    hub_create_pr: bool = flag(False, "Open a pull request instead of committing to the branch.", resume="free")
    push_checkpoints: bool = flag(
        False, "Also upload each checkpoint in the background as it is written, so a preempted run is on the Hub up "
               "to its last checkpoint.", resume="free")

    def __post_init__(self):
        if (self.push_to_hub or self.push_checkpoints) and not self.hub_model_id:
            raise ValueError("--push_to_hub and --push_checkpoints need --hub_model_id (e.g. your-name/nasiam-r18)")
        if self.hub_revision is not None and not (self.push_to_hub or self.push_checkpoints):
            raise ValueError(f"--hub_revision applies to --push_to_hub and --push_checkpoints only, and neither is "
                             f"given (got --hub_revision {self.hub_revision!r})")
        if self.hub_create_pr:
            if not self.push_to_hub:
                raise ValueError("--hub_create_pr applies to --push_to_hub only (the final upload opens the pull "
                                 "request); add --push_to_hub")
            if self.hub_revision not in (None, "main"):
                raise ValueError(f"--hub_create_pr opens a pull request against main: drop --hub_revision "
                                 f"{self.hub_revision!r}, or drop --hub_create_pr to commit to that branch")
            if self.push_checkpoints:
                raise ValueError("--push_checkpoints commits each checkpoint to the branch (--hub_revision, default "
                                 "main) and cannot open pull requests: drop --hub_create_pr, or push to a branch "
                                 "with --hub_revision")


# ---------------------------------------------------------------------------------------------------------------------
# Per-command defaults
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneRunArguments(RunArguments):
    """Fine-tuning keeps the run options of the other training commands."""


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


# ---------------------------------------------------------------------------------------------------------------------
# Command bundles
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """A command's arguments, one attribute per concern. ``parse`` reads flags (and ``--config`` files)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __post_init__(self):
        missing = [name for name in self.groups() if getattr(self, name) is None]
        if missing:
            examples = {"run": "RunArguments(output_dir=...)", "model": "...(model_name_or_path=...)"}
            raise ValueError(f"{type(self).__name__} needs " + ", ".join(f"{m}={examples.get(m, '...')}"
                                                                         for m in missing))

    @classmethod
    def groups(cls) -> dict[str, type]:
        """attribute name -> dataclass of each concern, in ``--help`` order."""
        return {f.name: f.type if isinstance(f.type, type) else _resolve(cls, f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, argv: list[str] | None = None):
        """Parse command-line flags (a ``--config`` file first, then the flags over it) into this bundle."""
        from .command_line import parse_command

        return parse_command(cls, argv)

    def values(self) -> dict[str, Any]:
        """Every argument as a flat ``{flag name: value}`` dict (the form of training_args.json and config files)."""
        flat = {}
        for name in self.groups():
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def identity(self) -> tuple[dict[str, Any], set[str], set[str]]:
        """(values, keys that may change on resume, keys that set the run's length) for the output-folder guard."""
        free, extend = set(), set()
        for name in self.groups():
            for f in dataclasses.fields(getattr(self, name)):
                rule = f.metadata.get("resume", "fixed")
                (free if rule == "free" else extend if rule == "extend" else set()).add(f.name)
        return self.values(), free, extend


def _resolve(cls, name: str) -> type:
    import typing

    return typing.get_type_hints(cls)[name]


def _default(factory):
    return field(default_factory=factory)


@dataclass(frozen=True)
class SearchCommand(Command):
    """``nasiam-search``: NASiam's differentiable search of the projector/predictor heads."""

    name: ClassVar[str] = "nasiam-search"
    description: ClassVar[str] = "Search the projector/predictor heads of a siamese learner (NASiam)."

    data: DataArguments = _default(DataArguments)
    search: SearchArguments = _default(SearchArguments)
    model: BackboneArguments = _default(BackboneArguments)
    objective: ObjectiveArguments = _default(ObjectiveArguments)
    optimization: OptimizationArguments = _default(OptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: RunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


@dataclass(frozen=True)
class PretrainCommand(Command):
    """``nasiam-pretrain``: self-supervised pretraining from a genotype, with a kNN monitor."""

    name: ClassVar[str] = "nasiam-pretrain"
    description: ClassVar[str] = "Pretrain a NASiam model (SimSiam, SimCLR, MoCo v2 or BYOL) from a genotype."

    data: DataArguments = _default(DataArguments)
    pretrain: PretrainArguments = _default(PretrainArguments)
    model: PretrainBackboneArguments = _default(PretrainBackboneArguments)
    objective: ObjectiveArguments = _default(ObjectiveArguments)
    monitor: MonitorArguments = _default(MonitorArguments)
    optimization: OptimizationArguments = _default(OptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: RunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


@dataclass(frozen=True)
class LinearEvalCommand(Command):
    """``nasiam-linear-eval``: a linear probe (and the kNN classifier) on the frozen features of a saved model."""

    name: ClassVar[str] = "nasiam-linear-eval"
    description: ClassVar[str] = "Linear evaluation (and kNN) of a saved NASiam model on labelled data."

    data: DataArguments = _default(DataArguments)
    model: EvalModelArguments = field(default=None)
    probe: ProbeArguments = _default(ProbeArguments)
    knn: KnnArguments = _default(KnnArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    run: EvalRunArguments = _default(EvalRunArguments)
    tracking: TrackingArguments = _default(TrackingArguments)


@dataclass(frozen=True)
class FinetuneCommand(Command):
    """``nasiam-finetune``: classification fine-tuning of a NASiam backbone."""

    name: ClassVar[str] = "nasiam-finetune"
    description: ClassVar[str] = (
        "Fine-tune a NASiam backbone (a pretraining folder or Hub id) for image classification: the whole network, "
        "or only a linear classifier with --freeze_backbone.")

    data: DataArguments = _default(DataArguments)
    model: FinetuneModelArguments = field(default=None)
    optimization: FinetuneOptimizationArguments = _default(FinetuneOptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: FinetuneRunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


COMMANDS: dict[str, type[Command]] = {
    cls.name: cls for cls in (SearchCommand, PretrainCommand, LinearEvalCommand, FinetuneCommand)
}


__all__ = [
    "COMMANDS",
    "BackboneArguments",
    "Command",
    "DataArguments",
    "EvalModelArguments",
    "EvalRunArguments",
    "FinetuneCommand",
    "FinetuneModelArguments",
    "FinetuneOptimizationArguments",
    "HubArguments",
    "KnnArguments",
    "LinearEvalCommand",
    "MonitorArguments",
    "ObjectiveArguments",
    "OptimizationArguments",
    "PrecisionArguments",
    "PretrainArguments",
    "PretrainBackboneArguments",
    "PretrainCommand",
    "ProbeArguments",
    "RunArguments",
    "SearchArguments",
    "SearchCommand",
    "SpeedArguments",
    "TrackingArguments",
    "parse_every",
]
