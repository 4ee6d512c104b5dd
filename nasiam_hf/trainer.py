"""What every training engine shares around its steps: the Accelerator, the output-folder guard of a command, the
model layout (SyncBatchNorm, channels_last, compile), device-side running sums, preemption, the NaN guard, tracking
and the epoch/update loop. Checkpoints themselves live in :mod:`nasiam_hf.checkpoints`, the optimisers and the
weight step in :mod:`nasiam_hf.optimization`.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from torch import distributed as dist

from .arguments import Command, PrecisionArguments, TrackingArguments
from .checkpoints import Checkpointer, OutputPlan, guard_output_dir
from .errors import NonFiniteLossError, TrainingError, UsageError
from .hub.metadata import redact_secrets


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
    """What every training command does first, in this order: the Accelerator (and the engine check), the decision
    about ``--output_dir`` (nothing written yet), the data (``with_eval``: load the eval split too), and its notes
    printed once. Returns ``(accelerator, output plan, splits)``."""
    from .data import load_splits

    run = command.run
    accelerator = make_accelerator(run.output_dir, run.seed, command.precision, command.tracking,
                                   command.optimization.gradient_accumulation_steps)
    output = guard_output(command, accelerator)
    splits = load_splits(command.data, run.seed, with_eval=with_eval, require_labels=require_labels,
                         image_size=image_size)
    for note in splits.notes:
        accelerator.print(note)
    return accelerator, output, splits


def guard_output(command: Command, accelerator: Accelerator) -> OutputPlan:
    """Decide (and print) what ``command`` does with its ``--output_dir``: the rules of
    :func:`nasiam_hf.checkpoints.decide_output_dir`, with the identity and the keys that may change on resume
    given by the arguments' ``resume`` rules (:mod:`nasiam_hf.arguments`)."""
    values, free, extend = command.identity()
    run = command.run
    return guard_output_dir(accelerator, run.output_dir, values, mutable_keys=free | extend,
                            resume=run.resume_from_checkpoint, overwrite=run.overwrite_output_dir)


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


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps; ranks agree through an all-reduce."""

    def __init__(self):
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame):
        self.flag = True

    def should_stop(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1 or not dist.is_initialized():
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def start_tracking(accelerator: Accelerator, command: Command, project: str) -> None:
    """With ``--with_tracking``, start the trackers of ``--report_to`` with the run's scalar arguments."""
    if command.tracking.with_tracking:
        values = redact_secrets(command.values())
        accelerator.init_trackers(project, {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))})


def check_finite(loss: torch.Tensor, where: str, checkpointer: Checkpointer) -> None:
    if not math.isfinite(float(loss.detach())):
        last = checkpointer.checkpoints()
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss became {float(loss.detach())} at {where}; stopping ({keep}). Try a lower --learning_rate, "
            "--mixed_precision no, or a different --seed."
        )


def due(every: tuple[str, int] | None, global_step: int, epoch: int, end_of_epoch: bool) -> bool:
    """Whether a periodic action (``parse_every``: ("steps", n) or ("epochs", n), None = never) is due now."""
    if every is None:
        return False
    unit, n = every
    if unit == "steps":
        return global_step % n == 0
    return end_of_epoch and (epoch + 1) % n == 0


def exit_for_preemption(accelerator: Accelerator, path: Path) -> None:
    accelerator.print(f"stop requested: checkpoint saved at {path}; continue with --resume_from_checkpoint latest")
    accelerator.end_training()
    sys.exit(0)


