"""Atomic writes: a kill at any instant leaves a file, or a model folder, as it was, as it was meant to become, or (a
model folder, for a moment) refusing to load with a one-line reason that the next save or run start settles.

One file: written beside its target, fsynced, renamed over it (:func:`atomic_write_bytes`).

A model folder holds regular files at their documented paths, as transformers writes them (``config.json``,
``model.safetensors``, ``preprocessor_config.json``, ``README.md``, the modeling code, run files), beside checkpoints
and other files. :func:`staged_files` replaces the files of a model together:

1. the new files are written into ``folder/.nasiam-publish.tmp/`` and fsynced;
2. ``publish.json`` (the files to move in, and the weight files of the old model that the new one does not write:
   sharded versus single) is written into it atomically; from here on the publish goes forward;
3. ``config.json`` is deleted: without it transformers, and :mod:`nasiam_hf.folders`, refuse the folder;
4. the old weight files named in ``publish.json`` are deleted, the staged files moved in (``os.replace`` each);
5. ``config.json`` is moved in last: the commit point (a publish that stages none re-stages the current one);
6. the staging folder is removed.

A reader sees the old model until ``publish.json`` exists, then a one-line refusal (:func:`publish_problem`; the
folder is about to change), then the new model once ``config.json`` is in: never a mix. Files the new model does not
write stay as they were (a card, eval results).

Roll forward or back (:func:`finish_publish`; every publish and every run start calls it first): a staging folder
holding ``publish.json`` is complete, since that file is written only after every staged file was fsynced, so its
publish is finished (steps 3 to 6 again; each is idempotent: what was moved already is skipped). A staging folder
without it is deleted: nothing outside it had changed. ``python -m nasiam_hf.fileio FOLDER`` does the same by hand.

One writer per folder at a time. Standard library only: the modeling code imports this module, so saved folders
carry a copy of it (``trust_remote_code``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

STAGING_DIR = ".nasiam-publish.tmp"
MANIFEST = "publish.json"
CONFIG = "config.json"
# Weight files: a model that writes weights replaces every weight file of the previous one (sharded vs single).
_WEIGHT_NAME = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (POSIX), to the disk."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` in one step: a temporary file beside it, fsynced, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Serialise first (a non-serialisable object raises before anything is touched), then write atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# Publishing a model folder
# ---------------------------------------------------------------------------------------------------------------------
def publish_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` must not be read now (a publish into it is decided, and its new ``config.json`` not in yet), or
    None (also for what is not a path: a Hub id is checked by the Hub)."""
    if not isinstance(folder, (str, os.PathLike)):
        return None
    staging = Path(folder) / STAGING_DIR
    if not (staging / MANIFEST).is_file():
        return None
    if (Path(folder) / CONFIG).is_file() and not (staging / CONFIG).exists():
        return None  # committed: only the staging folder is left to remove
    return (f"{os.fspath(folder)!r}: a save into this folder did not finish (interrupted, or still running); if it "
            f"was interrupted, complete it with `python -m nasiam_hf.fileio {os.fspath(folder)}` or rerun the command "
            "that wrote it")


def _plan(staging: Path, folder: Path) -> dict:
    """The ``publish.json`` of a filled staging folder; refuses subfolders and folders in the way."""
    names = sorted(os.listdir(staging))
    nested = [n for n in names if (staging / n).is_dir()]
    if nested:
        raise ValueError(f"a model folder is published as files only, got the folder(s) {nested} in {staging}")
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, f"a folder is in the way of the model file {name}", str(path))
    if CONFIG not in names and (folder / CONFIG).is_file():  # the commit point is always config.json
        try:
            os.link(folder / CONFIG, staging / CONFIG)
        except OSError:  # a filesystem without hard links
            shutil.copy2(folder / CONFIG, staging / CONFIG)
        names = sorted([*names, CONFIG])
    writes_weights = any(_WEIGHT_NAME.match(n) for n in names)
    stale = sorted(n for n in os.listdir(folder) if writes_weights and _WEIGHT_NAME.match(n) and n not in names)
    for name in names:
        _fsync(staging / name)
    _fsync(staging)
    return {"files": names, "remove": stale}


def _install(staging: Path, folder: Path, plan: dict) -> None:
    """Steps 3 to 6 of the module docstring; safe to repeat after a kill at any point."""
    names = plan["files"]
    if CONFIG in names and not (staging / CONFIG).exists():  # committed already: only the cleanup was left
        shutil.rmtree(staging)
        return
    if CONFIG in names:
        (folder / CONFIG).unlink(missing_ok=True)
        _fsync(folder)  # the folder refuses to load before any file changes
    for name in plan["remove"]:
        (folder / name).unlink(missing_ok=True)
    for name in names:
        if name != CONFIG and (staging / name).exists():
            os.replace(staging / name, folder / name)
    if CONFIG in names:
        _fsync(folder)
        os.replace(staging / CONFIG, folder / CONFIG)  # the commit point
    _fsync(folder)
    shutil.rmtree(staging)


def finish_publish(folder: str | os.PathLike) -> str | None:
    """Settle what a killed publish left in ``folder``: "finished" (rolled forward), "discarded" (rolled back), or
    None (nothing was left). See the module docstring for the rule."""
    folder = Path(folder)
    staging = folder / STAGING_DIR
    if not staging.is_dir():
        return None
    try:
        plan = read_json(staging / MANIFEST)
    except FileNotFoundError:
        shutil.rmtree(staging)
        return "discarded"
    except (OSError, ValueError) as error:
        raise OSError(f"{staging / MANIFEST} cannot be read ({error}): the save into {folder} cannot be completed; "
                      f"save the model again after deleting {staging}") from error
    _install(staging, folder, plan)
    return "finished"


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """An empty staging folder to write a model into (``model.save_pretrained(staged)``, the processor, the card,
    run files); when the block completes, its files replace those of ``folder`` together (see the module
    docstring). A block that raises leaves ``folder`` as it was."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_publish(folder)
    staging = folder / STAGING_DIR
    staging.mkdir()
    try:
        yield staging
        plan = _plan(staging, folder)
        atomic_write_json(staging / MANIFEST, plan)  # the decision: from here on the publish goes forward
    except BaseException:
        if not (staging / MANIFEST).exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(staging)
    _install(staging, folder, plan)


def main(argv: list[str] | None = None) -> None:
    """``python -m nasiam_hf.fileio FOLDER...``: finish (or discard) an interrupted save into each folder."""
    import sys

    folders = sys.argv[1:] if argv is None else argv
    if not folders:
        raise SystemExit("usage: python -m nasiam_hf.fileio FOLDER [FOLDER ...]")
    for folder in folders:
        outcome = finish_publish(folder)
        print({"finished": f"{folder}: the interrupted save was completed",
               "discarded": f"{folder}: the unfinished save was discarded; the folder holds what it held before",
               None: f"{folder}: no unfinished save"}[outcome])


if __name__ == "__main__":
    main()
