"""What every training command shares: flags, the Accelerator, output-folder guard, checkpoints, preemption, NaN guard.

Checkpoints are Accelerate ``save_state`` folders (every rank takes part) plus our own ``trainer_state.json``
(epoch, step, data position, history), written to a staging folder and renamed into place, so a kill during a save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import distributed as dist

from .fileio import atomic_write_json, read_json

CHECKPOINT_DIR = "checkpoints"
RUN_ARGS_FILE = "run_args.json"
TRAINER_STATE_FILE = "trainer_state.json"
# Flags that may change between a run and its resumption without making it a different run.
RUNTIME_FLAGS = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo",
    "with_tracking", "report_to", "checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers",
    "cache_dir", "output_dir", "torch_compile", "optimizer_implementation", "logging_steps",
})
AUGMENTATION_DEVICES = ("loader", "accelerator")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, learning_rate: float,
                    weight_decay: float) -> None:
    """Flags of transformers' ``*_no_trainer.py`` examples that every command shares."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, required=True, help="Where outputs and checkpoints go.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Allow an output_dir that holds a different run (its checkpoints are removed).")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    g.add_argument("--per_device_eval_batch_size", type=int, default=256)
    g.add_argument("--num_train_epochs", type=int, default=epochs)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Stop after this many optimisation steps (overrides --num_train_epochs).")
    g.add_argument("--learning_rate", type=float, default=learning_rate,
                   help="Base learning rate for a global batch of 256; the effective rate scales linearly.")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--num_warmup_epochs", type=float, default=0.0)
    g.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="Defaults to the accelerate config (or 'no').")
    g.add_argument("--checkpointing_steps", type=str, default="epoch",
                   help="Save a resumable checkpoint every N steps, or 'epoch', or 'no'.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="How many checkpoints to keep.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder, or 'latest' for the newest one in output_dir.")
    g.add_argument("--with_tracking", action="store_true", help="Log metrics to the trackers of --report_to.")
    g.add_argument("--report_to", type=str, default="all")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    s = parser.add_argument_group("speed")
    s.add_argument("--channels_last", action="store_true",
                   help="Run the backbone in channels_last memory format (model and input batches).")
    s.add_argument("--augmentation_device", choices=AUGMENTATION_DEVICES, default="loader",
                   help="Where the random views are drawn: 'loader' (torchvision on each PIL image in the DataLoader) "
                        "or 'accelerator' (the loader only decodes; whole uint8 batches are augmented on the training "
                        "device by nasiam_hf.augment, seeded per sample).")
    s.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the backbone in place (state-dict keys unchanged); the first steps compile.")
    s.add_argument("--optimizer_implementation", choices=OPTIMIZER_IMPLEMENTATIONS, default="auto",
                   help="Optimizer kernels: 'fused' (one kernel per step), 'foreach' (multi-tensor), 'for_loop'; "
                        "'auto' takes fused where this torch build supports it for the device, else foreach.")
    s.add_argument("--logging_steps", type=int, default=25,
                   help="Refresh the progress-bar losses every N steps (reading them waits for the device).")


def check_common_args(args: argparse.Namespace) -> None:
    """Range checks of the shared flags (``None`` means "filled in later from the recipe")."""
    for key in ("per_device_train_batch_size", "num_train_epochs", "max_train_steps"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key} must be at least 1, got {value}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if getattr(args, "logging_steps", 1) < 1:
        raise ValueError(f"--logging_steps must be at least 1, got {args.logging_steps}")
    steps = args.checkpointing_steps
    if not (steps in ("epoch", "no") or (steps.isdigit() and int(steps) > 0)):
        raise ValueError(f"--checkpointing_steps must be a positive integer, 'epoch' or 'no', got {steps!r}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/nasiam-simsiam-r18)")


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator. Batches move to the device with non-blocking copies (the loaders pin their memory on
    CUDA machines), so the copy of the next batch overlaps the work already queued."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    set_seed(args.seed)
    return accelerator


def is_multi_gpu(accelerator: Accelerator) -> bool:
    return accelerator.num_processes > 1 and accelerator.device.type == "cuda"


def prepare_model_layout(model: torch.nn.Module, accelerator: Accelerator, channels_last: bool,
                         torch_compile: bool = False) -> torch.nn.Module:
    """SyncBatchNorm only on several GPUs (it raises on CPU/gloo); optional channels_last memory format; optional
    in-place ``torch.compile`` of every ResNet trunk.

    ``channels_last`` also marks the model (``uses_channels_last``) so the step functions convert their input
    batches, which makes the first convolution read channels_last too. Compiling goes through ``Module.compile()``,
    which compiles the module's call in place: parameter names, ``state_dict`` and ``save_pretrained`` stay as they
    are (no ``_orig_mod.`` prefix).
    """
    from .backbones import ResNetTrunk

    if is_multi_gpu(accelerator):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model._nasiam_channels_last = bool(channels_last)
    if torch_compile:
        for module in model.modules():
            if isinstance(module, ResNetTrunk):
                module.compile(dynamic=False)
    return model


def uses_channels_last(model: torch.nn.Module) -> bool:
    """Whether :func:`prepare_model_layout` put ``model`` in channels_last."""
    return bool(getattr(model, "_nasiam_channels_last", False))


def fused_optimizer_supported(device_type: str) -> bool:
    """Whether this torch build has fused SGD/Adam/AdamW kernels for ``device_type`` (CPU ones since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - very old or very new torch
        return device_type == "cuda"


def build_optimizer(cls: type[torch.optim.Optimizer], params, implementation: str = "auto", **kwargs
                    ) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)`` with the step kernels of ``implementation``.

    "fused" one kernel for all parameters (SGD, Adam, AdamW; CUDA, and CPU since torch 2.4), "foreach" one kernel
    per operation over all parameters, "for_loop" per parameter. "auto" asks for fused when the parameters' device
    has fused kernels in this torch build and falls back to foreach when the optimizer refuses fused.
    """
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {implementation!r}")
    params = list(params)
    if implementation == "foreach":
        return cls(params, foreach=True, **kwargs)
    if implementation == "for_loop":
        return cls(params, foreach=False, **kwargs)
    if implementation == "fused":
        return cls(params, fused=True, **kwargs)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    device = tensors[0].device.type if tensors else "cpu"
    if fused_optimizer_supported(device):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # e.g. an optimizer or dtype without a fused kernel
            pass
    return cls(params, foreach=True, **kwargs)


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


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the recipes: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def mean_over_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """The mean of each value over the processes (the values themselves on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="mean").tolist()


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then a half cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_cosine_schedule(optimizer, accelerator: Accelerator, args: argparse.Namespace, steps_per_epoch: int,
                          total_steps: int, fixed_groups: tuple[int, ...] = ()):
    """Warmup + cosine for every param group except ``fixed_groups`` (SimSiam's fixed predictor lr).

    Accelerate steps a prepared scheduler once per process for every optimiser step, hence the counts multiplied
    by the number of processes.
    """
    n = accelerator.num_processes
    warmup, total = int(args.num_warmup_epochs * steps_per_epoch) * n, total_steps * n
    lambdas = [
        (lambda step: 1.0) if i in fixed_groups else (lambda step: cosine_factor(step, warmup, total))
        for i in range(len(optimizer.param_groups))
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def run_identity(args: argparse.Namespace) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_FLAGS}


def guard_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse an output_dir that holds a different run (compared on saved arguments) unless overwriting.

    Resuming, or re-running with the same arguments, is allowed. Only the main process reads and writes; the
    decision is the same on every rank because they all read the same file before anyone writes it.
    """
    out = Path(args.output_dir)
    saved_path = out / RUN_ARGS_FILE
    current = run_identity(args)
    if saved_path.exists():
        saved = read_json(saved_path)
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff and not args.overwrite_output_dir:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:6])
            raise ValueError(
                f"output_dir {str(out)!r} already holds a different run ({shown}). Pass --overwrite_output_dir to "
                "replace it, or choose another --output_dir."
            )
        if diff and accelerator.is_main_process:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    elif args.resume_from_checkpoint == "latest" and accelerator.is_main_process and not out.exists():
        accelerator.print(f"--resume_from_checkpoint latest: {out} is new, starting from scratch")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(saved_path, current)
    accelerator.wait_for_everyone()


