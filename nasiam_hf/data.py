"""Data layer: load image datasets, standardise their columns, and serve reproducible augmented views.

Everything a training script needs between "a dataset name or a folder" and "batches of two views":

* :func:`load_image_splits` turns a Hub id, a local parquet/arrow file, an image folder or the embedded ``demo``
  dataset into :class:`ImageSplits` whose datasets have exactly the columns ``image``, ``label`` and ``index``.
* :func:`build_transform` gives the torchvision v2 pipelines ("ssl", "light", "eval") for the CIFAR or ImageNet policy.
* :class:`ViewDataset` + :class:`EpochSampler` + :func:`make_loader` serve views whose randomness depends only on
  ``(seed, epoch, index, view)``: the same sample gives bit-identical views whatever the batch, the worker or the rank.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image as PILImage

if TYPE_CHECKING:  # `datasets` is imported lazily: the model code must work on machines without it
    import datasets

logger = logging.getLogger(__name__)

# Short dataset names accepted by --dataset_name, mapped to their Hub ids.
DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10", "cifar-10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100", "cifar-100": "uoft-cs/cifar100",
    "imagenet": "ILSVRC/imagenet-1k", "imagenet-1k": "ILSVRC/imagenet-1k",
}

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Computed once with `_build_demo_splits()`: per-channel mean/std of the 1,497 train images after the 32x32 RGB
    # upscaling, pixels scaled to [0, 1] (numpy over all pixels: mean 0.30567, std 0.32356; grey, so equal channels).
    "demo": ((0.3057, 0.3057, 0.3057), (0.3236, 0.3236, 0.3236)),
}

IMAGE_COLUMN_CANDIDATES = ("img", "image", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "fine_label", "labels")
EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")
LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
POLICIES = ("cifar", "imagenet")
IMAGENET_CROP_RATIO = 0.875  # evaluation crop / resized side (224 / 256)
TRANSFORM_KINDS = ("ssl", "light", "eval")
VIEW_MODES = ("two_view", "single", "decode")

# Known datasets by Hub id (lower case) -> key of NORMALIZATION; their aliases are looked up through DATASET_ALIASES.
_KNOWN = {
    "uoft-cs/cifar10": "cifar10", "uoft-cs/cifar100": "cifar100", "ilsvrc/imagenet-1k": "imagenet", "demo": "demo",
}


def _known_dataset(name: str) -> str | None:
    """The NORMALIZATION key of a known dataset (by Hub id or alias), else None."""
    return _KNOWN.get(DATASET_ALIASES.get(name.lower(), name).lower())


@dataclass
class ImageSplits:
    """Standardised train/eval datasets (columns ``image``, ``label``, ``index``) and what the models need to know."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    num_labels: int
    id2label: dict[int, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    policy: str
    name: str

    @property
    def label2id(self) -> dict[str, int]:
        """Inverse of ``id2label``, the form model configs want."""
        return {name: i for i, name in self.id2label.items()}

    def transform(self, kind: str) -> Callable:
        """The :func:`build_transform` pipeline of this dataset's policy, size and statistics."""
        return build_transform(kind, self.policy, self.image_size, self.mean, self.std)

    def decode_transform(self) -> Callable:
        """The :func:`build_decode_transform` of this dataset (uint8 images for on-device augmentation)."""
        return build_decode_transform(self.policy, self.image_size)

    def batch_augmenter(self, kind: str, seed: int = 0, num_views: int = 2):
        """The on-device :class:`~.augment.BatchAugmenter` of this dataset's policy, size and statistics
        (``num_views`` views; with ``kind="eval"``, the no-augmentation ablation, they are all the same)."""
        from .augment import BatchAugmenter

        return BatchAugmenter(kind, self.policy, self.image_size, self.mean, self.std, seed=seed, num_views=num_views)


# --------------------------------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------------------------------

_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Transparent pixels are composited on WHITE, the way image viewers and browsers show them on a page.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def _gray_to_rgb(values: np.ndarray) -> PILImage.Image:
    """uint8-range grey values (any float/int array) -> RGB image, rounding and clipping."""
    return PILImage.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any PIL mode -> 8-bit RGB without the silent losses of ``convert("RGB")``.

    ``convert`` clips 16-bit and 32-bit grey to white and drops alpha, so: 16-bit modes are divided by 257 (65535 ->
    255); mode ``I`` is scaled by its maximum when it exceeds 255; mode ``F`` in [0, 1] is scaled by 255 (other
    ranges: kept if inside [0, 255], else min-max scaled); transparent images are composited on white
    (:data:`TRANSPARENT_BACKGROUND`). CMYK, L, 1, YCbCr and palette images go through ``convert``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _16BIT_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        peak = values.max() if values.size else 0.0
        return _gray_to_rgb(values * (255.0 / peak) if peak > 255 else values)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            values = values * 255.0
        elif low < 0 or high > 255:
            values = (values - low) * (255.0 / max(high - low, 1e-12))
        return _gray_to_rgb(values)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _is_connection_error(error: BaseException) -> bool:
    """True when any error in the chain says the Hub could not be reached (offline mode included)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, ConnectionError) or names & {
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "ConnectError",
            "ConnectTimeout",
            "ConnectionError",
            "Timeout",
        }:
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_hub(dataset_id: str, config_name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """``load_dataset`` on a Hub id, turning 'not cached while offline' into an actionable error."""
    import datasets

    from .hub import offline_mode

    try:
        loaded = datasets.load_dataset(dataset_id, config_name, cache_dir=cache_dir)
    except Exception as error:
        if not _is_connection_error(error):
            raise
        offline = offline_mode("HF_DATASETS_OFFLINE")
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub cannot be reached"
        raise ValueError(
            f"Dataset {dataset_id!r} is not in the local cache and {why}, so it cannot be downloaded. "
            "Pass local data with --train_file (parquet) or --train_dir (image folder), or run once online to cache "
            f"it, or use --dataset_name demo (embedded, no download). Original error: {error}"
        ) from error
    if isinstance(loaded, datasets.Dataset):  # pragma: no cover - load_dataset without split returns a dict
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_local_file(path: str, cache_dir: str | None, role: str = "train") -> datasets.Dataset:
    """One local parquet/arrow file (or glob) as one split; ``role`` ("train"/"validation") names it in errors."""
    import datasets

    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass image folders with --train_dir/--validation_dir.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FILE_BUILDERS:
        raise ValueError(
            f"Unsupported data file {path!r}: expected one of {sorted(LOCAL_FILE_BUILDERS)} "
            "(or an image folder via --train_dir)."
        )
    try:
        builder = LOCAL_FILE_BUILDERS[extension]
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except ValueError as error:  # datasets refuses to build a split with no rows
        if "corresponds to no data" in str(error):
            raise ValueError(f"The {role} file {path!r} is empty (0 rows).") from error
        raise


def _load_image_folder(path: str, cache_dir: str | None) -> datasets.DatasetDict:
    """An image folder (class sub-folders, optionally under train/ and test/ folders) as a DatasetDict."""
    import datasets

    if not os.path.isdir(path):
        raise ValueError(f"Image folder {path!r} does not exist or is not a directory.")
    return datasets.load_dataset("imagefolder", data_dir=path, cache_dir=cache_dir)


@functools.lru_cache(maxsize=1)
def _build_demo_splits() -> tuple[datasets.Dataset, datasets.Dataset]:
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


def _find_column(dataset: datasets.Dataset, requested: str | None, candidates: Sequence[str], kind: str) -> str:
    """The image/label column: the requested one, else the first known name (images: else the only Image feature)."""
    import datasets

    columns = list(dataset.column_names)
    flag = f"--{kind}_column"
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{kind.capitalize()} column {requested!r} ({flag}) not found; columns found: {columns}.")
        return requested
    for name in candidates:
        if name in columns:
            return name
    if kind == "image":
        image_features = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
        if len(image_features) == 1:
            return image_features[0]
    extra = " All our uses need labels (kNN monitor, linear probe)." if kind == "label" else ""
    raise ValueError(
        f"No {kind} column found: looked for {list(candidates)} among the columns found {columns}. "
        f"Pass {flag} to name it.{extra}"
    )


def _standardise(
    dataset: datasets.Dataset, image_column: str | None, label_column: str | None, where: str
) -> datasets.Dataset:
    """Keep only ``image``/``label`` (renamed, image cast to an Image feature) and add the ``index`` column.

    ``index`` is added before any shuffle/select, so it is a cheap in-memory column (nothing flattened) holding the
    row's position in the original split: the key of per-sample seeding.
    """
    import datasets

    image_col = _find_column(dataset, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    label_col = _find_column(dataset, label_column, LABEL_COLUMN_CANDIDATES, "label")
    dataset = dataset.select_columns([image_col, label_col])
    if "index" in dataset.column_names:  # pragma: no cover - only if a label/image column is called "index"
        raise ValueError(f"{where}: a column named 'index' is reserved; rename it.")
    dataset = dataset.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
    image_feature = dataset.features["image"]
    if not isinstance(image_feature, datasets.Image) or not image_feature.decode:
        try:
            dataset = dataset.cast_column("image", datasets.Image())
        except Exception as error:
            raise ValueError(
                f"{where}: column {image_col!r} ({image_feature}) cannot be read as images; "
                "expected encoded images (bytes/paths). Pass --image_column to pick another column."
            ) from error
    label_feature = dataset.features["label"]
    is_int = isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
    if not isinstance(label_feature, datasets.ClassLabel) and not is_int:
        raise ValueError(
            f"{where}: label column {label_col!r} has type {label_feature}; expected integer class ids or a "
            "ClassLabel. Pass --label_column to pick another column."
        )
    return dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))


def _label_range(dataset: datasets.Dataset, where: str) -> tuple[int, int]:
    """(min, max) of the label column, read as one arrow column (no image decoding); errors on missing labels."""
    import pyarrow.compute as pc

    column = dataset.data.column("label")
    if column.null_count:
        raise ValueError(
            f"{where}: {column.null_count} rows have no label; all our uses need labels (kNN monitor, linear probe)."
        )
    bounds = pc.min_max(column)
    return int(bounds["min"].as_py()), int(bounds["max"].as_py())


def _check_labels(dataset: datasets.Dataset, num_labels: int, where: str) -> None:
    """Labels must lie in [0, num_labels): heads and kNN index class ids directly."""
    low, high = _label_range(dataset, where)
    bad = low if low < 0 else high if high >= num_labels else None
    if bad is not None:
        raise ValueError(f"{where}: label {bad} is outside [0, {num_labels}) (num_labels={num_labels}).")


def _truncate(dataset: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    """Shuffle with the seed, then keep the first n: a plain head of class-ordered data would be one class."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 0:
        raise ValueError(f"max samples must be >= 0, got {max_samples}.")
    return dataset.shuffle(seed=seed).select(range(max_samples))


def _labelled_split(dataset: datasets.Dataset, label_column: str | None) -> bool:
    """False for unlabelled test splits (e.g. ImageNet's, all -1), so eval-split detection can skip them."""
    try:
        column = dataset.data.column(_find_column(dataset, label_column, LABEL_COLUMN_CANDIDATES, "label"))
    except ValueError:
        return False
    import pyarrow.compute as pc

    high = pc.max(column).as_py()
    return high is not None and high >= 0


def _pick_eval_split(
    splits: Any, eval_split: str | None, train_split: str, label_column: str | None, where: str
) -> str | None:
    """``eval_split`` if given, else the first labelled of test/validation/valid/val; None when none exists."""
    names = list(splits.keys())
    if eval_split is not None:
        if eval_split not in names:
            raise ValueError(f"Eval split {eval_split!r} (--eval_split) not found in {where}; splits found: {names}.")
        return eval_split
    for name in EVAL_SPLIT_CANDIDATES:
        if name in names and name != train_split:
            if _labelled_split(splits[name], label_column):
                return name
            logger.warning("Skipping split %r of %s as eval split: it has no labels.", name, where)
    return None


def _resolve_sources(
    dataset_name, dataset_config_name, train_file, train_dir, validation_file, validation_dir,
    label_column, train_split, eval_split, cache_dir,
):  # fmt: skip
    """Load the raw train/eval datasets; returns (train, eval or None, name, where-train, where-eval)."""
    given = {
        "--dataset_name": dataset_name,
        "--train_file": train_file,
        "--train_dir": train_dir,
    }
    passed = {flag: value for flag, value in given.items() if value is not None}
    if len(passed) != 1:
        raise ValueError(
            "Exactly one training data source is needed: --dataset_name, --train_file or --train_dir; "
            f"got {passed if passed else 'none'}."
        )
    if validation_file is not None and validation_dir is not None:
        raise ValueError(
            "Pass at most one of --validation_file and --validation_dir; "
            f"got {validation_file!r} and {validation_dir!r}."
        )

    eval_ds, eval_where = None, None
    if dataset_name is not None and dataset_name.lower() == "demo":
        train_ds, demo_test = _build_demo_splits()
        name, train_where = "demo", "split 'train' of the demo dataset"
        if validation_file is None and validation_dir is None:
            eval_ds, eval_where = demo_test, "split 'test' of the demo dataset"
    elif dataset_name is not None:
        name = DATASET_ALIASES.get(dataset_name.lower(), dataset_name)
        splits = _load_hub(name, dataset_config_name, cache_dir)
        if train_split not in splits:
            raise ValueError(f"Train split {train_split!r} (--train_split) not in {name!r}; splits: {list(splits)}.")
        train_ds, train_where = splits[train_split], f"split {train_split!r} of {name!r}"
        if validation_file is None and validation_dir is None:
            picked = _pick_eval_split(splits, eval_split, train_split, label_column, repr(name))
            if picked is not None:
                eval_ds, eval_where = splits[picked], f"split {picked!r} of {name!r}"
    elif train_file is not None:
        name = os.path.basename(train_file.rstrip("/"))
        train_ds, train_where = _load_local_file(train_file, cache_dir), f"train file {train_file!r}"
    else:
        name = os.path.basename(os.path.normpath(train_dir))
        splits = _load_image_folder(train_dir, cache_dir)
        split = train_split if train_split in splits else next(iter(splits))
        train_ds, train_where = splits[split], f"image folder {train_dir!r} (split {split!r})"
        if validation_dir is None and validation_file is None and len(splits) > 1:
            picked = _pick_eval_split(splits, eval_split, split, label_column, repr(train_dir))
            if picked is not None:
                eval_ds, eval_where = splits[picked], f"image folder {train_dir!r} (split {picked!r})"

    if validation_file is not None:
        eval_ds = _load_local_file(validation_file, cache_dir, "validation")
        eval_where = f"validation file {validation_file!r}"
    elif validation_dir is not None:
        splits = _load_image_folder(validation_dir, cache_dir)
        eval_ds, eval_where = next(iter(splits.values())), f"image folder {validation_dir!r}"
    return train_ds, eval_ds, name, train_where, eval_where


def _label_names(train: datasets.Dataset, eval_ds: datasets.Dataset | None, where: str) -> list[str] | None:
    """Class names from the ClassLabel features; train and eval must agree when both have them."""
    import datasets

    feature = train.features["label"]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if eval_ds is not None:
        eval_feature = eval_ds.features["label"]
        if isinstance(eval_feature, datasets.ClassLabel):
            if names is not None and list(eval_feature.names) != names:
                raise ValueError(
                    f"{where}: train and eval class names differ: {names} vs {list(eval_feature.names)}."
                )
            names = names or list(eval_feature.names)
    return names


def _first_image_size(dataset: datasets.Dataset) -> int:
    """Longest side of the first image (decodes one image only)."""
    width, height = dataset[0]["image"].size
    return max(width, height)


def load_image_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    train_dir: str | None = None,
    validation_file: str | None = None,
    validation_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> ImageSplits:
    """Load train (and eval, when one exists) data from exactly one source and standardise it.

    Sources: a Hub id or alias (``cifar10``, ``cifar100``, ``imagenet``), ``demo`` (embedded digits), a local parquet
    or arrow file (``train_file``/``validation_file``) or an image folder (``train_dir``/``validation_dir``). The
    datasets come back with columns ``image`` (Image), ``label`` (int/ClassLabel) and ``index`` (original row).
    """
    train_raw, eval_raw, name, train_where, eval_where = _resolve_sources(
        dataset_name, dataset_config_name, train_file, train_dir, validation_file, validation_dir,
        label_column, train_split, eval_split, cache_dir,
    )  # fmt: skip
    for dataset, where in ((train_raw, train_where), (eval_raw, eval_where)):
        if dataset is not None and len(dataset) == 0:
            raise ValueError(f"The {where} is empty (0 rows).")
    train = _standardise(train_raw, image_column, label_column, train_where)
    eval_ds = _standardise(eval_raw, image_column, label_column, eval_where) if eval_raw is not None else None

    names = _label_names(train, eval_ds, train_where)
    if names is not None:
        num_labels = len(names)
    else:
        highs = [_label_range(d, w)[1] for d, w in ((train, train_where), (eval_ds, eval_where)) if d is not None]
        num_labels = max(highs) + 1 if highs else 0
        names = [str(i) for i in range(num_labels)]

    for dataset, where in ((train, train_where), (eval_ds, eval_where)):
        if dataset is not None:
            _check_labels(dataset, num_labels, where)

    train = _truncate(train, max_train_samples, seed)
    eval_ds = _truncate(eval_ds, max_eval_samples, seed) if eval_ds is not None else None
    truncated = ((train, train_where, "--max_train_samples"), (eval_ds, eval_where, "--max_eval_samples"))
    for dataset, where, flag in truncated:
        if dataset is not None and len(dataset) == 0:
            raise ValueError(f"The {where} is empty after {flag}.")

    known = _known_dataset(name)
    if image_size is None:
        if known == "imagenet":
            image_size = 224
        elif known is not None:
            image_size = 32
        else:
            detected = _first_image_size(train)
            image_size = detected if detected <= 64 else 224
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    policy = "imagenet" if known == "imagenet" or image_size > 64 else "cifar"
    stats_key = known if known is not None else ("imagenet" if policy == "imagenet" else "cifar10")
    mean, std = NORMALIZATION[stats_key]
    return ImageSplits(
        train=train,
        eval=eval_ds,
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        mean=mean,
        std=std,
        image_size=int(image_size),
        policy=policy,
        name=name,
    )


def split_in_halves(
    dataset: datasets.Dataset, portion: float = 0.5, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Shuffle, then cut into two disjoint parts (first ``int(len * portion)`` rows, rest).

    The NASiam search trains weights on one part and alphas on the other (Algorithm 1, train_portion 0.5).
    """
    if not 0 < portion < 1:
        raise ValueError(f"portion must be in (0, 1), got {portion}.")
    cut = int(len(dataset) * portion)
    if cut == 0 or cut == len(dataset):
        raise ValueError(
            f"Cannot split {len(dataset)} rows with portion {portion}: one part would be empty "
            f"({cut} / {len(dataset) - cut} rows). Use more data (--max_train_samples) or another portion."
        )
    shuffled = dataset.shuffle(seed=seed)
    return shuffled.select(range(cut)), shuffled.select(range(cut, len(dataset)))


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def blur_kernel_size(image_size: int) -> int:
    """About 10 % of the image side, odd (23 at 224), as in SimCLR/MoCo v2/SimSiam."""
    kernel = max(3, int(0.1 * image_size))
    return kernel if kernel % 2 else kernel + 1


def resize_edge(image_size: int, policy: str) -> int:
    """The shorter side an image is resized to before the evaluation centre crop: ``image_size`` for the CIFAR
    policy, ``int(image_size / 0.875)`` (256 at 224) for ImageNet."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; expected one of {POLICIES}.")
    return int(image_size) if policy == "cifar" else int(image_size / IMAGENET_CROP_RATIO)


def build_transform(
    kind: str, policy: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable:
    """torchvision v2 pipeline from an RGB PIL image to a normalised float32 (3, S, S) tensor.

    kind: "ssl" (strong SimSiam/MoCo v2 augmentation; ImageNet adds blur), "light" (linear-probe training: crop +
    flip) or "eval" (deterministic: resize/center-crop only). policy: "cifar" or "imagenet".
    """
    from torchvision.transforms import v2

    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"Unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}.")
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; expected one of {POLICIES}.")
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if kind == "eval":  # CIFAR: no-ops at the native size, square output otherwise
        steps = [v2.Resize(resize_edge(image_size, policy)), v2.CenterCrop(image_size)]
    elif kind == "light":
        if policy == "cifar":
            steps = [v2.Resize(image_size), v2.CenterCrop(image_size), v2.RandomCrop(image_size, padding=4)]
        else:
            steps = [v2.RandomResizedCrop(image_size)]
        steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if policy == "imagenet":
            steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + to_tensor)


