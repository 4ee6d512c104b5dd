#!/usr/bin/env python
"""One lent GPU session, one command, one JSON: does searching pay at GPU scale?

GPU time comes as one 15-minute allowance per task (the machine's start included), so everything is one command that
stops itself before ``--budget_seconds`` (default 500 s, under 9 minutes) and prints ONE JSON object:

1. the throughput check, a short ``throughput.py`` pass (ResNet-18 with the CIFAR stem, 32 px, bf16 + channels_last);
2. a head search (first-order DARTS) on the full CIFAR-10 training split (50,000 images);
3. the searched heads and the framework's standard heads (``<framework>-baseline``) pretrained with the same seed,
   data order, epochs and batch, one after the other;
4. kNN (k 200, T 0.2) on the 2,000-image test subset for both, and the paired difference with its standard error.

Every stage is the real command in a subprocess, with the recipe's learning rate (no learning-rate flag), bf16,
channels_last and views drawn on the GPU. No GPU figure of this package exists yet, so the epochs are planned in the
run: one count E for the search and each pretraining such that three commands' fixed costs and E search epochs plus
2 E pretraining epochs, at ``PLAN_EFFICIENCY`` of the throughput check's step rates, fit the time left; after the
search, its epoch-end times give the real seconds per epoch and a command's fixed cost, and the pretraining epochs
are planned again (the same for both arms). Without throughput figures the plan uses ``GPU_FALLBACK_RATES``, a low
guess for an H100 (about 100x the README's 2-core CPU figures). A stage still running at the deadline is stopped with
its workers and marked ``timed_out``; the JSON then says what finished. ``--search_epochs`` / ``--pretrain_epochs``
fix the epochs instead. benchmarks/README.md gives the device command, the data and wheels to carry, and what one
session's paired difference can and cannot resolve.

    python3 benchmarks/gpu_session.py --output_dir /tmp/gpu_session > gpu_session.json   # one GPU, < 9 minutes
    python3 benchmarks/gpu_session.py --cpu-smoke --output_dir /tmp/gpu_smoke             # toy sizes on the CPU

Data: ``--train_file`` / ``--test_file``, by default ``.gpu-data/{train,test}.parquet`` of the checkout (ignored by
git, carried to the GPU machine), else ``../shared/data/cifar10-full/train.parquet`` and
``../shared/data/cifar10/test.parquet``. Wheels: when a distribution of ``gpu-wheels.txt`` is missing, the list is
installed from ``--wheels`` (default: the checkout's ``.whl``) into ``<output_dir>/site``, first on the commands' path.

JSON: ``mode``, ``environment`` (versions, device, carried wheels, unmet requirements), ``throughput`` (images/s per
step, data paths, kNN features, extrapolated paper-length hours), ``plan`` (source, rates, epochs, calibration
``after_search``), ``stages`` (status ``ok`` / ``failed`` / ``timed_out`` / ``skipped`` / ``interrupted``, seconds, log, error),
``search`` (genotype, per-layer confidence), ``arms`` (genotype, epochs, kNN top-1 and its standard error, final loss,
collapse std, images/s), ``paired_knn`` (searched minus baseline, standard error, z), ``seconds``, ``complete``; also
in ``<output_dir>/gpu_session.json``, and ``--logs_archive`` packs logs, histories and the JSON into one .tar.gz.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # its helpers beside it, also when it is imported from elsewhere

from gpu_wheels import install_wheels, probe  # noqa: E402

REPO = BENCHMARKS.parent
SHARED = REPO.parent / "shared" / "data"
CARRIED_DATA = REPO / ".gpu-data"
VARIANT = "bf16+channels_last"
TRAIN_PORTION = 0.5  # the search's weight half; the alpha steps see the other half
PLAN_EFFICIENCY = 0.6  # real epochs (data loading, epoch ends) run at about this share of the synthetic step rates
STAGE_OVERHEAD_SECONDS = 30.0  # one training command's fixed cost on the GPU machine: imports, data, model, save
REPLAN_MARGIN = 0.9  # share of the time left that the pretrainings are planned to fill, once calibrated
RESERVE_SECONDS = 10.0  # kept back at the end for the summary and the archive
KNN_QUERY_FALLBACK = 2000


@dataclass(frozen=True)
class Rates:
    """Images/s of the synthetic steps (``throughput.py``, bf16 + channels_last) and of kNN feature extraction."""

    pretrain: float
    search_weight: float
    alpha: float
    knn_features: float

    def search_epoch(self, images: int) -> float:
        """Seconds of one search epoch over ``images``: weight steps over one half, alpha steps over the other."""
        return images * TRAIN_PORTION / self.search_weight + images * (1 - TRAIN_PORTION) / self.alpha

    def pretrain_epoch(self, images: int) -> float:
        return images / self.pretrain


GPU_FALLBACK_RATES = Rates(pretrain=5000.0, search_weight=4000.0, alpha=12000.0, knn_features=20000.0)
CPU_FALLBACK_RATES = Rates(pretrain=54.0, search_weight=51.4, alpha=144.6, knn_features=376.0)  # README, 2 cores


@dataclass(frozen=True)
class Session:
    """The settings of one session (``--cpu-smoke`` changes the sizes, never the stages)."""

    smoke: bool
    train_file: str
    test_file: str
    output_dir: str
    framework: str
    seed: int
    batch_size: int
    eval_batch_size: int
    image_size: int
    workers: int | None
    max_train_samples: int | None
    max_eval_samples: int | None
    budget_seconds: float
    search_epochs: int | None  # None: planned from the throughput check
    pretrain_epochs: int | None
    max_epochs: int
    wheels: str
    logs_archive: str | None


@dataclass
class StageResult:
    name: str
    status: str = "skipped"  # ok / failed / timed_out / skipped / interrupted
    seconds: float = 0.0
    log: str | None = None
    error: str | None = None
    epoch_ends: list[float] = field(default_factory=list)  # seconds from the stage's start to each epoch's end
    epochs_done: int = 0  # in its history file when it ended (an epoch ending just before the exit may be untimed)


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


def plan_epochs(seconds: float, overhead: float, search_epoch: float, pretrain_epoch: float, cap: int,
                efficiency: float = PLAN_EFFICIENCY) -> int:
    """The one epoch count E of the search and of each of the two pretrainings that fits ``seconds``: three commands'
    fixed costs plus E search epochs and 2 E pretraining epochs at ``efficiency`` of the synthetic rates; 1 to cap."""
    compute = (seconds - 3 * overhead) * efficiency
    return max(1, min(cap, math.floor(compute / (search_epoch + 2 * pretrain_epoch))))


def calibrate(search: StageResult, synthetic_epoch: float) -> dict | None:
    """Seconds per search epoch, the fixed cost of a command, and the efficiency (synthetic over real epoch time,
    at most 1), from the search's epoch-end times; None with fewer than two epochs (the two cannot be told apart)."""
    ends = search.epoch_ends
    if len(ends) < 2:
        return None
    per_epoch = max((ends[-1] - ends[0]) / (len(ends) - 1), 1e-3)
    epochs = max(search.epochs_done, len(ends))
    return {"search_seconds_per_epoch": round(per_epoch, 2),
            "command_overhead_seconds": round(max(search.seconds - epochs * per_epoch, 0.0), 1),
            "efficiency": round(min(synthetic_epoch / per_epoch, 1.0), 3), "epochs_timed": len(ends)}


