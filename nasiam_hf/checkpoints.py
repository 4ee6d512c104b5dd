"""Resumable checkpoints and the output-folder guard of every training run.

Checkpoints are Accelerate ``save_state`` folders (every rank takes part) plus our ``trainer_state.json`` (epoch,
step, data position, history), the model's ``config.json`` (and image processor) so a checkpoint can be exported as
a model, and ``checkpoint_files.json`` (every file and its size, written last) so later damage is noticed. They are
written to ``checkpoints/.staging-step-*`` and renamed into place: a kill during a save leaves the previous ones.

The guard (:func:`decide_output_dir`) decides, before anything is written, what a run does with its ``output_dir``:

* nothing there, or a run that left nothing to keep (no intact checkpoint, no model): start there;
* the same run (every identity key equal, except the ``mutable_keys``) with ``--resume_from_checkpoint``: continue
  from the newest intact checkpoint (``latest``) or the one named; grown ``num_train_epochs`` / ``max_train_steps``
  extend a finished run, and the schedule is recomputed over the new length;
* the same run without ``--resume_from_checkpoint``: refused (it would start again at step 0 over the checkpoints);
* a different run, or a resume with a changed identity key: refused, naming the keys and both values;
* files without a run record of ours (another tool's model, other files): refused;
* ``--overwrite_output_dir``: deletes what our runs write (checkpoints, run files and model files)
  and keeps every other file; together with ``--resume_from_checkpoint`` it is refused as a contradiction.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .checkpoint_health import (
    HEALTH_KEY, GoodCheckpoint, describe_last_good, file_crc32, last_good, require_usable_checkpoint,
    usable_checkpoint, weights_health,
)
from .errors import DamagedCheckpointError, OutputDirError, without_unsafe_advice
from .fileio import STAGING_DIR, atomic_write_json, finish_publish
from .folders import (
    CHECKPOINT_DIR, CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX, CONFIG_FILE, DATA_LISTING_FILE, RUN_FILES, RUN_LOCK_FILES,
    RUN_RECORD_FILE, TRAINER_STATE_FILE, FolderKind, checkpoint_step, inspect_path, read_trainer_state,
    survey_checkpoints,
)
from .run_lock import check_output_path

STAGING_PREFIX = ".staging-"
# Arguments whose growth extends a finished run (the schedule is recomputed over the new length).
LENGTH_KEYS = frozenset({"num_train_epochs", "max_train_steps"})
# Files a run of ours writes at the top of output_dir besides run files (the model, plots); --overwrite_output_dir
# deletes them, whoever wrote them, since the run rewrites them anyway.
MODEL_FILES = frozenset({
    CONFIG_FILE, "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json", "README.md",
    "genotype.json", "genotype.png", "loss.png", "knn_accuracy.png", "collapse.png", "alphas.png", "search_loss.png",
    "search_diagnostics.png", "linear_probe.safetensors",
})
# Tracker folders: runs/ (where the engines point Accelerate's trackers).
TRACKER_DIRS = frozenset({"runs"})
IGNORED_KEYS = frozenset({"output_dir", "resume_from_checkpoint", "overwrite_output_dir"})
DATA_KEY = "data_fingerprint"  # the identity key of the run's data (nasiam_hf.data.fingerprint)
_SECRET = re.compile(r"token|password|secret", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _modeling_code_files() -> frozenset[str]:
    """The modeling code ``save_pretrained`` copies next to the weights (for ``trust_remote_code``)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import configuration_nasiam, modeling_nasiam

    names = {Path(modeling_nasiam.__file__).name, Path(configuration_nasiam.__file__).name}
    for module in (modeling_nasiam, configuration_nasiam):
        names.update(Path(f).name for f in get_relative_import_files(module.__file__))
    return frozenset(names)


def _jsonable(values: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(values), default=str, sort_keys=True))


