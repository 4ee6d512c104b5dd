"""Where images come from: Hub ids (one split at a time), local parquet / arrow / JSON-lines / webdataset files,
folders or globs of them, image folders, the embedded demo; and how the image and label columns are found."""

from __future__ import annotations

import base64
import functools
import glob
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage

from ..network import is_connection_error, offline_mode
from .file_problems import unreadable_file
from .folders import FolderListing
from .images import BadImageError, DataError
from .webdataset import IMAGE_KEYS, LABEL_KEYS, iter_tar_samples, pick_keys, sample_label

if TYPE_CHECKING:
    import datasets

# Short dataset names accepted by --dataset_name, mapped to their Hub ids.
DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10", "cifar-10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100", "cifar-100": "uoft-cs/cifar100",
    "imagenet": "ILSVRC/imagenet-1k", "imagenet-1k": "ILSVRC/imagenet-1k",
}
# Known datasets by Hub id (lower case) -> key of NORMALIZATION; their aliases are looked up through DATASET_ALIASES.
KNOWN_DATASETS = {
    "uoft-cs/cifar10": "cifar10", "uoft-cs/cifar100": "cifar100", "ilsvrc/imagenet-1k": "imagenet", "demo": "demo",
}
# The eval split of known datasets whose first candidate split is unlabelled (ImageNet's test labels are all -1).
KNOWN_EVAL_SPLITS = {"ilsvrc/imagenet-1k": "validation"}

IMAGE_COLUMN_CANDIDATES = ("img", "image", "pixel_values", *IMAGE_KEYS)
LABEL_COLUMN_CANDIDATES = ("label", "fine_label", "labels", *LABEL_KEYS)
EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")
# File ending -> format; a folder or glob of data files must hold one format only.
FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".tar": "webdataset"}
STREAMABLE_FORMATS = ("parquet", "webdataset")
# The JSON files ``Dataset.save_to_disk`` writes next to its arrow files: metadata, not data.
SAVED_DATASET_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")


def hub_id(name: str) -> str:
    return DATASET_ALIASES.get(name.lower(), name)


def known_dataset(name: str) -> str | None:
    """The NORMALIZATION key of a known dataset (by Hub id or alias), else None."""
    return KNOWN_DATASETS.get(hub_id(name).lower())


@dataclass
class RawSplit:
    """One split as loaded, before standardisation; ``where`` names it in messages ("train file 'x.parquet'")."""

    dataset: datasets.Dataset
    where: str
    notes: tuple[str, ...] = ()
    labelled_hint: bool | None = None  # folders decide labels themselves: True/False; None = look for a column


@dataclass(frozen=True)
class DataFiles:
    """Local data files of one format (sorted), the root they are named relative to, and how the user gave them."""

    format: str
    files: list[str]
    root: str
    spec: str = field(default="")

    def name(self, path: str) -> str:
        """A file's stable name: its path relative to the root (POSIX style)."""
        return os.path.relpath(path, self.root).replace(os.sep, "/") if self.root else os.path.basename(path)


# --------------------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------------------


def find_column(columns: Sequence[str], features: Mapping | None, requested: str | None,
                candidates: Sequence[str], kind: str, where: str) -> str | None:
    """The image/label column: the requested one, else the first known name, else (images) the only Image feature.

    A missing image column is an error; a missing label column is None (the data is unlabelled).
    """
    columns = list(columns)
    flag = f"--{kind}_column"
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{where}: {kind} column {requested!r} ({flag}) not found; columns found: {columns}.")
        return requested
    for name in candidates:
        if name in columns:
            return name
    if kind == "label":
        return None
    import datasets

    image_features = [c for c, f in (features or {}).items() if isinstance(f, datasets.Image)]
    if len(image_features) == 1:
        return image_features[0]
    raise ValueError(
        f"{where}: no image column found: looked for {list(candidates)} among the columns found {columns}. "
        f"Pass {flag} to name it."
    )


# --------------------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------------------


def _format_of(path: str) -> str | None:
    return FILE_FORMATS.get(os.path.splitext(path)[1].lower())


