"""How a run trains and where it goes: optimisation, the linear probe, precision and speed, the output folder and
checkpoints, tracking, the Hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .fields import FEATURE_NORMS, OPTIMIZER_CHOICES, RECIPE_CHOICES, _positive, check_learning_rates, flag, \
    parse_every


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
        None, "Learning rate of the weights, used as given (default: --base_learning_rate scaled by the global "
              "batch).")
    base_learning_rate: float | None = flag(
        None, "Learning rate per 256 images: the run uses base x global batch / 256 (default: the recipe's). Give "
              "this or --learning_rate, not both.")
    weight_decay: float | None = flag(None, "Weight decay (default: recipe).")
    num_warmup_epochs: float | None = flag(
        None, "Linear warm-up before the cosine schedule, in epochs (default: recipe).")
    max_grad_norm: float | None = flag(None, "Clip the gradient norm of each update to this value (default: off).")
    optimizer: OPTIMIZER_CHOICES | None = flag(
        None, "Weight optimizer: 'sgd' (momentum 0.9) or 'lars' (timm's Lars, momentum 0.9; biases and norm "
              "parameters excluded from its adaptation and from weight decay; needs timm). Default: the recipe's "
              "(LARS for Barlow Twins and VICReg, SGD otherwise). The search's alphas keep their Adam-type optimizer.")

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "max_train_steps"):
            _positive(name, getattr(self, name))
        check_learning_rates(self.learning_rate, self.base_learning_rate)
        _positive("weight_decay", self.weight_decay, 0)
        _positive("num_warmup_epochs", self.num_warmup_epochs, 0)
        _positive("max_grad_norm", self.max_grad_norm, 0, strict=True)


@dataclass(frozen=True)
class FinetuneOptimizationArguments(OptimizationArguments):
    """Fine-tuning: SGD, momentum 0.9, cosine; by default 0.05 per 256 images of the global batch."""

    default_base_learning_rate: ClassVar[float] = 0.05

    per_device_train_batch_size: int | None = flag(128, "Training batch per device.")
    num_train_epochs: int | None = flag(30, "Epochs.", resume="extend")
    base_learning_rate: float | None = flag(
        None, f"Learning rate per 256 images: the run uses base x global batch / 256 (default: "
              f"{default_base_learning_rate}). Give this or --learning_rate, not both.")
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
        None, "Probe learning rate, used as given (default: --base_learning_rate scaled by the global batch).")
    base_learning_rate: float | None = flag(
        None, "Probe learning rate per 256 images: the probe uses base x global batch / 256 (default: the recipe's "
              "0.03 on batch-normalised features; 30, the official probes' rate, with --feature_norm none). Give "
              "this or --learning_rate, not both.")
    recipe: RECIPE_CHOICES | None = flag(
        None, "Probe recipe (see docs/recipes.md); default: from the data's policy (cifar or imagenet).")
    weight_decay: float | None = flag(None, "Probe weight decay (default: recipe, 0).")
    feature_norm: FEATURE_NORMS | None = flag(
        None, "'batchnorm': a non-affine BatchNorm in front of the classifier; 'none': raw features (default: "
              "recipe, batchnorm).")

    def __post_init__(self):
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            _positive(name, getattr(self, name))
        check_learning_rates(self.learning_rate, self.base_learning_rate)
        _positive("weight_decay", self.weight_decay, 0)


@dataclass(frozen=True)
class PrecisionArguments:
    """Numeric precision and memory layout."""

    _argument_group_name: ClassVar[str] = "precision"

    mixed_precision: Literal["no", "bf16", "fp16"] | None = flag(
        None, "bf16/fp16 autocast through Accelerate (default: the accelerate config, or 'no').")
    channels_last: bool = flag(False, "channels_last memory format for the backbone and its input batches.",
                               resume="free")

    def check_device(self, device_type: str, used: str) -> None:
        """Refuse a precision the device would silently ignore: Accelerate on a CPU runs fp16 as fp32 while the
        run records fp16. ``used`` is what the Accelerator took (this flag, else the accelerate config)."""
        if device_type == "cpu" and used == "fp16":
            given = ("--mixed_precision fp16" if self.mixed_precision == "fp16"
                     else "mixed_precision fp16 (from the accelerate config)")
            raise ValueError(f"{given} is not supported on a CPU, where it would train in fp32: bf16 is the CPU's "
                             "half precision; pass --mixed_precision bf16 (or no)")


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
    logging_steps: int | None = flag(
        None, "Read out the loss (progress bar, history, loss plot) every N updates; reading waits for the device "
              "(default: 25, or fewer in a short run so it shows its loss about ten times).", resume="free")
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


@dataclass(frozen=True)
class FinetuneRunArguments(RunArguments):
    """Fine-tuning keeps the run options of the other training commands."""
