"""Atomic file and folder writes: a crash or a kill mid-write leaves the previous version intact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
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


def staging_dir(final: str | os.PathLike) -> Path:
    """A fresh empty folder beside ``final`` (same filesystem), to be published with :func:`publish_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written staging folder to ``final``; an existing ``final`` is replaced only once it is complete.

    The old folder is first renamed aside, so at every instant either the old or the new complete folder exists
    under one of two names; the aside copy is removed last.
    """
    staged, final = Path(staged), Path(final)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(staged, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def publish_files(staged: str | os.PathLike, folder: str | os.PathLike) -> list[Path]:
    """Move every file of a staging folder into ``folder`` (each one an atomic rename), then drop the staging folder.

    Used for model folders that also hold other things (history, plots, checkpoints) which must not be touched.
    """
    staged, folder = Path(staged), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for item in sorted(staged.iterdir()):
        target = folder / item.name
        if item.is_dir():
            publish_dir(item, target)
        else:
            os.replace(item, target)
        moved.append(target)
    shutil.rmtree(staged, ignore_errors=True)
    return moved


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging folder inside ``folder`` to write into; when the block completes, :func:`publish_files` moves
    its files into ``folder``. The staging folder is removed whatever happens, so a failed or killed save leaves the
    previous files as they were."""
    staged = staging_dir(Path(folder) / "staged")
    try:
        yield staged
        publish_files(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
