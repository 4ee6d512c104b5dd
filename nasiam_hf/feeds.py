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
  image gives a full batch less when its rows no longer fill it), the training feed reads one update ahead and the
  loop's per-update decision (:mod:`nasiam_hf.loop`) ends the epoch for all ranks as soon as one has no next update
  (the loop also agrees on each epoch's first update as it starts); a feed whose ends are its own (the search's
  validation half, which cycles) just starts its next epoch.

Every feed says why an epoch can hold no update (:meth:`no_update_reason`) so the loop refuses such a run before
it starts instead of turning over empty epochs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from accelerate import Accelerator


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _describe_update(accumulation: int, batch_size: int | None) -> str:
    size = f"--per_device_train_batch_size {batch_size}" if batch_size else "--per_device_train_batch_size"
    return f"{accumulation} micro-batch{'es' if accumulation > 1 else ''} of {size} per update " \
           f"(--gradient_accumulation_steps {accumulation})"


def _no_update(accumulation: int, batch_size: int | None, micro_batches: int, images: int | None,
               processes: int) -> str:
    data = f"{images} images" if images is not None else "the data"
    return (f"an epoch gives each process {micro_batches} micro-batch{'es' if micro_batches != 1 else ''} ({data} "
            f"over {processes} process{'es' if processes > 1 else ''}, --per_device_train_batch_size "
            f"{batch_size}), but one update takes {accumulation} (--gradient_accumulation_steps {accumulation}): "
            "no update could ever be made. Lower --gradient_accumulation_steps or --per_device_train_batch_size, "
            "or use more data")


class LoaderFeed:
    """Updates from a map-style loader prepared by Accelerate."""

    streamed = False

    def __init__(self, loader, accelerator: Accelerator, accumulation: int = 1, batch_size: int | None = None):
        self.loader, self.accelerator, self.accumulation = loader, accelerator, int(accumulation)
        self.batch_size = batch_size

    def updates_in_epoch(self, epoch: int) -> int:
        return len(self.loader) // self.accumulation

    def no_update_reason(self, epoch: int) -> str | None:
        """Why ``epoch`` holds no update (None when it holds one)."""
        if self.updates_in_epoch(epoch) > 0:
            return None
        return _no_update(self.accumulation, self.batch_size, len(self.loader), len(self.loader.dataset),
                          self.accelerator.num_processes)

    def describe_update(self) -> str:
        return _describe_update(self.accumulation, self.batch_size)

    def next_missing(self) -> bool:
        """Whether this process lacks the update after the last one given (never: all have the same length)."""
        return False

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
    """Updates from a :class:`~nasiam_hf.data.StreamLoader` (this rank's share of a stream). ``ends_together``: the
    training feed, whose epochs end on all ranks at once (decided by the loop); otherwise each rank's epoch ends when
    its own share does."""

    streamed = True

    def __init__(self, stream_loader, accelerator: Accelerator, accumulation: int = 1, ends_together: bool = True):
        self.stream, self.accelerator, self.accumulation = stream_loader, accelerator, int(accumulation)
        self.ends_together = ends_together
        self._missing = False
        self._position: dict | None = None  # after the last group handed out (the stream itself may be ahead)
        self._resumed_updates = 0

    def updates_in_epoch(self, epoch: int) -> int | None:
        steps = self.stream.steps_in_epoch(epoch)
        return None if steps is None else steps // self.accumulation

    def no_update_reason(self, epoch: int) -> str | None:
        """Why ``epoch`` holds no update, when its length is known (None when it holds one, or is unknown)."""
        steps = self.stream.steps_in_epoch(epoch)
        if steps is None or steps // self.accumulation > 0:
            return None
        return _no_update(self.accumulation, self.stream.batch_size, steps, self.stream.stream.num_rows,
                          self.accelerator.num_processes)

    def describe_update(self) -> str:
        return _describe_update(self.accumulation, self.stream.batch_size)

    def next_missing(self) -> bool:
        """Whether this rank lacks the update after the last one given (read ahead when ranks may run out)."""
        return self._missing

    def total_updates(self, epochs: int) -> int | None:
        counts = [self.updates_in_epoch(e) for e in range(epochs)]
        return None if any(c is None for c in counts) else sum(counts)

    def groups(self, epoch: int, start: int = 0) -> Iterator[list[dict]]:
        """The updates of ``epoch`` from the stream's own position (restored by :meth:`load_state_dict`; ``start``
        is the same position counted by the loop). Micro-batches whose images were all undecodable (skipped) carry
        no views and are passed over.

        A training feed whose ranks may run out at different times reads one update ahead: :meth:`next_missing`
        then tells the loop's decision whether this rank has the next one (whether every rank has the epoch's first
        update the loop agrees on as the epoch starts)."""
        self.stream.set_epoch(epoch)
        updates = self.updates_in_epoch(epoch)
        may_end_early = updates is None or self.stream.stream.on_bad_image == "skip"  # ranks may run out unevenly
        ahead = may_end_early and self.ends_together
        device = self.accelerator.device
        stream = iter(self.stream)
        batches = (b for b in stream if "pixel_values" in b)
        self._missing, self._position = False, None

        def read(update: int) -> list[dict] | None:
            if updates is not None and update >= updates:
                return None
            group = list(itertools.islice(batches, self.accumulation))
            if len(group) == self.accumulation:
                return group
            if not may_end_early:  # pragma: no cover - a known length without skipped images promised these batches
                raise RuntimeError(f"the stream ended {update} updates into epoch {epoch}, before {updates}")
            return None

        try:
            group = read(start)  # whether every rank has it is agreed by the loop as the epoch starts
            for update in itertools.count(start):
                if group is None:
                    return
                self._position = {**self.stream.state_dict(), "updates": update + 1}
                following = read(update + 1) if ahead else None
                self._missing = ahead and following is None
                yield [_move(b, device) for b in group]
                group = following if ahead else read(update + 1)
        finally:
            stream.close()  # stops the loader's workers now

    def state_dict(self) -> list[dict]:
        """Every rank's stream position after the last update handed out (gathered: each rank's is different),
        for the checkpoint."""
        from accelerate.utils import gather_object

        mine = self._position if self._position is not None else self.stream.state_dict()
        return gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]

    def position(self) -> tuple[int, int]:
        """(epoch, updates of it already given) of this rank's stream: its restored position after a resume."""
        return self.stream.epoch, self._resumed_updates if self.stream.state.batches else 0

    def load_state_dict(self, states: list[dict] | None) -> None:
        if not states:
            return
        rank = self.accelerator.process_index
        if len(states) != self.accelerator.num_processes:
            raise ValueError(f"the checkpoint's stream positions are for {len(states)} processes, this run has "
                             f"{self.accelerator.num_processes}: resume with the same number of processes")
        for note in self.stream.load_state_dict(states[rank]):
            self.accelerator.print(note)
        self._resumed_updates = int(states[rank].get("updates", 0))