def run_identity(values: Mapping[str, Any]) -> dict:
    """What is recorded and compared: the values as JSON, without the flags that only say how to treat the folder
    (``output_dir``, ``resume_from_checkpoint``, ``overwrite_output_dir``) and without secrets (tokens)."""
    return {k: v for k, v in _jsonable(values).items() if k not in IGNORED_KEYS and not _SECRET.search(k)}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Atomic, rotating checkpoints under ``output_dir/checkpoints/step-XXXXXXXX``.

    ``model`` (the unwrapped model) and ``image_processor`` are written into every checkpoint as ``config.json``
    (naming the model class in ``architectures``) and ``preprocessor_config.json``, so ``nasiam-convert checkpoint``
    can turn any checkpoint into a model folder.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int = 2, *,
                 model=None, image_processor=None, before_first_save=None):
        self.accelerator = accelerator
        self.before_first_save = before_first_save  # e.g. OutputPlan.write_record: called once, main process
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.total_limit = max(1, total_limit)
        self.model = model
        self.image_processor = image_processor

    def checkpoints(self) -> list[Path]:
        """The intact checkpoints, oldest first."""
        return survey_checkpoints(self.root)[0]

    def resolve(self, spec: str | os.PathLike | None) -> Path | None:
        """``None`` -> no resume; ``"latest"`` -> the newest usable checkpoint (every part read: newer damaged ones
        are skipped with a printed reason; None when there is none); anything else must be a usable checkpoint
        (:class:`DamagedCheckpointError` / ``FolderKindError`` otherwise)."""
        if spec is None:
            return None
        if str(spec) != "latest":
            return require_usable_checkpoint(spec)
        newest, skipped = usable_checkpoint(self.root)
        for path, why in skipped:
            self.accelerator.print(f"--resume_from_checkpoint latest: skipping the damaged checkpoint {path} ({why})")
        return newest

    def last_good(self) -> GoodCheckpoint | None:
        """The newest checkpoint whose weights are finite and sane and whose loss was finite, or None
        (:func:`nasiam_hf.checkpoint_health.last_good`)."""
        return last_good(self.root)

    def describe_last_good(self) -> str:
        """For a stop message: "the last good checkpoint is ..." or "no checkpoint is known good (...): restart
        with ..." (:func:`nasiam_hf.checkpoint_health.describe_last_good`)."""
        return describe_last_good(self.root)

    def _write_model_files(self, folder: Path) -> None:
        if self.model is not None:
            config = copy.deepcopy(self.model.config)
            config.architectures = [type(self.model).__name__]
            config.save_pretrained(folder)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)

    def save(self, global_step: int, state: dict, loss: float | None = None) -> Path:
        """Every rank must call this (Accelerate saves per-rank RNG states); the main process publishes the folder.
        ``loss``: the last update's loss, recorded with the weights' health (:meth:`last_good` reads both)."""
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{global_step:08d}"
        staging = self.root / f"{STAGING_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.before_first_save is not None:
                self.before_first_save()
                self.before_first_save = None
            self._write_model_files(staging)
            health = {HEALTH_KEY: weights_health(self.model, loss)} if self.model is not None else {}
            atomic_write_json(staging / TRAINER_STATE_FILE, {**state, **health})
            parts = [p for p in sorted(staging.iterdir()) if p.is_file() and p.name != TRAINER_STATE_FILE]
            atomic_write_json(staging / CHECKPOINT_MANIFEST, {  # trainer_state.json is checked by reading it
                "files": {p.name: p.stat().st_size for p in parts}, "crc32": {p.name: file_crc32(p) for p in parts}})
            aside = self.root / f"{STAGING_PREFIX}old-{final.name}"
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        intact, damaged = survey_checkpoints(self.root)
        keep = set(intact[-self.total_limit:])
        for path in [*intact, *(p for p, _ in damaged)]:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | os.PathLike) -> dict:
        """Load model, optimiser, scheduler and RNG states from ``path``; returns its trainer state."""
        path = Path(path)
        try:
            self.accelerator.load_state(str(path))
            state = read_trainer_state(path)
            state.pop(HEALTH_KEY, None)  # a record of that save, not part of the run's state
            return state
        except Exception as error:  # noqa: BLE001 - a failed load always means "this checkpoint does not fit"
            detail = without_unsafe_advice(" ".join(str(error).split()))[:300]
            raise DamagedCheckpointError(
                f"checkpoint {str(path)!r} cannot be loaded ({type(error).__name__}: {detail}): it is damaged, or was "
                "written by a run with other model arguments; pick another one or start without "
                "--resume_from_checkpoint"
            ) from error

    def resume(self, spec: str | os.PathLike | None, state: dict) -> dict:
        """The trainer state to start from: ``state`` when ``spec`` names no checkpoint, else the checkpoint's
        (its model, optimiser, scheduler and RNG states are loaded too)."""
        path = self.resolve(spec)
        if path is None:
            return state
        state = self.load(path)
        self.accelerator.print(f"resumed from {path} (epoch {state['epoch']}, step {state['global_step']})")
        return state

    def clean_staging(self) -> list[Path]:
        """Remove staging folders a killed save left under ``checkpoints/`` (main process, at the start)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(STAGING_PREFIX)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale


# ---------------------------------------------------------------------------------------------------------------------
# The output-folder guard
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPlan:
    """What a run does with its ``output_dir``; :func:`decide_output_dir` makes it, :meth:`apply` carries it out.

    ``action``: "new" (nothing there), "fresh" (a run that left nothing to keep), "resume", "overwrite".
    ``resume_from``: the checkpoint to load, or None (start at step 0). ``delete``: what :meth:`apply` removes;
    ``kept``: the names of files there that are not ours, left alone. ``message``: what to print.
    """

    output_dir: Path
    action: str
    identity: dict
    resume_from: Path | None = None
    delete: tuple[Path, ...] = ()
    kept: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    data_listing: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def message(self) -> str:
        return "\n".join(self.notes)

    def apply(self) -> None:
        """Main process only: delete what the plan says and clean staging leftovers. Nothing new is written: the
        run's identity is recorded with its first checkpoint or its outputs (:meth:`write_record`), so a run that
        fails before that leaves the folder as it found it."""
        for path in self.delete:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if not self.output_dir.is_dir():
            return
        finish_publish(self.output_dir)
        root = self.output_dir / CHECKPOINT_DIR
        if root.is_dir():
            for stale in root.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)

    def write_record(self) -> None:
        """Main process only: record the run's identity (``run_args.json``), which later runs are compared to, and the
        listing of its data files (``data_files.json``) that names what changed."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.data_listing:
            atomic_write_json(self.output_dir / DATA_LISTING_FILE, self.data_listing)
        atomic_write_json(self.output_dir / RUN_RECORD_FILE, self.identity)


