"""One epoch of a stream on one rank: the unit order, the lanes, the rows each lane yields, and where a resumed
lane starts. Pure functions of (seed, epoch, rank, world size, lanes) and the source: nothing here keeps state.

Epoch ``e`` of rank ``r`` of ``W``, with ``L`` lanes and batch size ``B``:

1. files are permuted by ``(seed, e)``, then the units within each file; the unit list is dealt round-robin to the
   ranks (rank ``r`` takes units ``r, r + W, ...``: each unit is read by exactly one rank), then to the lanes;
2. a lane reads its units in windows of ``mix_units`` units and yields the window's rows in a permutation seeded by
   ``(seed, e, window)``: rows of several row groups get mixed, with only one window in memory; an image folder's
   lane is one window (its rows are paths); a ``.tar`` shard is read in order, since it cannot be read at random;
3. a lane yields only full batches of ``B`` samples (rows after its last full batch wait for another epoch);
4. the rank's batches are lane 0's first batch, lane 1's first, ..., lane 0's second, ..., skipping lanes that ran
   out: the order a torch DataLoader gives when worker ``i`` runs lane ``i`` (it round-robins its workers and skips
   exhausted ones), and the order :func:`generate_samples` gives when one process interleaves the lanes.

A resumed lane passes over the rows it had consumed without reading their images (whole windows are not even read).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .images import BadImageError, decode_or_skip
from .shards import StreamSource, Unit, key_index
from .views import make_views
from .webdataset import sample_label

_ORDER_SALT, _WINDOW_SALT = 11, 12


def resume_rotation(lane_batches: Sequence[int]) -> int:
    """The lane whose batch comes next after the lanes produced ``lane_batches`` batches in round-robin order.

    In that order the lanes before the next one have produced one batch more than the lanes from it on (lanes that
    ran out may have fewer), so it is the lane after the last lane with the highest count (lane 0 at a round
    boundary). Worker 0 of the resumed loader plays it, worker 1 the lane after it, and so on.
    """
    if not lane_batches or max(lane_batches) == 0:
        return 0
    top = max(lane_batches)
    return (max(i for i, count in enumerate(lane_batches) if count == top) + 1) % len(lane_batches)


def lane_batches_at(lane_totals: Sequence[int], position: int) -> list[int]:
    """Batches each lane has produced after ``position`` batches of the round-robin order, given each lane's total
    number of batches (lanes that run out are skipped)."""
    done = [0] * len(lane_totals)
    remaining = int(position)
    while remaining > 0:
        active = [i for i, total in enumerate(lane_totals) if done[i] < total]
        if not active:
            raise ValueError(f"position {position} is past the end of the epoch ({sum(lane_totals)} batches).")
        for i in active[:remaining]:
            done[i] += 1
        remaining -= min(len(active), remaining)
    return done


def resume_point(lane_totals: Sequence[int], position: int, batch_size: int) -> tuple[int, list[int]]:
    """``(rotation, rows to skip per lane)`` to resume after ``position`` batches, when every row is a sample (no
    bad image skipped) and the lanes' batch totals are known."""
    done = lane_batches_at(lane_totals, position)
    return resume_rotation(done), [count * batch_size for count in done]