def resolve_data_files(spec: str, role: str) -> DataFiles:
    """A file, a folder (searched at any depth) or a glob of data files -> :class:`DataFiles` of one format."""
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        root = os.path.dirname(spec.split("*")[0].split("?")[0].split("[")[0]) or "."
        if not files:
            raise ValueError(f"The {role} pattern {spec!r} matches no file.")
    elif os.path.isdir(spec):
        files = sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(spec) for name in names
            if _format_of(name) is not None and not name.startswith(".") and name not in SAVED_DATASET_METADATA
        )
        root = spec
        if not files:
            raise ValueError(f"The {role} folder {spec!r} holds no data file: looked for {sorted(FILE_FORMATS)} "
                             "(pass image folders with --train_dir / --validation_dir).")
    elif os.path.isfile(spec):
        files, root = [spec], os.path.dirname(spec)
    else:
        raise ValueError(f"The {role} {spec!r} does not exist.")
    formats = {_format_of(p) for p in files}
    if None in formats:
        bad = next(p for p in files if _format_of(p) is None)
        raise ValueError(f"Unsupported data file {bad!r} ({role}): expected one of {sorted(FILE_FORMATS)} "
                         "(or an image folder via --train_dir).")
    if len(formats) > 1:
        raise ValueError(f"The {role} {spec!r} mixes formats {sorted(formats)}: pass one format at a time.")
    return DataFiles(format=formats.pop(), files=files, root=root, spec=spec)


def _webdataset_rows(shards: list[str], names: list[str], image_key: str | None, label_key: str | None, where: str,
                     on_bad_image: str = "error"):
    """Rows of map-style webdataset loading: the encoded image (named ``shard/key.ext``) and the label. A sample
    without the image member is an error naming the shard, the sample and its keys (``--on_bad_image skip``: a row
    without bytes, skipped and counted when it is met)."""
    for path, shard in zip(shards, names):
        for key, members in iter_tar_samples(path, shard):
            if image_key in members:
                image = {"bytes": members[image_key], "path": f"{shard}/{key}.{image_key}"}
            elif on_bad_image == "skip":  # the missing member's name: no such file, skipped and counted when met
                image = {"bytes": None, "path": f"{shard}/{key}.{image_key}"}
            else:
                raise BadImageError(f"{where}: webdataset shard {shard!r}, sample {key!r} has no {image_key!r} member "
                                    f"(keys found: {sorted(members)}): rerun with --on_bad_image skip to skip it")
            row = {"image": image}
            if label_key is not None:
                row["label"] = sample_label(members, label_key, shard, key)
            yield row


def _first_tar_sample(files: DataFiles, image_key: str | None, label_key: str | None) -> tuple[str, str | None]:
    for path in files.files:
        shard = files.name(path)
        for key, members in iter_tar_samples(path, shard):
            return pick_keys(members, shard, key, image_key, label_key)
    raise ValueError(f"The webdataset shards {files.spec!r} hold no sample.")


