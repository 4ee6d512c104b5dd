"""Does searching pay? Searched heads against the framework's standard heads, on the same data, seeds and budget.

For every seed: search (plain first-order DARTS, and each robust variant asked for), pretrain the derived genotype,
and pretrain the framework's standard heads (``<framework>-baseline``) with the same seed (so the same data order and
views), data, epochs, batch and learning rate; then evaluate every pretrained backbone the same way (kNN k 200 /
T 0.2 and a linear probe on cached features, on the test split). Each stage runs the real command as a subprocess
(``python -m nasiam_hf.commands.search | pretrain | linear_eval``, the code behind the console scripts).

The CPU protocol (the default) spends this 2-core machine's time on epochs and seeds rather than on a backbone it
cannot train: SimCLR on the shared 10k/2k CIFAR-10 subset, a timm ResNet-18 with the ImageNet stem on the 32-px
images (residual BatchNorms at 1), 20 search epochs and 20 pretraining epochs at batch 128, bf16, channels_last and
views drawn on the device, 3 seeds, the baseline against plain DARTS. Why this backbone (pilot,
``benchmarks/throughput.py --variants bf16+channels_last --batch_size 128 --framework simclr --preset
simclr-baseline``, synthetic batches, images/s of the pretraining / search weight / alpha step):

    ResNet-18, CIFAR stem, 32 px (the paper's)        73 /  86 /  328
    ResNet-18, CIFAR stem, 16 px                     174 / 157 /  686
    timm ResNet-18, ImageNet stem, 32 px             307 / 283 /  934   <- chosen
    timm ResNet-18 at half width, ImageNet stem      823 / 660 / 1646

The ImageNet stem keeps the architecture, its 512-wide features (so the paper's head widths) and the 32-px images of
the data, at 4x the paper backbone's speed; 16-px images lose most of what CIFAR-10 shows, and a half-width trunk
changes the features the heads are searched on. 20 + 20 epochs for 3 seeds and two arms fit in about 2.5 hours.

The decision rule is fixed before any search runs: the baseline arm runs first, for every seed (the pilot), and
its seed spread s gives the smallest paired difference the protocol can resolve, t(0.975, n-1) x sqrt(2) x s /
sqrt(n) (two arms that differ only by chance differ by sqrt(2) s per seed; pairing by seed can only help). It is
written to ``decision_rule.json`` with its time before the first search starts. The verdict per metric: searching
pays when the 95 % interval of the mean paired difference (searched minus baseline, same seed) lies above 0, hurts
when it lies below, and is unresolved otherwise. A two-sided sign test is reported beside it (with 3 seeds its
smallest p-value is 0.25: it cannot decide alone).

``--full`` is the GPU protocol (the full 50k CIFAR-10 training split, the paper's ResNet-18 with the CIFAR stem and
zero-initialised residual BatchNorms, 3 seeds, 50 search and 200 pretraining epochs at batch 512, beta-DARTS too).
``--smoke`` checks the plumbing in a few minutes (256 training images at 16 px; its numbers mean nothing).

    python benchmarks/search_value.py --output_dir runs/search_value > search_value.json
    python benchmarks/search_value.py --smoke --output_dir /tmp/search_value_smoke

JSON (stdout, and ``search_value.json`` in the output folder; ``search_value.md`` holds the table): ``protocol``,
``runs`` (one record per arm and seed: genotype with per-layer confidence, kNN and probe top-1, wall time per stage),
``summary`` (per arm: mean and spread over seeds; per search arm: the paired differences with standard error, 95 %
interval, sign test and verdict), ``decision_rule`` and ``knn_standard_error`` (of one kNN figure on the test set,
sqrt(p (1 - p) / n)). A stage whose output is already complete is reused with ``--resume``.
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
METRICS = ("knn_top1", "linear_top1")
CPU_BACKBONE = ("timm/resnet18", '{"zero_init_last": false}')
SPEED_FLAGS = ("--channels_last", "--augmentation_device", "accelerator")


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
    learning_rate: float | None
    probe_epochs: int
    mixed_precision: str
    backbone: str | None = None
    backbone_kwargs: str | None = None
    image_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    hessian_every: int = 0
    zero_init_residual: bool | None = None  # torchvision ResNets only
    speed_flags: tuple[str, ...] = SPEED_FLAGS
    extra_search_flags: tuple[str, ...] = ()


@dataclass
class RunRecord:
    arm: str
    seed: int
    genotype: dict | str | None = None
    confidence: dict | None = None
    knn_top1: float | None = None
    linear_top1: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    if args.full:
        defaults = dict(train_file=SHARED / "cifar10-full" / "train.parquet", seeds=(0, 1, 2),
                        arms=("baseline", "darts", "beta-darts"), search_epochs=50, pretrain_epochs=200,
                        batch_size=512, probe_epochs=100, backbone="resnet18", zero_init_residual=True)
    elif args.smoke:
        defaults = dict(seeds=(0,), arms=("baseline", "darts"), search_epochs=1, pretrain_epochs=1, batch_size=32,
                        probe_epochs=2, image_size=16, max_train_samples=256, max_eval_samples=128,
                        backbone=CPU_BACKBONE[0], backbone_kwargs=CPU_BACKBONE[1])
    else:
        defaults = dict(seeds=(0, 1, 2), arms=("baseline", "darts"), search_epochs=20, pretrain_epochs=20,
                        batch_size=128, probe_epochs=100, backbone=CPU_BACKBONE[0], backbone_kwargs=CPU_BACKBONE[1])
    given = {key: getattr(args, key) for key in ("seeds", "arms", "search_epochs", "pretrain_epochs", "batch_size",
                                                 "probe_epochs", "train_file", "test_file", "backbone",
                                                 "backbone_kwargs")
             if getattr(args, key) is not None}
    if args.zero_init_residual is not None:
        given["zero_init_residual"] = args.zero_init_residual == "yes"
    values = {"train_file": SHARED / "cifar10" / "train.parquet", "test_file": SHARED / "cifar10" / "test.parquet",
              **defaults, **given}
    if "backbone" in given and "backbone_kwargs" not in given and values["backbone"] != defaults.get("backbone"):
        values["backbone_kwargs"] = None  # the default kwargs belong to the default backbone
    if values.get("backbone", "").startswith("timm/"):
        if values.get("zero_init_residual") is not None:
            raise ValueError("--zero_init_residual applies to the torchvision ResNets; for a timm ResNet pass "
                             "--backbone_kwargs '{\"zero_init_last\": true}'")
    elif values.get("zero_init_residual") is None:
        values["zero_init_residual"] = True
    if values["arms"][0] != "baseline":
        raise ValueError(f"--arms must start with 'baseline' (it sets the decision rule), got {values['arms']}")
    for arm in values["arms"][1:]:
        if arm not in ROBUST_FLAGS:
            raise ValueError(f"unknown arm {arm!r}; choose from baseline, {', '.join(ROBUST_FLAGS)}")
    for key in ("train_file", "test_file"):
        if not Path(values[key]).is_file():
            raise ValueError(f"--{key} {str(values[key])!r} is not a file")
    return Protocol(train_file=str(values["train_file"]), test_file=str(values["test_file"]),
                    framework=args.framework, seeds=tuple(values["seeds"]), arms=tuple(values["arms"]),
                    search_epochs=values["search_epochs"], pretrain_epochs=values["pretrain_epochs"],
                    batch_size=values["batch_size"], learning_rate=args.learning_rate,
                    probe_epochs=values["probe_epochs"], mixed_precision=args.mixed_precision,
                    backbone=values.get("backbone"), backbone_kwargs=values.get("backbone_kwargs"),
                    image_size=values.get("image_size"), max_train_samples=values.get("max_train_samples"),
                    max_eval_samples=values.get("max_eval_samples"), hessian_every=args.hessian_every,
                    zero_init_residual=values.get("zero_init_residual"),
                    speed_flags=() if args.no_speed_flags else SPEED_FLAGS,
                    extra_search_flags=tuple(args.extra_search_flags))


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
    """The flags every search and pretraining of ``seed`` gets, so the arms differ only in their heads. The learning
    rate is the recipe's unless ``--base_learning_rate`` was given."""
    flags = ["--seed", str(seed), "--per_device_train_batch_size", str(p.batch_size),
             "--mixed_precision", p.mixed_precision, "--checkpointing_steps", "no", *p.speed_flags]
    if p.learning_rate is not None:
        flags += ["--base_learning_rate", str(p.learning_rate)]
    if p.backbone is not None:
        flags += ["--backbone", p.backbone]
    if p.backbone_kwargs is not None:
        flags += ["--backbone_kwargs", p.backbone_kwargs]
    if p.zero_init_residual is False:
        flags.append("--no_zero_init_residual")
    return flags


