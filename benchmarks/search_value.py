"""Does searching pay? Searched heads against the framework's standard heads, on the same data and budget.

For every seed: search (plain first-order DARTS, and each robust variant asked for), pretrain the derived genotype,
and pretrain the framework's standard heads (``<framework>-baseline``) with the same seed, data, epochs, batch and
learning rate; then evaluate every pretrained backbone the same way (kNN k 200 / T 0.2 and a linear probe on cached
features, on the test split). Each stage runs the real command as a subprocess (``python -m
nasiam_hf.commands.search | pretrain | linear_eval``, the code behind ``nasiam-search``, ``nasiam-pretrain``,
``nasiam-linear-eval``). The summary gives the mean and spread over seeds of every arm and the standard error of one
kNN figure on the test set (a binomial proportion: sqrt(p (1 - p) / n), about 1.1 points at p 0.4 and n 2000), so a
difference can be read against the noise of a single evaluation.

Default CPU protocol (about 90 minutes on 2 cores): the shared 10k CIFAR-10 subset (2k test images), SimCLR,
ResNet-18 with the CIFAR stem, the baseline vs plain DARTS vs DARTS-, seeds 0 and 1, 1 search epoch and 2
pretraining epochs at batch 128 in bf16, a 100-epoch probe on cached features, and ``--no_zero_init_residual``
(with the residual BatchNorms zeroed as the reference recipes have them, the baseline's kNN after 2 epochs was
32.45 %, near its random-initialisation level, against 38.95 % with them at 1). ``--full`` is the GPU protocol
(the full 50k CIFAR-10 training split, 3 seeds, 50 search and 200 pretraining epochs at batch 512, beta-DARTS too,
zero-init).
``--smoke`` checks the plumbing in a few minutes (256 training images at 16 px; its numbers mean nothing).

    python benchmarks/search_value.py --output_dir runs/search_value > search_value.json
    python benchmarks/search_value.py --smoke --output_dir /tmp/search_value_smoke

JSON (stdout, and ``search_value.json`` in the output folder; ``search_value.md`` holds the table): ``protocol``,
``runs`` (one record per arm and seed: genotype, kNN and probe top-1, wall time per stage), ``summary`` (per arm:
mean, standard deviation and range of both figures over the seeds; the search variants' differences to the baseline)
and ``knn_standard_error``. A stage whose output is already complete is reused with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ROBUST_FLAGS = {
    "darts": [],
    "darts-minus": ["--search_method", "darts-minus"],
    "beta-darts": ["--search_method", "beta-darts"],
    "darts-pt": ["--discretization", "perturbation"],
}


@dataclass(frozen=True)
class Protocol:
    train_file: str
    test_file: str
    framework: str
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    search_epochs: int
    pretrain_epochs: int
    batch_size: int
    learning_rate: float
    probe_epochs: int
    mixed_precision: str
    image_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    hessian_every: int = 0
    zero_init_residual: bool = True
    extra_search_flags: tuple[str, ...] = ()


@dataclass
class RunRecord:
    arm: str
    seed: int
    genotype: dict | str | None = None
    knn_top1: float | None = None
    linear_top1: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    if args.full:
        defaults = dict(train_file=SHARED / "cifar10-full" / "train.parquet", seeds=(0, 1, 2),
                        arms=("baseline", "darts", "darts-minus", "beta-darts"), search_epochs=50,
                        pretrain_epochs=200, batch_size=512, probe_epochs=100, zero_init_residual=True)
    elif args.smoke:
        defaults = dict(seeds=(0,), arms=("baseline", "darts", "darts-minus"), search_epochs=1, pretrain_epochs=1,
                        batch_size=32, probe_epochs=2, image_size=16, max_train_samples=256, max_eval_samples=128,
                        zero_init_residual=False)
    else:
        defaults = dict(seeds=(0, 1), arms=("baseline", "darts", "darts-minus"), search_epochs=1, pretrain_epochs=2,
                        batch_size=128, probe_epochs=100, zero_init_residual=False)
    given = {key: getattr(args, key) for key in ("seeds", "arms", "search_epochs", "pretrain_epochs", "batch_size",
                                                 "probe_epochs", "train_file", "test_file")
             if getattr(args, key) is not None}
    if args.zero_init_residual is not None:
        given["zero_init_residual"] = args.zero_init_residual == "yes"
    values = {"train_file": SHARED / "cifar10" / "train.parquet", "test_file": SHARED / "cifar10" / "test.parquet",
              **defaults, **given}
    for arm in values["arms"]:
        if arm != "baseline" and arm not in ROBUST_FLAGS:
            raise ValueError(f"unknown arm {arm!r}; choose from baseline, {', '.join(ROBUST_FLAGS)}")
    for key in ("train_file", "test_file"):
        if not Path(values[key]).is_file():
            raise ValueError(f"--{key} {str(values[key])!r} is not a file")
    return Protocol(train_file=str(values["train_file"]), test_file=str(values["test_file"]),
                    framework=args.framework, seeds=tuple(values["seeds"]), arms=tuple(values["arms"]),
                    search_epochs=values["search_epochs"], pretrain_epochs=values["pretrain_epochs"],
                    batch_size=values["batch_size"], learning_rate=args.learning_rate,
                    probe_epochs=values["probe_epochs"], mixed_precision=args.mixed_precision,
                    image_size=values.get("image_size"), max_train_samples=values.get("max_train_samples"),
                    max_eval_samples=values.get("max_eval_samples"), hessian_every=args.hessian_every,
                    zero_init_residual=values["zero_init_residual"], extra_search_flags=tuple(args.extra_search_flags))


def data_flags(p: Protocol, with_eval: bool) -> list[str]:
    flags = ["--train_file", p.train_file]
    if with_eval:
        flags += ["--validation_file", p.test_file]
    for key in ("image_size", "max_train_samples") + (("max_eval_samples",) if with_eval else ()):
        value = getattr(p, key)
        if value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def run_stage(name: str, module: str, flags: list[str], log: Path) -> float:
    """Run one command; its output goes to ``log``. Returns the wall time; a failure raises with the log's tail."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-m", module, *flags], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        tail = log.read_text()[-800:]
        raise RuntimeError(f"{name} failed (exit {result.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - started


def common_flags(p: Protocol, seed: int) -> list[str]:
    """The flags every search and pretraining of ``seed`` gets, so the arms differ only in their heads."""
    return ["--seed", str(seed), "--per_device_train_batch_size", str(p.batch_size),
            "--learning_rate", str(p.learning_rate), "--mixed_precision", p.mixed_precision,
            "--checkpointing_steps", "no", *([] if p.zero_init_residual else ["--no_zero_init_residual"])]


def run_arm(p: Protocol, arm: str, seed: int, root: Path, resume: bool) -> RunRecord:
    record = RunRecord(arm=arm, seed=seed)
    folder = root / f"{arm}-seed{seed}"
    common = common_flags(p, seed)
    try:
        genotype = f"{p.framework}-baseline"
        if arm != "baseline":
            search_dir = folder / "search"
            if not (resume and (search_dir / "config.json").is_file()):
                flags = [*data_flags(p, with_eval=False), "--framework", p.framework, "--output_dir", str(search_dir),
                         "--overwrite_output_dir", "--num_train_epochs", str(p.search_epochs), *common,
                         *ROBUST_FLAGS[arm], *p.extra_search_flags]
                if p.hessian_every:
                    flags += ["--hessian_every", str(p.hessian_every)]
                record.seconds["search"] = run_stage(f"{arm} search", "nasiam_hf.commands.search", flags,
                                                     folder / "search.log")
            genotype = str(search_dir)
            record.genotype = json.loads((search_dir / "genotype.json").read_text())
        else:
            record.genotype = genotype
        model_dir = folder / "pretrain"
        if not (resume and (model_dir / "model.safetensors").is_file()):
            flags = [*data_flags(p, with_eval=True), "--genotype", genotype, "--output_dir", str(model_dir),
                     "--overwrite_output_dir", "--num_train_epochs", str(p.pretrain_epochs),
                     "--knn_every", str(p.pretrain_epochs), *common]
            record.seconds["pretrain"] = run_stage(f"{arm} pretraining", "nasiam_hf.commands.pretrain", flags,
                                                   folder / "pretrain.log")
        results_file = model_dir / "eval_results.json"
        if not (resume and results_file.is_file() and "linear_probe" in json.loads(results_file.read_text())):
            flags = ["--model_name_or_path", str(model_dir), *data_flags(p, with_eval=True), "--no_augmentation",
                     "--num_train_epochs", str(p.probe_epochs), "--seed", str(seed)]
            record.seconds["linear_eval"] = run_stage(f"{arm} evaluation", "nasiam_hf.commands.linear_eval", flags,
                                                      folder / "linear_eval.log")
        results = json.loads(results_file.read_text())
        record.knn_top1 = results["knn"]["top1"]
        record.linear_top1 = results["linear_probe"]["top1"]
    except (RuntimeError, OSError, KeyError, json.JSONDecodeError) as error:
        record.error = str(error)
    return record


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else None,
            "min": round(min(values), 2), "max": round(max(values), 2), "n": len(values)}


