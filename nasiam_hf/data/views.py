"""Per-sample seeded views, the epoch sampler, collation and the map-style DataLoader.

A sample's views depend only on ``(seed, epoch, index, view)`` (:func:`view_seed`): the same sample gives
bit-identical views whatever the batch, the worker or the rank, in map-style datasets and in streams alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .images import check_on_bad_image, decode_or_skip

if TYPE_CHECKING:  # `datasets` is imported lazily: the model code must work on machines without it
    import datasets

VIEW_MODES = ("two_view", "single", "decode")
_SEED_MASK = (1 << 63) - 1
# Batch keys that describe the loading rather than the samples; collate_views passes them on as long tensors.
BOOKKEEPING_KEYS = ("lane", "lane_rows")


def view_seed(seed: int, epoch: int, index: int, view: int) -> int:
    """Well-mixed 63-bit seed of (seed, epoch, index, view): neighbouring tuples give unrelated streams."""
    digest = hashlib.blake2b(digest_size=8)
    for value in (seed, epoch, index, view):
        digest.update(int(value).to_bytes(16, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & _SEED_MASK


def view_key(view: int) -> str:
    """The batch key of view ``view``: ``pixel_values``, ``pixel_values_2``, ..."""
    return "pixel_values" if view == 0 else f"pixel_values_{view + 1}"


def make_views(image, transforms: Sequence[Callable], seed: int, epoch: int, index: int, decode: bool
               ) -> dict[str, Any]:
    """The pixel entries of one sample: each view drawn from the CPU generator seeded with ``view_seed(...)`` (call
    inside ``torch.random.fork_rng(devices=[])``), or, with ``decode``, the one deterministic decode transform.

    Only the CPU generator is seeded (the transforms draw from it alone): ``torch.manual_seed`` would also reseed
    the accelerator's generators, outside what ``fork_rng(devices=[])`` restores, and costs a stack capture per call
    on machines where CUDA is not initialised yet.
    """
    if decode:
        return {"pixel_values": transforms[0](image)}
    sample = {}
    generator = torch.random.default_generator
    for view, transform in enumerate(transforms):
        generator.manual_seed(view_seed(seed, epoch, index, view))
        pixels = transform(image)
        sample[view_key(view)] = pixels.as_subclass(torch.Tensor) if torch.is_tensor(pixels) else pixels
    return sample


def resolve_transforms(mode: str, transform: Callable | Sequence[Callable] | None, num_views: int) -> list[Callable]:
    """One transform per view (``transform`` is one callable for all views or a sequence, one per view)."""
    if mode not in VIEW_MODES:
        raise ValueError(f"Unknown view mode {mode!r}; expected one of {VIEW_MODES}.")
    count = 1 if mode in ("single", "decode") else int(num_views)
    if count < 1 or (mode == "two_view" and count < 2):
        raise ValueError(f"mode {mode!r} needs num_views >= 2, got {num_views}.")
    if transform is None:
        raise ValueError("ViewDataset needs a transform (see build_transform).")
    transforms = list(transform) if isinstance(transform, (list, tuple)) else [transform] * count
    if len(transforms) != count:
        raise ValueError(f"Got {len(transforms)} transforms for {count} views.")
    return transforms


def _rows(batch: dict) -> dict:
    """``with_transform`` hook that keeps rows as they are (module level so spawned workers can pickle it)."""
    return batch


def _undecoded(hf_dataset):
    """The dataset with its image column left encoded, so each image is decoded (and a bad one named) here."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - stand-in tables of the throughput benchmark
        return hf_dataset
    if isinstance(hf_dataset, datasets.Dataset):
        feature = hf_dataset.features.get("image")
        if isinstance(feature, datasets.Image) and feature.decode:
            return hf_dataset.cast_column("image", datasets.Image(decode=False))
    return hf_dataset