def search_confidence(search_dir: Path) -> dict:
    """Per searched layer, the package's own confidence record (:func:`nasiam_hf.confidence.genotype_confidence`)
    from the last epoch's op weights and the genotype the search chose."""
    from nasiam_hf.confidence import genotype_confidence

    history = json.loads((search_dir / "search_history.json").read_text())
    genotype = json.loads((search_dir / "genotype.json").read_text())
    return genotype_confidence(history["epochs"][-1]["op_weights"], history["ops"], genotype=genotype)


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
                         "--hessian_every", str(p.hessian_every), *ROBUST_FLAGS[arm], *p.extra_search_flags]
                record.seconds["search"] = run_stage(f"{arm} search", "nasiam_hf.commands.search", flags,
                                                     folder / "search.log")
            genotype = str(search_dir)
            record.genotype = json.loads((search_dir / "genotype.json").read_text())
            record.confidence = search_confidence(search_dir)
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


def t_quantile(n: int) -> float:
    """t(0.975, n - 1), the two-sided 95 % quantile for a mean of n values."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def decision_rule(p: Protocol, records: list[RunRecord]) -> dict:
    """The smallest paired difference the protocol resolves, from the baseline arm's seed spread (the pilot)."""
    rule = {"fixed_at_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "seeds": len(p.seeds),
            "formula": "t(0.975, n-1) * sqrt(2) * s_baseline / sqrt(n)"}
    for metric in METRICS:
        values = [getattr(r, metric) for r in records if r.arm == "baseline" and r.error is None]
        if len(values) < 2:
            rule[metric] = {"resolvable_points": None, "why": "fewer than 2 baseline seeds"}
            continue
        s = statistics.stdev(values)
        rule[metric] = {"baseline_seed_std": round(s, 3),
                        "resolvable_points": round(t_quantile(len(values)) * math.sqrt(2) * s / math.sqrt(len(values)),
                                                   2)}
    rule["verdict"] = ("pays: 95 % interval of the mean paired difference above 0; hurts: below 0; otherwise "
                       "unresolved. Linear probe first, kNN beside it; sign test reported, not decisive with 3 seeds.")
    return rule