def summarise(p: Protocol, records: list[RunRecord]) -> dict:
    summary = {}
    for arm in p.arms:
        done = [r for r in records if r.arm == arm and r.error is None]
        summary[arm] = {"knn_top1": spread([r.knn_top1 for r in done]),
                        "linear_top1": spread([r.linear_top1 for r in done])}
    baseline = {r.seed: r for r in records if r.arm == "baseline" and r.error is None}
    for arm in p.arms:
        if arm == "baseline" or not baseline:
            continue
        paired = [(r, baseline[r.seed]) for r in records if r.arm == arm and r.error is None and r.seed in baseline]
        summary[arm]["minus_baseline"] = {
            "knn_top1": spread([r.knn_top1 - b.knn_top1 for r, b in paired]),
            "linear_top1": spread([r.linear_top1 - b.linear_top1 for r, b in paired]),
        }
    return summary


def knn_standard_error(p: Protocol, records: list[RunRecord]) -> dict:
    """sqrt(p (1 - p) / n) of one kNN top-1 on the n test images, at the mean accuracy measured (points)."""
    import pyarrow.parquet as pq

    n = pq.ParquetFile(p.test_file).metadata.num_rows
    if p.max_eval_samples is not None:
        n = min(n, p.max_eval_samples)
    measured = [r.knn_top1 for r in records if r.error is None]
    accuracy = statistics.fmean(measured) / 100 if measured else 0.4
    return {"test_images": n, "at_accuracy": round(100 * accuracy, 2),
            "points": round(100 * math.sqrt(accuracy * (1 - accuracy) / n), 2)}


