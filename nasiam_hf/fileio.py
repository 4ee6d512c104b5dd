"""Atomic writes: a kill at any instant leaves the previous version of a file, or of a whole model, in place.

Single files are written to a temporary file beside the target and renamed over it (:func:`atomic_write_bytes`).

A model is several files (config, weights, processor, card, modeling code) that must change together, and they sit
at the top of an output folder beside checkpoints and run files, so the folder cannot simply be renamed. They live
in a versioned hidden subfolder instead, and one atomic step makes a version current::

    output_dir/
      .model-000003/            config.json, model.safetensors, preprocessor_config.json, README.md, *.py
      .model-current -> .model-000003
      config.json -> .model-current/config.json      (one relative link per file of the version)
      model.safetensors -> .model-current/model.safetensors
      checkpoints/, run_args.json, ...                (not part of the model, untouched)

:func:`staged_files` yields an empty staging folder; when the block ends, the files written there become the next
version: files of the current version that were not rewritten are hard-linked into it (a card refresh does not
copy the weights), the links of new names are created, then ``.model-current`` is replaced with ``os.replace``. A
reader therefore sees the old model or the new one (on a first save: none), never a mix. Old versions and staging
folders left by a kill are removed at the next save (:func:`clean_model_leftovers`). Writing a published path with
:func:`atomic_write_bytes` (e.g. refreshing ``README.md``) goes through a new version the same way.

One writer per folder at a time. The module uses the standard library only: saved folders carry a copy of it.
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

CURRENT_LINK = ".model-current"
VERSION_PREFIX = ".model-"
STAGING_SUFFIX = ".tmp"
# What a push or an archive of the folder must leave out: the versions behind the published links.
HIDDEN_MODEL_PATTERNS = (".model-*",)
_VERSION_NAME = re.compile(r"^\.model-(\d{6,})$")
# Weight files: a version that writes weights drops every weight file of the previous one (sharded vs single).
_WEIGHT_NAME = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_open_stagings: set[Path] = set()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=STAGING_SUFFIX)
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` in one step. A published model file (a link into ``.model-current``) is
    replaced through a new model version, so the other files of the model stay consistent with it."""
    path = Path(path)
    if is_published_link(path):
        with staged_files(path.parent) as staged:
            _write_new_file(staged / path.name, data)
    else:
        _write_new_file(path, data)
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
# Model versions
# ---------------------------------------------------------------------------------------------------------------------
def _link_text(name: str) -> str:
    return f"{CURRENT_LINK}/{name}"


