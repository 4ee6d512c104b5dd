"""From "a dataset name or a folder" to standardised train/eval splits: :func:`load_image_splits`,
:class:`ImageSplits`, the kNN monitor's sets (:class:`KnnSets`) and the search's two halves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .images import decode_or_skip
from .transforms import build_decode_transform, build_transform
from .views import ViewDataset

if TYPE_CHECKING:
    import datasets

    from .augment import BatchAugmenter
    from .streaming import ImageStream

SAMPLED_IMAGES = 64  # images decoded at load time: the image size choice and an early look for bad files
KNN_QUERY_FRACTION = 0.1  # a lone labelled set is split 90/10 into kNN memory and queries ...
KNN_MAX_QUERIES = 10_000  # ... with at most this many queries


@dataclass(frozen=True)
class KnnSets:
    """What the kNN monitor runs on: labelled ``memory`` and ``queries`` (both None when it is off), where they come
    from, and the line to print, saying which data it uses, or why it is off."""

    memory: datasets.Dataset | None
    queries: datasets.Dataset | None
    note: str
    memory_source: str = ""
    query_source: str = ""

    @property
    def enabled(self) -> bool:
        return self.memory is not None

    def view_datasets(self, splits: ImageSplits) -> tuple[ViewDataset, ViewDataset]:
        """Un-augmented single-view datasets of the memory and the queries (the "eval" transform of ``splits``)."""
        if not self.enabled:
            raise ValueError(self.note)
        common = dict(transform=splits.transform("eval"), on_bad_image=splits.on_bad_image)
        return (ViewDataset(self.memory, "single", source=self.memory_source, **common),
                ViewDataset(self.queries, "single", source=self.query_source, **common))


@dataclass
class ImageSplits:
    """Standardised train/eval data and what the models need to know.

    Datasets have the columns ``image``, ``index`` (the row's original position: the key of per-sample seeding) and,
    when labelled, ``label``. With ``streaming`` the training data is ``stream`` (an
    :class:`~nasiam_hf.data.streaming.ImageStream`) and ``train`` is None; eval data is always map-style.
    ``notes`` are the lines the commands print once (labels decided, files skipped, image size chosen).
    """

    train: datasets.Dataset | None
    eval: datasets.Dataset | None
    num_labels: int
    id2label: dict[int, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    policy: str
    name: str
    train_labelled: bool = True
    eval_labelled: bool = True
    stream: ImageStream | None = None
    train_source: str = "train data"
    eval_source: str | None = None
    on_bad_image: str = "error"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label2id(self) -> dict[str, int]:
        """Inverse of ``id2label``, the form model configs want."""
        return {name: i for i, name in self.id2label.items()}

    @property
    def streaming(self) -> bool:
        return self.stream is not None

    def transform(self, kind: str) -> Callable:
        """The :func:`build_transform` pipeline of this dataset's policy, size and statistics."""
        return build_transform(kind, self.policy, self.image_size, self.mean, self.std)

    def decode_transform(self) -> Callable:
        """The :func:`build_decode_transform` of this dataset (uint8 images for on-device augmentation)."""
        return build_decode_transform(self.policy, self.image_size)

    def batch_augmenter(self, kind: str, seed: int = 0, num_views: int = 2) -> BatchAugmenter:
        """The on-device :class:`~nasiam_hf.data.augment.BatchAugmenter` of this dataset's policy, size and statistics
        (``num_views`` views; with ``kind="eval"``, the no-augmentation ablation, they are all the same)."""
        from .augment import BatchAugmenter

        return BatchAugmenter(kind, self.policy, self.image_size, self.mean, self.std, seed=seed, num_views=num_views)

    def knn_sets(self, seed: int = 0, query_fraction: float = KNN_QUERY_FRACTION,
                 max_queries: int = KNN_MAX_QUERIES) -> KnnSets:
        """The kNN monitor's data: labelled training images as memory and the labelled eval set as queries; with
        only one labelled set (map-style), a seeded split of it into memory and ``query_fraction`` of queries (at
        most ``max_queries``); with none, off."""
        train = self.train if self.train is not None and self.train_labelled else None
        evaluation = self.eval if self.eval is not None and self.eval_labelled else None
        if train is not None and evaluation is not None:
            return KnnSets(train, evaluation, f"kNN monitor: memory {len(train)} labelled images of the "
                                              f"{self.train_source}, queries {len(evaluation)} of the "
                                              f"{self.eval_source}", self.train_source, self.eval_source)
        lone, source = (evaluation, self.eval_source) if evaluation is not None else (train, self.train_source)
        if lone is None:
            why = ("the streamed training data is not used as kNN memory" if self.streaming and self.train_labelled
                   else "the training data has no labels")
            return KnnSets(None, None, f"kNN monitor off: no labelled data ({why}, and no labelled eval data; pass "
                                       "--validation_file or --validation_dir with labels)")
        if len(lone) < 2:
            return KnnSets(None, None, f"kNN monitor off: the {source} is the only labelled set and has "
                                       f"{len(lone)} image, too few to split into memory and queries")
        queries = min(max(1, math.ceil(len(lone) * query_fraction)), max_queries, len(lone) - 1)
        shuffled = lone.shuffle(seed=seed)
        memory, held_out = shuffled.select(range(queries, len(lone))), shuffled.select(range(queries))
        return KnnSets(memory, held_out, f"kNN monitor: the {source} is the only labelled set: split with seed "
                                         f"{seed} into memory {len(memory)} and queries {len(held_out)} images",
                       source, source)


def sample_image_sides(dataset: datasets.Dataset, where: str, seed: int, on_bad_image: str,
                       count: int = SAMPLED_IMAGES) -> tuple[list[int], int]:
    """Longest sides of ``count`` seeded random images (decoded: a bad one raises, or is counted when skipped)."""
    import datasets

    rows = np.random.default_rng(seed).permutation(len(dataset))[:count].tolist()
    sample = dataset.select(rows).cast_column("image", datasets.Image(decode=False))
    sides, bad = [], 0
    for value, index in zip(sample["image"], sample["index"]):
        image = decode_or_skip(value, f"{where}, row {index}", on_bad_image)
        if image is None:
            bad += 1
        else:
            sides.append(max(image.size))
    return sides, bad


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


def view_dataset_for(
    splits: ImageSplits, split: str = "train", kind: str = "ssl", seed: int = 0, augment: bool = True,
    mode: str | None = None, num_views: int = 2, dataset: datasets.Dataset | None = None,
) -> ViewDataset:  # fmt: skip
    """The usual ViewDataset of a split: "ssl" two views by default, other kinds one; ``augment=False`` -> "eval".

    ``mode="decode"`` serves uint8 images for :meth:`ImageSplits.batch_augmenter` instead (``kind`` is then ignored).
    ``dataset`` overrides the split's data (e.g. the kNN sets of :meth:`ImageSplits.knn_sets`, ``split`` then names
    where they come from: "train" or "eval").
    """
    data = dataset if dataset is not None else splits.train if split == "train" else splits.eval
    if data is None:
        streamed = splits.streaming and split == "train"
        raise ValueError(f"{splits.name!r} has no {split!r} split" + (" (streamed: use splits.stream)." if streamed
                                                                      else "."))
    source = splits.train_source if split == "train" else (splits.eval_source or "eval data")
    common = dict(seed=seed, on_bad_image=splits.on_bad_image, source=source)
    if mode == "decode":
        return ViewDataset(data, "decode", splits.decode_transform(), **common)
    if mode is None:
        mode = "two_view" if kind == "ssl" else "single"
    return ViewDataset(data, mode, splits.transform(kind if augment else "eval"), num_views=num_views, **common)


__all__ = [
    "KNN_MAX_QUERIES",
    "KNN_QUERY_FRACTION",
    "SAMPLED_IMAGES",
    "ImageSplits",
    "KnnSets",
    "sample_image_sides",
    "split_in_halves",
    "view_dataset_for",
]