def _fingerprint(files: Sequence[str], *extra: Any) -> str:
    """Content identity of local files for datasets' cache: paths, sizes and modification times."""
    digest = hashlib.sha256(repr(extra).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _load_webdataset(files: DataFiles, image_column: str | None, label_column: str | None, cache_dir: str | None,
                     num_proc: int | None, where: str, on_bad_image: str) -> datasets.Dataset:
    import datasets

    image_key, label_key = _first_tar_sample(files, image_column, label_column)
    features = {"image": datasets.Image()}
    if label_key is not None:
        features["label"] = datasets.Value("int64")
    names = [files.name(p) for p in files.files]
    try:
        return datasets.Dataset.from_generator(
            _webdataset_rows, features=datasets.Features(features), cache_dir=cache_dir,
            gen_kwargs={"shards": list(files.files), "names": names, "image_key": image_key, "label_key": label_key,
                        "where": where, "on_bad_image": on_bad_image},
            num_proc=num_proc if num_proc and num_proc > 1 and len(files.files) > 1 else None,
            fingerprint=_fingerprint(files.files, image_key, label_key, on_bad_image),
        )
    except datasets.exceptions.DatasetGenerationError as error:  # it hides our message behind its own
        cause = error.__cause__
        if isinstance(cause, DataError):
            raise type(cause)(str(cause)) from error
        raise


def _decode_json_images(batch: dict, indices: list[int], column: str, folder: str, where: str) -> dict:
    """JSON-lines image values: paths relative to the file -> absolute paths; base64 ``bytes`` -> bytes."""
    import binascii

    values = []
    for index, value in zip(indices, batch[column]):
        if isinstance(value, str):
            value = {"bytes": None, "path": value}
        if not isinstance(value, dict):
            raise DataError(f"{where}, row {index}: the image column {column!r} holds {type(value).__name__} "
                            f"{str(value)[:40]!r}; expected a path, or {{'bytes': base64 text}}")
        raw, path = value.get("bytes"), value.get("path")
        if isinstance(raw, str):
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as error:
                raise DataError(f"{where}, row {index}: the image's 'bytes' are not base64 text ({error})") from None
        if raw is None and path is not None and not os.path.isabs(path) and "://" not in path:
            path = os.path.join(folder, path)
        values.append({"bytes": raw, "path": path})
    batch[column] = values
    return batch


def _parquet_row_groups(paths: Sequence[str]) -> list[list[int]]:
    """Rows of each row group of each file, from the footers."""
    import pyarrow.parquet as pq

    groups = []
    for path in paths:
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:
            raise DataError(f"parquet file {path!r} cannot be read: {type(error).__name__}: {error}") from error
        groups.append([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
    return groups


def load_local_files(spec: str, role: str, image_column: str | None, label_column: str | None,
                     cache_dir: str | None, num_proc: int | None, on_bad_image: str = "error") -> RawSplit:
    """A local file, folder or glob of data files as one map-style split (through datasets' cache)."""
    import datasets

    files = resolve_data_files(spec, role)
    where = f"{role} {spec!r}"
    if files.format == "webdataset":
        dataset = _load_webdataset(files, image_column, label_column, cache_dir, num_proc, where, on_bad_image)
        return RawSplit(dataset, where)
    options = {}
    if files.format == "parquet":
        groups = _parquet_row_groups(files.files)
        if not sum(map(sum, groups)):
            raise ValueError(f"The {where} is empty (0 rows).")
        if any(g and g[0] == 0 for g in groups):  # datasets reads in batches of the first row group's size
            options["batch_size"] = max(max(g) for g in groups if g)
    try:
        dataset = datasets.load_dataset(files.format, data_files=files.files, split="train", cache_dir=cache_dir,
                                        num_proc=num_proc, **options)
    except Exception as error:  # noqa: BLE001 - datasets' messages name neither the file nor the line
        if "corresponds to no data" in str(error):  # datasets refuses to build a split with no rows
            raise ValueError(f"The {where} is empty (0 rows).") from error
        raise unreadable_file(files, where, error) from error
    if files.format == "json" and len(dataset):
        column = find_column(dataset.column_names, dataset.features, image_column, IMAGE_COLUMN_CANDIDATES,
                             "image", where)
        if not isinstance(dataset.features[column], datasets.Image):
            folder = os.path.dirname(os.path.abspath(files.files[0]))
            try:
                dataset = dataset.map(_decode_json_images, batched=True, with_indices=True,
                                      fn_kwargs={"column": column, "folder": folder, "where": where},
                                      features=datasets.Features({**dataset.features, column: datasets.Image()}),
                                      num_proc=num_proc, desc="resolving image paths")
            except DataError as error:
                raise DataError(str(error)) from None
    return RawSplit(dataset, where)


def folder_dataset(listing: FolderListing, class_names: list[str] | None, role: str) -> RawSplit:
    """An image folder's listing as a map-style split: images by path (decoded on access), labels from the class
    folders when the listing has them."""
    import datasets

    columns: dict[str, list] = {"image": listing.files}
    features = {"image": datasets.Value("string")}
    if listing.classes is not None and class_names is not None:
        ids = {name: i for i, name in enumerate(class_names)}
        columns["label"] = [ids[c] for c in listing.classes]
        features["label"] = datasets.ClassLabel(names=class_names)
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    dataset = dataset.cast_column("image", datasets.Image())
    return RawSplit(dataset, f"{role} {listing.root!r}", listing.notes, labelled_hint="label" in columns)


# --------------------------------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------------------------------


def hub_error(name: str, error: BaseException | None, streaming: bool = False) -> ValueError:
    """The error for a Hub dataset that cannot be fetched: why (offline mode or no connection) and what to pass."""
    offline = offline_mode()
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub cannot be reached"
    path_like = ("/" in name or os.sep in name) and not os.path.exists(name)
    local = "not a local folder (no such path here), and as a Hub dataset id: " if path_like else ""
    if streaming:
        return ValueError(f"--streaming {name!r}: {local}{why}, so the split's files cannot be listed or read. Stream "
                          "local shards instead (--train_file with parquet or webdataset .tar files, or --train_dir).")
    return ValueError(
        f"--dataset_name {name!r}: {local}it is not in the local cache and {why}, so it cannot be downloaded. "
        "Pass local data with --train_file (parquet) or --train_dir (image folder), or run once online to cache "
        f"it, or use --dataset_name demo (embedded, no download)." + (f" Original error: {error}" if error else "")
    )


def hub_split_files(name: str, config_name: str | None, cache_dir: str | None) -> dict[str, list[str]] | None:
    """``{split: data files}`` of a Hub dataset (or a local dataset folder), resolved without downloading data;
    None when the Hub cannot be reached (a cached copy may still load whole) or the dataset lists no files."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, config_name, cache_dir=cache_dir)
    except Exception as error:
        if is_connection_error(error):
            return None
        if type(error).__name__ == "DatasetNotFoundError" and not os.path.exists(name):
            raise ValueError(f"--dataset_name {name!r} is not a local folder (no such path here), and the Hub has no "
                             f"dataset {name!r} that this account can read: check the name (or the path), or log in "
                             "with `hf auth login` for a private or gated dataset") from error
        raise
    data_files = builder.config.data_files
    return {str(split): [str(f) for f in files] for split, files in data_files.items()} if data_files else None


def load_hub_split(name: str, config_name: str | None, split: str, files: list[str], cache_dir: str | None,
                   num_proc: int | None) -> datasets.Dataset:
    """One split of a Hub dataset, downloading only that split's files; a file that cannot be read is a
    :class:`DataError` naming the split and its files (datasets' own message names neither)."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.load_dataset(name, config_name, data_files={split: files}, split=split,
                                     cache_dir=cache_dir, num_proc=num_proc)
    except Exception as error:
        if is_connection_error(error):
            raise hub_error(name, error) from error
        if isinstance(error, pa.ArrowException):
            shown = repr(files[0]) if len(files) == 1 else f"{len(files)} files, the first {files[0]!r}"
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            raise DataError(f"split {split!r} of {name!r} ({shown}) cannot be read: {reason}") from error
        raise


def load_hub_whole(name: str, config_name: str | None, cache_dir: str | None, num_proc: int | None
                   ) -> dict[str, datasets.Dataset]:
    """Every split of a Hub dataset at once: the way a copy cached by an earlier version (or a dataset that does
    not list its files) loads, offline too."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir, num_proc=num_proc)
    except Exception as error:
        if is_connection_error(error):
            raise hub_error(name, error) from error
        raise
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def pick_eval_split(split_names: Sequence[str], eval_split: str | None, train_split: str, name: str
                    ) -> list[str]:
    """The eval split to try: ``eval_split`` if given, else the known one, else test/validation/valid/val in order
    (the caller takes the first that turns out labelled)."""
    names = list(split_names)
    if eval_split is not None:
        if eval_split not in names:
            raise ValueError(f"Eval split {eval_split!r} (--eval_split) not found in {name}; splits found: {names}.")
        return [eval_split]
    known = KNOWN_EVAL_SPLITS.get(name.strip("'").lower())
    if known in names:
        return [known]
    return [s for s in EVAL_SPLIT_CANDIDATES if s in names and s != train_split]


def has_labels(dataset: datasets.Dataset, label_column: str | None) -> bool:
    """False for splits without a label column or whose labels are all missing or -1 (ImageNet's test split)."""
    import pyarrow.compute as pc

    column = find_column(dataset.column_names, dataset.features, label_column, LABEL_COLUMN_CANDIDATES, "label", "")
    if column is None:
        return False
    high = pc.max(dataset.data.column(column)).as_py()
    return high is not None and high >= 0


# --------------------------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def demo_splits() -> tuple[datasets.Dataset, datasets.Dataset]:
    """The embedded demo: scikit-learn's 1,797 real 8x8 digits, upscaled to 32x32 RGB, split 1,497 / 300 (stratified).

    Ships with scikit-learn (no download) and takes well under a second; memoised in-process, nothing written to disk.
    """
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = [
        PILImage.fromarray(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8), "L")
        .resize((32, 32), PILImage.BILINEAR)
        .convert("RGB")
        for pixels in digits.images
    ]
    labels = [int(y) for y in digits.target]
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=300, stratify=labels, random_state=0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def subset(rows: np.ndarray) -> datasets.Dataset:
        rows = np.sort(rows)
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in rows], "label": [labels[i] for i in rows]}, features=features
        )

    return subset(train_idx), subset(test_idx)


__all__ = [
    "DATASET_ALIASES",
    "EVAL_SPLIT_CANDIDATES",
    "FILE_FORMATS",
    "IMAGE_COLUMN_CANDIDATES",
    "KNOWN_DATASETS",
    "LABEL_COLUMN_CANDIDATES",
    "STREAMABLE_FORMATS",
    "DataError",
    "DataFiles",
    "RawSplit",
    "demo_splits",
    "find_column",
    "folder_dataset",
    "has_labels",
    "hub_id",
    "hub_split_files",
    "known_dataset",
    "hub_error",
    "load_hub_split",
    "load_hub_whole",
    "load_local_files",
    "pick_eval_split",
    "resolve_data_files",
]