@dataclass(frozen=True)
class EpochPlan:
    """Everything the lanes of one rank need for one epoch (it travels to the DataLoader workers)."""

    source: StreamSource
    units: tuple[Unit, ...]
    keep: tuple[np.ndarray | None, ...]  # per unit: the kept row positions (None: all rows)
    lane_units: tuple[tuple[int, ...], ...]
    epoch: int
    seed: int
    batch_size: int
    mix_units: int
    mode: str
    transforms: tuple[Callable, ...]
    on_bad_image: str
    skips: tuple[int, ...]  # per lane: rows consumed before the resume point

    def count(self, unit: int) -> int | None:
        keep = self.keep[unit]
        return len(keep) if keep is not None else self.units[unit].num_rows

    def lane_rows(self, lane: int) -> int | None:
        counts = [self.count(u) for u in self.lane_units[lane]]
        return None if any(c is None for c in counts) else sum(counts)

    def lane_batches(self) -> list[int] | None:
        """Full batches per lane when the lengths are known (bad images skipped make them an upper bound)."""
        rows = [self.lane_rows(lane) for lane in range(len(self.lane_units))]
        return None if any(r is None for r in rows) else [r // self.batch_size for r in rows]


def slice_units(source: StreamSource, keep: Sequence[np.ndarray | None], target: int
                ) -> tuple[tuple[Unit, ...], tuple[np.ndarray | None, ...]]:
    """Cut parquet/folder units into row ranges when there are fewer than ``target`` (ranks x lanes), so that
    every lane of every rank gets data on small datasets (each slice re-reads its row group)."""
    units = list(source.units)
    if source.kind == "webdataset" or len(units) >= target or not units:
        return tuple(units), tuple(keep)
    parts = math.ceil(target / len(units))
    new_units, new_keep = [], []
    for unit, kept in zip(units, keep):
        for piece in unit.sliced(parts):
            new_units.append(piece)
            if kept is None:
                new_keep.append(None)
            else:
                low, high = piece.start - unit.start, piece.stop - unit.start
                new_keep.append(kept[(kept >= low) & (kept < high)] - low)
    return tuple(new_units), tuple(new_keep)


def unit_order(units: Sequence[Unit], seed: int, epoch: int) -> list[int]:
    """Unit ids in epoch order: the files permuted by (seed, epoch), then the units within each file."""
    rng = np.random.default_rng([seed, epoch, _ORDER_SALT])
    by_file: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        by_file.setdefault(unit.file, []).append(i)
    files = sorted(by_file)
    order = []
    for f in rng.permutation(len(files)).tolist():
        ids = by_file[files[f]]
        order += [ids[i] for i in rng.permutation(len(ids)).tolist()]
    return order


def plan_epoch(source: StreamSource, keep: Sequence[np.ndarray | None], epoch: int, seed: int, rank: int,
               world_size: int, lanes: int, batch_size: int, mix_units: int, mode: str,
               transforms: Sequence[Callable], on_bad_image: str, skips: Sequence[int] | None = None) -> EpochPlan:
    units, kept = slice_units(source, keep, world_size * lanes)
    mine = unit_order(units, seed, epoch)[rank::world_size]
    return EpochPlan(source, units, kept, tuple(tuple(mine[lane::lanes]) for lane in range(lanes)), int(epoch),
                     int(seed), int(batch_size), int(mix_units), mode, tuple(transforms), on_bad_image,
                     tuple(skips) if skips is not None else (0,) * lanes)


# --------------------------------------------------------------------------------------------------------------------
# Rows, samples, batches
# --------------------------------------------------------------------------------------------------------------------


def _window_rows(plan: EpochPlan, lane: int) -> Iterator[tuple[int, str, Callable[[], str], Any, Any]]:
    """``(rows consumed, key, where, encoded image, label)`` of a parquet/folder lane, window by window, after its
    skip (``where`` names the row for messages, lazily).

    An image folder's lane is one window: its rows are file paths, so mixing them all costs no image memory.
    """
    units, skip, done = plan.lane_units[lane], plan.skips[lane], 0
    width = max(1, len(units)) if plan.source.kind == "folder" else plan.mix_units
    for first in range(0, len(units), width):
        window = units[first:first + width]
        sizes = [plan.count(u) for u in window]
        total = sum(sizes)
        if done + total <= skip:  # consumed before the resume point: not even read
            done += total
            continue
        order = np.random.default_rng([plan.seed, plan.epoch, window[0], _WINDOW_SALT]).permutation(total)
        order = order[max(0, skip - done):]
        done = max(done, skip)
        edges = np.cumsum([0] + sizes)
        slots = np.searchsorted(edges, order, side="right") - 1
        keys: dict[int, list[str]] = {}
        rows: dict[tuple[int, int], tuple[Any, Any]] = {}
        for slot in np.unique(slots).tolist():
            unit, kept = plan.units[window[slot]], plan.keep[window[slot]]
            wanted = order[slots == slot] - edges[slot]
            positions = np.sort(kept[wanted] if kept is not None else wanted).tolist()
            keys[slot] = plan.source.unit_keys(unit)
            rows.update(((slot, p), row) for p, row in zip(positions, plan.source.read_rows(unit, positions)))
        for slot, entry in zip(slots.tolist(), order.tolist()):
            unit, kept = plan.units[window[slot]], plan.keep[window[slot]]
            position = int(entry - edges[slot])
            position = int(kept[position]) if kept is not None else position
            done += 1
            encoded, label = rows.pop((slot, position))
            yield done, keys[slot][position], functools.partial(plan.source.describe, unit, position), encoded, label


def _tar_rows(plan: EpochPlan, lane: int) -> Iterator[tuple[int, str, str, Any, Any]]:
    """``(rows consumed, key, where, encoded image, label)`` of a webdataset lane, shard by shard, after its skip."""
    source, skip = plan.source, plan.skips[lane]
    done = 0
    for unit_id in plan.lane_units[lane]:
        unit, kept = plan.units[unit_id], plan.keep[unit_id]
        kept_set = set(kept.tolist()) if kept is not None else None
        ordinal = -1

        def want(key: str) -> bool:
            nonlocal ordinal, done
            ordinal += 1
            if kept_set is not None and ordinal not in kept_set:
                return False
            done += 1
            return done > skip

        shard = source.names[unit.file]
        for key, members in source.tar_samples(unit, want):
            where = f"{source.where}: webdataset shard {shard!r}, sample {key!r}"
            image = members.get(source.image_column)
            if image is None:
                image = BadImageError(f"{where}: no {source.image_column!r} member (keys found: {sorted(members)})")
            label = sample_label(members, source.label_column, shard, key) if source.label_column else None
            yield done, f"{shard}/{key}", where, image, label


def _lane_batches(plan: EpochPlan, lane: int, seed: int) -> Iterator[list[dict]]:
    """Full batches of ready samples (decoded, views drawn) of one lane."""
    source = plan.source
    rows = _tar_rows if source.kind == "webdataset" else _window_rows
    skip_bad, decode = plan.on_bad_image == "skip", plan.mode == "decode"
    batch, bad = [], 0
    for done, key, where, encoded, label in rows(plan, lane):
        image = decode_or_skip(encoded, where, plan.on_bad_image)
        if image is None:
            bad += 1
            continue
        index = key_index(key)
        with torch.random.fork_rng(devices=[]):
            sample = make_views(image, plan.transforms, seed, plan.epoch, index, decode)
        sample.update(index=index, lane=lane, lane_rows=done)
        if source.labelled:
            sample["labels"] = -1 if label is None else int(label)
        if decode:
            sample["epoch"] = plan.epoch
        if skip_bad:
            sample["bad_images"], bad = bad, 0
        batch.append(sample)
        if len(batch) == plan.batch_size:
            yield batch
            batch = []


def generate_samples(lanes: list[tuple[int, ...]], plan: EpochPlan, seed: int) -> Iterator[dict]:
    """The samples of an epoch (:class:`~.streaming.EpochSamples`): each group of lanes interleaved batch by
    batch, skipping lanes that ran out (each DataLoader worker gets one group)."""
    for group in lanes:
        active = [_lane_batches(plan, lane, seed) for lane in group]
        while active:
            for lane_iterator in list(active):
                batch = next(lane_iterator, None)
                if batch is None:
                    active.remove(lane_iterator)
                else:
                    yield from batch


__all__ = [
    "EpochPlan",
    "generate_samples",
    "lane_batches_at",
    "plan_epoch",
    "resume_point",
    "resume_rotation",
    "slice_units",
    "unit_order",
]
