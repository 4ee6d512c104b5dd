"""What every training engine shares around its steps: the Accelerator, the output-folder guard of a command, the
model layout (SyncBatchNorm, channels_last, compile), device-side running sums and tracking. The epoch/update loop
and its per-update decision (stops, non-finite losses, data running out) live in :mod:`nasiam_hf.loop`, checkpoints
in :mod:`nasiam_hf.checkpoints`, the optimisers and the weight step in :mod:`nasiam_hf.optimization`.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed

from .arguments import Command, PrecisionArguments, TrackingArguments
from .checkpoints import OutputPlan, guard_output_dir
from .errors import UsageError
from .hub.metadata import redact_secrets
from .run_lock import hold_output_dir


# Accelerate engines other than DDP, by the environment variable `accelerate launch` sets from an accelerate config.
UNSUPPORTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                       "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
WHY_DDP_ONLY = (
    "nasiam-hf supports DDP (one process per device, on one machine or many): the search's alpha step runs the "
    "unwrapped supernet and all-reduces the alpha gradients itself, which a sharding engine cannot serve, and every "
    "model here fits on one device. Run `accelerate config` again and choose multi-GPU (or pass --multi_gpu)")


def refuse_unsupported_engine(accelerator: Accelerator | None = None) -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM, whether asked through the environment (an accelerate config: on a CPU
    Accelerate would silently ignore an FSDP plugin, so the request itself is checked) or active in
    ``accelerator``."""
    for variable, name in UNSUPPORTED_ENGINES.items():
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
            raise UsageError(f"{name} was requested ({variable}=true, from the accelerate config): {WHY_DDP_ONLY}")
    engine = str(getattr(accelerator, "distributed_type", "")).split(".")[-1].upper()
    for name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        if engine == name:
            raise UsageError(f"the accelerate engine is {name}: {WHY_DDP_ONLY}")


def make_accelerator(output_dir: str | None, seed: int, precision: PrecisionArguments,
                     tracking: TrackingArguments | None = None, gradient_accumulation_steps: int = 1) -> Accelerator:
    """The run's Accelerator. Batches move to the device with non-blocking copies (the loaders pin their memory on
    CUDA machines), so the copy of the next batch overlaps the work already queued. Gradient accumulation counts
    micro-batches itself (``sync_with_dataloader=False``): one update is always exactly ``k`` micro-batches."""
    refuse_unsupported_engine()
    with_tracking = tracking is not None and tracking.with_tracking
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        log_with=tracking.report_to if with_tracking else None,
        # tracker files (TensorBoard events) under output_dir/runs/, the folder the Hub shows training metrics from
        project_config=ProjectConfiguration(
            project_dir=output_dir, logging_dir=None if output_dir is None else os.path.join(output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False),
    )
    refuse_unsupported_engine(accelerator)
    try:
        precision.check_device(accelerator.device.type, accelerator.mixed_precision)
    except ValueError:
        AcceleratorState._reset_state()  # the next run in this process may choose its precision again
        raise
    set_seed(seed)
    return accelerator


def start_run(command: Command, *, with_eval: bool = True, require_labels: bool = False,
              image_size: int | None = None):
    """What every training command does first, in this order: the Accelerator (and the engine check), the lock on
    ``--output_dir`` (one run per folder, held until the run function decorated with
    :func:`~nasiam_hf.run_lock.releases_output_dir` ends), the decision about the folder (nothing written yet), the
    data (``with_eval``: load the eval split too), and its notes printed once. Returns ``(accelerator, output plan,
    splits)``."""
    from .data import load_splits

    run = command.run
    accelerator = make_accelerator(run.output_dir, run.seed, command.precision, command.tracking,
                                   command.optimization.gradient_accumulation_steps)
    hold_output_dir(accelerator, run.output_dir, command.name, run.overwrite_output_dir)
    output = guard_output(command, accelerator)
    splits = load_splits(command.data, run.seed, with_eval=with_eval, require_labels=require_labels,
                         image_size=image_size)
    for note in splits.notes:
        accelerator.print(note)
    return accelerator, output, splits


def guard_output(command: Command, accelerator: Accelerator) -> OutputPlan:
    """Decide (and print) what ``command`` does with its ``--output_dir``: the rules of
    :func:`nasiam_hf.checkpoints.decide_output_dir`, with the identity and the keys that may change on resume
    given by the arguments' ``resume`` rules (:mod:`nasiam_hf.arguments`) and the fingerprint of its data."""
    from .data.fingerprint import fingerprint_data

    values, free, extend = command.identity()
    run = command.run
    return guard_output_dir(accelerator, run.output_dir, values, mutable_keys=free | extend,
                            resume=run.resume_from_checkpoint, overwrite=run.overwrite_output_dir,
                            data=lambda: fingerprint_data(command.data))