def replan_pretrain_epochs(seconds: float, overhead: float, pretrain_epoch: float, cap: int,
                           margin: float = REPLAN_MARGIN) -> int:
    """Epochs of each of the two pretrainings (the same for both arms) that fit ``margin`` of ``seconds`` after two
    commands' fixed costs; 1 to cap."""
    return max(1, min(cap, math.floor((seconds - 2 * overhead) * margin / (2 * pretrain_epoch))))


def rates_from_throughput(result: dict) -> Rates:
    steps = result["steps"][VARIANT]
    knn = result.get("knn", {}).get("bf16", {}).get("extract_features", {})
    return Rates(pretrain=steps["pretrain_step"]["images_per_second"],
                 search_weight=steps["search_weight_step"]["images_per_second"],
                 alpha=steps["alpha_step"]["images_per_second"],
                 knn_features=knn.get("images_per_second") or GPU_FALLBACK_RATES.knn_features)


# ---------------------------------------------------------------------------------------------------------------------
# kNN figures
# ---------------------------------------------------------------------------------------------------------------------


def knn_standard_error(top1: float, queries: int) -> float:
    """Test-sampling standard error of one kNN top-1 (points): sqrt(p (1 - p) / n)."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / queries)


def paired_knn(baseline: float, searched: float, queries: int) -> dict:
    """Searched minus baseline, with the standard error of the difference of the two figures (independent errors:
    an upper bound for two models scored on the same test images; seed-to-seed spread not included)."""
    difference = searched - baseline
    error = math.hypot(knn_standard_error(baseline, queries), knn_standard_error(searched, queries))
    return {"searched_minus_baseline": round(difference, 2), "standard_error": round(error, 2),
            "z": round(difference / error, 2) if error > 0 else None, "test_images": queries,
            "error_covers": "test sampling of both figures, treated as independent; not the seed-to-seed spread "
                            "(one seed)"}


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


def history_epochs(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run_stage(result: StageResult, argv: list[str], log: Path, env: dict, deadline: float,
              history: Path | None = None) -> StageResult:
    """Run one command until it ends or ``deadline`` (time.monotonic) passes; then stop its whole process group.
    With ``history``, the time each new epoch appears in that file is recorded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result.log = str(log)
    started = time.monotonic()
    print(f"[gpu_session] {result.name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True, preexec_fn=die_with_parent)
        try:
            while process.poll() is None:
                if time.monotonic() >= deadline:
                    stop_group(process)
                    result.status = "timed_out"
                    break
                if history is not None and history_epochs(history) > len(result.epoch_ends):
                    result.epoch_ends.append(round(time.monotonic() - started, 2))
                time.sleep(0.25)
        except BaseException:  # the session itself is being stopped: take the command and its workers along
            stop_group(process)
            result.status, result.error = "interrupted", "the session was stopped while this stage ran"
            result.seconds = round(time.monotonic() - started, 1)
            raise
    result.seconds = round(time.monotonic() - started, 1)
    result.epochs_done = history_epochs(history) if history is not None else 0
    if result.status != "timed_out":
        result.status = "ok" if process.returncode == 0 else "failed"
    if result.status != "ok":
        tail = log.read_text(errors="replace")[-1500:]
        result.error = (f"stopped at the deadline after {result.seconds} s" if result.status == "timed_out"
                        else f"exit {process.returncode}") + f"; end of {log.name}:\n{tail}"
    print(f"[gpu_session] {result.name}: {result.status} in {result.seconds} s", file=sys.stderr, flush=True)
    return result


class Interrupted(Exception):
    """SIGTERM reached the session (a wall-clock limit around it): the JSON is still written."""


def on_sigterm(signum, frame):
    raise Interrupted(f"stopped by signal {signum}")


def die_with_parent() -> None:
    """In a stage's process before it runs: SIGTERM when the session's process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the command and its workers, SIGKILL 5 s later if they are still there."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env(session: Session) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if session.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def parquet_rows(path: str, limit: int | None) -> int | None:
    try:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception:  # reported as unknown; the planner then assumes the full split
        return None
    return min(rows, limit) if limit is not None else rows


# ---------------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------------


def throughput_argv(s: Session, output: Path) -> list[str]:
    common = ["--backbone", "resnet18", "--image_size", str(s.image_size), "--framework", s.framework,
              "--variants", VARIANT, "--skip", "optimizer", "--extrapolate", "--output", str(output)]
    if s.smoke:
        sizes = ["--device", "cpu", "--batch_size", "4", "--repeats", "1", "--warmup", "0", "--data_batches", "1",
                 "--data_workers", "0", "--knn_images", "8", "--eval_batch_size", "4"]
    else:
        sizes = ["--device", "cuda", "--batch_size", str(s.batch_size), "--repeats", "5", "--warmup", "2",
                 "--data_batches", "8", "--data_workers", str(s.workers or 0), "--knn_images", "8192",
                 "--eval_batch_size", str(s.eval_batch_size)]
    return [sys.executable, str(BENCHMARKS / "throughput.py"), *common, *sizes]


def training_flags(s: Session, epochs: int, output: Path) -> list[str]:
    """What the search and both pretrainings share: data, seed, batch, epochs, precision and speed flags. The
    learning rate is the recipe's; the residual BatchNorms start at 1, as in the CPU protocol: zeroed (the reference's
    800-epoch choice) they hold a short run back (docs/design-notes.md, "Zero-init residual in short runs")."""
    flags = ["--train_file", s.train_file, "--image_size", str(s.image_size), "--seed", str(s.seed),
             "--per_device_train_batch_size", str(s.batch_size), "--num_train_epochs", str(epochs),
             "--mixed_precision", "bf16", "--channels_last", "--augmentation_device", "accelerator",
             "--checkpointing_steps", "no", "--logging_steps", "50", "--output_dir", str(output),
             "--overwrite_output_dir", "--no_zero_init_residual"]
    if s.workers is not None:
        flags += ["--dataloader_num_workers", str(s.workers)]
    if s.max_train_samples is not None:
        flags += ["--max_train_samples", str(s.max_train_samples)]
    return flags


def search_argv(s: Session, epochs: int, output: Path) -> list[str]:
    return [sys.executable, "-m", "nasiam_hf.commands.search", *training_flags(s, epochs, output),
            "--framework", s.framework, "--hessian_every", "0"]


def pretrain_argv(s: Session, genotype: str, epochs: int, output: Path) -> list[str]:
    flags = [*training_flags(s, epochs, output), "--genotype", genotype, "--validation_file", s.test_file,
             "--knn_every", str(epochs), "--per_device_eval_batch_size", str(s.eval_batch_size)]
    if s.max_eval_samples is not None:
        flags += ["--max_eval_samples", str(s.max_eval_samples)]
    return [sys.executable, "-m", "nasiam_hf.commands.pretrain", *flags]


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def throughput_record(result: dict) -> dict:
    steps = result["steps"][VARIANT]
    data = result.get("data", {})
    return {"device": result["config"]["device_name"], "batch_size": result["config"]["batch_size"],
            "images_per_second": {part: steps[part]["images_per_second"]
                                  for part in ("pretrain_step", "search_weight_step", "alpha_step")},
            "pretrain_peak_memory_mb": steps["pretrain_step"]["peak_memory_mb"],
            "data_images_per_second": {path: data[path]["images_per_second"]
                                       for path in ("per_image_loader", "batched_on_device") if path in data},
            "knn_feature_images_per_second": result.get("knn", {}).get("bf16", {}).get("extract_features", {})
            .get("images_per_second"),
            "extrapolated_hours": {key: value for key, value in result.get("extrapolation", {}).get(VARIANT, {}).items()
                                   if key.endswith("_hours")}}


def search_record(folder: Path) -> dict:
    from search_value import search_confidence  # one definition of the per-layer confidence

    history = json.loads((folder / "search_history.json").read_text())
    return {"genotype": json.loads((folder / "genotype.json").read_text()), "confidence": search_confidence(folder),
            "epochs_done": len(history["epochs"])}


def arm_record(folder: Path, genotype: str, epochs: int, queries: int | None) -> dict:
    record = {"genotype": genotype, "epochs_planned": epochs}
    try:
        history = json.loads((folder / "training_history.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return record
    knn = [e["knn_top1"] for e in history if e.get("knn_top1") is not None]
    record.update(epochs_done=len(history), final_loss=history[-1]["loss"] if history else None,
                  collapse_std=history[-1]["collapse_std"] if history else None,
                  images_per_second=round(sorted(e["images_per_second"] for e in history)[len(history) // 2], 1)
                  if history else None, knn_top1=knn[-1] if knn else None)
    if knn and queries:
        record["knn_standard_error"] = round(knn_standard_error(knn[-1], queries), 2)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------------------------------


MIN_STAGE_SECONDS = 20.0  # a training command started with less than this left is skipped
THROUGHPUT_SECONDS = 90.0  # the throughput check's share on the GPU


def run_session(s: Session, out: Path, deadline: float, report: dict, stages: dict[str, StageResult]) -> None:
    env = child_env(s)
    environment = report["environment"] = install_wheels(s.wheels, Path(s.output_dir) / "site", env)
    environment.update(probe(env, timeout=deadline - time.monotonic()))
    problems = [environment[key] for key in ("install_error", "import_error") if key in environment]
    if not s.smoke and environment.get("cuda_available") is False:
        report["error"] = "no CUDA device visible: run on a GPU machine, or pass --cpu-smoke to check the script"
        return
    train_images = parquet_rows(s.train_file, s.max_train_samples) or 50_000
    queries = parquet_rows(s.test_file, s.max_eval_samples) or KNN_QUERY_FALLBACK
    fallback = CPU_FALLBACK_RATES if s.smoke else GPU_FALLBACK_RATES

    def left() -> float:
        return deadline - time.monotonic()

    # 1. throughput check
    throughput_file = out / "throughput.json"
    throughput = stages["throughput"] = StageResult("throughput")
    run_stage(throughput, throughput_argv(s, throughput_file), out / "logs" / "throughput.log", env,
              deadline if s.smoke else min(deadline, time.monotonic() + THROUGHPUT_SECONDS))
    rates, source = fallback, "fallback estimate (the throughput check gave no figures)"
    if throughput.status == "ok":
        try:
            result = json.loads(throughput_file.read_text())
            report["throughput"] = throughput_record(result)
            rates, source = rates_from_throughput(result), "throughput check"
        except (OSError, ValueError, KeyError) as error:
            throughput.error = f"its JSON could not be read: {error}"
    if problems:  # the throughput figures are still worth the session; the training commands cannot run
        report["error"] = "; ".join(problems)
        return

    # 2. the plan: one epoch count for the search and each pretraining
    planned = plan_epochs(left(), STAGE_OVERHEAD_SECONDS, rates.search_epoch(train_images),
                          rates.pretrain_epoch(train_images), s.max_epochs)
    search_epochs = s.search_epochs or planned
    pretrain_epochs = s.pretrain_epochs or planned
    plan = report["plan"] = {
        "from": "flags" if s.search_epochs and s.pretrain_epochs else source, "rates": asdict(rates),
        "train_images": train_images, "test_images": queries, "seconds_left": round(left(), 1),
        "assumed_command_overhead_seconds": STAGE_OVERHEAD_SECONDS, "efficiency": PLAN_EFFICIENCY,
        "search_epochs": search_epochs, "pretrain_epochs": pretrain_epochs}

    # 3. the search, its epoch ends timed
    search_dir = out / "search"
    search = stages["search"] = StageResult("search")
    if left() >= MIN_STAGE_SECONDS:
        run_stage(search, search_argv(s, search_epochs, search_dir), out / "logs" / "search.log", env, deadline,
                  history=search_dir / "search_history.json")
    else:
        search.error = f"{left():.0f} s left"
    if search.status == "ok":
        report["search"] = search_record(search_dir)
        calibration = plan["after_search"] = calibrate(search, rates.search_epoch(train_images))
        if calibration is not None and s.pretrain_epochs is None:
            knn_seconds = (train_images + queries) / rates.knn_features
            overhead = calibration["command_overhead_seconds"] + knn_seconds
            pretrain_epochs = plan["pretrain_epochs"] = replan_pretrain_epochs(
                left(), overhead, rates.pretrain_epoch(train_images) / calibration["efficiency"], s.max_epochs)

    # 4. both arms, same seed, data order, epochs and batch
    arms = report["arms"] = {}
    for arm, genotype in (("baseline", f"{s.framework}-baseline"), ("searched", str(search_dir))):
        stage = stages[f"pretrain_{arm}"] = StageResult(f"pretrain_{arm}")
        if arm == "searched" and search.status != "ok":
            stage.error = f"the search is {search.status}"
        elif left() < MIN_STAGE_SECONDS:
            stage.error = f"{left():.0f} s left"
        else:
            run_stage(stage, pretrain_argv(s, genotype, pretrain_epochs, out / arm), out / "logs" / f"{arm}.log",
                      env, deadline, history=out / arm / "training_history.json")
        arms[arm] = {"status": stage.status, **arm_record(out / arm, genotype, pretrain_epochs, queries)}

    # 5. the paired kNN difference
    figures = [arms[arm].get("knn_top1") for arm in ("baseline", "searched")]
    if all(arms[arm]["status"] == "ok" for arm in arms) and None not in figures:
        report["paired_knn"] = paired_knn(*figures, queries)
        report["complete"] = all(stage.status == "ok" for stage in stages.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", "--cpu_smoke", dest="smoke", action="store_true",
                        help="Every stage at toy sizes on the CPU (16 px, 128 training and 32 test images, batch 32, "
                             "1 epoch): checks the script; its numbers mean nothing.")
    parser.add_argument("--output_dir", default="runs/gpu_session", help="Where every stage writes its folder.")
    parser.add_argument("--train_file", default=None,
                        help="Training parquet (default .gpu-data/train.parquet, else "
                             "../shared/data/cifar10-full/train.parquet).")
    parser.add_argument("--test_file", default=None,
                        help="Labelled test parquet for kNN (default .gpu-data/test.parquet, else "
                             "../shared/data/cifar10/test.parquet).")
    parser.add_argument("--framework", default="simclr",
                        help="The framework whose heads are searched (any nasiam-search takes) and whose standard "
                             "heads (<framework>-baseline) are the baseline.")
    parser.add_argument("--seed", type=int, default=0, help="Shared by the search and both pretrainings.")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-device batch (default 512; smoke 32).")
    parser.add_argument("--budget_seconds", type=float, default=None,
                        help="Wall time of the whole session, from its start (default 500; smoke 1800).")
    parser.add_argument("--search_epochs", type=int, default=None, help="Fix the search epochs (default: planned).")
    parser.add_argument("--pretrain_epochs", type=int, default=None,
                        help="Fix the epochs of each pretraining (default: planned).")
    parser.add_argument("--max_epochs", type=int, default=None,
                        help="Upper bound of a planned epoch count (default 200; smoke 1).")
    parser.add_argument("--wheels", default=None,
                        help="Folder of the carried wheels (default: .whl of the checkout; see gpu-wheels.txt).")
    parser.add_argument("--logs_archive", default=None,
                        help="Also pack the logs, histories and the JSON into this .tar.gz (e.g. $OUT/logs.tar.gz).")
    return parser.parse_args(argv)


def first_file(given: str | None, *candidates: Path) -> str:
    if given is not None:
        return given
    return str(next((path for path in candidates if path.is_file()), candidates[0]))


def session_from_args(args: argparse.Namespace) -> Session:
    smoke = args.smoke
    train = first_file(args.train_file, CARRIED_DATA / "train.parquet", SHARED / "cifar10-full" / "train.parquet")
    test = first_file(args.test_file, CARRIED_DATA / "test.parquet", SHARED / "cifar10" / "test.parquet")
    for flag, path in (("--train_file", train), ("--test_file", test)):
        if not Path(path).is_file():
            raise SystemExit(f"error: {flag} {path} is not a file (on the GPU machine, copy the data into .gpu-data/ "
                             "and carry it: see this script's --help)")
    for flag in ("search_epochs", "pretrain_epochs", "max_epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    return Session(smoke=smoke, train_file=train, test_file=test, output_dir=args.output_dir,
                   framework=args.framework, seed=args.seed,
                   batch_size=args.batch_size or (32 if smoke else 512), eval_batch_size=64 if smoke else 1024,
                   image_size=16 if smoke else 32, workers=0 if smoke else 8,
                   max_train_samples=128 if smoke else None, max_eval_samples=32 if smoke else None,
                   budget_seconds=args.budget_seconds or (1800.0 if smoke else 500.0),
                   search_epochs=args.search_epochs, pretrain_epochs=args.pretrain_epochs,
                   max_epochs=args.max_epochs or (1 if smoke else 200), wheels=args.wheels or str(REPO / ".whl"),
                   logs_archive=args.logs_archive)


def archive(out: Path, target: str) -> None:
    """The logs, histories, genotype and the session JSON (small files only) in one .tar.gz."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if (path.is_file() and path.suffix in (".log", ".json") and "site" not in path.relative_to(out).parts
                    and path.stat().st_size < 4 * 2**20):
                tar.add(path, arcname=str(path.relative_to(out)))


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    s = session_from_args(parse_args(argv))
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    deadline = started + s.budget_seconds - RESERVE_SECONDS
    report: dict = {"mode": "cpu-smoke" if s.smoke else "gpu", "settings": asdict(s), "complete": False}
    stages: dict[str, StageResult] = {}
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run_session(s, out, deadline, report, stages)
    except Interrupted as error:
        report["error"] = str(error)
    except Exception as error:  # a bug of this script: the JSON still says what ran
        import traceback

        report["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}"
    finally:
        report["stages"] = {name: asdict(stage) for name, stage in stages.items()}
        report["seconds"] = {**{name: stage.seconds for name, stage in stages.items()},
                             "total": round(time.monotonic() - started, 1)}
        text = json.dumps(report, indent=2)
        (out / "gpu_session.json.tmp").write_text(text + "\n")
        os.replace(out / "gpu_session.json.tmp", out / "gpu_session.json")
        if s.logs_archive:
            archive(out, s.logs_archive)
        print(text, flush=True)
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