class Checkpointer:
    """Atomic, rotating checkpoints under ``output_dir/checkpoints/step-XXXXXXXX``."""

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int = 2):
        self.accelerator = accelerator
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.total_limit = max(1, total_limit)

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step-*") if (p / TRAINER_STATE_FILE).exists()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def resolve(self, spec: str | None) -> Path | None:
        """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint (or None); else a checkpoint folder."""
        if spec is None:
            return None
        if spec == "latest":
            found = self.checkpoints()
            return found[-1] if found else None
        path = Path(spec)
        if not (path / TRAINER_STATE_FILE).exists():
            raise ValueError(
                f"--resume_from_checkpoint {spec!r} is not a complete checkpoint folder (no {TRAINER_STATE_FILE}); "
                f"available: {[str(p) for p in self.checkpoints()] or 'none'}; or pass 'latest'"
            )
        return path

    def save(self, global_step: int, state: dict) -> Path:
        """Every rank must call this (Accelerate saves per-rank RNG states); the main process publishes the folder."""
        acc = self.accelerator
        final = self.root / f"step-{global_step:08d}"
        staging = self.root / f".staging-step-{global_step:08d}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(staging / TRAINER_STATE_FILE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in self.checkpoints()[: -self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return read_json(path / TRAINER_STATE_FILE)

    def resume(self, spec: str | None, state: dict) -> dict:
        """The trainer state to start from: ``state`` when ``spec`` (``--resume_from_checkpoint``) names no
        checkpoint, else the checkpoint's, whose model, optimiser, scheduler and RNG states are loaded too."""
        path = self.resolve(spec)
        if path is None:
            return state
        state = self.load(path)
        self.accelerator.print(f"resumed from {path} (epoch {state['epoch']}, step {state['global_step']})")
        return state


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