class ViewDataset(torch.utils.data.Dataset):
    """Augmented views of a standardised HF dataset, indexed by ``key = epoch * len(dataset) + i``.

    The epoch travels inside the key (see :class:`EpochSampler`), so workers, persistent or not, need no shared
    state. Each view is drawn from the CPU generator seeded with ``view_seed(seed, epoch, index, view)`` inside
    ``fork_rng``, where ``index`` is the row's original position: the same (seed, epoch, index) gives bit-identical
    views whatever the batch, worker or rank, and the caller's RNG is left untouched.

    mode "two_view" returns ``pixel_values``, ``pixel_values_2`` (... up to ``num_views``), ``index`` and, when the
    dataset has a ``label`` column, ``labels``; "single" returns one ``pixel_values``. ``transform`` is one
    callable for all views or one per view. For the no-augmentation ablation pass the "eval" transform: both views
    are then identical.

    mode "decode" serves the decoded image only, for augmentation on the accelerator: ``transform`` is a
    deterministic :func:`build_decode_transform`, ``pixel_values`` a uint8 ``(3, S, S)`` tensor, and ``epoch`` is
    returned next to ``index`` so :class:`~nasiam_hf.data.augment.BatchAugmenter` can seed each sample's views from
    ``(seed, epoch, index, view)``.

    Bad images: ``on_bad_image="error"`` raises :class:`~nasiam_hf.data.images.BadImageError` naming ``source``
    and the row (or the image file); ``"skip"`` returns None for the sample (and ``bad_images: 0`` in the others),
    which :func:`collate_views` drops and counts.
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        mode: str = "two_view",
        transform: Callable | Sequence[Callable] | None = None,
        seed: int = 0,
        num_views: int = 2,
        on_bad_image: str = "error",
        source: str = "dataset",
    ):
        if "image" not in hf_dataset.column_names:
            raise ValueError(
                f"ViewDataset needs the 'image' column of load_image_splits; got {hf_dataset.column_names}."
            )
        self.transforms = resolve_transforms(mode, transform, num_views)
        self.mode, self.num_views = mode, len(self.transforms)
        self.seed = int(seed)
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.source = source
        self.has_index = "index" in hf_dataset.column_names
        self.has_labels = "label" in hf_dataset.column_names
        columns = ["image"] + (["label"] if self.has_labels else []) + (["index"] if self.has_index else [])
        self.data = _undecoded(hf_dataset).with_transform(_rows, columns=columns)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int) -> dict[str, Any] | None:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any] | None]:
        """Fetch the rows of a whole batch in one arrow query, then decode and draw each sample's seeded views."""
        size = len(self.data)
        keys = [int(k) for k in keys]
        if any(k < 0 for k in keys):
            raise IndexError(f"ViewDataset keys must be >= 0, got {min(keys)}.")
        positions = [k % size for k in keys]
        batch = self.data[positions]
        indices = batch["index"] if self.has_index else positions
        skip = self.on_bad_image == "skip"
        decode = self.mode == "decode"
        samples: list[dict[str, Any] | None] = []
        with torch.random.fork_rng(devices=[]):
            for j, key in enumerate(keys):
                epoch, index = key // size, int(indices[j])
                image = decode_or_skip(batch["image"][j], f"{self.source}, row {index}", self.on_bad_image)
                if image is None:
                    samples.append(None)
                    continue
                sample = make_views(image, self.transforms, self.seed, epoch, index, decode)
                if self.has_labels:
                    sample["labels"] = int(batch["label"][j])
                sample["index"] = index
                if decode:
                    sample["epoch"] = epoch
                if skip:
                    sample["bad_images"] = 0
                samples.append(sample)
        return samples


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


def collate_views(batch: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Stack samples into ``pixel_values`` (B, 3, H, W) float32 (uint8 ones, from "decode" mode, stay uint8),
    optional ``pixel_values_2``..., ``labels`` (when the samples have labels) and ``index`` (long), and ``epoch``
    (long) when the samples have it.

    Samples that are None (bad images under ``on_bad_image="skip"``) are dropped and counted: ``bad_images`` (a
    long scalar) is the number dropped plus the ``bad_images`` the samples carry (a stream counts the ones it
    skipped before each sample). A batch whose every image was bad has only ``index`` (empty) and ``bad_images``:
    skip it. The stream's bookkeeping (``lane``, ``lane_rows``) passes through as long tensors.
    """
    samples = [s for s in batch if s is not None]
    counted = any("bad_images" in s for s in samples) or len(samples) < len(batch)
    bad = len(batch) - len(samples) + sum(int(s.get("bad_images", 0)) for s in samples)
    if not samples:
        return {"index": torch.zeros(0, dtype=torch.long), "bad_images": torch.tensor(bad, dtype=torch.long)}
    first = samples[0]
    out = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in first if k.startswith("pixel_values")}
    # drop tv_tensors.Image subclassing; keep uint8 images small until they reach the device
    out = {k: v.as_subclass(torch.Tensor) for k, v in out.items()}
    out = {k: v if v.dtype == torch.uint8 else v.float() for k, v in out.items()}
    if "labels" in first:
        out["labels"] = torch.tensor([int(s["labels"]) for s in samples], dtype=torch.long)
    out["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    for key in ("epoch", *BOOKKEEPING_KEYS):
        if key in first:
            out[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.long)
    if counted:
        out["bad_images"] = torch.tensor(bad, dtype=torch.long)
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


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Set the epoch of a loader from :func:`make_loader`, prepared by Accelerate or not, or of a stream loader.

    Accelerate's loaders (``DataLoaderShard``, ``DataLoaderDispatcher``) and :class:`~.streaming.StreamLoader` have
    ``set_epoch``: Accelerate's passes the epoch to the sampler under its batch sampler, and keeps it as the counter
    it re-applies on every ``__iter__`` (``skip_first_batches`` copies that counter into the loader it makes). A plain
    DataLoader's :class:`EpochSampler` is set directly.
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif isinstance(getattr(loader, "sampler", None), EpochSampler):
        loader.sampler.set_epoch(epoch)
    else:
        raise TypeError(f"{type(loader).__name__} has no set_epoch and no EpochSampler; build it with make_loader.")


__all__ = [
    "VIEW_MODES",
    "EpochSampler",
    "ViewDataset",
    "collate_views",
    "default_num_workers",
    "make_loader",
    "make_views",
    "set_loader_epoch",
    "view_key",
    "view_seed",
]
