"""What a run's data is, cheaply: the fingerprint the output guard records with a run and compares on resume.

Local data (``--train_file`` / ``--validation_file`` files, folders or globs; ``--train_dir`` / ``--validation_dir``
image folders; a local ``--dataset_name`` folder) is fingerprinted by the names, sizes and modification times of the
files the readers would use, never their content, so a folder of a million images costs one ``stat`` per file. A
Hub dataset is fingerprinted by its revision (the commit sha the Hub reports, or offline the one the local cache
holds); the embedded demo needs none.

The record keeps a small summary per source (files, bytes, digest) and, beside it, a listing that lets a refusal
say which files changed: every file's size and time up to :data:`LISTED_FILES` files, above that a digest per
folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import is_image_file
from .sources import SAVED_DATASET_METADATA, hub_id, resolve_data_files

# Sources a run may read, by the flag that names them.
ROLES = ("dataset_name", "train_file", "train_dir", "validation_file", "validation_dir")
# Up to this many files the listing names every file (about 50 bytes each in the record); above it, each folder.
LISTED_FILES = 50_000
_SHOWN = 5  # files or folders named in a message


@dataclass(frozen=True)
class SourceFingerprint:
    """One source: ``summary`` (recorded in the run's identity) and ``listing`` (kept beside it, to name changes)."""

    role: str
    spec: str
    summary: dict
    listing: dict = field(default_factory=dict, compare=False)


def _scan(root: str, keep: Callable[[str], bool]) -> dict[str, tuple[int, int]]:
    """``relative POSIX name -> (size, mtime_ns)`` of the files under ``root`` that ``keep`` (by name) accepts, at
    any depth, following links (each real folder once), hidden files and folders left out."""
    found, seen, stack = {}, set(), [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append((entry.path, f"{prefix}{entry.name}/"))
                elif keep(entry.name):
                    try:
                        stat = entry.stat()
                    except OSError:  # a dangling link: the reader names it
                        continue
                    found[prefix + entry.name] = (stat.st_size, stat.st_mtime_ns)
    return found


def _digest(items: Iterable[tuple[str, tuple[int, int]]]) -> str:
    digest = hashlib.sha256()
    for name, (size, mtime) in items:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:24]


def _local(role: str, spec: str, files: dict[str, tuple[int, int]]) -> SourceFingerprint:
    ordered = sorted(files.items())
    summary = {"source": spec, "files": len(ordered), "bytes": sum(size for _, (size, _) in ordered),
               "digest": _digest(ordered)}
    if len(ordered) <= LISTED_FILES:
        listing = {"files": {name: list(value) for name, value in ordered}}
    else:
        folders: dict[str, list] = {}
        for name, value in ordered:
            folders.setdefault(name.rpartition("/")[0] or ".", []).append((name, value))
        listing = {"folders": {folder: [len(items), sum(v[0] for _, v in items), _digest(items)]
                               for folder, items in folders.items()}}
    return SourceFingerprint(role, spec, summary, listing)


def _data_files(role: str, spec: str) -> SourceFingerprint:
    files = resolve_data_files(spec, role.replace("_", " "))
    listed = {}
    for path in files.files:
        stat = os.stat(path)
        listed[files.name(path)] = (stat.st_size, stat.st_mtime_ns)
    return _local(role, spec, listed)


def hub_revision(repo_id: str) -> str | None:
    """The commit sha of a Hub dataset: from the Hub, or (offline, unreachable) from the local cache; None when
    neither knows it."""
    from huggingface_hub import HfApi, constants

    from ..network import offline_mode

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    if not (offline_mode() or datasets_offline):
        try:
            return HfApi().dataset_info(repo_id, timeout=10).sha
        except Exception:  # noqa: BLE001 - unreachable, private, missing: the loader says which
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _source(role: str, spec: str) -> SourceFingerprint | None:
    if role == "dataset_name":
        if spec.lower() == "demo":
            return SourceFingerprint(role, spec, {"source": "demo"})
        if os.path.isdir(spec):  # a dataset folder laid out like a Hub repository
            return _local(role, spec, _scan(spec, lambda name: name not in SAVED_DATASET_METADATA))
        return SourceFingerprint(role, spec, {"source": hub_id(spec), "revision": hub_revision(hub_id(spec))})
    if role.endswith("_dir"):
        return _local(role, spec, _scan(spec, is_image_file)) if os.path.isdir(spec) else None
    return _data_files(role, spec)


@dataclass(frozen=True)
class DataFingerprint:
    """The fingerprints of every source a run reads (:func:`fingerprint_data`)."""

    sources: tuple[SourceFingerprint, ...] = ()

    @property
    def summary(self) -> dict:
        """``{flag: summary}``: what the run's identity records."""
        return {s.role: s.summary for s in self.sources}

    @property
    def listing(self) -> dict:
        """``{flag: listing}``: what the record keeps beside the identity to name changed files."""
        return {s.role: s.listing for s in self.sources if s.listing}

    def changes_since(self, summary: Any, listing: Any = None) -> list[str]:
        """What changed since a run recorded ``summary`` (and ``listing``), one phrase per source: empty when
        nothing did. A source that could not be fingerprinted on either side is not compared (the readers report
        what is wrong with it)."""
        if not isinstance(summary, dict):
            return []
        listing = listing if isinstance(listing, dict) else {}
        changes = []
        for source in self.sources:
            before = summary.get(source.role)
            if not isinstance(before, dict) or before == source.summary:
                continue
            if "revision" in before and (before["revision"] is None or source.summary.get("revision") is None):
                continue  # the Hub's revision was unknown then or is now (offline, never cached): not comparable
            changes.append(_describe(source, before, listing.get(source.role)))
        return changes


def _names(items: list[str], label: str) -> list[str]:
    return [f"{name!r} ({label})" for name in items]


def _describe(source: SourceFingerprint, before: dict, listing: Any) -> str:
    where = f"{source.role} {source.spec!r}"
    now = source.summary
    if "revision" in now or "revision" in before:
        return (f"{where}: the Hub dataset's revision changed since the run started ({before.get('revision')} -> "
                f"{now.get('revision')})")
    if before.get("source") != now.get("source"):
        return f"{where}: the source changed since the run started ({before.get('source')!r} -> {now.get('source')!r})"
    old, new = (listing or {}).get("files"), source.listing.get("files")
    if isinstance(old, dict) and isinstance(new, dict):
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(n for n in set(old) & set(new) if list(old[n]) != list(new[n]))
        counts = [f"{len(names)} file{'s' if len(names) != 1 else ''} {label}" for names, label in
                  ((added, "added"), (removed, "removed"), (changed, "changed (size or modification time)")) if names]
        shown = [*_names(added, "added"), *_names(removed, "removed"), *_names(changed, "changed")]
        more = f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
        return f"{where}: {', '.join(counts)} since the run started: {', '.join(shown[:_SHOWN])}{more}"
    old, new = (listing or {}).get("folders"), source.listing.get("folders")
    totals = (f"{before.get('files')} files, {before.get('bytes')} bytes -> {now.get('files')} files, "
              f"{now.get('bytes')} bytes")
    if isinstance(old, dict) and isinstance(new, dict):
        folders = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
        shown = [f"{f!r} ({(old.get(f) or [0])[0]} -> {(new.get(f) or [0])[0]} files)" for f in folders[:_SHOWN]]
        more = f" and {len(folders) - _SHOWN} more" if len(folders) > _SHOWN else ""
        return (f"{where}: files changed since the run started ({totals}) in {len(folders)} of "
                f"{len(set(old) | set(new))} folders: {', '.join(shown)}{more}")
    return f"{where}: files changed since the run started ({totals}, names or modification times differ)"


def fingerprint_data(data) -> DataFingerprint:
    """The fingerprint of every source a command's :class:`~nasiam_hf.arguments.DataArguments` names. A source that
    cannot be read is left out (the readers say what is wrong with it, with their own messages)."""
    sources = []
    for role in ROLES:
        spec = getattr(data, role, None)
        if spec is None:
            continue
        try:
            source = _source(role, str(spec))
        except (OSError, ValueError):
            source = None
        if source is not None:
            sources.append(source)
    return DataFingerprint(tuple(sources))


__all__ = ["LISTED_FILES", "DataFingerprint", "SourceFingerprint", "fingerprint_data", "hub_revision"]