def _ours(name: str) -> bool:
    return (name in RUN_FILES or name in MODEL_FILES or name in TRACKER_DIRS or name in (CHECKPOINT_DIR, STAGING_DIR)
            or name in _modeling_code_files())


def _partition(out: Path) -> tuple[list[Path], list[str]]:
    """(paths our runs write, names of the other entries) at the top of ``out``; the run lock is neither."""
    ours, others = [], []
    for name in sorted(set(os.listdir(out)) - RUN_LOCK_FILES):
        (ours.append(out / name) if _ours(name) else others.append(name))
    return ours, others


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _changes(saved: Mapping, current: Mapping, keys, defaults: Mapping) -> list[str]:
    return [f"{k}: {_show(saved.get(k, defaults.get(k)))} -> {_show(current.get(k, defaults.get(k)))}"
            for k in sorted(keys) if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))]


def _read_record(out: Path) -> dict | None:
    path = out / RUN_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputDirError(f"{str(path)!r} (the record of the run in --output_dir) is unreadable ({error}): "
                             "pass --overwrite_output_dir to start a new run there, or choose another --output_dir"
                             ) from None
    if not isinstance(record, dict):
        raise OutputDirError(f"{str(path)!r} is not a run record: pass --overwrite_output_dir or another --output_dir")
    return record


