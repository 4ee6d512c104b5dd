"""How the training loop gets its micro-batches, from a map-style loader or from a stream, with one interface.

A feed yields the updates of an epoch, each a list of ``accumulation`` micro-batches on the training device, from a
given update on (the resume position), says how many updates an epoch has (``None`` when the length of a stream is
unknown ahead), and saves and restores its position in a checkpoint.

* :class:`LoaderFeed`: a ``DataLoader`` of :func:`~nasiam_hf.data.make_loader` prepared by Accelerate (which shards
  it over the ranks); resuming skips the micro-batches already seen (``skip_first_batches``), and the views, seeded
  per (seed, epoch, sample, view), are the same ones.
* :class:`StreamFeed`: a :class:`~nasiam_hf.data.StreamLoader`, which shards itself over the ranks (so it never goes
  through ``accelerator.prepare``) and keeps its own resumable position per rank; the positions of all ranks are
  saved together. Ranks may hold different numbers of batches: with a known length every rank takes the minimum;
  with an unknown one, or with bad images skipped (the known length is then an upper bound: a lane holding a bad
  image gives a full batch less when its rows no longer fill it), all ranks stop as soon as one of them runs out
  (one all-reduce per update on several processes).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from accelerate import Accelerator


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class LoaderFeed:
    """Updates from a map-style loader prepared by Accelerate."""

    streamed = False

    def __init__(self, loader, accelerator: Accelerator, accumulation: int = 1):
        self.loader, self.accelerator, self.accumulation = loader, accelerator, int(accumulation)

    def updates_in_epoch(self, epoch: int) -> int:
        return len(self.loader) // self.accumulation

    def total_updates(self, epochs: int) -> int:
        return epochs * self.updates_in_epoch(0)

    def groups(self, epoch: int, start: int = 0) -> Iterator[list[dict]]:
        """The updates of ``epoch`` from update ``start`` on (left-over micro-batches are not used)."""
        from .data import set_loader_epoch

        set_loader_epoch(self.loader, epoch)
        skip = start * self.accumulation
        batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == self.accumulation:
                yield group
                group = []

    def state_dict(self) -> None:
        return None  # the position is the trainer state's (epoch, update in the epoch)

    def load_state_dict(self, state) -> None:
        return None


class StreamFeed:
    """Updates from a :class:`~nasiam_hf.data.StreamLoader` (this rank's share of a stream)."""

    streamed = True

    def __init__(self, stream_loader, accelerator: Accelerator, accumulation: int = 1):
        self.stream, self.accelerator, self.accumulation = stream_loader, accelerator, int(accumulation)

    def updates_in_epoch(self, epoch: int) -> int | None:
        steps = self.stream.steps_in_epoch(epoch)
        return None if steps is None else steps // self.accumulation

    def total_updates(self, epochs: int) -> int | None:
        counts = [self.updates_in_epoch(e) for e in range(epochs)]
        return None if any(c is None for c in counts) else sum(counts)

    def _all_have(self, have: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return have
        flag = torch.tensor([1.0 if have else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def groups(self, epoch: int, start: int = 0) -> Iterator[list[dict]]:
        """The updates of ``epoch`` from the stream's own position (restored by :meth:`load_state_dict`; ``start``
        is the same position counted by the loop). Micro-batches whose images were all undecodable (skipped) carry
        no views and are passed over."""
        self.stream.set_epoch(epoch)
        updates = self.updates_in_epoch(epoch)
        may_end_early = updates is None or self.stream.stream.on_bad_image == "skip"  # the ranks agree on the end
        device = self.accelerator.device
        stream = iter(self.stream)
        batches = (b for b in stream if "pixel_values" in b)
        try:
            for update in itertools.count(start):
                if updates is not None and update >= updates:
                    return
                group = list(itertools.islice(batches, self.accumulation))
                full = len(group) == self.accumulation
                if may_end_early and not self._all_have(full):  # a rank ran out: the epoch ends for all
                    return
                if not full:  # pragma: no cover - a known length without skipped images promised these batches
                    raise RuntimeError(f"the stream ended {update} updates into epoch {epoch}, before {updates}")
                yield [_move(b, device) for b in group]
        finally:
            stream.close()  # stops the loader's workers now

    def state_dict(self) -> list[dict]:
        """Every rank's stream position (gathered: each rank's is different), for the checkpoint."""
        from accelerate.utils import gather_object

        mine = self.stream.state_dict()
        return gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]

    def load_state_dict(self, states: list[dict] | None) -> None:
        if not states:
            return
        rank = self.accelerator.process_index
        if len(states) != self.accelerator.num_processes:
            raise ValueError(f"the checkpoint's stream positions are for {len(states)} processes, this run has "
                             f"{self.accelerator.num_processes}: resume with the same number of processes")
        for note in self.stream.load_state_dict(states[rank]):
            self.accelerator.print(note)


def cycle_batches(feed, state: dict, prefix: str) -> Iterator[dict]:
    """Micro-batches of ``feed`` one by one, epoch after epoch, forever; the position (``state[prefix + "_epoch"]``
    and ``state[prefix + "_step"]``, in micro-batches of a feed without accumulation) lives in the trainer state,
    so a resumed run continues exactly (the search's validation half)."""
    epoch_key, step_key = f"{prefix}_epoch", f"{prefix}_step"
    while True:
        before = state[step_key]
        for group in feed.groups(state[epoch_key], state[step_key]):
            state[step_key] += 1
            yield group[0]
        if state[step_key] == before == 0:
            raise ValueError(f"the {prefix} data gives no full batch in an epoch: use a smaller "
                             "--per_device_train_batch_size or more data")
        state[epoch_key] += 1
        state[step_key] = 0




def view_feed(accelerator: Accelerator, splits, source, *, batch_size: int, seed: int, on_device: bool,
              augment: bool = True, workers: int | None = None, accumulation: int = 1, kind: str = "ssl"):
    """The two-view training feed of ``source`` (a map-style dataset of ``splits``, or an
    :class:`~nasiam_hf.data.ImageStream`) and, with ``on_device``, the batch augmenter that draws its views on the
    device (the loader then only decodes); returns ``(feed, make_views or None)``. Views are seeded by ``seed``."""
    from .data import ImageStream, ViewDataset, default_num_workers, make_loader

    kind = kind if augment else "eval"
    mode, transform = ("decode", splits.decode_transform()) if on_device else ("two_view", splits.transform(kind))
    make_views = splits.batch_augmenter(kind, seed) if on_device else None
    if isinstance(source, ImageStream):
        rows = source.num_rows
        workers = workers if workers is not None else default_num_workers(rows if rows is not None else 1 << 20)
        loader = source.loader(batch_size, mode, transform, seed=seed, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, num_workers=workers)
        return StreamFeed(loader, accelerator, accumulation), make_views
    views = ViewDataset(source, mode, transform, seed=seed, on_bad_image=splits.on_bad_image,
                        source=splits.train_source)
    loader = accelerator.prepare(make_loader(views, batch_size, shuffle=True, seed=seed, drop_last=True,
                                             num_workers=workers))
    return LoaderFeed(loader, accelerator, accumulation), make_views


def num_samples(source) -> int | None:
    """Rows of a dataset or a stream (None: a stream of unknown length)."""
    from .data import ImageStream

    return source.num_rows if isinstance(source, ImageStream) else len(source)


__all__ = ["LoaderFeed", "StreamFeed", "cycle_batches", "num_samples", "view_feed"]