def paired(differences: list[float]) -> dict:
    """Mean paired difference with its standard error, 95 % t interval, two-sided sign test and verdict."""
    from scipy import stats

    n = len(differences)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(differences)
    out = {"n": n, "per_seed": [round(d, 2) for d in differences], "mean": round(mean, 2)}
    if n > 1:
        se = statistics.stdev(differences) / math.sqrt(n)
        half = t_quantile(n) * se
        out.update(standard_error=round(se, 2), ci95=[round(mean - half, 2), round(mean + half, 2)],
                   verdict="pays" if mean - half > 0 else "hurts" if mean + half < 0 else "unresolved")
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    out["sign_test"] = {"wins": wins, "losses": losses, "ties": n - wins - losses,
                        "p_two_sided": round(float(stats.binomtest(wins, wins + losses).pvalue), 3)
                        if wins + losses else None}
    return out


def summarise(p: Protocol, records: list[RunRecord]) -> dict:
    summary = {}
    for arm in p.arms:
        done = [r for r in records if r.arm == arm and r.error is None]
        summary[arm] = {metric: spread([getattr(r, metric) for r in done]) for metric in METRICS}
    baseline = {r.seed: r for r in records if r.arm == "baseline" and r.error is None}
    for arm in p.arms[1:]:
        pairs = [(r, baseline[r.seed]) for r in records if r.arm == arm and r.error is None and r.seed in baseline]
        summary[arm]["minus_baseline"] = {metric: paired([getattr(r, metric) - getattr(b, metric) for r, b in pairs])
                                          for metric in METRICS}
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