def table(p: Protocol, summary: dict, error: dict) -> str:
    def cell(s):
        if not s.get("n"):
            return "–"
        return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s.get("std") is not None else "") + f" (n={s['n']})"

    lines = [f"{p.framework}, {len(p.seeds)} seed(s), search {p.search_epochs} epoch(s), pretraining "
             f"{p.pretrain_epochs} epoch(s) at batch {p.batch_size}; one kNN figure has a standard error of "
             f"{error['points']} points ({error['test_images']} test images)", "",
             "| arm | kNN top-1 (%) | linear top-1 (%) | kNN minus baseline | linear minus baseline |",
             "|---|---|---|---|---|"]
    for arm in p.arms:
        delta = summary[arm].get("minus_baseline", {})
        lines.append(f"| {arm} | {cell(summary[arm]['knn_top1'])} | {cell(summary[arm]['linear_top1'])} | "
                     f"{cell(delta.get('knn_top1', {}))} | {cell(delta.get('linear_top1', {}))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/search_value")
    parser.add_argument("--train_file", default=None, help="Default: ../shared/data/cifar10/train.parquet.")
    parser.add_argument("--test_file", default=None, help="Default: ../shared/data/cifar10/test.parquet.")
    parser.add_argument("--framework", default="simclr", choices=("simsiam", "simclr", "mocov2", "byol"))
    parser.add_argument("--arms", nargs="+", default=None,
                        help=f"'baseline' and search variants among {', '.join(ROBUST_FLAGS)}.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--search_epochs", type=int, default=None)
    parser.add_argument("--pretrain_epochs", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=0.06, help="Base rate per 256 images, every stage.")
    parser.add_argument("--probe_epochs", type=int, default=None)
    parser.add_argument("--mixed_precision", default="bf16", choices=("no", "bf16", "fp16"))
    parser.add_argument("--hessian_every", type=int, default=0, help="Passed to every search (0: off).")
    parser.add_argument("--zero_init_residual", choices=("yes", "no"), default=None,
                        help="Zero the last BatchNorm of every residual block, as the reference recipes do (default: "
                             "yes with --full; no otherwise: zeroed, the 2-epoch CPU baseline's kNN does not move).")
    parser.add_argument("--extra_search_flags", nargs=argparse.REMAINDER, default=[],
                        help="Further nasiam-search flags (last on the line).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="The GPU protocol.")
    mode.add_argument("--smoke", action="store_true", help="Plumbing check in minutes; the numbers mean nothing.")
    parser.add_argument("--resume", action="store_true", help="Reuse stages whose outputs are complete.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        p = protocol_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    root = Path(args.output_dir)
    started, records = time.perf_counter(), []
    for seed in p.seeds:
        for arm in p.arms:
            print(f"[search_value] {arm}, seed {seed}", file=sys.stderr, flush=True)
            records.append(run_arm(p, arm, seed, root, args.resume))
            print(json.dumps(asdict(records[-1])), file=sys.stderr, flush=True)
    summary = summarise(p, records)
    error = knn_standard_error(p, records)
    report = {"protocol": asdict(p), "runs": [asdict(r) for r in records], "summary": summary,
              "knn_standard_error": error, "wall_minutes": round((time.perf_counter() - started) / 60, 1)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "search_value.json").write_text(json.dumps(report, indent=2))
    (root / "search_value.md").write_text(table(p, summary, error) + "\n")
    print(table(p, summary, error), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