def start_tracking(accelerator: Accelerator, args: argparse.Namespace, project: str) -> None:
    """With ``--with_tracking``, start the trackers of ``--report_to`` with the run's scalar arguments."""
    if args.with_tracking:
        accelerator.init_trackers(project, {k: v for k, v in vars(args).items()
                                            if isinstance(v, (int, float, str, bool))})


def check_finite(loss: torch.Tensor, where: str, checkpointer: Checkpointer) -> None:
    if not math.isfinite(float(loss.detach())):
        last = checkpointer.checkpoints()
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss became {float(loss.detach())} at {where}; stopping ({keep}). Try a lower --learning_rate, "
            "--mixed_precision no, or a different --seed."
        )


def checkpoint_due(args: argparse.Namespace, global_step: int, end_of_epoch: bool) -> bool:
    spec = args.checkpointing_steps
    if spec == "no":
        return False
    if spec == "epoch":
        return end_of_epoch
    return global_step % int(spec) == 0


def run_command(run, parse_args, argv: list[str] | None = None):
    """Parse ``argv`` and run a command; a bad flag value, a bad input or a non-finite loss ends it with a one-line
    message instead of a traceback."""
    try:
        return run(parse_args(argv))
    except NonFiniteLossError as error:
        sys.exit(f"error: {error}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def exit_for_preemption(accelerator: Accelerator, path: Path) -> None:
    accelerator.print(f"stop requested: checkpoint saved at {path}; continue with --resume_from_checkpoint latest")
    accelerator.end_training()
    sys.exit(0)


class StepLoop:
    """Epoch and step bookkeeping shared by the training commands.

    Iterating yields ``(epoch, batch)``; after each step it counts, calls ``on_epoch_end(epoch)`` at the end of an
    epoch, saves checkpoints when due (calling ``before_save()`` first, to fold device-side sums into ``state``)
    and, on a stop request agreed by all ranks, saves one and exits. ``state`` (a JSON-able dict) holds the position
    (``epoch``, ``step_in_epoch``, ``global_step``) and whatever the caller keeps in it; it is what a checkpoint's
    ``trainer_state.json`` stores, so a resumed run skips exactly the batches already seen (views are seeded per
    sample and epoch, so it sees the same ones).
    """

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, loader, state: dict, total_steps: int,
                 checkpointer: Checkpointer, on_epoch_end=None, desc: str = "train", before_save=None):
        self.accelerator, self.args, self.loader, self.state = accelerator, args, loader, state
        self.total_steps, self.checkpointer = total_steps, checkpointer
        self.steps_per_epoch = len(loader)
        self.epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.on_epoch_end = on_epoch_end
        self.before_save = before_save
        self.desc = desc

    def __iter__(self):
        from tqdm.auto import tqdm

        from .data import set_loader_epoch

        acc, state = self.accelerator, self.state
        stop = StopRequest()
        self.progress = tqdm(total=self.total_steps, initial=state["global_step"], desc=self.desc,
                             disable=not acc.is_local_main_process, dynamic_ncols=True)
        try:
            for epoch in range(state["epoch"], self.epochs):
                state["epoch"] = epoch
                set_loader_epoch(self.loader, epoch)
                skip = state["step_in_epoch"]
                for batch in acc.skip_first_batches(self.loader, skip) if skip else self.loader:
                    yield epoch, batch
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    self.progress.update(1)
                    done = state["global_step"] >= self.total_steps
                    end_of_epoch = done or state["step_in_epoch"] >= self.steps_per_epoch
                    if end_of_epoch:
                        if self.on_epoch_end is not None:
                            self.on_epoch_end(epoch)
                        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
                    stopping = stop.should_stop(acc)
                    if checkpoint_due(self.args, state["global_step"], end_of_epoch) or stopping:
                        if self.before_save is not None:
                            self.before_save()
                        path = self.checkpointer.save(state["global_step"], state)
                        if stopping:
                            exit_for_preemption(acc, path)
                    if done:
                        return
                    if end_of_epoch:
                        break
        finally:
            self.progress.close()
            stop.restore()

    def set_postfix(self, **values) -> None:
        self.progress.set_postfix(values, refresh=False)
