"""The epoch/update loop of every training command, and the one decision all processes take together per update.

An update (the micro-batches of one optimizer step) goes:

1. each micro-batch's forward; the step function hands its loss to :meth:`UpdateGuard.watch`, which keeps a
   device-side "non-finite" flag (no host sync);
2. after the last forward, before its backward (where DDP all-reduces the gradients), :meth:`UpdateGuard.decide`
   packs into one small tensor: a stop signal seen (SIGTERM, SIGINT), a non-finite loss (and on which process), this
   process's next update missing (a stream whose processes may run out at different times is read one update
   ahead), this process's data unreadable (a bad image: stand-in micro-batches kept it in step) or its validation
   data missing; one all-reduce (MAX) on several processes, one host sync;
3. every process then does the same: a non-finite loss or unreadable data stops them all before any backward
   (nothing applied, nothing saved; the process that saw it prints the one line); otherwise the update is applied,
   then the loop ends the epoch (out of data) or saves and exits (a stop).

No process raises on its own before a collective the others enter: whatever one finds wrong during an update waits
for the decision. A stop finishes the update in progress, so every checkpoint lies between updates and a resumed run
continues exactly; on one process a stop that would lose nothing (no update since the last checkpoint) ends the run
at the next micro-batch instead.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import distributed as dist

from .checkpoints import Checkpointer
from .errors import NonFiniteLossError, TrainingError, UsageError

# A fault-injection hook for the tests, read once per loop: "nan_loss@STEP" (or "nan_loss@STEP:rank=R") makes the
# loss of update STEP non-finite (on process R only), "sigterm@STEP" sends this process a real SIGTERM as update STEP
# starts. Nothing else reads it; unset, it costs nothing.
FAULT_ENV = "NASIAM_INJECT_FAULT"
PARTS = ("alpha step", "weight step")  # the losses an update can watch, in the order they run


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return None
        try:
            kind, rest = spec.split("@", 1)
            step, *options = rest.split(":")
            rank = next((int(o.split("=", 1)[1]) for o in options if o.startswith("rank=")), None)
            fault = cls(kind, int(step), rank)
        except (ValueError, IndexError):
            fault = None
        if fault is None or fault.kind not in ("nan_loss", "sigterm"):
            raise UsageError(f"{FAULT_ENV}={spec!r}: expected nan_loss@STEP[:rank=R] or sigterm@STEP")
        return fault

    def hits(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.step == step and self.rank in (None, rank)


class StopRequest:
    """SIGTERM and SIGINT turned into a flag, read by the update decision (no signal ends a run mid-step)."""

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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass(frozen=True)
class Decision:
    """What every process does after the update (the same on all of them)."""

    stop: bool = False  # a stop signal reached some process: save and exit after this update
    out_of_data: bool = False  # some process has no next update: the epoch ends after this one


class UpdateGuard:
    """The checks of one update, handed by :class:`StepLoop` (or built alone, e.g. by a benchmark) to the step
    functions: :meth:`watch` each loss after its forward, :meth:`decide` once after the last forward."""

    def __init__(self, accelerator: Accelerator, stop: StopRequest | None = None, on_failure=None,
                 last_good=None, stop_now=None, describe_last_good=None):
        self.accelerator = accelerator
        self.stop = stop
        self.on_failure = on_failure  # called on every process before a failure is raised (closes the loop)
        self.last_good = last_good or (lambda: None)
        self.describe_last_good = describe_last_good  # the stop message's clause on the checkpoint to go back to
        self.stop_now = stop_now  # ends the run at once (a stop that loses nothing)
        self.fault = Fault.from_env()
        self.begin("", 0)

    def begin(self, where: str, step: int, next_missing=lambda: False, may_stop_early: bool = False,
              data_error: BaseException | None = None) -> None:
        """Arm for update ``step`` (1-based), described as ``where`` in messages. ``next_missing()``: whether this
        process lacks the next update. ``may_stop_early``: a stop may end the run before the next micro-batch (one
        process, nothing done since the last checkpoint). ``data_error``: reading this update's data failed here
        (the micro-batches are stand-ins): the decision stops every process."""
        self.where, self.step, self.next_missing, self.may_stop_early = where, step, next_missing, may_stop_early
        self.data_error = data_error
        self.flags: dict[str, torch.Tensor] = {}
        self.losses: dict[str, list[torch.Tensor]] = {}
        self.validation_missing = False
        self.decision: Decision | None = None
        if self.fault is not None and self.fault.hits("sigterm", step, self.accelerator.process_index):
            os.kill(os.getpid(), signal.SIGTERM)

    def before_micro_batch(self) -> None:
        """Called before each forward: on one process, a stop that would lose nothing ends the run now."""
        if self.may_stop_early and self.stop is not None and self.stop.flag and self.stop_now is not None:
            self.stop_now()

    def watch(self, loss: torch.Tensor, part: str = "weight step") -> torch.Tensor:
        """Note whether ``loss`` is finite (on the device: no sync); returns the loss to go on with."""
        if self.fault is not None and self.fault.hits("nan_loss", self.step, self.accelerator.process_index):
            loss = loss * float("nan")
        bad = ~torch.isfinite(loss.detach()).all()
        self.flags[part] = bad if part not in self.flags else self.flags[part] | bad
        self.losses.setdefault(part, []).append(loss.detach())
        return loss

    def data_failed(self, error: BaseException) -> None:
        """Reading this update's data failed here (the caller goes on with stand-ins): the decision stops every
        process, this one naming ``error``."""
        if self.data_error is None:
            self.data_error = error

    def missing_validation(self) -> None:
        """This process's validation data gave no batch in a whole epoch (stand-ins were used): the decision stops
        every process."""
        self.validation_missing = True

    def decide(self) -> Decision:
        """The one cross-process decision of the update (see the module docstring); raises on every process alike
        when the update must not be applied."""
        acc = self.accelerator
        me = float(acc.process_index + 1)
        host = torch.tensor([float(self.stop is not None and self.stop.flag), float(self.next_missing()),
                             me if self.data_error is not None else 0.0, me if self.validation_missing else 0.0],
                            dtype=torch.float32)
        zero = torch.zeros((), dtype=torch.bool, device=acc.device)
        nonfinite = torch.stack([self.flags.get(part, zero) for part in PARTS]).float() * me
        flags = torch.cat([host.to(acc.device, non_blocking=True), nonfinite])
        if acc.num_processes > 1 and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, missing, data, validation, *bad = flags.tolist()  # the update's one host sync
        if data:
            self._fail(self._data_failure(), int(data))
        if validation:
            self._fail(TrainingError(
                f"the validation half gives process {int(validation) - 1} no full batch in an epoch ({self.where}): "
                "use a smaller --per_device_train_batch_size, fewer processes, or more data"), int(validation))
        for part, culprit in zip(PARTS, bad):
            if culprit:
                self._fail(self._non_finite(part, int(culprit)), int(culprit))
        self.decision = Decision(stop=bool(stop), out_of_data=bool(missing))
        self.flags, self.losses = {}, {}
        return self.decision

    def _non_finite(self, part: str, culprit: int) -> NonFiniteLossError:
        values = [float(v) for v in self.losses.get(part, []) if not torch.isfinite(v).all()]
        value = f"{values[0]}" if values else "non-finite"
        where = self.where + (f" ({part})" if len(self.losses) > 1 else "")
        if self.accelerator.num_processes > 1:
            where += f" on process {culprit - 1}"
        if self.describe_last_good is not None:
            keep = self.describe_last_good()
        else:
            last = self.last_good()
            keep = f"the last checkpoint is {last}" if last else "no checkpoint had been written yet"
        return NonFiniteLossError(
            f"the loss became {value} at {where}; stopping before the update was applied ({keep}). Try a lower "
            "--learning_rate, --mixed_precision no, or a different --seed.")

    def agree_on_start(self, have: bool, data_error: BaseException | None) -> bool:
        """As an epoch starts: whether every process has its first update (one all-reduce on several processes,
        none on one); a process that failed to read it stops them all."""
        acc = self.accelerator
        self.data_error = data_error
        me = float(acc.process_index + 1)
        missing, data = float(not have), me if data_error is not None else 0.0
        if acc.num_processes > 1 and dist.is_initialized():
            flags = torch.tensor([missing, data], device=acc.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            missing, data = flags.tolist()
        if data:
            self._fail(self._data_failure(), int(data))
        return not missing

    def _data_failure(self) -> BaseException:
        from .data import BadImageError

        error = self.data_error
        if error is None:  # another process failed: it prints why
            return TrainingError(f"another process could not read its data ({self.where}); the run stopped")
        if isinstance(error, BadImageError):
            last = self.last_good()
            keep = f"the last checkpoint is {last}" if last else "no checkpoint had been written yet"
            return TrainingError(f"{error}; the run stopped ({keep}): rerun with --on_bad_image skip"
                                 + (" --resume_from_checkpoint latest" if last else ""))
        return error

    def _fail(self, error: BaseException, culprit: int) -> None:
        try:
            error.quiet = self.accelerator.process_index + 1 != culprit  # one process prints the line
        except AttributeError:  # pragma: no cover - an exception type without attributes
            pass
        if self.on_failure is not None:
            self.on_failure()
        if error is self.data_error:
            raise error
        raise error from self.data_error


def due(every: tuple[str, int] | None, global_step: int, epoch: int, end_of_epoch: bool) -> bool:
    """Whether a periodic action (``parse_every``: ("steps", n) or ("epochs", n), None = never) is due now."""
    if every is None:
        return False
    unit, n = every
    if unit == "steps":
        return global_step % n == 0
    return end_of_epoch and (epoch + 1) % n == 0


def restore_positions(state: dict, feeds: dict) -> None:
    """Give each feed (``{"train": feed, ...}``, as :class:`StepLoop` saves them) its position from a resumed
    trainer state; a no-op on a fresh start and for map-style feeds."""
    positions = state.get("data_position") or {}
    for name, feed in feeds.items():
        feed.load_state_dict(positions.get(name))


class StepLoop:
    """Epoch and update bookkeeping shared by the training commands.

    Iterating yields ``(epoch, micro_batches)``: the micro-batches of one optimizer update, from a feed
    (:mod:`nasiam_hf.feeds`: a map-style loader or a stream). The caller runs the update through a step function
    given :attr:`guard` (which must reach :meth:`UpdateGuard.decide`). After each update the loop counts, calls
    ``on_epoch_end(epoch)`` at the end of an epoch, saves checkpoints when ``checkpoint_every`` says so (calling
    ``before_save()`` first, to fold device-side sums into ``state``, and ``after_save(path)`` on the main process
    after, e.g. to push it) and, when the decision says stop, saves one and exits (status 0).
    ``state`` (a JSON-able dict) holds the position (``epoch``, ``step_in_epoch`` and ``global_step``, in updates),
    the feeds' own positions (``data_position``, for streams) and whatever the caller keeps in it; it is what a
    checkpoint's ``trainer_state.json`` stores, so a resumed run continues with exactly the batches (and, views
    being seeded per sample and epoch, the views) an uninterrupted one would have seen. ``epochs`` None: as many
    as ``total_steps`` takes (streams of unknown length).

    Every epoch starts with one agreement (on several processes) that each has its first update. An epoch that ends
    without an update (a stream that gave too little; configurations whose epochs can hold none are refused before,
    by :meth:`~nasiam_hf.plans.OptimizationPlan.total_steps`) stops the run with one line. Data that cannot be read
    on one process (a bad image with ``--on_bad_image error``: its file and row are named) stops every process at
    that update's decision, keeping the last checkpoint (exit status 1).
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
        self.saved_step = state["global_step"]  # a resumed run starts at its checkpoint: nothing new to save yet
        self.stop: StopRequest | None = None
        self.progress = None
        self.guard = UpdateGuard(accelerator, on_failure=self.close, last_good=self.last_good,
                                 stop_now=self._stop_without_saving,
                                 describe_last_good=checkpointer.describe_last_good)

    def last_good(self) -> Path | None:
        """The checkpoint a failure message names as the one to go back to."""
        checkpoints = self.checkpointer.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def _save(self, stopping: bool) -> None:
        acc, state = self.accelerator, self.state
        if self.before_save is not None:
            self.before_save()
        state["data_position"] = {name: feed.state_dict() for name, feed in self.feeds.items()}
        path = self.checkpointer.save(state["global_step"], state)
        self.saved_step = state["global_step"]
        if self.after_save is not None and acc.is_main_process:
            self.after_save(path)
        if stopping:
            self._exit(f"stop requested: checkpoint saved at {path}; continue with --resume_from_checkpoint latest")

    def _exit(self, line: str) -> None:
        self.close()
        self.accelerator.print(line)
        self.accelerator.end_training()
        sys.exit(0)

    def _end_epoch(self, epoch: int) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch)
        self.state["epoch"], self.state["step_in_epoch"] = epoch + 1, 0

    def __iter__(self):
        from tqdm.auto import tqdm

        acc, state, guard = self.accelerator, self.state, self.guard
        self.stop = guard.stop = StopRequest()
        self.progress = tqdm(total=self.total_steps, initial=state["global_step"], desc=self.desc,
                             disable=not acc.is_local_main_process, dynamic_ncols=True)
        one_process = acc.num_processes == 1
        try:
            epochs = range(state["epoch"], self.epochs) if self.epochs is not None else itertools.count(state["epoch"])
            for epoch in epochs:
                if state["global_step"] >= self.total_steps:
                    return
                state["epoch"] = epoch
                updates = self.feed.updates_in_epoch(epoch)
                ended = False
                groups = iter(self.feed.groups(epoch, state["step_in_epoch"]))
                group, error = _next_group(groups, None)
                guard.where = f"epoch {epoch}, step {state['global_step'] + 1}"
                if not guard.agree_on_start(group is not None, error):
                    group = None  # some process has no update left in this epoch
                while group is not None:
                    step = state["global_step"] + 1
                    guard.begin(f"epoch {epoch}, step {step}", step, self.feed.next_missing,
                                may_stop_early=one_process and self.saved_step == state["global_step"],
                                data_error=error)
                    yield epoch, group
                    decision = guard.decision
                    if decision is None:
                        raise RuntimeError("the training step did not reach UpdateGuard.decide()")
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    self.progress.update(1)
                    done = state["global_step"] >= self.total_steps
                    ended = done or decision.out_of_data or (updates is not None and state["step_in_epoch"] >= updates)
                    if ended:
                        self._end_epoch(epoch)
                    if due(self.checkpoint_every, state["global_step"], epoch, ended) or decision.stop:
                        self._save(decision.stop)
                    if ended:
                        break
                    # a failed read stands in the last update (the decision then stops every process before its
                    # backward): the others are about to enter that update's collectives
                    group, error = _next_group(groups, group)
                    if group is None:  # pragma: no cover - every process was promised this update
                        raise RuntimeError(f"the training data ended early in epoch {epoch} on this process")
                if not ended:
                    if state["step_in_epoch"] == 0:
                        last = self.last_good()
                        raise TrainingError(
                            f"epoch {epoch} gave no full update ({self.feed.describe_update()}): the data ran out "
                            "before one; use a smaller --per_device_train_batch_size or --gradient_accumulation_steps, "
                            "or more data" + (f" (the last checkpoint is {last})" if last else ""))
                    self._end_epoch(epoch)  # the stream ran out after a partial epoch it had already begun
                    if due(self.checkpoint_every, state["global_step"], epoch, True):
                        self._save(False)
        finally:
            self.close()

    def _stop_without_saving(self) -> None:
        step = self.state["global_step"]
        self._exit("stop requested before the first update: nothing to save" if not step else
                   f"stop requested: nothing new since the checkpoint of step {step}; continue with "
                   "--resume_from_checkpoint latest")

    def close(self) -> None:
        """Put the signal handlers back and close the progress bar (also when a failure ends the loop)."""
        if self.stop is not None:
            self.stop.restore()
        if self.progress is not None:
            self.progress.close()

    def set_postfix(self, **values) -> None:
        self.progress.set_postfix(values, refresh=False)


def _next_group(groups, stand_in: list[dict] | None) -> tuple[list[dict] | None, BaseException | None]:
    """The next update of ``groups``, or ``(stand_in, the error)`` when reading it failed on this process."""
    try:
        return next(groups, None), None
    except Exception as error:  # noqa: BLE001 - decided by every process together (UpdateGuard.decide)
        return stand_in, error


__all__ = ["FAULT_ENV", "Decision", "StepLoop", "StopRequest", "UpdateGuard", "due", "restore_positions"]