def _data_changes(run_folder: Path, record: Mapping | None, data) -> list[str]:
    """What changed in the run's data since the run recorded in ``run_folder`` started (``data``: the current
    :class:`~nasiam_hf.data.fingerprint.DataFingerprint`; a record older than fingerprints is not compared)."""
    if data is None or record is None or DATA_KEY not in record:
        return []
    try:
        listing = json.loads((run_folder / DATA_LISTING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        listing = None
    return data.changes_since(record[DATA_KEY], listing)


def _described(changed: list[str], data_changed: list[str]) -> str:
    return "; ".join(filter(None, [", ".join(changed), *data_changed]))


def decide_output_dir(output_dir: str | os.PathLike, identity: Mapping[str, Any], *, mutable_keys,
                      resume: str | os.PathLike | None = None, overwrite: bool = False,
                      defaults: Mapping[str, Any] | None = None, data=None) -> OutputPlan:
    """Decide what the run does with ``output_dir`` (read-only; raises :class:`OutputDirError` on a refusal).

    ``identity``: the run's argument values (JSON-able after ``str`` of paths); ``mutable_keys``: those that may
    differ from the recorded run on a resume (runtime flags, and ``num_train_epochs`` / ``max_train_steps``, which
    extend it); ``defaults``: the value of a key missing from an older record (flags added since). ``resume``: the
    ``--resume_from_checkpoint`` value ("latest" or a checkpoint path), ``overwrite``: ``--overwrite_output_dir``.
    ``data``: the fingerprint of the run's data (:func:`~nasiam_hf.data.fingerprint.fingerprint_data`), recorded
    under ``data_fingerprint``; resuming over changed data is refused, naming what changed.
    """
    out = Path(output_dir)
    identity, defaults = run_identity(identity), _jsonable(defaults or {})
    fixed = set(identity) - set(mutable_keys)
    if data is not None:
        identity[DATA_KEY] = _jsonable(data.summary)
    if overwrite and resume is not None:
        raise OutputDirError(
            "--overwrite_output_dir and --resume_from_checkpoint contradict each other: overwriting deletes the "
            f"checkpoints a resume continues from. Pass --resume_from_checkpoint {resume} alone to continue the run "
            f"in {str(out)!r}, or --overwrite_output_dir alone to start it again from step 0"
        )
    check_output_path(out)
    latest = resume is not None and str(resume) == "latest"
    explicit = require_usable_checkpoint(resume) if resume is not None and not latest else None
    plan = dict(output_dir=out, identity=identity, data_listing=data.listing if data is not None else {})
    entries = sorted(set(os.listdir(out)) - RUN_LOCK_FILES) if out.is_dir() else []
    ours, others = _partition(out) if entries else ([], [])
    record = _read_record(out) if entries else None
    if explicit is not None and explicit.parent.resolve() != (out / CHECKPOINT_DIR).resolve():
        return _resume_elsewhere(out, explicit, identity, fixed, defaults, record, ours, others, data)
    visible = [n for n in entries if not n.startswith(".")]
    if not visible:
        note = (f"--resume_from_checkpoint latest: {out} holds no checkpoint yet; starting from step 0" if latest
                else f"output_dir {out}: new run")
        return OutputPlan(action="new", notes=(note,), **plan)
    if record is None:
        return _foreign(out, ours, others, overwrite, plan)
    intact = survey_checkpoints(out / CHECKPOINT_DIR)[0]
    has_model = (out / CONFIG_FILE).is_file()
    if not intact and not has_model:
        changed = _changes(record, identity, fixed, defaults)
        deleted = ", ".join(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in ours)
        note = (f"output_dir {out}: the run there left nothing to keep (no checkpoint, no model); starting afresh "
                "there" + (f" (it had {', '.join(changed)})" if changed else "") + f", replacing {deleted}"
                + ("; no checkpoint to resume from, starting from step 0" if resume is not None else ""))
        return OutputPlan(action="fresh", delete=tuple(ours), kept=tuple(others), notes=(note,), **plan)
    if overwrite:
        return _overwrite(out, ours, others, plan)
    held = ", ".join(filter(None, (f"checkpoints up to step {checkpoint_step(intact[-1])}" if intact else "",
                                   "a saved model" if has_model else "")))
    changed = _changes(record, identity, fixed, defaults)
    data_changed = _data_changes(out, record, data)
    if (changed or data_changed) and resume is None:
        raise OutputDirError(
            f"output_dir {str(out)!r} already holds a different run ({_described(changed, data_changed)}; it has "
            f"{held}). Pass "
            "--overwrite_output_dir to replace it (deletes its checkpoints, run files and model, keeps other files), "
            "or choose another --output_dir"
        )
    if changed or data_changed:
        raise OutputDirError(
            f"cannot resume the run in {str(out)!r}: {_described(changed, data_changed)}, and these may not change "
            f"on resume (only {', '.join(sorted(set(mutable_keys) & set(identity))) or 'runtime flags'} may). Resume "
            f"with the original values{' and data' if data_changed else ''}, pass --overwrite_output_dir (without "
            "--resume_from_checkpoint) to start a new run there, or choose another --output_dir"
        )
    if resume is None:
        raise OutputDirError(
            f"output_dir {str(out)!r} already holds this run ({held}). To continue it (also with more "
            "--num_train_epochs or --max_train_steps) pass --resume_from_checkpoint latest; to run it again from "
            "step 0 pass --overwrite_output_dir; or choose another --output_dir"
        )
    return _resume_here(out, explicit, intact, record, identity, mutable_keys, defaults, has_model, others, plan)


def _resume_here(out, explicit, intact, record, identity, mutable_keys, defaults, has_model, others, plan
                 ) -> OutputPlan:
    notes = []
    start = explicit
    if explicit is None:
        start, skipped = usable_checkpoint(out / CHECKPOINT_DIR)
        notes += [f"--resume_from_checkpoint latest: skipping the damaged checkpoint {p} ({why})" for p, why in skipped]
    if start is None:
        notes.append(f"--resume_from_checkpoint latest: no usable checkpoint in {out / CHECKPOINT_DIR}; starting "
                     "from step 0" + ("; the model there is replaced when this run ends" if has_model else ""))
    else:
        state = read_trainer_state(start)
        notes.append(f"output_dir {out}: resuming the run from {start} (epoch {state['epoch']}, step "
                     f"{state['global_step']})")
    changed = _changes(record, identity, set(mutable_keys) & (set(record) | set(identity)), defaults)
    if changed:
        notes.append(f"changed since the run started: {', '.join(changed)}")
    if any(c.split(":")[0] in LENGTH_KEYS for c in changed):
        notes.append("the run's length changed: the learning-rate (and momentum) schedule is recomputed over the new "
                     "length from here on; the steps already done followed the old one")
    return OutputPlan(action="resume", resume_from=start, kept=tuple(others), notes=tuple(notes), **plan)


def _resume_elsewhere(out, checkpoint, identity, fixed, defaults, record, ours, others, data) -> OutputPlan:
    """A checkpoint outside ``output_dir``: its own run must match, and ``output_dir`` must be free."""
    run = checkpoint.parent.parent
    source = _read_record(run) if checkpoint.parent.name == CHECKPOINT_DIR else None
    changed = _changes(source, identity, fixed, defaults) if source is not None else []
    data_changed = _data_changes(run, source, data)
    if changed or data_changed:
        raise OutputDirError(f"cannot resume from {str(checkpoint)!r}: its run had {_described(changed, data_changed)}"
                             ", and these may not change on resume")
    if record is not None or [p for p in ours if p.name != RUN_RECORD_FILE] or others:
        info = inspect_path(out)
        raise OutputDirError(f"--output_dir {str(out)!r} already holds {info.what}: resume from {checkpoint} into a "
                             "new or empty --output_dir")
    return OutputPlan(output_dir=out, action="resume", identity=identity, resume_from=checkpoint,
                      notes=(f"output_dir {out}: continuing the run of {checkpoint} there",),
                      data_listing=data.listing if data is not None else {})


def _foreign(out: Path, ours: list[Path], others: list[str], overwrite: bool, plan: dict) -> OutputPlan:
    info = inspect_path(out)
    if not overwrite:
        described = info.what if info.kind is not FolderKind.UNFINISHED_RUN else f"files of another run ({info.what})"
        raise OutputDirError(
            f"--output_dir {str(out)!r} holds {described} and no run record of nasiam-hf ({RUN_RECORD_FILE}): "
            "choose another --output_dir, or pass --overwrite_output_dir to write there (it deletes the files a run "
            f"writes: {', '.join(p.name for p in ours) or 'none here'}; it keeps the others)"
        )
    return _overwrite(out, ours, others, plan)


def _overwrite(out: Path, ours: list[Path], others: list[str], plan: dict) -> OutputPlan:
    deleted = ", ".join(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in ours) or "nothing"
    note = (f"--overwrite_output_dir: deleting {deleted} in {out}"
            + (f"; keeping {', '.join(others)} (not written by nasiam-hf)" if others else ""))
    return OutputPlan(action="overwrite", delete=tuple(ours), kept=tuple(others), notes=(note,), **plan)


def guard_output_dir(accelerator: Accelerator, output_dir: str | os.PathLike, identity: Mapping[str, Any], *,
                     mutable_keys, resume: str | os.PathLike | None = None, overwrite: bool = False,
                     defaults: Mapping[str, Any] | None = None, data=None) -> OutputPlan:
    """:func:`decide_output_dir` on every process (they all read the folder before anyone changes it), print the
    decision on the main process, apply it there, and wait for everyone. ``data``: a function giving the data's
    fingerprint, called on the main process only (a large folder is listed once) and sent to the others. Returns
    the plan (``.resume_from``).

    A model save into ``output_dir`` that a kill interrupted is settled first (:func:`~nasiam_hf.fileio.
    finish_publish`), so the decision sees a whole model or none."""
    if accelerator.is_main_process and Path(output_dir).is_dir():
        settled = finish_publish(output_dir)
        if settled:
            accelerator.print(f"output_dir {output_dir}: the model save a kill interrupted was "
                              + ("completed" if settled == "finished" else "discarded (the previous model stays)"))
    accelerator.wait_for_everyone()
    fingerprint, failure = None, None
    if data is not None and accelerator.is_main_process:
        try:
            fingerprint = data()
        except Exception as error:  # noqa: BLE001 - the other ranks must not wait for a fingerprint that never comes
            failure = error
    if data is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        fingerprint, message = broadcast_object_list([fingerprint, None if failure is None else str(failure)])
        if failure is None and message is not None:
            raise OutputDirError(f"the data could not be fingerprinted on the main process: {message}")
    if failure is not None:
        raise failure
    plan = decide_output_dir(output_dir, identity, mutable_keys=mutable_keys, resume=resume, overwrite=overwrite,
                             defaults=defaults, data=fingerprint)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.print(plan.message)
        plan.apply()
    accelerator.wait_for_everyone()
    return plan


__all__ = ["LENGTH_KEYS", "Checkpointer", "OutputPlan", "decide_output_dir", "guard_output_dir",
           "run_identity"]