def decode_size(policy: str, image_size: int) -> int:
    """Side of the square uint8 images served for on-device augmentation: the crop size for the CIFAR policy (the
    native size of CIFAR itself), ``image_size / 0.875`` (256 at 224) for ImageNet, where the random crop to
    ``image_size`` then happens on the device."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; expected one of {POLICIES}.")
    return int(image_size) if policy == "cifar" else int(round(image_size / IMAGENET_CROP_RATIO))


def build_decode_transform(policy: str, image_size: int) -> Callable:
    """RGB PIL image -> uint8 ``(3, S, S)`` tensor, ``S = decode_size(policy, image_size)``: resize the shorter side
    to ``S`` (antialiased), centre-crop. Deterministic: the random views are drawn later, on the device
    (:class:`~.augment.BatchAugmenter`)."""
    from torchvision.transforms import v2

    size = decode_size(policy, image_size)
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])


# --------------------------------------------------------------------------------------------------------------------
# Views, sampler, loader
# --------------------------------------------------------------------------------------------------------------------

_SEED_MASK = (1 << 63) - 1


def view_seed(seed: int, epoch: int, index: int, view: int) -> int:
    """Well-mixed 63-bit seed of (seed, epoch, index, view): neighbouring tuples give unrelated streams."""
    digest = hashlib.blake2b(digest_size=8)
    for value in (seed, epoch, index, view):
        digest.update(int(value).to_bytes(16, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & _SEED_MASK


def _decode_rgb_batch(batch: dict) -> dict:
    """``with_transform`` hook: decoded images -> RGB (module level so spawned workers can pickle it)."""
    batch["image"] = [to_rgb(image) for image in batch["image"]]
    return batch


def view_key(view: int) -> str:
    """The batch key of view ``view``: ``pixel_values``, ``pixel_values_2``, ..."""
    return "pixel_values" if view == 0 else f"pixel_values_{view + 1}"


class ViewDataset(torch.utils.data.Dataset):
    """Augmented views of a standardised HF dataset, indexed by ``key = epoch * len(dataset) + i``.

    The epoch travels inside the key (see :class:`EpochSampler`), so workers, persistent or not, need no shared
    state. Each view is drawn under ``torch.manual_seed(view_seed(seed, epoch, index, view))`` inside
    ``fork_rng``, where ``index`` is the row's original position: the same (seed, epoch, index) gives bit-identical
    views whatever the batch, worker or rank, and the caller's RNG is left untouched.

    mode "two_view" returns ``pixel_values``, ``pixel_values_2`` (... up to ``num_views``), ``labels``, ``index``;
    "single" returns one ``pixel_values``. ``transform`` is one callable for all views or one per view. For the
    no-augmentation ablation pass the "eval" transform: both views are then identical.

    mode "decode" serves the decoded image only, for augmentation on the accelerator: ``transform`` is a
    deterministic :func:`build_decode_transform`, ``pixel_values`` a uint8 ``(3, S, S)`` tensor, and ``epoch`` is
    returned next to ``index`` so :class:`~.augment.BatchAugmenter` can seed each sample's views from
    ``(seed, epoch, index, view)``.
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        mode: str = "two_view",
        transform: Callable | Sequence[Callable] | None = None,
        seed: int = 0,
        num_views: int = 2,
    ):
        if mode not in VIEW_MODES:
            raise ValueError(f"Unknown view mode {mode!r}; expected one of {VIEW_MODES}.")
        if "image" not in hf_dataset.column_names or "label" not in hf_dataset.column_names:
            raise ValueError(
                "ViewDataset needs the 'image' and 'label' columns of load_image_splits; "
                f"got {hf_dataset.column_names}."
            )
        self.mode = mode
        self.num_views = 1 if mode in ("single", "decode") else int(num_views)
        if self.num_views < 1 or (mode == "two_view" and self.num_views < 2):
            raise ValueError(f"mode {mode!r} needs num_views >= 2, got {num_views}.")
        if transform is None:
            raise ValueError("ViewDataset needs a transform (see build_transform).")
        transforms = list(transform) if isinstance(transform, (list, tuple)) else [transform] * self.num_views
        if len(transforms) != self.num_views:
            raise ValueError(f"Got {len(transforms)} transforms for {self.num_views} views.")
        self.transforms = transforms
        self.seed = int(seed)
        self.has_index = "index" in hf_dataset.column_names
        columns = ["image", "label"] + (["index"] if self.has_index else [])
        self.data = hf_dataset.with_transform(_decode_rgb_batch, columns=columns)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        """Fetch the rows of a whole batch in one arrow query, then draw each sample's seeded views."""
        size = len(self.data)
        keys = [int(k) for k in keys]
        if any(k < 0 for k in keys):
            raise IndexError(f"ViewDataset keys must be >= 0, got {min(keys)}.")
        positions = [k % size for k in keys]
        batch = self.data[positions]
        indices = batch["index"] if self.has_index else positions
        if self.mode == "decode":  # deterministic: no per-sample seeding needed
            transform = self.transforms[0]
            return [
                {"pixel_values": transform(image), "labels": int(label), "index": int(index), "epoch": key // size}
                for image, label, index, key in zip(batch["image"], batch["label"], indices, keys)
            ]
        samples = []
        with torch.random.fork_rng(devices=[]):
            for j, key in enumerate(keys):
                epoch, index = key // size, int(indices[j])
                sample = {}
                for view, transform in enumerate(self.transforms):
                    torch.manual_seed(view_seed(self.seed, epoch, index, view))
                    pixels = transform(batch["image"][j])
                    sample[view_key(view)] = pixels.as_subclass(torch.Tensor) if torch.is_tensor(pixels) else pixels
                sample["labels"] = int(batch["label"][j])
                sample["index"] = index
                samples.append(sample)
        return samples


def view_dataset_for(
    splits: ImageSplits, split: str = "train", kind: str = "ssl", seed: int = 0, augment: bool = True,
    mode: str | None = None, num_views: int = 2,
) -> ViewDataset:  # fmt: skip
    """The usual ViewDataset of a split: "ssl" two views by default, other kinds one; ``augment=False`` -> "eval".

    ``mode="decode"`` serves uint8 images for :meth:`ImageSplits.batch_augmenter` instead (``kind`` is then ignored).
    """
    dataset = splits.train if split == "train" else splits.eval
    if dataset is None:
        raise ValueError(f"{splits.name!r} has no {split!r} split.")
    if mode == "decode":
        return ViewDataset(dataset, "decode", splits.decode_transform(), seed=seed)
    if mode is None:
        mode = "two_view" if kind == "ssl" else "single"
    return ViewDataset(dataset, mode, splits.transform(kind if augment else "eval"), seed=seed, num_views=num_views)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Yields ``epoch * num_samples + perm[i]``: a fresh permutation per epoch (seeded by ``seed + epoch``, identical
    on every rank) and the epoch encoded in each key for :class:`ViewDataset`."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError(f"EpochSampler needs num_samples > 0, got {num_samples}.")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and the view randomness of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
        else:
            order = range(self.num_samples)
        offset = self.epoch * self.num_samples
        return (offset + i for i in order)

    def __len__(self) -> int:
        return self.num_samples


def collate_views(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into ``pixel_values`` (B, 3, H, W) float32 (uint8 ones, from "decode" mode, stay uint8),
    optional ``pixel_values_2``..., ``labels`` and ``index`` (long), and ``epoch`` (long) when the samples have it."""
    first = batch[0]
    out = {k: torch.stack([torch.as_tensor(s[k]) for s in batch]) for k in first if k.startswith("pixel_values")}
    # drop tv_tensors.Image subclassing; keep uint8 images small until they reach the device
    out = {k: v.as_subclass(torch.Tensor) for k, v in out.items()}
    out = {k: v if v.dtype == torch.uint8 else v.float() for k, v in out.items()}
    out["labels"] = torch.tensor([int(s["labels"]) for s in batch], dtype=torch.long)
    out["index"] = torch.tensor([int(s["index"]) for s in batch], dtype=torch.long)
    if "epoch" in first:
        out["epoch"] = torch.tensor([int(s["epoch"]) for s in batch], dtype=torch.long)
    return out


def _usable_cpus() -> int:
    """CPUs this process may use (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_num_workers(num_samples: int) -> int:
    """min(8, cpus - 1), but 0 for tiny datasets (< 256 rows) or machines with <= 2 CPUs: workers would cost more."""
    cpus = _usable_cpus()
    if num_samples < 256 or cpus <= 2:
        return 0
    return min(8, cpus - 1)


def make_loader(
    view_dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader over an :class:`EpochSampler` with :func:`collate_views`; worker/pinning defaults from the machine.

    Call :func:`set_loader_epoch` before each epoch (also after ``accelerator.prepare``).
    """
    length = len(view_dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if length == 0:
        raise ValueError("Cannot build a DataLoader over an empty dataset.")
    if drop_last and batch_size > length:
        raise ValueError(
            f"Batch size {batch_size} is larger than the dataset ({length} samples) and drop_last=True: "
            "the loader would yield no batch. Use a smaller --per_device_train_batch_size (or more data)."
        )
    if num_workers is None:
        num_workers = default_num_workers(length)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return torch.utils.data.DataLoader(
        view_dataset,
        batch_size=batch_size,
        sampler=EpochSampler(length, seed=seed, shuffle=shuffle),
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=bool(persistent_workers and num_workers > 0),
        collate_fn=collate_views,
        # A private generator: iterating the loader never draws from the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )


_WRAPPER_ATTRIBUTES = ("sampler", "batch_sampler", "base_dataloader", "dataloader", "_loader")


def find_epoch_sampler(loader: Any) -> EpochSampler | None:
    """The EpochSampler inside a DataLoader, also through Accelerate's wrappers (DataLoaderShard, BatchSamplerShard,
    SkipBatchSampler, the XLA wrapper): a breadth-first walk over their sampler/loader attributes."""
    queue, seen = [loader], set()
    for _ in range(64):
        if not queue:
            break
        obj = queue.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, EpochSampler):
            return obj
        queue.extend(getattr(obj, name, None) for name in _WRAPPER_ATTRIBUTES)
    return None


def set_loader_epoch(loader: Any, epoch: int) -> EpochSampler | None:
    """Set the epoch of a loader from :func:`make_loader`, prepared by Accelerate or not.

    Accelerate's ``DataLoaderShard`` re-applies its own ``iteration`` counter on every ``__iter__`` (and bumps it only
    after a complete pass), so its ``set_epoch`` is called first to move that counter; then the EpochSampler is set
    directly, which also covers wrappers Accelerate does not reach (e.g. ``skip_first_batches`` on several ranks).
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sampler = find_epoch_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)
    elif not hasattr(loader, "set_epoch"):
        raise TypeError(f"No EpochSampler or set_epoch found in {type(loader).__name__}; build it with make_loader.")
    return sampler


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Data flags in the style of transformers' ``examples/pytorch/*_no_trainer.py`` scripts."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name", type=str, default=None,
        help="Hub dataset id or alias (cifar10, cifar100, imagenet), or 'demo' (embedded digits, no download).",
    )  # fmt: skip
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the Hub dataset.")
    group.add_argument("--train_file", type=str, default=None, help="Local parquet/arrow file with the train images.")
    group.add_argument("--validation_file", type=str, default=None, help="Local parquet/arrow file for evaluation.")
    group.add_argument("--train_dir", type=str, default=None, help="Image folder (class sub-folders) for training.")
    group.add_argument("--validation_dir", type=str, default=None, help="Image folder for evaluation.")
    group.add_argument("--image_column", type=str, default=None, help="Image column (default: img/image/pixel_values).")
    group.add_argument(
        "--label_column", type=str, default=None, help="Label column (default: label/fine_label/labels)."
    )
    group.add_argument("--train_split", type=str, default="train", help="Split used for training.")
    group.add_argument(
        "--eval_split", type=str, default=None, help="Split used for evaluation (default: test/validation/valid/val)."
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where datasets caches downloads and arrow files.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep n shuffled train samples (debugging).")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Keep n shuffled eval samples (debugging).")
    group.add_argument(
        "--image_size", type=int, default=None, help="Crop size (default: 32 for CIFAR-like data, 224 for ImageNet)."
    )
    group.add_argument(
        "--no_augmentation", action="store_true",
        help="Ablation (paper Table II): no augmentation, both views are the same un-augmented image.",
    )  # fmt: skip
    group.add_argument(
        "--dataloader_num_workers", type=int, default=None,
        help="DataLoader workers (default: chosen from the CPU count and dataset size).",
    )  # fmt: skip
    return parser


def splits_from_args(args: argparse.Namespace) -> ImageSplits:
    """:func:`load_image_splits` with the flags of :func:`add_data_args` (seed from ``args.seed``, default 0)."""
    seed = getattr(args, "seed", None)
    return load_image_splits(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        train_dir=args.train_dir,
        validation_file=args.validation_file,
        validation_dir=args.validation_dir,
        image_column=args.image_column,
        label_column=args.label_column,
        train_split=args.train_split,
        eval_split=args.eval_split,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=0 if seed is None else int(seed),
        image_size=args.image_size,
    )


__all__ = [
    "DATASET_ALIASES",
    "NORMALIZATION",
    "EpochSampler",
    "ImageSplits",
    "ViewDataset",
    "add_data_args",
    "blur_kernel_size",
    "build_decode_transform",
    "build_transform",
    "collate_views",
    "decode_size",
    "default_num_workers",
    "find_epoch_sampler",
    "load_image_splits",
    "make_loader",
    "resize_edge",
    "set_loader_epoch",
    "split_in_halves",
    "splits_from_args",
    "to_rgb",
    "view_dataset_for",
    "view_key",
    "view_seed",
]
