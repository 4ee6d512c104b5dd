"""Streamed training data with exact resume: :class:`ImageStream` (what is read), :class:`StreamLoader` (one rank's
batches, epoch by epoch, with a resumable position) and :func:`open_stream` (a Hub id, local shards or an image
folder as a stream). The order itself is :mod:`.lanes`: derived from (seed, epoch) alone.

A stream's samples carry ``index``, the 63-bit hash of their stable key (:func:`~.shards.key_index`), which seeds
their views exactly as a map-style ``index`` does; so a resumed run replays bit-identical batches. The search's
halves and a ``max_train_samples`` subset are chosen by seeded hashes of the keys: the same every epoch and on
every rank, decided from metadata (parquet footers, folder listings, tar headers) without reading an image.

A :class:`StreamLoader` is not for ``accelerator.prepare``: it shards across ranks itself (Accelerate would shard
it again, or dispatch from rank 0); move its batches to the device in the loop. Save :meth:`StreamLoader.state_dict`
of every rank with the checkpoint (ranks differ) and give it back with :meth:`StreamLoader.load_state_dict`.
Ranks may get different numbers of batches: run :meth:`StreamLoader.steps_in_epoch` steps (the minimum over the
ranks) when the length is known (``ImageStream.num_rows`` not None); when unknown (uncounted webdataset shards) the
run needs ``max_train_steps`` and must stop every rank as soon as one runs out (all-reduce a "done" flag each step).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .folders import scan_image_folder, split_folders
from .images import BadImageError, check_on_bad_image, decode_or_skip
from .lanes import EpochPlan, generate_samples, plan_epoch, resume_rotation
from .shards import StreamSource, count_units, folder_source, key_indices, mix64, parquet_source, webdataset_source
from .sources import hub_error, hub_split_files, resolve_data_files
from .views import collate_views, resolve_transforms

DEFAULT_MIX_UNITS = 8
_HALF_SALT, _SUBSET_SALT, _SAMPLE_SALT = 13, 14, 15


class EpochSamples(torch.utils.data.IterableDataset):
    """One epoch of a rank's samples: each DataLoader worker runs its share of the lane groups
    (:func:`~.lanes.generate_samples`), through a shuffle buffer of ``buffer_size`` samples when one is set (seeded by
    ``buffer_seed`` and the worker)."""

    def __init__(self, groups: list[tuple[int, ...]], plan: EpochPlan, seed: int, buffer_size: int | None,
                 buffer_seed: tuple[int, ...]):
        self.groups, self.plan, self.seed = groups, plan, seed
        self.buffer_size, self.buffer_seed = buffer_size, buffer_seed

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        samples = generate_samples(self.groups[index::count], self.plan, self.seed)
        if not self.buffer_size:
            return samples
        return _buffer_shuffled(samples, self.buffer_size, np.random.default_rng([*self.buffer_seed, index]))


def _buffer_shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Each sample goes into a buffer of ``size`` at a random slot, and the one it replaces comes out."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


class ImageStream:
    """Training data read as a stream; ``keep`` (per unit: kept row positions, or None for all) narrows it to a
    half or a subset. ``num_rows`` is None while unknown."""

    def __init__(self, source: StreamSource, keep: Sequence[np.ndarray | None] | None = None,
                 on_bad_image: str = "error", shuffle_buffer_size: int | None = None,
                 mix_units: int = DEFAULT_MIX_UNITS, notes: Sequence[str] = ()):
        if not source.units:
            raise ValueError(f"The {source.where} is empty (0 rows).")
        self.source = source
        self.keep = tuple(keep) if keep is not None else (None,) * len(source.units)
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.shuffle_buffer_size = shuffle_buffer_size
        self.mix_units = int(mix_units)
        self.notes = tuple(notes)
        self._indices: list[np.ndarray] | None = None

    @property
    def where(self) -> str:
        return self.source.where

    @property
    def labelled(self) -> bool:
        return self.source.labelled

    def class_names(self) -> list[str]:
        return list(self.source.class_names or [])

    @property
    def num_rows(self) -> int | None:
        counts = [len(k) if k is not None else u.num_rows for k, u in zip(self.keep, self.source.units)]
        return None if any(c is None for c in counts) else int(sum(counts))

    def _derived(self, source: StreamSource, keep: Sequence[np.ndarray], note: str) -> ImageStream:
        stream = ImageStream(source, keep, self.on_bad_image, self.shuffle_buffer_size, self.mix_units,
                             self.notes + (note,))
        stream._indices = self._indices
        return stream

    def _scores(self, salt: int, seed: int) -> tuple[StreamSource, list[np.ndarray], list[np.ndarray]]:
        """Kept positions and their seeded key-hash scores, unit by unit (webdataset shards get counted first)."""
        source = count_units(self.source)
        if self._indices is None or source is not self.source:
            self._indices = [key_indices(source.unit_keys(unit)) for unit in source.units]
        positions = [k if k is not None else np.arange(len(ix)) for k, ix in zip(self.keep, self._indices)]
        scores = [mix64(seed * 1_000_003 + salt, ix[p]) for ix, p in zip(self._indices, positions)]
        return source, positions, scores

    def halves(self, portion: float = 0.5, seed: int = 0) -> tuple[ImageStream, ImageStream]:
        """The search's two disjoint halves: a sample is in the first when the seeded hash of its key falls below
        ``portion`` (the same split every epoch, on every rank)."""
        if not 0 < portion < 1:
            raise ValueError(f"--train_portion must be in (0, 1), got {portion}.")
        source, positions, scores = self._scores(_HALF_SALT, seed)
        cut = np.uint64(min(int(portion * 2.0 ** 64), 2 ** 64 - 1))
        low = [p[s < cut] for p, s in zip(positions, scores)]
        high = [p[s >= cut] for p, s in zip(positions, scores)]
        sizes = (sum(map(len, low)), sum(map(len, high)))
        if 0 in sizes:
            raise ValueError(f"Cannot split the {self.where} with --train_portion {portion}: one half would be "
                             f"empty ({sizes[0]} / {sizes[1]} samples).")
        note = f"stream halves by seeded key hash: {sizes[0]} / {sizes[1]} samples (--train_portion {portion})"
        return self._derived(source, low, note), self._derived(source, high, note)

    def subset(self, count: int, seed: int = 0) -> ImageStream:
        """The ``count`` samples with the smallest seeded key hashes: a fixed subset, the same every epoch."""
        if count <= 0:
            raise ValueError(f"The {self.where} is empty after --max_train_samples ({count}).")
        source, positions, scores = self._scores(_SUBSET_SALT, seed)
        total = sum(map(len, positions))
        if count >= total:
            return self
        flat = np.concatenate(scores)
        chosen = np.zeros(len(flat), dtype=bool)
        chosen[np.argsort(flat, kind="stable")[:count]] = True
        edges = np.cumsum([0] + [len(p) for p in positions])
        keep = [p[chosen[a:b]] for p, a, b in zip(positions, edges[:-1], edges[1:])]
        return self._derived(source, keep, f"stream subset: {count} of {total} samples by seeded key hash "
                                           "(--max_train_samples; the same every epoch)")

    def sample_image_sides(self, seed: int, count: int = 64) -> tuple[list[int], int]:
        """Longest sides of about ``count`` images of up to 4 seeded units (a bad one raises, or is counted)."""
        rng = np.random.default_rng([seed, _SAMPLE_SALT])
        picked = rng.permutation(len(self.source.units))[:4].tolist()
        per_unit = max(1, count // len(picked))
        sides, bad = [], 0
        for unit_id in picked:
            unit, kept = self.source.units[unit_id], self.keep[unit_id]
            if self.source.kind == "webdataset":
                budget, shard = iter(range(per_unit)), self.source.names[unit.file]
                rows = [(members, f"{self.where}: webdataset shard {shard!r}, sample {key!r}") for key, members
                        in self.source.tar_samples(unit, lambda key: next(budget, None) is not None)]
                rows = [(members.get(self.source.image_column) if self.source.image_column in members else
                         BadImageError(f"{where}: no {self.source.image_column!r} member (keys found: "
                                       f"{sorted(members)})"), where) for members, where in rows]
            else:
                size = len(kept) if kept is not None else unit.num_rows
                chosen = rng.permutation(size)[:per_unit]
                positions = np.sort(kept[chosen] if kept is not None else chosen).tolist()
                keys = self.source.unit_keys(unit)
                rows = [(encoded, f"{self.where}, sample {keys[p]!r}")
                        for (encoded, _), p in zip(self.source.read_rows(unit, positions), positions)]
            for encoded, where in rows:
                image = decode_or_skip(encoded, where, self.on_bad_image)
                if image is None:
                    bad += 1
                else:
                    sides.append(max(image.size))
        return sides, bad

    def loader(self, batch_size: int, mode: str = "two_view", transform: Callable | Sequence[Callable] | None = None,
               seed: int = 0, num_views: int = 2, rank: int = 0, world_size: int = 1, num_workers: int = 0,
               pin_memory: bool | None = None, lanes: int | None = None) -> StreamLoader:
        """This rank's :class:`StreamLoader`. ``num_workers`` DataLoader workers run one lane each; with 0 the
        ``lanes`` (default 1) run interleaved in this process, in the same order. ``seed`` seeds order and views."""
        return StreamLoader(self, batch_size, mode, transform, seed, num_views, rank, world_size, num_workers,
                            pin_memory, lanes)


@dataclass
class StreamState:
    """Where a rank's stream is: the epoch, the batches consumed in it, the lane count, and per lane the batches
    and rows consumed (rows include bad images skipped)."""

    epoch: int
    lanes: int
    batches: int = 0
    lane_batches: list[int] = field(default_factory=list)
    lane_rows: list[int] = field(default_factory=list)
    finished: bool = False

    @classmethod
    def start(cls, epoch: int, lanes: int) -> StreamState:
        return cls(int(epoch), int(lanes), 0, [0] * lanes, [0] * lanes)

    def advance(self, lanes: torch.Tensor, rows: torch.Tensor) -> None:
        ids = lanes.unique().tolist()
        self.lane_batches[int(lanes[0])] += 1  # one lane per batch (without a shuffle buffer)
        for lane in ids:
            self.lane_rows[lane] = max(self.lane_rows[lane], int(rows[lanes == lane].max()))
        self.batches += 1


class StreamLoader:
    """One rank's batches of an :class:`ImageStream`, epoch by epoch (:meth:`set_epoch`), resumable
    (:meth:`state_dict` / :meth:`load_state_dict`). Batches are :func:`~.views.collate_views` dicts (``index``,
    views, ``labels`` when labelled, ``epoch`` in "decode" mode, ``bad_images`` with ``on_bad_image="skip"``)."""

    def __init__(self, stream: ImageStream, batch_size: int, mode: str, transform, seed: int, num_views: int,
                 rank: int, world_size: int, num_workers: int, pin_memory: bool | None, lanes: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        if num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {num_workers}.")
        if lanes is not None and (lanes < 1 or (num_workers > 0 and lanes != num_workers)):
            raise ValueError(f"lanes must be >= 1 and, with workers, equal to the {num_workers} workers; got {lanes}.")
        self.stream, self.batch_size, self.mode, self.seed = stream, int(batch_size), mode, int(seed)
        self.transforms = tuple(resolve_transforms(mode, transform, num_views))
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.lanes = int(num_workers), int(lanes or max(1, num_workers))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.state = StreamState.start(0, self.lanes)

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def plan(self, epoch: int, rank: int | None = None, skips: Sequence[int] | None = None) -> EpochPlan:
        """The :class:`~.lanes.EpochPlan` of ``epoch`` for ``rank`` (default: this rank)."""
        return plan_epoch(self.stream.source, self.stream.keep, epoch, self.seed,
                          self.rank if rank is None else rank, self.world_size, self.lanes, self.batch_size,
                          self.stream.mix_units, self.mode, self.transforms, self.stream.on_bad_image, skips)

    def batches_per_epoch(self, rank: int, epoch: int | None = None) -> int | None:
        """Batches ``rank`` gets in ``epoch`` (default: the current one); None when the length is unknown. With
        bad images skipped this is an upper bound."""
        lanes = self.plan(self.epoch if epoch is None else epoch, rank).lane_batches()
        return None if lanes is None else sum(lanes)

    def steps_in_epoch(self, epoch: int | None = None) -> int | None:
        """The steps every rank can take in ``epoch``: the minimum of :meth:`batches_per_epoch` over the ranks."""
        counts = [self.batches_per_epoch(r, epoch) for r in range(self.world_size)]
        return None if any(c is None for c in counts) else min(counts)

    def total_steps(self, num_epochs: int, start_epoch: int = 0) -> int | None:
        """Steps of ``num_epochs`` epochs from ``start_epoch`` (per-epoch counts can differ a little: each epoch
        deals the units to the ranks anew); None when the length is unknown."""
        steps = [self.steps_in_epoch(e) for e in range(start_epoch, start_epoch + num_epochs)]
        return None if any(s is None for s in steps) else sum(steps)

    def __len__(self) -> int:
        steps = self.steps_in_epoch()
        if steps is None:
            raise TypeError(f"The length of the {self.stream.where} stream is unknown (webdataset shards are not "
                            "counted): pass --max_train_steps.")
        return steps

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; a resume position loaded for this same epoch is kept."""
        if int(epoch) != self.state.epoch or self.state.finished:
            self.state = StreamState.start(epoch, self.lanes)

    def state_dict(self) -> dict:
        """This rank's position (plain ints and lists: JSON-able), with what a resume must match."""
        return {**asdict(self.state), "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle_buffer_size": self.stream.shuffle_buffer_size}

    def load_state_dict(self, state: dict) -> list[str]:
        """Resume from a :meth:`state_dict` (one saved after an epoch's last batch resumes at the next epoch);
        returns the lines to print (the saved lane count kept, an inexact resume with a shuffle buffer)."""
        for key, mine in (("world_size", self.world_size), ("batch_size", self.batch_size), ("seed", self.seed)):
            if state.get(key) != mine:
                flag = {"world_size": "number of processes", "batch_size": "--per_device_train_batch_size",
                        "seed": "--seed"}[key]
                raise ValueError(f"Cannot resume the stream: the checkpoint was made with {flag} {state.get(key)}, "
                                 f"this run has {mine}; resume with the same value.")
        notes = []
        lanes = int(state["lanes"])
        if lanes != self.lanes:
            asked = self.num_workers
            self.lanes = lanes
            self.num_workers = lanes if asked > 0 else 0
            notes.append(f"stream resume keeps the saved {lanes} lanes: "
                         + (f"{lanes} DataLoader workers (asked {asked})" if asked > 0 else "interleaved in-process"))
        if state.get("shuffle_buffer_size") or self.stream.shuffle_buffer_size:
            notes.append("stream resume with --shuffle_buffer_size: the samples that were in the shuffle buffer are "
                         "not replayed, and the order after the resume point differs from an uninterrupted run")
        if state.get("finished"):  # saved after the epoch's last batch: resume at the start of the next one
            self.state = StreamState.start(int(state["epoch"]) + 1, lanes)
        else:
            self.state = StreamState(int(state["epoch"]), lanes, int(state["batches"]), list(state["lane_batches"]),
                                     list(state["lane_rows"]))
        return notes

    def dataset(self) -> EpochSamples:
        """The current epoch from the current position as a torch ``IterableDataset`` of samples (one lane group per
        DataLoader worker)."""
        state = self.state
        plan = self.plan(state.epoch, skips=state.lane_rows)
        first = resume_rotation(state.lane_batches)
        order = [(first + j) % self.lanes for j in range(self.lanes)]
        groups = [(lane,) for lane in order] if self.num_workers > 0 else [tuple(order)]
        return EpochSamples(groups, plan, self.seed, self.stream.shuffle_buffer_size, (self.seed, state.epoch))

    def __iter__(self) -> Iterator[dict]:
        if self.state.finished:  # a second pass over the same epoch starts it again
            self.state = StreamState.start(self.state.epoch, self.lanes)
        state = self.state
        loader = torch.utils.data.DataLoader(self.dataset(), batch_size=self.batch_size,
                                             num_workers=self.num_workers, collate_fn=collate_views,
                                             pin_memory=self.pin_memory, drop_last=False,
                                             generator=torch.Generator().manual_seed(self.seed))
        batches = iter(loader)
        try:
            for batch in batches:
                state.advance(batch.pop("lane"), batch.pop("lane_rows"))
                yield batch
            state.finished = True
        finally:  # stop the workers now, not at garbage collection (a later fork would inherit them)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


