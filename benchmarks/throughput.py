#!/usr/bin/env python
"""Throughput and peak memory of every hot path of nasiam-hf, with each speed option on and off, as ONE JSON object.

Measured, always through the package's own functions (the code the training commands run):

(a) data pipeline: decode + two-view augmentation, per image with torchvision v2 (``ViewDataset("two_view")`` +
    ``make_loader``) and batched on the device (``ViewDataset("decode")`` + ``make_loader`` + ``BatchAugmenter``);
(b) the architecture step ``search.alpha_step`` on the supernet;
(c) the weight step of the search, ``search.weight_step`` on the supernet;
(d) the pretraining step, ``search.weight_step`` on ``NASiamForPreTraining`` with a paper genotype's heads;
(e) kNN evaluation: ``evaluation.extract_features`` + ``evaluation.knn_predict``.

Steps (b)-(d) run for each precision/layout variant (fp32, channels_last, bf16 autocast, both); models are built with
``trainer.prepare_model_layout``, optimizers with the package's builders, and every step goes through the same
per-update guard (non-finite check and decision) the commands use. Warmup steps are excluded; timings are medians
over ``--repeats`` steps. Images/s count source images (each gives two views), so "an epoch over N images" takes
N / (images/s) seconds.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; CPU the peak resident set
size of this process (``VmHWM`` of /proc/self/status, reset to the current RSS through /proc/self/clear_refs before
each measurement; where that is not available, ``ru_maxrss``, the peak since the process started).

JSON goes to stdout, progress to stderr. Defaults suit a laptop-class CPU (ResNet-18, 32x32, batch 64, a few minutes);
on a GPU pass e.g. ``--batch_size 512``. ``--extrapolate`` adds the time of a 100-epoch CIFAR-10 search and an
800-epoch CIFAR-10 pretraining (50,000 images) at the measured rates.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

VARIANTS = {  # name -> (mixed precision, channels_last)
    "fp32": ("no", False),
    "channels_last": ("no", True),
    "bf16": ("bf16", False),
    "bf16+channels_last": ("bf16", True),
}
CIFAR_IMAGES = 50_000
PAPER_SEARCH_GPU_HOURS = 2.3
LIBRARY_PRETRAIN_GPU_HOURS = (5.0, 7.0)


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------------


class Memory:
    """Peak memory of one measurement: CUDA allocator peak, or this process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_resettable = False
        if device.type != "cuda":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.cpu_resettable = self._vmhwm_mb() is not None
            except OSError:
                self.cpu_resettable = False

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (reset before each measurement)"
        if self.cpu_resettable:
            return "peak RSS: VmHWM of /proc/self/status, reset via /proc/self/clear_refs before each measurement"
        return "peak RSS since process start: resource.getrusage(RUSAGE_SELF).ru_maxrss (not resettable here)"

    @staticmethod
    def _vmhwm_mb() -> float | None:
        try:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) / 1024 if match else None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.cpu_resettable:
            return round(self._vmhwm_mb(), 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise_times(times: list[float], images: int, peak_mb: float) -> dict:
    median = statistics.median(times)
    return {
        "seconds_per_step": round(median, 5),
        "images_per_second": round(images / median, 2),
        "step_seconds_all": [round(t, 5) for t in times],
        "peak_memory_mb": peak_mb,
    }


def measure(fn, *, images: int, warmup: int, repeats: int, device: torch.device, memory: Memory) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed times; median seconds and images/s."""
    return measure_rounds({"x": fn}, images=images, warmup=warmup, repeats=repeats, device=device, memory=memory)["x"]


def measure_rounds(fns: dict, *, images: int, warmup: int, repeats: int, device: torch.device, memory: Memory
                   ) -> dict:
    """Time several step functions in interleaved rounds (one call of each per round, in the given order), so a
    burst of load from elsewhere on the machine slows them alike; ``warmup`` untimed rounds first. Per function:
    median seconds and images/s over the rounds, and the largest peak memory of its calls."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    peaks = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            memory.reset()
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak_mb())
    return {name: summarise_times(times[name], images, peaks[name]) for name in fns}