class StepLoop:
    """Epoch and update bookkeeping shared by the training commands.

    Iterating yields ``(epoch, micro_batches)``: the micro-batches of one optimizer update (a list of one batch
    without accumulation), from a feed (:mod:`nasiam_hf.feeds`: a map-style loader or a stream). After each update
    it counts, calls ``on_epoch_end(epoch)`` at the end of an epoch, saves checkpoints when ``checkpoint_every``
    says so (calling ``before_save()`` first, to fold device-side sums into ``state``, and ``after_save(path)`` on
    the main process after, e.g. to push it) and, on a stop request agreed by all ranks, saves one and exits.
    ``state`` (a JSON-able dict) holds the position (``epoch``, ``step_in_epoch`` and ``global_step``, in updates),
    the feed's own position (``data_position``, for streams) and whatever the caller keeps in it; it is what a
    checkpoint's ``trainer_state.json`` stores, so a resumed run continues with exactly the batches (and, views
    being seeded per sample and epoch, the views) an uninterrupted one would have seen. ``epochs`` None: as many
    as ``total_steps`` takes (streams of unknown length).

    A bad image met while training (``--on_bad_image error``) stops the run with its file and row, keeping the last
    checkpoint (exit status 1).
    """

    def __init__(self, accelerator: Accelerator, feed, state: dict, total_steps: int, checkpointer: Checkpointer,
                 checkpoint_every: tuple[str, int] | None, on_epoch_end=None, desc: str = "train", before_save=None,
                 after_save=None, epochs: int | None = None, other_feeds: dict | None = None):
        self.accelerator, self.feed, self.state = accelerator, feed, state
        self.feeds = {"train": feed, **(other_feeds or {})}  # whose positions a checkpoint holds
        self.total_steps, self.checkpointer, self.checkpoint_every = total_steps, checkpointer, checkpoint_every
        self.epochs = epochs
        self.on_epoch_end = on_epoch_end
        self.before_save, self.after_save = before_save, after_save
        self.desc = desc

    def _save(self, stopping: bool) -> None:
        acc, state = self.accelerator, self.state
        if self.before_save is not None:
            self.before_save()
        state["data_position"] = {name: feed.state_dict() for name, feed in self.feeds.items()}
        path = self.checkpointer.save(state["global_step"], state)
        if self.after_save is not None and acc.is_main_process:
            self.after_save(path)
        if stopping:
            exit_for_preemption(acc, path)

    def _end_epoch(self, epoch: int) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch)
        self.state["epoch"], self.state["step_in_epoch"] = epoch + 1, 0

    def __iter__(self):
        from tqdm.auto import tqdm

        from .data import BadImageError

        acc, state = self.accelerator, self.state
        stop = StopRequest()
        self.progress = tqdm(total=self.total_steps, initial=state["global_step"], desc=self.desc,
                             disable=not acc.is_local_main_process, dynamic_ncols=True)
        try:
            epochs = range(state["epoch"], self.epochs) if self.epochs is not None else itertools.count(state["epoch"])
            for epoch in epochs:
                if state["global_step"] >= self.total_steps:
                    return
                state["epoch"] = epoch
                updates = self.feed.updates_in_epoch(epoch)
                ended = False
                for group in self.feed.groups(epoch, state["step_in_epoch"]):
                    yield epoch, group
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    self.progress.update(1)
                    done = state["global_step"] >= self.total_steps
                    ended = done or (updates is not None and state["step_in_epoch"] >= updates)
                    if ended:
                        self._end_epoch(epoch)
                    stopping = stop.should_stop(acc)
                    if due(self.checkpoint_every, state["global_step"], epoch, ended) or stopping:
                        self._save(stopping)
                    if ended:
                        break
                if not ended:  # the stream ran out (its length was not known ahead): the last update ended it
                    self._end_epoch(epoch)
                    if due(self.checkpoint_every, state["global_step"], epoch, True):
                        self._save(False)
        except BadImageError as error:
            last = self.checkpointer.checkpoints()
            keep = f"the last checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
            raise TrainingError(f"{error}; the run stopped ({keep}): rerun with --on_bad_image skip"
                                + (" --resume_from_checkpoint latest" if last else "")) from error
        finally:
            self.progress.close()
            stop.restore()

    def set_postfix(self, **values) -> None:
        self.progress.set_postfix(values, refresh=False)


def restore_positions(state: dict, feeds: dict) -> None:
    """Give each feed (``{"train": feed, ...}``, as :class:`StepLoop` saves them) its position from a resumed
    trainer state; a no-op on a fresh start and for map-style feeds."""
    positions = state.get("data_position") or {}
    for name, feed in feeds.items():
        feed.load_state_dict(positions.get(name))


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
