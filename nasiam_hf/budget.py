"""A training run's size and cost, told before and while it is spent, and the record of what it did.

Every training command builds a :class:`RunBudget` once its plan and data are known:

* :meth:`RunBudget.announce` prints, before the first update, the updates, the images they take and the epochs,
  naming the values taken by default (the recipe's epochs and batch);
* :meth:`RunBudget.track` wraps the update loop: after a few updates it prints the projected wall time and, when the
  run will take more than :data:`LONG_RUN_SECONDS` with epochs or batch not given, says so with the flags that
  shorten it (at once, after the first update, when even a tenth of that update's time per update is too long);
* :meth:`RunBudget.after_save` wraps the checkpoint callback: the first checkpoint prints its size, how many are kept
  (``--checkpoints_total_limit``) and the disk they take;
* :meth:`RunBudget.outcome` is what ran (updates and fractional epochs done, global batch, learning rates, precision,
  images), for ``training_args.json`` and the model card.

:func:`logging_interval` makes the loss visible from the first updates of a short run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LONG_RUN_SECONDS = 2 * 3600
PROJECT_AFTER_UPDATES = 5  # the projection times the updates after the first (which carries start-up costs)
PROJECT_AFTER_SECONDS = 30.0  # ... or sooner, once this long has passed since the first update ended
FIRST_UPDATE_FACTOR = 10  # the first update may be this many times slower than the next (start-up costs)
DEFAULT_LOGGING_STEPS = 25
SHORTENING_FLAGS = "--num_train_epochs, --max_train_steps or --per_device_train_batch_size"


def logging_interval(given: int | None, total_updates: int | None) -> int:
    """Updates between loss read-outs: ``--logging_steps`` when given; else 25, or fewer so that a short run shows
    its loss about ten times (``min(25, max(1, total // 10))``: a 12-update run logs every update)."""
    if given:
        return int(given)
    if not total_updates:
        return DEFAULT_LOGGING_STEPS
    return min(DEFAULT_LOGGING_STEPS, max(1, int(total_updates) // 10))


def defaults_taken(optimization) -> tuple[str, ...]:
    """The flags of the run's length and batch whose values were not given: ``None`` (the recipe decides) or equal
    to the field's own default (fine-tuning's 30 epochs, batch 128). ``--max_train_steps`` given fixes the length."""
    fields = {f.name: f for f in dataclasses.fields(optimization)}
    taken = []
    for name in ("num_train_epochs", "per_device_train_batch_size"):
        value = getattr(optimization, name, None)
        if value is None or value == fields[name].default:
            taken.append(f"--{name}")
    if getattr(optimization, "max_train_steps", None) is not None and "--num_train_epochs" in taken:
        taken.remove("--num_train_epochs")
    return tuple(taken)


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(int(round(minutes)), 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def planned_checkpoints(every: tuple[str, int] | None, total_updates: int, updates_per_epoch: int | None) -> int | None:
    """How many checkpoints the whole run writes (``--checkpointing_steps``); None when it cannot be known."""
    if every is None:
        return 0
    unit, n = every
    if unit == "steps":
        return total_updates // n
    if not updates_per_epoch:
        return None
    epochs = -(-total_updates // updates_per_epoch)  # a partial last epoch ends (and saves) too
    return epochs // n


@dataclass(frozen=True)
class RunSize:
    """What a run will do: its updates (``start`` of them already done when resuming), their images and epochs."""

    command: str
    updates: int
    global_batch: int
    train_images: int | None
    updates_per_epoch: int | None
    defaults: tuple[str, ...] = ()
    recipe: str | None = None
    start: int = 0
    note: str = ""  # e.g. the alpha steps' images of a search

    def epochs_of(self, updates: int) -> float | None:
        return updates / self.updates_per_epoch if self.updates_per_epoch else None

    def describe(self) -> str:
        epochs = self.epochs_of(self.updates)
        images = self.updates * self.global_batch
        text = (f"{self.command} run size: {self.updates} updates x global batch {self.global_batch} = {images} "
                "training images" + (f" ({epochs:.4g} epoch{'' if epochs == 1 else 's'} of {self.updates_per_epoch} "
                                     f"update{'' if self.updates_per_epoch == 1 else 's'} over {self.train_images} "
                                     "images)" if epochs is not None
                                     else " (the number of training images is unknown)"))
        if self.note:
            text += f", {self.note}"
        if self.start:
            text += f"; resuming after update {self.start}, {self.updates - self.start} to go"
        if self.defaults:
            source = f"the {self.recipe} recipe" if self.recipe else "the defaults"
            text += f"; {' and '.join(self.defaults)} not given: {source} decided"
        return text


class RunBudget:
    """Prints a run's size, its projected wall time and its checkpoints' disk use (see the module docstring)."""

    def __init__(self, accelerator, size: RunSize, checkpoint_every: tuple[str, int] | None = None,
                 checkpoints_total_limit: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.accelerator, self.size, self.clock = accelerator, size, clock
        self.checkpoint_every, self.total_limit = checkpoint_every, checkpoints_total_limit
        self.started = clock()
        self.first_done: float | None = None
        self.updates_done = 0  # in this process's life (after a resume: since it)
        self.projection: dict | None = None
        self.checkpoint_noted = self.long_warned = False

    def print(self, text: str) -> None:
        self.accelerator.print(text)

    def announce(self) -> None:
        """Before the first update: the run's size."""
        self.print(self.size.describe())

    def track(self, loop: Iterable) -> Iterator:
        """Yield ``loop``'s items; after each update is done, time it and project the run once."""
        for item in loop:
            yield item
            self.update_done()

    def update_done(self) -> None:
        now = self.clock()
        self.updates_done += 1
        if self.updates_done == 1:
            self.first_done = now
            self.first_update_check(now - self.started)
            return
        if self.projection is not None:
            return
        to_go = self.size.updates - self.size.start - self.updates_done
        timed = now - self.first_done
        if self.updates_done >= PROJECT_AFTER_UPDATES or timed >= PROJECT_AFTER_SECONDS or to_go <= 0:
            self.project(timed / (self.updates_done - 1), to_go, now - self.started)

    def first_update_check(self, seconds: float) -> None:
        """Warn at once when even a tenth of the first update's time (it carries the start-up costs) makes a run
        with default length or batch longer than :data:`LONG_RUN_SECONDS`; the projection follows later."""
        to_go = self.size.updates - self.size.start - 1
        if not self.size.defaults or seconds / FIRST_UPDATE_FACTOR * to_go <= LONG_RUN_SECONDS:
            return
        self.long_warned = True
        self.print(self.long_warning(f"its first update took {format_seconds(seconds)}; even at a tenth of that, "
                                     f"its {to_go} updates to go take {format_seconds(seconds / 10 * to_go)}"))

    def long_warning(self, how_long: str) -> str:
        source = f"the {self.size.recipe} recipe's" if self.size.recipe else "default"
        epochs = self.size.epochs_of(self.size.updates)
        what = (f"{epochs:.4g} epochs at global batch {self.size.global_batch}" if epochs is not None
                else f"{self.size.updates} updates at global batch {self.size.global_batch}")
        return (f"warning: this run is long: {how_long} ({what}, with {' and '.join(self.size.defaults)} taken from "
                f"{source} values). Shorten it with {SHORTENING_FLAGS} (stop now with Ctrl-C: a checkpoint is saved)")

    def project(self, per_update: float, to_go: int, elapsed: float) -> None:
        total = elapsed + per_update * max(to_go, 0)
        self.projection = {"seconds_per_update": per_update, "projected_seconds": total,
                           "timed_updates": self.updates_done - 1}
        self.print(f"budget: {per_update:.3g} s per update (timed over updates 2-{self.updates_done}): about "
                   f"{format_seconds(total)} for this run's {self.size.updates - self.size.start} updates, "
                   f"{format_seconds(per_update * max(to_go, 0))} to go (evaluations and checkpoints come on top)")
        if total > LONG_RUN_SECONDS and self.size.defaults and not self.long_warned:
            self.long_warned = True
            self.print(self.long_warning(f"it will take about {format_seconds(total)}"))

    def after_save(self, then: Callable[[Path], object] | None = None) -> Callable[[Path], None]:
        """A checkpoint callback (main process) that reports the first checkpoint, then calls ``then(path)``."""
        def callback(path: Path) -> None:
            if not self.checkpoint_noted:
                self.checkpoint_noted = True
                self.print(self.describe_checkpoint(Path(path)))
            if then is not None:
                then(path)
        return callback

    def describe_checkpoint(self, path: Path) -> str:
        size = folder_size(path)
        planned = planned_checkpoints(self.checkpoint_every, self.size.updates, self.size.updates_per_epoch)
        limit = self.total_limit or 1
        kept = limit if planned is None else max(1, min(limit, planned))
        writes = "" if planned is None else f"this run writes {planned} and "
        return (f"checkpoint {path.name}: {format_bytes(size)}; {writes}keeps the last {kept} "
                f"(--checkpoints_total_limit {limit}): about {format_bytes(size * kept)} on disk under {path.parent}. "
                "They stay after the run, for --resume_from_checkpoint: delete them when no longer needed (or pass "
                "--checkpointing_steps no)")

    def outcome(self, updates_done: int, *, learning_rate: float | None = None,
                base_learning_rate: float | None = None, mixed_precision: str | None = None) -> dict:
        """What the run did, for ``training_args.json`` (``"outcome"``) and the model card."""
        size = self.size
        epochs = size.epochs_of(updates_done)
        record = {"updates": int(updates_done), "planned_updates": int(size.updates),
                  "epochs": None if epochs is None else round(epochs, 4), "updates_per_epoch": size.updates_per_epoch,
                  "global_batch": int(size.global_batch),
                  "images_seen": int(updates_done * size.global_batch), "train_images": size.train_images,
                  "learning_rate": learning_rate, "base_learning_rate": base_learning_rate,
                  "mixed_precision": mixed_precision or "no"}
        return record  # no timings: the record of a rerun of the same run is the same record


def run_budget(accelerator, command_name: str, command, opt, train_feed, total_updates: int, start: int,
               train_images: int | None, note: str = "") -> RunBudget:
    """The budget of a training command: ``opt`` is its optimisation plan, ``train_feed`` its feed of updates."""
    size = RunSize(command=command_name, updates=int(total_updates), global_batch=int(opt.global_batch),
                   train_images=train_images, updates_per_epoch=train_feed.updates_in_epoch(0),
                   defaults=defaults_taken(command.optimization), recipe=opt.recipe, start=int(start), note=note)
    return RunBudget(accelerator, size, command.run.checkpoint_every, command.run.checkpoints_total_limit)


__all__ = [
    "DEFAULT_LOGGING_STEPS",
    "LONG_RUN_SECONDS",
    "RunBudget",
    "RunSize",
    "defaults_taken",
    "folder_size",
    "format_bytes",
    "format_seconds",
    "logging_interval",
    "planned_checkpoints",
    "run_budget",
]