def table(p: Protocol, summary: dict, error: dict, rule: dict) -> str:
    def cell(s):
        if not s.get("n"):
            return "–"
        return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s.get("std") is not None else "")

    def diff(s):
        if not s.get("n"):
            return "–"
        if "ci95" not in s:
            return f"{s['mean']:+.2f} (n=1)"
        sign = s["sign_test"]
        return (f"{s['mean']:+.2f} ± {s['standard_error']:.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] "
                f"{sign['wins']}/{s['n']} up, p {sign['p_two_sided']}: **{s['verdict']}**")

    resolvable = ", ".join(f"{m.split('_')[0]} {rule[m]['resolvable_points']} points" for m in METRICS
                           if rule.get(m, {}).get("resolvable_points") is not None)
    lines = [f"{p.framework}, {p.backbone or 'resnet18'}, {len(p.seeds)} seed(s), search {p.search_epochs} epoch(s), "
             f"pretraining {p.pretrain_epochs} epoch(s) at batch {p.batch_size}; one kNN figure has a standard error "
             f"of {error['points']} points ({error['test_images']} test images); resolvable paired difference "
             f"(fixed from the baseline seeds before the searches): {resolvable or 'not known'}", "",
             "| arm | kNN top-1 (%) | linear top-1 (%) | kNN minus baseline (mean ± SE [95 % CI], sign test) "
             "| linear minus baseline (mean ± SE [95 % CI], sign test) |", "|---|---|---|---|---|"]
    for arm in p.arms:
        delta = summary[arm].get("minus_baseline", {})
        lines.append(f"| {arm} | {cell(summary[arm]['knn_top1'])} | {cell(summary[arm]['linear_top1'])} | "
                     f"{diff(delta.get('knn_top1', {}))} | {diff(delta.get('linear_top1', {}))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/search_value", help="Where every stage writes its folder.")
    parser.add_argument("--train_file", default=None, help="Default: ../shared/data/cifar10/train.parquet.")
    parser.add_argument("--test_file", default=None, help="Default: ../shared/data/cifar10/test.parquet.")
    parser.add_argument("--framework", default="simclr",
                        choices=("simsiam", "simclr", "mocov2", "byol", "barlowtwins", "vicreg"),
                        help="The framework whose heads are searched.")
    parser.add_argument("--arms", nargs="+", default=None,
                        help=f"'baseline' first, then search variants among {', '.join(ROBUST_FLAGS)}.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Shared by every arm.")
    parser.add_argument("--search_epochs", type=int, default=None, help="Epochs of each search.")
    parser.add_argument("--pretrain_epochs", type=int, default=None, help="Epochs of each pretraining.")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-device batch of every stage.")
    parser.add_argument("--backbone", default=None, help="--backbone of every stage (default: see the protocol).")
    parser.add_argument("--backbone_kwargs", default=None, help="--backbone_kwargs of every stage (JSON).")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="Base rate per 256 images for every stage (default: the recipe's).")
    parser.add_argument("--probe_epochs", type=int, default=None, help="Epochs of the linear probe.")
    parser.add_argument("--mixed_precision", default="bf16", choices=("no", "bf16", "fp16"),
                        help="Precision of every search and pretraining.")
    parser.add_argument("--no_speed_flags", action="store_true",
                        help="Leave out --channels_last and --augmentation_device accelerator.")
    parser.add_argument("--hessian_every", type=int, default=0, help="Passed to every search (0: off).")
    parser.add_argument("--zero_init_residual", choices=("yes", "no"), default=None,
                        help="torchvision ResNets: zero the last BatchNorm of every residual block, as the reference "
                             "recipes do (default yes).")
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
    root.mkdir(parents=True, exist_ok=True)
    started, records, rule = time.perf_counter(), [], None
    rule_file = root / "decision_rule.json"
    for arm in p.arms:  # the baseline (the pilot) for every seed first: it fixes the decision rule
        if arm != "baseline" and rule is None:
            rule = json.loads(rule_file.read_text()) if rule_file.is_file() else decision_rule(p, records)
            rule_file.write_text(json.dumps(rule, indent=2))
            print(f"[search_value] decision rule: {json.dumps(rule)}", file=sys.stderr, flush=True)
        for seed in p.seeds:
            print(f"[search_value] {arm}, seed {seed}", file=sys.stderr, flush=True)
            records.append(run_arm(p, arm, seed, root, args.resume))
            print(json.dumps(asdict(records[-1])), file=sys.stderr, flush=True)
    if rule is None:
        rule = json.loads(rule_file.read_text()) if rule_file.is_file() else decision_rule(p, records)
    summary = summarise(p, records)
    error = knn_standard_error(p, records)
    report = {"protocol": asdict(p), "runs": [asdict(r) for r in records], "summary": summary,
              "decision_rule": rule, "knn_standard_error": error,
              "wall_minutes": round((time.perf_counter() - started) / 60, 1)}
    (root / "search_value.json").write_text(json.dumps(report, indent=2))
    (root / "search_value.md").write_text(table(p, summary, error, rule) + "\n")
    print(table(p, summary, error, rule), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
