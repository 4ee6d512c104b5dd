#!/usr/bin/env python
"""Speed and memory of the data layer, map-style and streamed, as ONE JSON object (stdout; progress on stderr).

Measured through the package's own loaders (the code the commands run):

* throughput: images/s of a full pass (decode + two "ssl" views per image) of the map-style loader
  (``load_image_splits`` + ``view_dataset_for`` + ``make_loader``) and of the streamed loader (``open_stream`` +
  ``ImageStream.loader``) over the same parquet shards: the shared CIFAR-10 subset (real 32x32 PNGs) and
  ImageNet-size JPEGs generated here (``--imagenet_side`` x 4/3, smooth random images, quality 90), next to the
  images/s one pretraining step consumes (``search.weight_step`` on ``NASiamForPreTraining``, measured here, or
  given with ``--step_images_per_second``);
* memory: the peak resident memory of a loader-only full pass over ``--memory_counts`` ImageNet-size images (10k and
  50k by default): the whole process tree (this process and its DataLoader workers), sampled every 0.1 s, both the
  resident set (RSS: it counts the memory-mapped arrow / parquet pages that were read) and the anonymous memory
  (``RssAnon``: what the process itself holds), plus this process's ``VmHWM`` (reset through /proc/self/clear_refs,
  as benchmarks/throughput.py does). Bounded memory: the 50k pass within 10 % of the 10k pass;
* ``--pretrain_epoch``: the same memory figures, the wall time and the training images/s of a real
  ``nasiam-pretrain --streaming`` epoch over ``../shared/data/cifar10-full/train.parquet`` (50k images) against a
  10k-image epoch of it (``--pretrain_samples 10000,all``: a seeded subset of the same stream).

Generated shards are cached in ``--work_dir`` (default: a folder under the system temp dir), so a second run skips the
generation. Quick smoke runs: ``python benchmarks/data.py --cifar_images 256 --imagenet_images 64
--memory_counts 128,256 --step_images_per_second 0`` and ``python benchmarks/data.py --skip cifar,imagenet,memory
--pretrain_epoch --pretrain_samples 128,256 --batch_size 32 --image_size 8``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ROWS_PER_SHARD = 1000
ROW_GROUP = 100  # what datasets writes for image datasets


def log(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Memory of a process tree
# ---------------------------------------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|VmHWM):\s+(\d+) kB", text, flags=re.MULTILINE)}


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*") if Path(f"/proc/{current}/task").exists() else []:
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


class TreeMemory:
    """Peak RSS and anonymous memory of a process and its descendants, sampled by a thread every ``interval`` s."""

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        rss = anon = 0
        for pid in _tree(self.pid):
            status = _status(pid)
            rss, anon = rss + status.get("VmRSS", 0), anon + status.get("RssAnon", 0)
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMemory:
        if self.pid == os.getpid():
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
            except OSError:
                pass
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        out = {"peak_tree_rss_mb": round(self.peak_rss / 1024, 1), "peak_tree_anon_mb": round(self.peak_anon / 1024, 1)}
        if self.pid == os.getpid():
            out["main_vmhwm_mb"] = round(_status(self.pid).get("VmHWM", 0) / 1024, 1)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def natural_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random image (coarse noise upsampled, fine grain on top) as JPEG quality 90: JPEG sizes like photos."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-10, 11, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def imagenet_shards(folder: Path, count: int, side: int) -> Path:
    """``count`` ImageNet-size JPEGs (``side`` x ``side * 4 / 3``) in parquet shards of 1,000 rows, row groups of
    100, written once (shards already there are kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(-(-count // ROWS_PER_SHARD)):
        path = folder / f"part-{shard:05d}.parquet"
        rows = min(ROWS_PER_SHARD, count - shard * ROWS_PER_SHARD)
        if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
            continue
        rng = np.random.default_rng(shard)
        images = [{"bytes": natural_jpeg(rng, side * 4 // 3, side), "path": None} for _ in range(rows)]
        table = pa.table({"image": images, "label": [i % 1000 for i in range(rows)]})
        pq.write_table(table, path.with_suffix(".tmp"), row_group_size=ROW_GROUP)
        os.replace(path.with_suffix(".tmp"), path)
        log(f"wrote {path.name} ({rows} images)")
    return folder


def first_images(folder: Path, count: int) -> tuple[str, int | None]:
    """``(data, limit)``: the shards holding the first ``count`` images (one file, or a folder of links to them),
    and ``count`` as ``max_train_samples`` when it ends inside a shard."""
    shards = sorted(folder.glob("part-*.parquet"))[: -(-count // ROWS_PER_SHARD)]
    rows = sum(min(ROWS_PER_SHARD, count - i * ROWS_PER_SHARD) for i in range(len(shards)))
    import pyarrow.parquet as pq

    held = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    limit = None if held == rows == count else count
    if len(shards) == 1:
        return str(shards[0]), limit
    link = folder.parent / f"{folder.name}-first-{len(shards)}-shards"  # the loaders take a folder
    link.mkdir(exist_ok=True)
    for shard in shards:
        if not (link / shard.name).exists():
            (link / shard.name).symlink_to(shard)
    return str(link), limit


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------


def build_loader(kind: str, data: str, args, limit: int | None, cache_dir: str):
    """The map-style or streamed loader of ``data``, as the commands build them; returns (loader, images/epoch)."""
    from nasiam_hf.data import default_num_workers, load_image_splits, make_loader, view_dataset_for

    splits = load_image_splits(train_file=data, cache_dir=cache_dir, streaming=kind == "streamed",
                               max_train_samples=limit, image_size=args.image_size)
    if kind == "streamed":
        count = splits.stream.num_rows
        workers = default_num_workers(count) if args.workers is None else args.workers
        loader = splits.stream.loader(args.batch_size, transform=splits.transform("ssl"), num_workers=workers)
        return loader, len(loader) * args.batch_size, splits
    views = view_dataset_for(splits)
    workers = default_num_workers(len(views)) if args.workers is None else args.workers
    loader = make_loader(views, args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                         persistent_workers=False)
    return loader, len(loader) * args.batch_size, splits


def full_pass(loader) -> tuple[int, float]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += int(batch["index"].shape[0])
    return images, time.perf_counter() - start


def throughput(data: str, args, limit: int | None, cache_dir: str) -> dict:
    out = {}
    for kind in ("map_style", "streamed"):
        loader, expected, splits = build_loader("streamed" if kind == "streamed" else "map", data, args, limit,
                                                cache_dir)
        images, seconds = full_pass(loader)
        out[kind] = {"images": images, "seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1),
                     "num_workers": loader.num_workers}
        log(f"{kind}: {images} images in {seconds:.1f} s")
    out["image_size"], out["policy"] = splits.image_size, splits.policy
    return out


def step_rate(policy: str, image_size: int, batch: int) -> float:
    """Images/s of one pretraining step (``search.weight_step`` on NASiamForPreTraining), median of 3 after 1."""
    from accelerate import Accelerator

    from nasiam_hf import NASiamConfig
    from nasiam_hf.modeling_nasiam import NASiamForPreTraining
    from nasiam_hf.optimization import build_sgd, momentum_for_step, predictor_param_groups, scaled_lr, weight_step

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    config = NASiamConfig(image_size=image_size, cifar_stem=policy == "cifar")
    model = NASiamForPreTraining(config)
    groups, _ = predictor_param_groups(model.parameters(), model.nasiam.predictor, True)  # as the pretraining does
    optimizer = build_sgd(groups, scaled_lr(0.06, batch), 5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    g = torch.Generator().manual_seed(0)
    views = {k: torch.randn(batch, 3, image_size, image_size, generator=g).to(accelerator.device)
             for k in ("pixel_values", "pixel_values_2")}
    momentum = momentum_for_step(config, 0, 1)
    times = []
    for i in range(4):
        start = time.perf_counter()
        weight_step(model, views, optimizer, None, accelerator, momentum)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return round(batch / sorted(times)[1], 2)


def memory_pass(data: str, limit: int | None, args, cache_dir: str) -> dict:
    out = {}
    for kind in ("map_style", "streamed"):
        loader, _, _ = build_loader("streamed" if kind == "streamed" else "map", data, args, limit, cache_dir)
        with TreeMemory() as memory:
            images, seconds = full_pass(loader)
        out[kind] = {"images": images, "seconds": round(seconds, 1), **memory.result()}
        log(f"memory {kind}: {out[kind]}")
    return out


def pretrain_samples(text: str) -> list[tuple[str, int | None]]:
    """``--pretrain_samples`` ("10000,all") as (label, max_train_samples or None for the whole file) pairs."""
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "all":
            pairs.append(("all", None))
        elif item.isdigit() and int(item) > 0:
            pairs.append((f"{int(item) // 1000}k" if int(item) % 1000 == 0 else item, int(item)))
        else:
            raise SystemExit(f"--pretrain_samples takes positive counts or 'all', got {item!r}")
    return pairs


def pretrain_epoch(args, work: Path) -> dict:
    """Peak memory, wall time and images/s of one real ``nasiam-pretrain --streaming`` epoch over
    ``--pretrain_file`` (default ``../shared/data/cifar10-full/train.parquet``, 50k JPEGs) for each of
    ``--pretrain_samples`` (a seeded ``--max_train_samples`` subset of the stream, or ``all``): the process tree
    (the command and its DataLoader workers), sampled every 0.1 s."""
    data = Path(args.pretrain_file)
    if not data.exists():
        raise SystemExit(f"--pretrain_file {str(data)!r} does not exist")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout's package
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = {"file": str(data)}
    for label, limit in pretrain_samples(args.pretrain_samples):
        folder = work / f"pretrain-{label}"
        command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", "--train_file", str(data), "--streaming",
                   "--output_dir", str(folder), "--overwrite_output_dir", "--genotype", args.pretrain_genotype,
                   "--num_train_epochs", "1", "--per_device_train_batch_size", str(args.batch_size),
                   "--knn_every", "0", "--checkpointing_steps", "no", "--seed", "0"]
        command += ["--max_train_samples", str(limit)] if limit is not None else []
        command += ["--dataloader_num_workers", str(args.workers)] if args.workers is not None else []
        command += ["--image_size", str(args.image_size)] if args.image_size is not None else []
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                   env=env)
        with TreeMemory(process.pid) as memory:
            output, _ = process.communicate()
        record = {"max_train_samples": limit, "returncode": process.returncode,
                  "seconds": round(time.perf_counter() - start, 1), **memory.result()}
        if process.returncode:
            record["error_tail"] = output[-1500:]
        else:
            epoch = json.loads((folder / "training_history.json").read_text())["epochs"][-1]
            record["training_images_per_second"] = round(epoch["images_per_second"], 1)
        out[label] = record
        log(f"pretrain {label}: {record}")
    labels = [label for label, _ in pretrain_samples(args.pretrain_samples)]
    if len(labels) == 2 and all(out[k]["returncode"] == 0 for k in labels):
        small, large = (out[k] for k in labels)
        out["ratios_large_over_small"] = {k: round(large[k] / max(small[k], 1e-9), 3)
                                          for k in ("peak_tree_rss_mb", "peak_tree_anon_mb")}
        out["bounded"] = out["ratios_large_over_small"]["peak_tree_anon_mb"] < 1.10
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the commands').")
    parser.add_argument("--image_size", type=int, default=None, help="Training size (default: the policy's).")
    parser.add_argument("--cifar_images", type=int, default=10_000, help="Images of the shared subset to pass over.")
    parser.add_argument("--imagenet_images", type=int, default=2_000, help="ImageNet-size images for the throughput.")
    parser.add_argument("--imagenet_side", type=int, default=375, help="Shorter side of the generated JPEGs.")
    parser.add_argument("--memory_counts", default="10000,50000", help="Image counts of the memory passes.")
    parser.add_argument("--step_images_per_second", type=float, default=None,
                        help="What a pretraining step consumes (default: measured; 0 skips it).")
    parser.add_argument("--pretrain_epoch", action="store_true", help="Also run the streamed nasiam-pretrain epochs.")
    parser.add_argument("--pretrain_file", default=str(SHARED / "cifar10-full" / "train.parquet"),
                        help="What --pretrain_epoch streams (default: the shared 50k CIFAR-10 JPEGs).")
    parser.add_argument("--pretrain_samples", default="10000,all",
                        help="The --pretrain_epoch runs: seeded subsets of the stream (counts) and/or 'all'.")
    parser.add_argument("--pretrain_genotype", default="simsiam-cifar10-resnet18", help="--genotype of those runs.")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "nasiam-data-benchmark"))
    parser.add_argument("--skip", default="", help="Comma list of parts to skip: cifar, imagenet, memory.")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    work = Path(args.work_dir)
    cache = str(work / "hf_cache")
    counts = [int(c) for c in args.memory_counts.split(",") if c]
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()},
              "settings": {k: v for k, v in vars(args).items() if k != "work_dir"}}
    needed = ([args.imagenet_images] if "imagenet" not in skip else []) + (counts if "memory" not in skip else [])
    imagenet = imagenet_shards(work / "imagenet-size", max(needed), args.imagenet_side) if needed else None
    parts = []
    if "cifar" not in skip:
        parts.append(("cifar", str(SHARED / "cifar10" / "train.parquet"), args.cifar_images))
    if "imagenet" not in skip:
        parts.append(("imagenet", *first_images(imagenet, args.imagenet_images)))
    for name, data, limit in parts:
        log(f"throughput: {name}")
        rates = throughput(data, args, limit, cache)
        step = args.step_images_per_second
        if step is None:
            step = step_rate(rates["policy"], rates["image_size"], min(args.batch_size, 16))
        rates["pretrain_step_images_per_second"] = step or None
        if step:
            rates["loader_over_step"] = {k: round(rates[k]["images_per_second"] / step, 2)
                                         for k in ("map_style", "streamed")}
        result[name] = rates
    if "memory" not in skip:
        memory = {str(count): memory_pass(*first_images(imagenet, count), args, cache) for count in counts}
        if len(counts) == 2:
            small, large = (memory[str(c)] for c in counts)
            memory["ratios_large_over_small"] = {
                kind: {k: round(large[kind][k] / max(small[kind][k], 1e-9), 3)
                       for k in ("peak_tree_rss_mb", "peak_tree_anon_mb")} for kind in ("map_style", "streamed")}
            memory["streamed_bounded"] = memory["ratios_large_over_small"]["streamed"]["peak_tree_anon_mb"] < 1.10
        result["memory"] = memory
    if args.pretrain_epoch:
        result["pretrain_epoch"] = pretrain_epoch(args, work)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