# ---------------------------------------------------------------------------------------------------------------------
# Set-up helpers (thin: everything measured is package code)
# ---------------------------------------------------------------------------------------------------------------------


def new_accelerator(precision: str, device: str):
    """A fresh Accelerator with the given mixed precision (the singleton state is reset between variants)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    free()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


def backbone_fields(args) -> dict:
    """The config fields of ``--backbone`` / ``--backbone_kwargs`` (``backbones.backbone_config_values``, as the
    commands resolve them), with the CIFAR stem for a torchvision ResNet at CIFAR sizes."""
    from nasiam_hf.backbones import backbone_config_values, is_torchvision_backbone

    values = backbone_config_values(args.backbone, args.backbone_kwargs)
    if is_torchvision_backbone(args.backbone):
        values["cifar_stem"] = args.cifar_stem
    return values


def default_preset(framework: str, backbone: str) -> str:
    from nasiam_hf.presets import PRESETS

    for name in (f"{framework}-cifar10-{backbone}", f"{framework}-cifar10-resnet18", f"{framework}-baseline"):
        if name in PRESETS:
            return name
    raise ValueError(f"no preset for {framework}/{backbone}")


def synthetic_views(batch: int, size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(batch, 3, size, size, generator=g).to(device)
            for key in ("pixel_values", "pixel_values_2")}


def free() -> None:
    """Collect what earlier measurements left (models, optimizers, the Accelerator holding them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# (b), (c), (d): training steps
# ---------------------------------------------------------------------------------------------------------------------


def bench_steps(args, variant: str, tmp: Path, compile_backbone: bool = False) -> dict:
    from nasiam_hf import NASiamConfig
    from nasiam_hf.modeling_nasiam import NASiamForArchitectureSearch, NASiamForPreTraining
    from nasiam_hf.optimization import build_sgd, momentum_for_step, predictor_param_groups, scaled_lr, weight_step
    from nasiam_hf.search import alpha_step, build_arch_optimizer
    from nasiam_hf.loop import UpdateGuard
    from nasiam_hf.trainer import prepare_model_layout

    precision, channels_last = VARIANTS[variant]
    accelerator = new_accelerator(precision, args.device)
    device = accelerator.device
    memory = Memory(device)
    guard = UpdateGuard(accelerator)  # the commands' per-update checks and decision (one host sync per update)
    batch = synthetic_views(args.batch_size, args.image_size, device)
    lr = scaled_lr(0.06, args.batch_size)
    timing = dict(images=args.batch_size, warmup=args.warmup, repeats=args.repeats, device=device, memory=memory)
    result = {"mixed_precision": precision, "channels_last": channels_last, "torch_compile": compile_backbone}
    torch.manual_seed(0)

    steps = {}
    if not compile_backbone:
        config = NASiamConfig(framework=args.framework, image_size=args.image_size, **backbone_fields(args))
        supernet = prepare_model_layout(NASiamForArchitectureSearch(config), accelerator, channels_last)
        weight_opt = build_sgd(supernet.weight_parameters(), lr, 5e-4, implementation=args.optimizer_implementation)
        arch_opt = build_arch_optimizer(supernet, "adamw", 1e-3, 1e-3, args.optimizer_implementation)
        model, weight_opt, arch_opt = accelerator.prepare(supernet, weight_opt, arch_opt)
        core = accelerator.unwrap_model(model)
        model.train()
        search_momentum = momentum_for_step(config, 0, 1)
        steps["alpha_step"] = lambda: alpha_step(core, batch, arch_opt, accelerator, guard=guard)
        steps["search_weight_step"] = lambda: weight_step(model, batch, weight_opt, None, accelerator,
                                                          search_momentum, guard=guard)

    config = NASiamConfig.from_preset(args.preset, image_size=args.image_size, **backbone_fields(args))
    pre = prepare_model_layout(NASiamForPreTraining(config), accelerator, channels_last, torch_compile=compile_backbone)
    groups, _ = predictor_param_groups(pre.parameters(), pre.nasiam.predictor, config.framework == "simsiam")
    optimizer = build_sgd(groups, lr, 5e-4, implementation=args.optimizer_implementation)
    pre, optimizer = accelerator.prepare(pre, optimizer)
    pre.train()
    momentum = momentum_for_step(config, 0, 1)
    steps["pretrain_step"] = lambda: weight_step(pre, batch, optimizer, None, accelerator, momentum, guard=guard)
    if compile_backbone:
        log(f"{variant}: compiling the backbone (first step)")
        start = time.perf_counter()
        steps["pretrain_step"]()
        synchronize(device)
        result["compile_and_first_step_seconds"] = round(time.perf_counter() - start, 2)
    log(f"{variant}{' + torch.compile' if compile_backbone else ''}: {', '.join(steps)} in interleaved rounds")
    result.update(measure_rounds(steps, **timing))
    steps.clear()
    if "alpha_step" in result:
        result["ratios"] = step_ratios(result)
    return result


def step_ratios(steps: dict) -> dict:
    """Per-image cost ratios of one variant; the search epoch does N/2 weight + N/2 alpha images, pretraining N."""
    alpha = steps["alpha_step"]["seconds_per_step"]
    weight = steps["search_weight_step"]["seconds_per_step"]
    pretrain = steps["pretrain_step"]["seconds_per_step"]
    return {
        "alpha_over_weight": round(alpha / weight, 3),
        "search_epoch_over_pretrain_epoch": round((alpha + weight) / (2 * pretrain), 3),
        "search_weight_over_pretrain_step": round(weight / pretrain, 3),
    }


def bench_optimizers(args) -> dict:
    """``optimizer.step()`` alone over the pretraining model's parameters, per implementation."""
    from nasiam_hf import NASiamConfig
    from nasiam_hf.modeling_nasiam import NASiamForPreTraining
    from nasiam_hf.optimization import build_sgd, fused_optimizer_supported, predictor_param_groups

    device = torch.device(args.device)
    memory = Memory(device)
    config = NASiamConfig.from_preset(args.preset, image_size=args.image_size, **backbone_fields(args))
    model = NASiamForPreTraining(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    out = {"fused_supported": fused_optimizer_supported(device.type)}
    optimizer = None
    for implementation in ("for_loop", "foreach", "fused"):
        try:
            groups, _ = predictor_param_groups(model.parameters(), model.nasiam.predictor, True)
            optimizer = build_sgd(groups, 0.01, 5e-4, implementation=implementation)
        except (RuntimeError, ValueError) as error:
            out[implementation] = {"error": str(error)[:200]}
            continue
        timed = measure(optimizer.step, images=1, warmup=2, repeats=max(5, args.repeats), device=device,
                        memory=memory)
        out[implementation] = {"ms_per_step": round(1000 * timed["seconds_per_step"], 3),
                               "peak_memory_mb": timed["peak_memory_mb"]}
    del model, optimizer
    free()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (a): data pipeline
# ---------------------------------------------------------------------------------------------------------------------


class EncodedImageTable:
    """A stand-in for a ``datasets.Dataset`` of encoded images (columns image, label, index), for machines without
    the datasets library: rows decode with PIL on access, and ``with_transform`` behaves as datasets' does for the
    calls :class:`~nasiam_hf.data.ViewDataset` makes."""

    column_names = ["image", "label", "index"]

    def __init__(self, encoded: list[bytes], labels: list[int], transform=None):
        self.encoded, self.labels, self.transform = encoded, labels, transform

    def __len__(self) -> int:
        return len(self.encoded)

    def with_transform(self, transform, columns=None):
        return EncodedImageTable(self.encoded, self.labels, transform)

    def __getitem__(self, positions):
        from PIL import Image

        rows = {"image": [Image.open(io.BytesIO(self.encoded[i])) for i in positions],
                "label": [self.labels[i] for i in positions], "index": list(positions)}
        return self.transform(rows) if self.transform is not None else rows


def synthetic_encoded_images(count: int, size: int, seed: int = 0) -> tuple[list[bytes], list[int], str]:
    """Smooth random RGB images (PNG at <= 64 px like CIFAR's files, else JPEG at 1.25x the crop, ImageNet-like)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = size if size <= 64 else int(size * 1.25)
    fmt = "PNG" if size <= 64 else "JPEG"
    encoded = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (max(side // 8, 2), max(side // 8, 2), 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((side, side), Image.BILINEAR), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        encoded.append(buffer.getvalue())
    return encoded, [i % 10 for i in range(count)], fmt


def image_table(args, count: int):
    """(dataset, description): ``--data_file`` through ``load_image_splits``, else synthetic encoded images in a
    ``datasets.Dataset`` (or :class:`EncodedImageTable` when datasets is not installed)."""
    if args.data_file:
        from nasiam_hf.data import load_image_splits

        splits = load_image_splits(train_file=args.data_file, max_train_samples=count, image_size=args.image_size)
        return splits.train, f"{args.data_file} ({len(splits.train)} rows)"
    encoded, labels, fmt = synthetic_encoded_images(count, args.image_size)
    try:
        import datasets
    except ImportError:
        return EncodedImageTable(encoded, labels), f"synthetic {fmt} images (no datasets library: in-memory table)"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                  "index": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in encoded], "label": labels, "index": list(range(count))},
        features=features)
    return table, f"synthetic {fmt} images in a datasets.Dataset"


def time_loader(loader, device: torch.device, memory: Memory, after=None) -> dict:
    """Images/s of one full pass over ``loader`` (a :func:`make_loader` loader), after a warm-up.

    With workers the warm-up is a whole pass (the workers are persistent, so the timed pass starts with them up and
    prefetching, and the pipeline's fill is spread over every batch of the pass); without workers it is one batch.
    Each batch is moved to ``device`` and given to ``after`` (the on-device augmentation) inside the timing.
    """
    def run(limit=None):
        images = 0
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            if after is not None:
                batch = after(batch)
            images += batch["index"].shape[0]
        synchronize(device)
        return images

    run(None if loader.num_workers > 0 else 1)
    memory.reset()
    start = time.perf_counter()
    images = run()
    elapsed = time.perf_counter() - start
    return {"images_per_second": round(images / elapsed, 2), "images": images, "peak_memory_mb": memory.peak_mb()}


def bench_data(args) -> dict:
    from nasiam_hf.data.augment import BatchAugmenter
    from nasiam_hf.data import (
        NORMALIZATION, ViewDataset, build_decode_transform, build_transform, default_num_workers, make_loader,
    )

    device = torch.device(args.device)
    memory = Memory(device)
    policy = "cifar" if args.image_size <= 64 else "imagenet"
    mean, std = NORMALIZATION["cifar10" if policy == "cifar" else "imagenet"]
    count = args.batch_size * args.data_batches
    table, source = image_table(args, count)
    workers = default_num_workers(len(table)) if args.data_workers is None else args.data_workers
    loader_kwargs = dict(batch_size=args.batch_size, shuffle=True, seed=0, drop_last=True, num_workers=workers)
    out = {"source": source, "policy": policy, "num_workers": workers,
           "default_num_workers": default_num_workers(CIFAR_IMAGES), "batches_per_pass": args.data_batches}

    log("data: per-image torchvision views in the loader")
    per_image = ViewDataset(table, "two_view", build_transform("ssl", policy, args.image_size, mean, std), seed=0)
    out["per_image_loader"] = time_loader(make_loader(per_image, **loader_kwargs), device, memory)

    log("data: decode-only loader + batched views on the device")
    decoded = ViewDataset(table, "decode", build_decode_transform(policy, args.image_size), seed=0)
    augmenter = BatchAugmenter("ssl", policy, args.image_size, mean, std, seed=0)
    decode_loader = make_loader(decoded, **loader_kwargs)
    out["decode_only_loader"] = time_loader(decode_loader, device, memory)
    out["batched_on_device"] = time_loader(decode_loader, device, memory, after=augmenter)
    sample = next(iter(decode_loader))
    sample = {k: v.to(device) for k, v in sample.items()}
    out["on_device_augment_only"] = measure(lambda: augmenter(sample), images=args.batch_size, warmup=1,
                                            repeats=max(3, args.repeats), device=device, memory=memory)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (e): kNN evaluation
# ---------------------------------------------------------------------------------------------------------------------


def bench_knn(args, precision: str) -> dict:
    from nasiam_hf import NASiamConfig
    from nasiam_hf.evaluation import extract_features, knn_predict
    from nasiam_hf.modeling_nasiam import NASiamForPreTraining

    accelerator = new_accelerator(precision, args.device)
    device = accelerator.device
    memory = Memory(device)
    config = NASiamConfig.from_preset(args.preset, image_size=args.image_size, **backbone_fields(args))
    encoder = NASiamForPreTraining(config).nasiam.backbone.to(device)
    g = torch.Generator().manual_seed(0)
    eval_batch = args.eval_batch_size
    n = max(eval_batch, args.knn_images // eval_batch * eval_batch)
    batches = [{"pixel_values": torch.randn(eval_batch, 3, args.image_size, args.image_size, generator=g),
                "labels": torch.randint(0, 10, (eval_batch,), generator=g)} for _ in range(n // eval_batch)]
    extract_features(encoder, batches[:1], accelerator, normalize=True)  # warmup
    synchronize(device)
    memory.reset()
    start = time.perf_counter()
    features, labels = extract_features(encoder, batches, accelerator, normalize=True)
    synchronize(device)
    extract_s = time.perf_counter() - start
    extract_peak = memory.peak_mb()
    timed = measure(lambda: knn_predict(features, labels, features, 10, k=200, temperature=0.2), images=n,
                    warmup=1, repeats=max(3, args.repeats), device=torch.device("cpu"), memory=memory)
    del encoder, batches
    free()
    extract_ips = n / extract_s
    pairs_per_s = n * n / timed["seconds_per_step"]
    full = CIFAR_IMAGES / extract_ips + 10_000 / extract_ips + CIFAR_IMAGES * 10_000 / pairs_per_s
    return {"mixed_precision": precision, "images": n, "eval_batch_size": eval_batch,
            "extract_features": {"images_per_second": round(extract_ips, 2), "peak_memory_mb": extract_peak},
            "knn_predict": {"memory": n, "queries": n, "k": 200, "seconds": timed["seconds_per_step"],
                            "similarity_pairs_per_second": round(pairs_per_s, 1)},
            "estimated_cifar10_knn_eval_seconds": round(full, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------------------


def rate(steps: dict, key: str) -> float:
    return steps[key]["images_per_second"]


def extrapolate(steps: dict, data_rates: dict[str, float]) -> dict:
    """Hours of a 100-epoch CIFAR-10 search (25k weight + 25k alpha images per epoch) and an 800-epoch CIFAR-10
    pretraining (50k images per epoch) at the measured rates. "with_<data path>" caps every step rate at that data
    pipeline's rate (loader workers overlapping the steps; without workers the two add up instead)."""
    half = CIFAR_IMAGES / 2

    def hours(weight_rate, alpha_rate, pretrain_rate):
        search = 100 * (half / weight_rate + half / alpha_rate) / 3600
        pretrain = 800 * CIFAR_IMAGES / pretrain_rate / 3600
        return {"search_100_epochs_hours": round(search, 3), "pretrain_800_epochs_hours": round(pretrain, 3)}

    w, a, p = rate(steps, "search_weight_step"), rate(steps, "alpha_step"), rate(steps, "pretrain_step")
    out = {**hours(w, a, p),
           "reference": {"paper_search_gpu_hours": PAPER_SEARCH_GPU_HOURS,
                         "library_pretrain_gpu_hours": list(LIBRARY_PRETRAIN_GPU_HOURS)}}
    for path, data_rate in data_rates.items():
        out[f"with_{path}"] = hours(min(w, data_rate), min(a, data_rate), min(p, data_rate))
    return out


def summarise(result: dict) -> dict:
    steps = result["steps"]
    data = result.get("data", {})
    options = {}

    def pair(off, on, key="pretrain_step"):
        if off in steps and on in steps:
            a, b = rate(steps[off], key), rate(steps[on], key)
            return {"off_images_per_second": a, "on_images_per_second": b, "speedup": round(b / a, 3)}
        return None

    options["channels_last"] = {"fp32": pair("fp32", "channels_last"), "bf16": pair("bf16", "bf16+channels_last")}
    options["bf16_autocast"] = {"contiguous": pair("fp32", "bf16"),
                                "channels_last": pair("channels_last", "bf16+channels_last")}
    for name in ("alpha_step", "search_weight_step"):
        options["bf16_autocast"][f"{name}_contiguous"] = pair("fp32", "bf16", name)
    if data:
        loader, batched = data["per_image_loader"]["images_per_second"], data["batched_on_device"]["images_per_second"]
        options["augmentation_device"] = {"loader_images_per_second": loader,
                                          "accelerator_images_per_second": batched,
                                          "speedup": round(batched / loader, 3)}
    if "optimizer" in result:
        opt = result["optimizer"]
        options["optimizer"] = {k: v.get("ms_per_step", v.get("error")) for k, v in opt.items()
                                if k != "fused_supported"}
        options["optimizer"]["unit"] = "ms per optimizer.step() over the pretraining model"
    compiled = result.get("torch_compile")
    if compiled:
        base = steps.get(compiled["variant"])
        options["torch_compile"] = {
            "variant": compiled["variant"],
            "compile_and_first_step_seconds": compiled["compile_and_first_step_seconds"],
            "off_images_per_second": rate(base, "pretrain_step") if base else None,
            "on_images_per_second": rate(compiled, "pretrain_step"),
        }
    else:
        options["torch_compile"] = "not measured (pass --compile)"

    best = max(steps, key=lambda v: rate(steps[v], "pretrain_step"))
    defaults = "fp32" if "fp32" in steps else best
    ratios = {v: s["ratios"] for v, s in steps.items() if "ratios" in s}
    targets = {}
    for label, variant in (("default_flags", defaults), ("fastest", best)):
        r = steps[variant]["ratios"]
        p = rate(steps[variant], "pretrain_step")
        entry = {"variant": variant,
                 "alpha_over_weight<=0.5": [r["alpha_over_weight"], r["alpha_over_weight"] <= 0.5],
                 "search_epoch_over_pretrain_epoch<=0.8": [r["search_epoch_over_pretrain_epoch"],
                                                           r["search_epoch_over_pretrain_epoch"] <= 0.8]}
        if data:
            for path in ("per_image_loader", "batched_on_device"):
                x = round(data[path]["images_per_second"] / p, 2)
                entry[f"data_{path}_over_pretrain>=4"] = [x, x >= 4]
        targets[label] = entry
    return {"options": options, "ratios": ratios, "fastest_variant": best, "targets": targets}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18",
                        help="resnet18|resnet34|resnet50 (torchvision), timm/<model name>, or a transformers backbone "
                             "folder / Hub id (as --backbone of the commands).")
    parser.add_argument("--backbone_kwargs", type=json.loads, default=None,
                        help='JSON keyword arguments of timm.create_model, e.g. \'{"img_size": 32, "patch_size": 4}\'.')
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--framework", default="simsiam", choices=["simsiam", "simclr", "mocov2", "byol"])
    parser.add_argument("--preset", default=None,
                        help="Genotype preset of the pretraining step (default: the paper's for framework/backbone).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per measurement (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps before each measurement.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma list of step variants among {list(VARIANTS)}.")
    parser.add_argument("--optimizer_implementation", default="auto", choices=["auto", "fused", "foreach", "for_loop"])
    parser.add_argument("--compile", action="store_true",
                        help="Also measure the pretraining step with torch.compile'd backbone (slow to compile).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--data_batches", type=int, default=6,
                        help="Batches in the data measurement's pass (use >= 3x the worker count).")
    parser.add_argument("--data_workers", type=int, default=None,
                        help="DataLoader workers (default: data.default_num_workers, as the commands use).")
    parser.add_argument("--data_file", default=None, help="A parquet of real images instead of synthetic ones.")
    parser.add_argument("--knn_images", type=int, default=512, help="Memory = query size of the kNN measurement.")
    parser.add_argument("--eval_batch_size", type=int, default=256)
    parser.add_argument("--skip", default="", help="Comma list of parts to skip: data, steps, optimizer, knn.")
    parser.add_argument("--extrapolate", action="store_true",
                        help="Add 100-epoch CIFAR-10 search and 800-epoch CIFAR-10 pretraining times.")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.preset = args.preset or default_preset(args.framework, args.backbone)
    args.cifar_stem = args.image_size <= 64 if args.backbone in ("resnet18", "resnet34", "resnet50") else None
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "config": {
            "backbone": args.backbone, "backbone_kwargs": args.backbone_kwargs, "image_size": args.image_size,
            "batch_size": args.batch_size,
            "framework": args.framework, "preset": args.preset, "cifar_stem": args.cifar_stem, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or
            platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "repeats": args.repeats, "warmup": args.warmup, "optimizer_implementation": args.optimizer_implementation,
            "images_per_second_counts": "source images per second (each image gives two views)",
            "memory_method": Memory(torch.device(args.device)).method,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "data" not in args.skip:
            result["data"] = bench_data(args)
        if "steps" not in args.skip:
            result["steps"] = {v: bench_steps(args, v, Path(tmp)) for v in args.variants}
            if args.compile:
                best = max(result["steps"], key=lambda v: rate(result["steps"][v], "pretrain_step"))
                compiled = bench_steps(args, best, Path(tmp), compile_backbone=True)
                compiled["variant"] = best
                result["torch_compile"] = compiled
        if "optimizer" not in args.skip:
            log("optimizer step implementations")
            result["optimizer"] = bench_optimizers(args)
        if "knn" not in args.skip:
            log("kNN evaluation")
            precisions = ["no", "bf16"] if any(VARIANTS[v][0] == "bf16" for v in args.variants) else ["no"]
            result["knn"] = {p if p != "no" else "fp32": bench_knn(args, p) for p in precisions}
    if "steps" in result:
        result["summary"] = summarise(result)
        if args.data_batches and "data" in result:
            data = result["data"]
            result["summary"]["data_over_pretrain"] = {
                v: {path: round(data[path]["images_per_second"] / rate(s, "pretrain_step"), 2)
                    for path in ("per_image_loader", "batched_on_device")}
                for v, s in result["steps"].items()}
        if args.extrapolate:
            data = result.get("data", {})
            data_rates = {p: data[p]["images_per_second"] for p in ("per_image_loader", "batched_on_device")
                          if p in data}
            result["extrapolation"] = {v: extrapolate(s, data_rates) for v, s in result["steps"].items()
                                       if "alpha_step" in s}
    result["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