def initialise_backbone(model: torch.nn.Module, weights: str | None, splits, data, accelerator: Accelerator,
                        cache_dir: str | None = None):
    """Start the backbone of a freshly built ``model`` from ``--backbone_weights`` (when given) and choose the
    normalisation: ``--image_mean/--image_std``, else the weights', else the dataset's. Returns
    ``(splits with those statistics, the image processor to save, the starting point as a dict or None)``."""
    from .backbone_weights import load_backbone_weights
    from .processing import apply_preprocessing

    init = load_backbone_weights(model, weights, cache_dir=cache_dir) if weights else None
    if init is not None:
        accelerator.print(f"backbone weights: {init.note or init.source}")
    mean, std = data.statistics()
    splits, processor, note = apply_preprocessing(splits, init.preprocessing if init else None, mean, std)
    if note:
        accelerator.print(note)
    return splits, processor, init.to_dict() if init else None


def describe_backbone_of(config) -> str:
    """The backbone for the start-up line: ``resnet18 (CIFAR stem)``, ``timm/vit_tiny_patch16_224 (timm)``..."""
    if config.backbone_kind == "torchvision":
        return f"{config.backbone} ({'CIFAR' if config.cifar_stem else 'ImageNet'} stem)"
    return f"{config.backbone} ({config.backbone_kind}, {config.hidden_size} features)"


def is_multi_gpu(accelerator: Accelerator) -> bool:
    return accelerator.num_processes > 1 and accelerator.device.type == "cuda"


def prepare_model_layout(model: torch.nn.Module, accelerator: Accelerator, channels_last: bool,
                         torch_compile: bool = False) -> torch.nn.Module:
    """SyncBatchNorm only on several GPUs (it raises on CPU/gloo); optional channels_last memory format; optional
    in-place ``torch.compile`` of every backbone trunk.

    ``channels_last`` also marks the model (``uses_channels_last``) so the step functions convert their input
    batches, which makes the first convolution read channels_last too. Compiling goes through ``Module.compile()``,
    which compiles the module's call in place: parameter names, ``state_dict`` and ``save_pretrained`` stay as they
    are (no ``_orig_mod.`` prefix).
    """
    from .backbones import BackboneTrunk

    if is_multi_gpu(accelerator):
        # the online encoder only: MoCo's key encoder keeps per-process BatchNorm, or its Shuffle-BN would be undone
        target = getattr(model, "nasiam", None)
        if target is not None:
            model.nasiam = torch.nn.SyncBatchNorm.convert_sync_batchnorm(target)
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model._nasiam_channels_last = bool(channels_last)
    if torch_compile:
        for module in model.modules():
            if isinstance(module, BackboneTrunk):
                module.compile(dynamic=False)
    return model


def uses_channels_last(model: torch.nn.Module) -> bool:
    """Whether :func:`prepare_model_layout` put ``model`` in channels_last."""
    return bool(getattr(model, "_nasiam_channels_last", False))


class DeviceSums:
    """Running sums of per-step scalars kept on the device, so the training loop does not wait for the device
    every step; :meth:`drain` reads (one host sync) and resets them."""

    def __init__(self, size: int):
        self.size = size
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, *values: torch.Tensor) -> None:
        step = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
        self.sums = step if self.sums is None else self.sums + step
        self.count += 1

    def drain(self) -> tuple[list[float], int]:
        """(sums, number of steps) since the last drain."""
        sums = [0.0] * self.size if self.sums is None else self.sums.tolist()
        count, self.sums, self.count = self.count, None, 0
        return sums, count

    def fold_into(self, running: list) -> list[float] | None:
        """Drain into ``running`` (the sums onto ``running[:-1]``, the step count onto ``running[-1]``, one host
        sync); returns the means over the drained steps, or None when there were none."""
        values, count = self.drain()
        if not count:
            return None
        for i, value in enumerate(values):
            running[i] += value
        running[-1] += count
        return [value / count for value in values]


def mean_over_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """The mean of each value over the processes (the values themselves on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="mean").tolist()


def start_tracking(accelerator: Accelerator, command: Command, project: str) -> None:
    """With ``--with_tracking``, start the trackers of ``--report_to`` with the run's scalar arguments."""
    if command.tracking.with_tracking:
        values = redact_secrets(command.values())
        accelerator.init_trackers(project, {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))})


def bad_image_count(batches: list[dict]) -> torch.Tensor:
    """Undecodable images skipped in these micro-batches (``--on_bad_image skip``), on the device (no sync)."""
    counts = [b["bad_images"] for b in batches if "bad_images" in b]
    if not counts:
        return torch.zeros(())
    return torch.stack([torch.as_tensor(c).reshape(()).float() for c in counts]).sum()


def report_bad_images(accelerator: Accelerator, record: dict, count: float, epoch: int) -> None:
    """Count the skipped images of an epoch over the ranks, record and print them (only when there were any)."""
    total = int(round(mean_over_ranks(accelerator, [count])[0] * accelerator.num_processes))
    if total:
        record["bad_images_skipped"] = total
        accelerator.print(f"epoch {epoch}: skipped {total} undecodable image{'s' if total > 1 else ''} "
                          "(--on_bad_image skip)")


def describe_count(count: int | None) -> str:
    """A sample count for the start-up line (streams may not know theirs)."""
    return "an unknown number of" if count is None else f"{count}"