def is_published_link(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the top-level links of a model folder (``name -> .model-current/name``)."""
    path = Path(path)
    try:
        return path.is_symlink() and os.readlink(path) == _link_text(path.name)
    except OSError:
        return False


def current_version(folder: str | os.PathLike) -> Path | None:
    """The version folder ``.model-current`` points to, or None (no model published with versions)."""
    link = Path(folder) / CURRENT_LINK
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    version = link.parent / target
    return version if _VERSION_NAME.match(target) and version.is_dir() else None


def published_names(folder: str | os.PathLike) -> list[str]:
    """Names of the files of the current model version (empty when there is none)."""
    version = current_version(folder)
    return sorted(p.name for p in version.iterdir()) if version is not None else []


def _is_staging(entry: Path) -> bool:
    """Staging folders of versions (and of older releases, ``.staged.*.tmp``), temporary files and links."""
    name = entry.name
    if not (name.startswith(".") and name.endswith(STAGING_SUFFIX)):
        return False
    return name.startswith((VERSION_PREFIX, ".staged.")) or not entry.is_dir() or entry.is_symlink()


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_model_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove what a killed save can leave in ``folder``: staging folders, versions that are not current, links
    that point to nothing, and a ``.model-current`` copied as a plain folder (by a copy that followed links).
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    current = current_version(folder)
    removed = []
    for entry in folder.iterdir():
        stale = (
            _is_staging(entry)
            or (entry.name == CURRENT_LINK and not entry.is_symlink())
            or (_VERSION_NAME.match(entry.name) and entry != current)
            or (is_published_link(entry) and not entry.exists())
        )
        if stale and entry.resolve() not in _open_stagings:
            _remove(entry)
            removed.append(entry)
    return removed


def _hard_link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def _next_version(folder: Path) -> int:
    numbers = [int(m.group(1)) for m in map(_VERSION_NAME.match, os.listdir(folder)) if m]
    return max(numbers, default=0) + 1


def _make_current(staged: Path, folder: Path) -> Path:
    """Rename a complete staging folder to the next version, link its new names, then switch ``.model-current``."""
    number = _next_version(folder)
    while True:
        version = folder / f"{VERSION_PREFIX}{number:06d}"
        try:
            os.rename(staged, version)
            break
        except OSError:
            if not version.exists():
                raise
            number += 1
    for name in sorted(os.listdir(version)):
        top = folder / name
        if not is_published_link(top):
            # a new name: the link resolves to nothing until the switch below (a regular file was adopted first)
            _replace_with_link(top)
    switch = folder / f"{CURRENT_LINK}.{os.getpid()}{STAGING_SUFFIX}"
    switch.unlink(missing_ok=True)
    os.symlink(version.name, switch)
    os.replace(switch, folder / CURRENT_LINK)  # the one step that publishes the version
    return version


def _replace_with_link(top: Path) -> None:
    tmp = top.with_name(f".{top.name}.link{STAGING_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(_link_text(top.name), tmp)
    except OSError as error:
        raise OSError(f"{top.parent}: cannot create a symbolic link there ({error}); model folders need a "
                      "filesystem with symbolic links") from error
    os.replace(tmp, top)


def _adopt(folder: Path, names: list[str]) -> None:
    """Turn top-level files that are not links yet (written directly, or by an older version of this package) into
    links with the same content: a version holding them is made current first, so nothing visible changes."""
    previous = current_version(folder)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=VERSION_PREFIX, suffix=STAGING_SUFFIX))
    if previous is not None:
        for item in previous.iterdir():
            _hard_link_or_copy(item, staging / item.name)
    for name in names:
        (staging / name).unlink(missing_ok=True)
        _hard_link_or_copy(folder / name, staging / name)
    _make_current(staging, folder)
    for name in names:
        _replace_with_link(folder / name)


def _carried(previous: Path | None, names: list[str], keep_previous: bool) -> list[str]:
    """Files of the current version that the new one takes over (weight files only when it writes none)."""
    if not keep_previous or previous is None:
        return []
    writes_weights = any(_WEIGHT_NAME.match(n) for n in names)
    return sorted(n for n in os.listdir(previous)
                  if n not in names and not (writes_weights and _WEIGHT_NAME.match(n)))


def publish_version(staged: str | os.PathLike, folder: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Make the files of ``staged`` the current model of ``folder`` (see the module docstring); returns the version.

    With ``keep_previous``, files of the current version that ``staged`` does not rewrite are hard-linked into the
    new one (weight files only when ``staged`` writes none). Staged subfolders are refused: versions hold files.
    """
    staged, folder = Path(staged), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(staged))
    folders = [n for n in names if (staged / n).is_dir()]
    if folders:
        raise ValueError(f"a model version holds files only, got the folder(s) {folders} in {staged}")
    every = [*names, *_carried(current_version(folder), names, keep_previous)]
    collisions = [n for n in every if os.path.lexists(folder / n) and not is_published_link(folder / n)]
    for name in collisions:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            raise IsADirectoryError(errno.EISDIR, f"a folder is in the way of the model file {name}",
                                    str(folder / name))
    if collisions:
        _adopt(folder, collisions)
    previous = current_version(folder)
    for name in _carried(previous, names, keep_previous):
        _hard_link_or_copy(previous / name, staged / name)
    version = _make_current(staged, folder)
    clean_model_leftovers(folder)
    return version


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, keep_previous: bool = True) -> Iterator[Path]:
    """A fresh staging folder to write a model into; when the block completes, its files become the current model
    of ``folder`` at once (:func:`publish_version`). Whatever happens, the staging folder is then removed, so a
    failed or killed save leaves the previous model as it was.

    Nested blocks write into the outer staging folder (``staged_files(staged)`` yields ``staged``), so
    ``with staged_files(out) as staged: model.save_pretrained(staged); processor.save_pretrained(staged)`` publishes
    weights and processor together although ``save_pretrained`` stages on its own.
    """
    folder = Path(folder)
    if folder.resolve() in _open_stagings:
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    clean_model_leftovers(folder)
    staged = Path(tempfile.mkdtemp(dir=folder, prefix=VERSION_PREFIX, suffix=STAGING_SUFFIX))
    key = staged.resolve()
    _open_stagings.add(key)
    try:
        yield staged
        publish_version(staged, folder, keep_previous=keep_previous)
    finally:
        _open_stagings.discard(key)
        shutil.rmtree(staged, ignore_errors=True)
