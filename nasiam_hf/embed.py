"""``nasiam-embed``: one vector per image of a folder, file, Hub dataset or stream, written as parquet shards.

The images are read in one fixed order (an image folder's sorted relative paths, parquet files row by row, webdataset
shards sample by sample, a dataset loaded whole row by row), so shard ``i`` always holds rows ``[i * S, (i + 1) * S)``
of it (``S`` = ``--shard_size``; rows of undecodable images are left out with ``--on_bad_image skip``). A shard is
written to a staging folder and renamed into place, so a shard under its final name is complete; a rerun of the same
command finds them and computes only the others, giving the rows of an uninterrupted run. Several processes
(``accelerate launch``) share the missing shards, each writing its own.

Each shard holds ``key`` (the image's path relative to the folder, ``<file>:<row>`` for parquet shards,
``<shard>/<key>`` for webdataset shards, the row number for a dataset loaded whole), ``embedding`` (a fixed-size
list of float32 or float16) and, when the source has labels, ``label``. ``embed_info.json`` records the settings
(a rerun with others is refused), the class names and, once done, the totals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arguments.embed import EmbedCommand, EmbedDataArguments
from .errors import OutputDirError, UsageError
from .fileio import atomic_write_json, read_json

INFO_FILE = "embed_info.json"
LOCK_FILE = ".embed.lock"
STAGING_DIR = ".embed-staging"
SHARD_PREFIX = "embeddings-"
BAD_IMAGES_KEY = b"nasiam_bad_images"


def shard_name(index: int, total: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}-of-{total:05d}.parquet"


# --------------------------------------------------------------------------------------------------------------------
# Sources: every image once, in a fixed order, read by row range
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ImageSource:
    """The images to embed: ``read(start, stop)`` gives ``(key, encoded image, label or None, where)`` of rows
    ``[start, stop)`` (the image is a :class:`~nasiam_hf.data.images.BadImageError` when a sample has none).
    ``fingerprint`` changes when the source does (a rerun on other data is refused)."""

    where: str
    num_rows: int
    class_names: list[str] | None
    labelled: bool
    fingerprint: str
    notes: tuple[str, ...] = ()

    def read(self, start: int, stop: int) -> list[tuple[str, Any, int | None, str]]:  # pragma: no cover
        raise NotImplementedError


class ShardedSource(ImageSource):
    """An image folder, parquet files or webdataset shards (local, or a Hub split's files), read unit by unit
    through :class:`~nasiam_hf.data.shards.StreamSource`, without a datasets cache."""

    def __init__(self, source, notes: Sequence[str] = ()):
        from .data.shards import count_units

        source = count_units(source)  # webdataset shards: sample counts from their headers
        self.source = source
        self.offsets = np.cumsum([0] + [unit.num_rows for unit in source.units])
        digest = hashlib.blake2b(digest_size=16)
        for name, path in zip(source.names, source.paths):
            size = os.path.getsize(path) if source.kind != "folder" and "://" not in path else -1
            digest.update(f"{name}\0{size}\0".encode())
        digest.update(repr([(u.file, u.group, u.start, u.stop) for u in source.units]).encode())
        super().__init__(source.where, int(self.offsets[-1]), source.class_names, source.labelled,
                         f"{source.kind}:{digest.hexdigest()}", tuple(notes))

    @functools.lru_cache(maxsize=4)
    def _keys(self, unit_id: int) -> list[str]:
        return self.source.unit_keys(self.source.units[unit_id])

    def read(self, start: int, stop: int) -> list[tuple[str, Any, int | None, str]]:
        from .data.images import BadImageError
        from .data.webdataset import sample_label

        rows, source = [], self.source
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for unit_id in range(first, len(source.units)):
            base = int(self.offsets[unit_id])
            if base >= stop:
                break
            unit = source.units[unit_id]
            a, b = max(start - base, 0), min(stop - base, unit.num_rows)
            keys = self._keys(unit_id)[a:b]
            if source.kind == "webdataset":
                shard, wanted = source.names[unit.file], set(keys)
                found = {}
                for key, members in source.tar_samples(unit, lambda full: full in wanted):
                    where = f"{source.where}: webdataset shard {shard!r}, sample {key!r}"
                    encoded = members.get(source.image_column)
                    if encoded is None:
                        encoded = BadImageError(f"{where}: no {source.image_column!r} member (found {sorted(members)})")
                    label = sample_label(members, source.label_column, shard, key) if source.label_column else None
                    found[f"{shard}/{key}"] = (encoded, label, where)
                rows += [(key, *found[key]) for key in keys]
            else:
                for position, key, (encoded, label) in zip(range(a, b), keys, source.read_rows(unit,
                                                                                             list(range(a, b)))):
                    rows.append((key, encoded, label, source.describe(unit, position)))
        return rows


class TableSource(ImageSource):
    """A dataset loaded whole by the data layer (a Hub split, arrow or JSON-lines files, the demo); its rows in
    order, keyed by their row number."""

    def __init__(self, splits):
        import datasets

        self.dataset = splits.train.cast_column("image", datasets.Image(decode=False))
        self.label_column = "label" if splits.train_labelled else None
        names = [splits.id2label[i] for i in range(splits.num_labels)] if self.label_column else None
        super().__init__(splits.train_source, len(self.dataset), names, self.label_column is not None,
                         f"table:{self.dataset._fingerprint}", tuple(splits.notes[:-1]))  # the last is the size

    def read(self, start: int, stop: int) -> list[tuple[str, Any, int | None, str]]:
        batch = self.dataset[start:stop]
        labels = batch[self.label_column] if self.label_column else [None] * len(batch["index"])
        return [(str(index), image, label, f"{self.where}, row {index}")
                for index, image, label in zip(batch["index"], batch["image"], labels)]


def open_images(data: EmbedDataArguments) -> ImageSource:
    """The source of the data flags: folders, parquet and webdataset files (and a Hub split with ``--streaming``)
    shard by shard; other files, the demo and Hub splits through :func:`~nasiam_hf.data.load_image_splits`."""
    from .data import load_image_splits, open_stream, resolve_data_files, scan_image_folder
    from .data.shards import folder_source
    from .data.sources import hub_id

    if data.train_dir is not None:
        listing = scan_image_folder(data.train_dir, data.folder_labels, "train_dir")
        return ShardedSource(folder_source(listing, f"train_dir {data.train_dir!r}"), listing.notes)
    common = dict(image_column=data.image_column, label_column=data.label_column, on_bad_image=data.on_bad_image)
    shards = data.train_file is not None and resolve_data_files(data.train_file, "train file").format in (
        "parquet", "webdataset")
    if shards or (data.streaming and data.dataset_name is not None and data.dataset_name.lower() != "demo"):
        stream = open_stream(dataset_name=hub_id(data.dataset_name) if data.dataset_name else None,
                             dataset_config_name=data.dataset_config_name, train_file=data.train_file,
                             train_split=data.train_split, folder_labels=data.folder_labels, cache_dir=data.cache_dir,
                             **common)
        return ShardedSource(stream.source, stream.notes)
    if data.streaming:
        raise UsageError(f"--streaming reads a Hub dataset's parquet or webdataset files; "
                         f"{data.train_file or data.dataset_name!r} is loaded whole: drop --streaming")
    splits = load_image_splits(dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name,
                               train_file=data.train_file, train_split=data.train_split, cache_dir=data.cache_dir,
                               with_eval=False, **common)
    return TableSource(splits)


class ShardBatches(torch.utils.data.Dataset):
    """Item ``i``: the ``i``-th batch of the shards to compute, read, decoded and preprocessed (in DataLoader
    workers). A bad image is left out and counted (``on_bad_image="skip"``) or reported, in one line, to the main
    process, which raises it."""

    def __init__(self, source: ImageSource, plan: list[tuple[int, int, int]], processor, on_bad_image: str):
        self.source, self.plan, self.processor, self.on_bad_image = source, plan, processor, on_bad_image

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int) -> dict:
        from .data.images import BadImageError, decode_or_skip

        shard, start, stop = self.plan[item]
        keys, images, labels, bad = [], [], [], 0
        try:
            for key, encoded, label, where in self.source.read(start, stop):
                image = decode_or_skip(encoded, where, self.on_bad_image)
                if image is None:
                    bad += 1
                    continue
                keys.append(key)
                images.append(image)
                labels.append(-1 if label is None else int(label))
        except BadImageError as error:
            return {"shard": shard, "error": str(error)}
        pixels = self.processor(images, return_tensors="pt")["pixel_values"] if images else None
        return {"shard": shard, "stop": stop, "rows": stop - start, "keys": keys, "labels": labels, "bad": bad,
                "pixel_values": pixels}


# --------------------------------------------------------------------------------------------------------------------
# The output folder: identity, lock, completed shards, atomic writes
# --------------------------------------------------------------------------------------------------------------------
def _ours(name: str) -> bool:
    return name in (INFO_FILE, LOCK_FILE, STAGING_DIR) or (name.startswith(SHARD_PREFIX) and name.endswith(".parquet"))


def prepare_output(folder: Path, identity: dict, overwrite: bool) -> str:
    """Check ``folder`` for this embedding (new, the same settings: resume, other settings: refused unless
    ``overwrite``, which deletes our files) and write ``embed_info.json``; returns the line to print."""
    import shutil

    entries = [e for e in folder.iterdir() if e.name != LOCK_FILE]
    foreign = sorted(e.name for e in entries if not _ours(e.name))
    if foreign:
        raise OutputDirError(f"--output_dir {str(folder)!r} holds other files (e.g. {foreign[0]!r}): nasiam-embed "
                             "writes into a new or empty folder, or one it wrote before")
    info = read_json(folder / INFO_FILE) if (folder / INFO_FILE).is_file() else None
    note = f"output_dir {folder}: new embedding"
    if entries and (info is None or info.get("identity") != identity):
        differing = sorted(k for k in identity if info is None or info["identity"].get(k) != identity[k])
        if not overwrite:
            raise OutputDirError(f"--output_dir {str(folder)!r} holds an embedding with other settings "
                                 f"({', '.join(differing)} differ): pass --overwrite_output_dir to replace it, or "
                                 "choose another folder")
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        note = f"output_dir {folder}: the earlier embedding ({', '.join(differing)} differed) replaced"
    elif entries:
        note = f"output_dir {folder}: same settings, resuming"
    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)  # parts of shards a killed run was writing
    atomic_write_json(folder / INFO_FILE, {**(info or {}), "identity": identity, "complete": False})
    return note


def completed_shards(folder: Path, total: int) -> set[int]:
    """Shards under their final name whose parquet footer reads (a renamed shard was written whole)."""
    import pyarrow.parquet as pq

    done = set()
    for index in range(total):
        path = folder / shard_name(index, total)
        if path.is_file():
            try:
                pq.read_metadata(path)
            except Exception:  # noqa: BLE001 - unreadable: computed again
                continue
            done.add(index)
    return done


def write_shard(folder: Path, index: int, total: int, keys: list[str], vectors: np.ndarray,
                labels: list[int] | None, dtype: str, bad: int, rank: int) -> Path:
    """The shard's table written to the staging folder, synced, then renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    value_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32).ravel(),
                    type=value_type)
    columns = {"key": pa.array(keys, type=pa.string()),
               "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    table = pa.table(columns).replace_schema_metadata({BAD_IMAGES_KEY: str(bad).encode()})
    staging = folder / STAGING_DIR
    staging.mkdir(exist_ok=True)
    final = folder / shard_name(index, total)
    part = staging / f"{final.name}.{rank}.{os.getpid()}"
    with open(part, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, final)
    return final


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------
def load_embedder(path: str, embed: str):
    """The NASiam model of ``path`` (checked to hold the weights ``embed`` needs) and its image processor (the
    saved one; a folder without one gets the config's defaults, with a note)."""
    from transformers import AutoImageProcessor

    from .folders import require_model
    from .modeling_nasiam import NASiamModel
    from .processing import image_processor_for_config

    require_model(path, flag="--model_name_or_path", purpose="nasiam-embed")
    model, info = NASiamModel.from_pretrained(path, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k.startswith(("backbone.", "projector.") if embed == "projector"
                                                               else "backbone.")]
    if missing:
        part = "projector" if embed == "projector" and any(k.startswith("projector.") for k in missing) else "backbone"
        raise UsageError(f"--model_name_or_path {path!r} has no {part} weights (missing e.g. {missing[0]!r})"
                         + (": a fine-tuned classifier keeps no projector; use --embed backbone"
                            if part == "projector" else ""))
    try:
        processor, note = AutoImageProcessor.from_pretrained(path), None
    except OSError:
        processor = image_processor_for_config(model.config)
        note = (f"{path}: no preprocessor_config.json; images are resized and normalised with the config's defaults "
                f"({processor.image_mean} / {processor.image_std})")
    return model.eval(), processor, note


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every tensor of the model: a rerun with other weights is refused."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
def batch_plan(shards: Sequence[int], num_rows: int, shard_size: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` of every batch of ``shards``, in order (a batch never crosses a shard)."""
    plan = []
    for shard in shards:
        start, stop = shard * shard_size, min((shard + 1) * shard_size, num_rows)
        plan += [(shard, a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
    return plan


def run_embed(command: EmbedCommand) -> Path:
    """Embed every image of ``command``'s source into ``command.run.output_dir``; returns the folder."""
    from filelock import FileLock, Timeout
    from tqdm.auto import tqdm

    from .data.views import default_num_workers
    from .trainer import make_accelerator

    data, run, precision = command.data, command.run, command.precision
    accelerator = make_accelerator(None, 0, precision)
    model, processor, processor_note = load_embedder(command.model.model_name_or_path, command.model.embed)
    source = open_images(data)
    for note in (*source.notes, processor_note):
        if note:
            accelerator.print(note)
    if source.num_rows == 0:
        raise UsageError(f"the {source.where} holds no images")
    folder = Path(run.output_dir)
    total = -(-source.num_rows // run.shard_size)
    identity = {"model": model_fingerprint(model), "model_name_or_path": command.model.model_name_or_path,
                "embed": command.model.embed, "dtype": run.dtype, "shard_size": run.shard_size,
                "source": source.fingerprint, "num_rows": source.num_rows, "on_bad_image": data.on_bad_image,
                "processor": processor.to_dict(), "mixed_precision": accelerator.mixed_precision,
                "channels_last": precision.channels_last}
    identity = json.loads(json.dumps(identity))  # as embed_info.json holds it (lists, not tuples)
    lock = FileLock(str(folder / LOCK_FILE))  # held by the main process for the run's life
    try:
        if accelerator.is_main_process:
            if folder.is_file():
                raise OutputDirError(f"--output_dir {str(folder)!r} is a file: give a folder")
            folder.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise OutputDirError(f"--output_dir {str(folder)!r} is in use by another nasiam-embed run") from None
            accelerator.print(prepare_output(folder, identity, run.overwrite_output_dir))
        accelerator.wait_for_everyone()
        done = completed_shards(folder, total)
        accelerator.wait_for_everyone()  # every rank has listed the shards before any is written
        missing = [i for i in range(total) if i not in done]
        mine = missing[accelerator.process_index::accelerator.num_processes]
        device = accelerator.device
        model.to(device)
        if precision.channels_last:
            model.to(memory_format=torch.channels_last)
        plan = batch_plan(mine, source.num_rows, run.shard_size, run.per_device_eval_batch_size)
        workers = data.dataloader_num_workers
        workers = default_num_workers(sum(b - a for _, a, b in plan)) if workers is None else workers
        loader = torch.utils.data.DataLoader(ShardBatches(source, plan, processor, data.on_bad_image),
                                             batch_size=None, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        accelerator.print(f"embedding {source.num_rows} images of the {source.where} with the {command.model.embed} "
                          f"of {command.model.model_name_or_path}: {total} shards of {run.shard_size}, "
                          f"{len(done)} already written" + (f", {accelerator.num_processes} processes"
                                                            if accelerator.num_processes > 1 else ""))
        dim = model.config.projection_dim if command.model.embed == "projector" else model.config.hidden_size
        start_time = time.perf_counter()
        current, parts = None, None
        with tqdm(total=sum(b - a for _, a, b in plan), desc="embed", unit="img",
                  disable=not accelerator.is_local_main_process) as bar:
            for batch in loader:
                if "error" in batch:
                    from .data.images import BadImageError

                    raise BadImageError(batch["error"])
                if batch["shard"] != current:
                    current, parts = batch["shard"], {"keys": [], "vectors": [], "labels": [], "bad": 0}
                if batch["pixel_values"] is not None:
                    pixels = batch["pixel_values"].to(device, non_blocking=True)
                    if precision.channels_last:
                        pixels = pixels.contiguous(memory_format=torch.channels_last)
                    with torch.no_grad(), accelerator.autocast():
                        features = model(pixels).pooler_output
                        vectors = model.project(features) if command.model.embed == "projector" else features
                    parts["vectors"].append(vectors.float().cpu())
                parts["keys"] += batch["keys"]
                parts["labels"] += batch["labels"]
                parts["bad"] += batch["bad"]
                bar.update(batch["rows"])
                if batch["stop"] == min((current + 1) * run.shard_size, source.num_rows):  # the shard's last batch
                    vectors = torch.cat(parts["vectors"]).numpy() if parts["vectors"] else np.zeros((0, dim))
                    write_shard(folder, current, total, parts["keys"], vectors,
                                parts["labels"] if source.labelled else None, run.dtype, parts["bad"],
                                accelerator.process_index)
        accelerator.wait_for_everyone()  # every rank's shards are written
        if accelerator.is_main_process:
            computed_rows = sum(b - a for _, a, b in batch_plan(missing, source.num_rows, run.shard_size,
                                                                run.shard_size))
            accelerator.print(finish_output(folder, total, source, command, dim, computed_rows,
                                            time.perf_counter() - start_time, len(missing)))
    finally:
        if lock.is_locked:
            lock.release()
    accelerator.end_training()
    return folder


def finish_output(folder: Path, total: int, source: ImageSource, command: EmbedCommand, dim: int, rows_this_run: int,
                  elapsed: float, computed: int) -> str:
    """``embed_info.json`` completed with the totals read back from the shards' footers and the throughput of this
    run (``rows_this_run`` rows of ``computed`` shards in ``elapsed`` seconds, all processes together); the staging
    folder removed. Returns the summary line."""
    import shutil

    import pyarrow.parquet as pq

    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)

    rows = bad = 0
    for index in range(total):
        metadata = pq.read_metadata(folder / shard_name(index, total))
        rows += metadata.num_rows
        bad += int((metadata.metadata or {}).get(BAD_IMAGES_KEY, b"0"))
    info = read_json(folder / INFO_FILE)
    throughput = rows_this_run / elapsed if computed and elapsed > 0 else None
    info.update(complete=True, rows=rows, bad_images=bad, dimension=dim, shards=total, embed=command.model.embed,
                dtype=command.run.dtype, columns=["key", "embedding"] + (["label"] if source.labelled else []),
                class_names=source.class_names if source.labelled else None, source=source.where,
                model_name_or_path=command.model.model_name_or_path, images_per_second_last_run=throughput)
    atomic_write_json(folder / INFO_FILE, info)
    return (f"{rows} embeddings of dimension {dim} ({command.run.dtype}) in {total} shards in {folder}"
            + (f"; {bad} undecodable images left out" if bad else "")
            + (f"; {computed} shards computed at {throughput:.1f} images/s" if throughput else
               "; every shard was already written"))


__all__ = ["EmbedCommand", "ImageSource", "ShardedSource", "TableSource", "open_images", "run_embed"]
