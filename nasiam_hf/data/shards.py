"""Where a stream's rows come from: *units* (parquet row groups, webdataset ``.tar`` shards, chunks of image
files), each row's stable key, and the raw rows of a unit, read without decoding any image.

Keys: ``"<file>:<row>"`` for parquet (the row's position in its file, from the footers alone), ``"<shard>/<__key__>"``
for webdataset, the relative path for image folders. :func:`key_index` hashes a key to the 63-bit ``index`` that
seeds the sample's views.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from ..network import is_connection_error
from .folders import FolderListing
from .images import DataError
from .sources import IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, find_column
from .webdataset import count_tar_samples, iter_tar_samples, pick_keys

FOLDER_CHUNK = 256  # image files per unit of an image folder
_MASK63 = (1 << 63) - 1


def key_index(key: str) -> int:
    """The 63-bit hash of a sample key: the stream's per-sample ``index`` (the seed key of its views)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") & _MASK63


def key_indices(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((key_index(k) for k in keys), dtype=np.int64, count=len(keys))


def mix64(seed: int, values: np.ndarray) -> np.ndarray:
    """SplitMix64 of ``values`` (int64 indices) xor a seeded offset: well-spread uint64 scores, vectorised."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) ^ np.uint64((int(seed) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def open_binary(path: str) -> IO[bytes]:
    """A local path or an fsspec URL (``hf://datasets/...`` through huggingface_hub's HfFileSystem) as a binary
    file; a Hub that cannot be reached is a :class:`DataError` naming the file."""
    if "://" not in path:
        return open(path, "rb")
    import fsspec

    try:
        return fsspec.open(path, "rb").open()
    except Exception as error:
        if is_connection_error(error):
            raise DataError(f"{path!r} cannot be read: the Hugging Face Hub cannot be reached ({error})") from error
        raise


@dataclass(frozen=True)
class Unit:
    """One readable piece of a stream: rows ``[start, stop)`` of row group ``group`` of file ``file`` (parquet),
    tar shard ``file`` (webdataset: ``start`` 0, ``stop`` its sample count or -1 when not counted), or files
    ``[start, stop)`` of an image folder listing. ``first_row`` is the file row of the unit's first row."""

    file: int
    group: int
    start: int
    stop: int
    first_row: int = 0

    @property
    def num_rows(self) -> int | None:
        return None if self.stop < 0 else self.stop - self.start

    def sliced(self, parts: int) -> list[Unit]:
        """The unit cut into ``parts`` row ranges (for more units than ranks x lanes on small data)."""
        edges = np.linspace(self.start, self.stop, parts + 1).round().astype(int)
        return [Unit(self.file, self.group, int(a), int(b), self.first_row + int(a - self.start))
                for a, b in zip(edges[:-1], edges[1:]) if b > a]


@dataclass
class StreamSource:
    """The units of one training source and how to read them (picklable: it travels to DataLoader workers)."""

    kind: str  # "parquet" | "webdataset" | "folder"
    paths: list[str]  # data files (parquet, tar) or image files (folder)
    names: list[str]  # stable names of ``paths`` (relative to the data root / repository)
    units: list[Unit]
    where: str
    image_column: str
    label_column: str | None = None
    class_names: list[str] | None = None
    labels: list[int] | None = None  # folder kind: label of each image file
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.label_column is not None or self.labels is not None

    def unit_keys(self, unit: Unit) -> list[str]:
        """Keys of a unit's rows (parquet: from metadata; tar: header scan; folder: relative paths)."""
        if self.kind == "parquet":
            name = self.names[unit.file]
            return [f"{name}:{unit.first_row + p}" for p in range(unit.stop - unit.start)]
        if self.kind == "folder":
            return self.names[unit.start:unit.stop]
        name = self.names[unit.file]
        return [f"{name}/{k}" for k in count_tar_samples(self.paths[unit.file], name, opener=open_binary)]

    def describe(self, unit: Unit, position: int) -> str:
        """Where row ``position`` of a parquet/folder unit is, for messages."""
        if self.kind == "folder":
            return f"{self.where}, image {self.names[unit.start + position]!r}"
        return f"{self.where}: parquet shard {self.names[unit.file]!r}, row {unit.first_row + position}"

    def read_rows(self, unit: Unit, positions: Sequence[int]) -> list[tuple[Any, int | None]]:
        """``(encoded image, label or None)`` of the unit's rows at ``positions`` (parquet / folder units)."""
        if self.kind == "folder":
            return [(self.paths[unit.start + p], None if self.labels is None else self.labels[unit.start + p])
                    for p in positions]
        import pyarrow.parquet as pq

        path = self.paths[unit.file]
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        try:
            with open_binary(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(unit.group, columns=columns)
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"parquet shard {self.names[unit.file]!r} (row group {unit.group}) cannot be read: "
                            f"{type(error).__name__}: {error}") from error
        rows = table.slice(unit.start, unit.stop - unit.start).take(np.asarray(positions, dtype=np.int64))
        images = rows.column(self.image_column).to_pylist()
        labels = rows.column(self.label_column).to_pylist() if self.label_column else [None] * len(images)
        return list(zip(images, labels))

    def tar_samples(self, unit: Unit, want: Callable[[str], bool]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The samples of a tar unit whose key ``want`` accepts (called once per sample, in order); the others
        are passed over by their headers."""
        name = self.names[unit.file]
        return iter_tar_samples(self.paths[unit.file], name, want=lambda key: want(f"{name}/{key}"),
                                opener=open_binary)


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


def parquet_source(paths: list[str], names: list[str], where: str, image_column: str | None,
                   label_column: str | None) -> StreamSource:
    """Units from the footers only: every non-empty row group of every file (empty ones are skipped)."""
    import datasets
    import pyarrow.parquet as pq

    def footer(path: str, name: str):
        try:
            with open_binary(path) as handle:
                parquet = pq.ParquetFile(handle)
                return parquet.metadata, parquet.schema_arrow
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"parquet shard {name!r} cannot be read: {type(error).__name__}: {error}") from error

    remote = any("://" in p for p in paths)
    with ThreadPoolExecutor(max_workers=16 if remote else 1) as pool:  # Hub footers: one round trip each
        footers = list(pool.map(footer, paths, names))
    units, first_schema, image, label, class_names = [], None, None, None, None
    for index, (name, (metadata, schema)) in enumerate(zip(names, footers)):
        if first_schema is None:
            first_schema = schema
            features = datasets.Features.from_arrow_schema(schema)
            image = find_column(schema.names, features, image_column, IMAGE_COLUMN_CANDIDATES, "image", where)
            label = find_column(schema.names, features, label_column, LABEL_COLUMN_CANDIDATES, "label", where)
            if label is not None and isinstance(features.get(label), datasets.ClassLabel):
                class_names = list(features[label].names)
        missing = [c for c in (image, label) if c is not None and c not in schema.names]
        if missing:
            raise DataError(f"parquet shard {name!r} has no column {missing[0]!r} (columns: {schema.names}).")
        offset = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                units.append(Unit(index, group, 0, rows, offset))
            offset += rows
    return StreamSource("parquet", paths, names, units, where, image, label, class_names)


def webdataset_source(paths: list[str], names: list[str], where: str, image_column: str | None,
                      label_column: str | None) -> StreamSource:
    """One unit per shard (length unknown until counted); image and label keys from the first sample."""
    for path, name in zip(paths, names):
        for key, members in iter_tar_samples(path, name, opener=open_binary):
            image, label = pick_keys(members, name, key, image_column, label_column)
            units = [Unit(i, 0, 0, -1) for i in range(len(paths))]
            return StreamSource("webdataset", paths, names, units, where, image, label)
    raise DataError(f"The webdataset shards of {where} hold no sample (0 rows).")


def folder_source(listing: FolderListing, where: str) -> StreamSource:
    """Chunks of :data:`FOLDER_CHUNK` image files; labels from the class folders when the listing has them."""
    names = listing.class_names or None
    labels = None
    if listing.classes is not None:
        ids = {name: i for i, name in enumerate(names)}
        labels = [ids[c] for c in listing.classes]
    total = len(listing.files)
    units = [Unit(0, 0, start, min(start + FOLDER_CHUNK, total)) for start in range(0, total, FOLDER_CHUNK)]
    return StreamSource("folder", list(listing.files), list(listing.keys), units, where, "image", None, names,
                        labels, list(listing.notes))


def count_units(source: StreamSource) -> StreamSource:
    """Webdataset units with their sample counts, from the tar headers (a local shard is not read in full)."""
    if source.kind != "webdataset" or all(u.stop >= 0 for u in source.units):
        return source
    units = [Unit(u.file, 0, 0, len(count_tar_samples(source.paths[u.file], source.names[u.file],
                                                       opener=open_binary))) for u in source.units]
    return StreamSource(source.kind, source.paths, source.names, units, source.where, source.image_column,
                        source.label_column, source.class_names, source.labels, source.notes)


__all__ = [
    "FOLDER_CHUNK",
    "StreamSource",
    "Unit",
    "count_units",
    "folder_source",
    "key_index",
    "key_indices",
    "mix64",
    "open_binary",
    "parquet_source",
    "webdataset_source",
]
