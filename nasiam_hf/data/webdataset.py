"""Webdataset ``.tar`` shards read with the standard library: members grouped into samples by their ``__key__``.

A sample is the run of consecutive members sharing a key (the member path up to the first dot of its file name,
as webdataset defines it); each member's data is stored under its extension (``jpg``, ``cls``, ...). Samples a
reader does not want are passed over by their headers only, without reading their data (a local tar seeks over it).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from .images import BadImageError, DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
LABEL_KEYS = ("cls", "label")


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/n0123.seg.png"`` -> ``("dir/n0123", "seg.png")``: webdataset's key and (lower-case) extension."""
    folder, base = os.path.split(name)
    if "." not in base:
        return name, ""
    prefix, extension = base.split(".", 1)
    return (f"{folder}/{prefix}" if folder else prefix), extension.lower()


def _open_local(path: str) -> IO[bytes]:
    return open(path, "rb")


def iter_tar_samples(path: str, shard: str, want: Callable[[str], bool] | None = None,
                     opener: Callable[[str], IO[bytes]] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: data})`` for each sample of a tar shard, in file order.

    ``want(key)``, called once per sample in order, can pass samples over: their members are skipped by their headers
    (a seekable file seeks over the data). ``shard`` names the shard in errors; ``opener`` opens ``path`` as a binary
    file (default: a local file). An unreadable or truncated tar raises :class:`DataError` naming it.
    """
    opener = opener or _open_local
    try:
        with opener(path) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
            key, members, wanted = None, {}, False
            while (member := tar.next()) is not None:
                tar.members = []  # tarfile keeps every header it has read: not needed, and it grows
                if not member.isfile():
                    continue
                name, extension = split_member_name(member.name)
                if name != key:
                    if wanted:
                        yield key, members
                    key, members = name, {}
                    wanted = want is None or want(name)
                if wanted:
                    members[extension] = tar.extractfile(member).read()
            if wanted:
                yield key, members
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"webdataset shard {shard!r} cannot be read: {type(error).__name__}: {error}") from error


def count_tar_samples(path: str, shard: str, opener: Callable[[str], IO[bytes]] | None = None) -> list[str]:
    """The sample keys of a shard, from its headers only (no member data is read from a local tar)."""
    opener = opener or _open_local
    keys: list[str] = []
    try:
        with opener(path) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
            while (member := tar.next()) is not None:
                tar.members = []
                if member.isfile():
                    name, _ = split_member_name(member.name)
                    if not keys or keys[-1] != name:
                        keys.append(name)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"webdataset shard {shard!r} cannot be read: {type(error).__name__}: {error}") from error
    return keys


def pick_keys(members: dict[str, bytes], shard: str, key: str, image_key: str | None, label_key: str | None
              ) -> tuple[str, str | None]:
    """The image and label extensions of a shard, from its first sample (or the requested ones).

    No image among the sample's keys -> :class:`DataError` naming the shard and the keys found.
    """
    found = sorted(members)
    if image_key is not None:
        if image_key not in members:
            raise DataError(f"webdataset shard {shard!r}: sample {key!r} has no key {image_key!r} (--image_column); "
                            f"keys found: {found}.")
        image = image_key
    else:
        image = next((k for k in IMAGE_KEYS if k in members), None)
        if image is None:
            raise DataError(f"webdataset shard {shard!r} has no image key: sample {key!r} has the keys {found}, "
                            f"none of {list(IMAGE_KEYS)}. Pass --image_column to name the image key.")
    if label_key is not None and label_key not in members:
        raise DataError(f"webdataset shard {shard!r}: sample {key!r} has no key {label_key!r} (--label_column); "
                        f"keys found: {found}.")
    label = label_key or next((k for k in LABEL_KEYS if k in members), None)
    return image, label


def sample_image(members: dict[str, bytes], image_key: str, shard: str, key: str) -> bytes:
    """The encoded image of a sample; a sample without it is a bad image (skippable)."""
    if image_key not in members:
        raise BadImageError(f"webdataset shard {shard!r}, sample {key!r}: no {image_key!r} member "
                            f"(keys found: {sorted(members)})")
    return members[image_key]


def sample_label(members: dict[str, bytes], label_key: str, shard: str, key: str) -> int:
    """The integer class id of a sample (a ``.cls`` member holds it as text)."""
    raw = members.get(label_key)
    try:
        return int(raw.decode("utf-8").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise DataError(f"webdataset shard {shard!r}, sample {key!r}: label {label_key!r} is {raw!r}, "
                        "expected an integer class id.") from None


__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "count_tar_samples",
    "iter_tar_samples",
    "pick_keys",
    "sample_image",
    "sample_label",
    "split_member_name",
]