def cycle_batches(feed, state: dict, prefix: str) -> Iterator[dict | None]:
    """Micro-batches of ``feed`` one by one, epoch after epoch, forever (the search's validation half). The position
    is ``state[prefix + "_epoch"]`` and ``state[prefix + "_step"]`` (in micro-batches of a feed without
    accumulation), in the trainer state, so a resumed run continues exactly; a stream's epochs end on each rank when
    its own share does, so there each rank starts from its own restored position. Yields None from the moment this
    rank's data gives no batch in a whole epoch: the caller stops every rank through the update decision instead of
    failing alone."""
    epoch_key, step_key = f"{prefix}_epoch", f"{prefix}_step"
    if feed.streamed:
        state[epoch_key], state[step_key] = feed.position()
    while True:
        before = state[step_key]
        for group in feed.groups(state[epoch_key], state[step_key]):
            state[step_key] += 1
            yield group[0]
        if state[step_key] == before == 0:
            while True:
                yield None
        state[epoch_key] += 1
        state[step_key] = 0


def first_batches(feed, count: int) -> list[dict]:
    """The first ``count`` micro-batches of ``feed``'s epoch 0 that every rank has (one all-reduce on several
    processes: a stream's ranks may hold fewer)."""
    batches = [group[0] for group in itertools.islice(feed.groups(0), count)]
    accelerator = feed.accelerator
    if accelerator.num_processes > 1:
        have = torch.tensor([float(len(batches))], device=accelerator.device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        batches = batches[:int(have.item())]
    return batches


def view_feed(accelerator: Accelerator, splits, source, *, batch_size: int, seed: int, on_device: bool,
              augment: bool = True, workers: int | None = None, accumulation: int = 1, kind: str = "ssl",
              ends_together: bool = True):
    """The two-view training feed of ``source`` (a map-style dataset of ``splits``, or an
    :class:`~nasiam_hf.data.ImageStream`) and, with ``on_device``, the batch augmenter that draws its views on the
    device (the loader then only decodes); returns ``(feed, make_views or None)``. Views are seeded by ``seed``.
    ``ends_together``: a stream's epochs end on every rank at once (the training feed; see :class:`StreamFeed`)."""
    from .data import ImageStream, ViewDataset, default_num_workers, make_loader

    kind = kind if augment else "eval"
    mode, transform = ("decode", splits.decode_transform()) if on_device else ("two_view", splits.transform(kind))
    make_views = splits.batch_augmenter(kind, seed) if on_device else None
    if isinstance(source, ImageStream):
        rows = source.num_rows
        workers = workers if workers is not None else default_num_workers(rows if rows is not None else 1 << 20)
        loader = source.loader(batch_size, mode, transform, seed=seed, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, num_workers=workers)
        return StreamFeed(loader, accelerator, accumulation, ends_together), make_views
    views = ViewDataset(source, mode, transform, seed=seed, on_bad_image=splits.on_bad_image,
                        source=splits.train_source)
    loader = accelerator.prepare(make_loader(views, batch_size, shuffle=True, seed=seed, drop_last=True,
                                             num_workers=workers))
    return LoaderFeed(loader, accelerator, accumulation, batch_size), make_views


def num_samples(source) -> int | None:
    """Rows of a dataset or a stream (None: a stream of unknown length)."""
    from .data import ImageStream

    return source.num_rows if isinstance(source, ImageStream) else len(source)


__all__ = ["LoaderFeed", "StreamFeed", "cycle_batches", "first_batches", "num_samples", "view_feed"]