# --------------------------------------------------------------------------------------------------------------------
# Opening a stream
# --------------------------------------------------------------------------------------------------------------------

_HF_PREFIX = re.compile(r"^hf://datasets/[^@/]+/[^@/]+(@[^/]+)?/")


def _shard_names(paths: Sequence[str], root: str | None) -> list[str]:
    """Stable shard names: the path inside the Hub repository, or relative to the dataset folder."""
    names = []
    for path in paths:
        if _HF_PREFIX.match(path):
            names.append(_HF_PREFIX.sub("", path))
        elif root:
            names.append(os.path.relpath(path, root).replace(os.sep, "/"))
        else:
            names.append(os.path.basename(path))
    return names


def _source_of_files(paths: list[str], names: list[str], fmt: str, where: str, image_column, label_column):
    if fmt == "parquet":
        return parquet_source(paths, names, where, image_column, label_column)
    if fmt == "webdataset":
        return webdataset_source(paths, names, where, image_column, label_column)
    raise ValueError(f"--streaming reads parquet and webdataset .tar shards (and image folders); the {where} is "
                     f"{fmt}: load it without --streaming.")


def open_stream(dataset_name: str | None = None, dataset_config_name: str | None = None, train_file: str | None = None,
                train_dir: str | None = None, train_split: str = "train", image_column: str | None = None,
                label_column: str | None = None, folder_labels: str = "auto", cache_dir: str | None = None,
                seed: int = 0, max_train_samples: int | None = None, on_bad_image: str = "error",
                shuffle_buffer_size: int | None = None, mix_units: int = DEFAULT_MIX_UNITS) -> ImageStream:
    """The training source as an :class:`ImageStream`: a Hub id (or local dataset folder; the split's parquet or
    tar files, resolved without downloading), local parquet / tar shards (a file, folder or glob) or an image
    folder. ``max_train_samples`` keeps a fixed seeded subset."""
    if dataset_name is not None:
        where = f"split {train_split!r} of {dataset_name!r}"
        split_files = hub_split_files(dataset_name, dataset_config_name, cache_dir)
        if split_files is None:
            raise hub_error(dataset_name, None, streaming=True)
        if train_split not in split_files:
            raise ValueError(f"Train split {train_split!r} (--train_split) not in {dataset_name!r}; "
                             f"splits: {list(split_files)}.")
        paths = split_files[train_split]
        endings = sorted({os.path.splitext(p)[1].lower() for p in paths})
        fmt = {(".parquet",): "parquet", (".tar",): "webdataset"}.get(tuple(endings), "/".join(endings) + " files")
        root = dataset_name if os.path.isdir(dataset_name) else None
        source = _source_of_files(paths, _shard_names(paths, root), fmt, where, image_column, label_column)
    elif train_file is not None:
        files = resolve_data_files(train_file, "train file")
        where = f"train file {train_file!r}"
        source = _source_of_files(files.files, [files.name(p) for p in files.files], files.format, where,
                                  image_column, label_column)
    else:
        layout = split_folders(train_dir, train_split)
        root = layout[train_split] if layout else train_dir
        source = folder_source(scan_image_folder(root, folder_labels, "train_dir"), f"train_dir {root!r}")
    rows = ImageStream(source).num_rows
    notes = list(source.notes) + [
        f"streaming the {source.where}: {len(source.units)} {source.kind} units, "
        + (f"{rows} rows" if rows is not None else "length unknown until read (webdataset shards are not counted)")
    ]
    stream = ImageStream(source, None, on_bad_image, shuffle_buffer_size, mix_units, notes)
    return stream.subset(max_train_samples, seed) if max_train_samples is not None else stream


__all__ = ["DEFAULT_MIX_UNITS", "EpochSamples", "ImageStream", "StreamLoader", "StreamState", "open_stream"]
