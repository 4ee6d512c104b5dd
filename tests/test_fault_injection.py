"""Faults injected from outside: SIGKILL at seeded-random moments of a pretraining and of a search, each time resumed
with ``--resume_from_checkpoint latest``, ends bit-identical to an uninterrupted run; a model save (``save_pretrained``
into :func:`~nasiam_hf.fileio.staged_files`) killed at any of its filesystem operations leaves a folder that loads the
old model or the new one, or refuses in one line until the next start settles it.

The kill-during-save worker runs in a subprocess started from this file (``python tests/test_fault_injection.py``):
it builds the models once, then forks one child per kill point; the child counts its filesystem operations in the
folder (Python audit events: opens for writing, renames, links, removals) and SIGKILLs itself at the N-th one.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_cli, write_image_parquet

from nasiam_hf.errors import UsageError

WRITE_EVENTS = {"open", "os.rename", "os.link", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
                "os.chmod", "shutil.copyfile"}
SAVE_SCENARIOS = ("replace", "first")  # a save over an existing model, and the first save into an empty folder


# ---------------------------------------------------------------------------------------------------------------------
# The worker (runs in a subprocess)
# ---------------------------------------------------------------------------------------------------------------------
def _writes(event: str, args: tuple, folder: str) -> bool:
    if event not in WRITE_EVENTS:
        return False
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            return False
        args = (path,)
    return any(isinstance(a, (str, bytes, os.PathLike)) and os.fsdecode(a).startswith(folder) for a in args[:2])


def _save_and_die(model, folder: Path, kill_at: int) -> None:
    """In a forked child: save ``model`` into ``folder``, SIGKILLing this process at its ``kill_at``-th write (0:
    never); when it survives, lists the writes it made in ``folder.events.json``."""
    from nasiam_hf.fileio import staged_files

    events = []
    prefix = str(folder)

    def hook(event, args):
        if _writes(event, args, prefix):
            names = [os.path.basename(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            events.append(" ".join([event, *names]))
            if len(events) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    with staged_files(folder) as staged:
        model.save_pretrained(staged)
    Path(f"{folder}.events.json").write_text(json.dumps(events))


def save_worker(work: Path, scenario: str, points: int, seed: int) -> None:
    import torch

    from nasiam_hf import NASiamConfig, NASiamModel
    from nasiam_hf.fileio import staged_files
    from nasiam_hf.processing import image_processor_for_config

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    old = NASiamModel(NASiamConfig(image_size=8))
    new = NASiamModel(NASiamConfig(image_size=8, framework="byol"))
    pristine = work / "pristine"
    pristine.mkdir()
    (pristine / "run_args.json").write_text("{}")  # a file beside the model that no save may touch
    if scenario == "replace":
        with staged_files(pristine) as staged:
            old.save_pretrained(staged)
            image_processor_for_config(old.config).save_pretrained(staged)
            (staged / "README.md").write_text("the old card")
    torch.save({"old": old.state_dict(), "new": new.state_dict()}, work / "references.pt")

    def run(kill_at: int, folder: Path) -> int:
        shutil.copytree(pristine, folder, symlinks=True)
        pid = os.fork()
        if pid == 0:
            try:
                _save_and_die(new, folder, kill_at)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return status

    run(0, work / "dry-run")
    events = json.loads(Path(f"{work / 'dry-run'}.events.json").read_text())
    decided = next(i for i, e in enumerate(events, 1) if e.startswith("os.rename ") and e.endswith(" publish.json"))
    commit = next(i for i, e in enumerate(events, 1) if e == "os.rename config.json config.json")
    # seeded-random points, plus the writes on either side of the decision and of the commit point, and the last one
    chosen = set(random.Random(seed).sample(range(1, len(events) + 1), min(points, len(events))))
    chosen |= {decided - 1, decided, decided + 1, commit - 1, commit, commit + 1, len(events)}
    killed = {n: os.WIFSIGNALED(run(n, work / f"kill-{n:03d}")) for n in sorted(chosen)}
    (work / "report.json").write_text(json.dumps({"events": events, "decided": decided, "commit": commit,
                                                  "killed": killed}))


# ---------------------------------------------------------------------------------------------------------------------
# A model save killed between any two of its filesystem operations
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about 30-40 s each: one subprocess, some twenty forked saves of a ResNet-18 model
@pytest.mark.parametrize("scenario", SAVE_SCENARIOS)
def test_a_killed_save_always_leaves_a_folder_that_loads(tmp_path, scenario):
    """Each kill point leaves the old model, the new one, or a folder every reader refuses in one line; the next
    start (``finish_publish``) then rolls forward exactly the kills after publish.json was written, back the others;
    the files beside the model are never touched, and no entry is ever a link."""
    import torch

    from nasiam_hf import NASiamConfig, NASiamModel
    from nasiam_hf.fileio import finish_publish
    from nasiam_hf.folders import require_model

    result = run_cli([sys.executable, __file__, "save", str(tmp_path), scenario, "16", "5"],
                     env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    references = torch.load(tmp_path / "references.pt", weights_only=True)
    assert len(report["events"]) >= 20 and all(report["killed"].values()), report  # each child died at its point
    before = "old" if scenario == "replace" else "none"

    def model_in(folder: Path) -> str:
        """Which whole model ``folder`` loads ("none": refused in one line)."""
        try:
            weights = NASiamModel.from_pretrained(folder).state_dict()
        except OSError as refusal:
            assert "\n" not in str(refusal)
            with pytest.raises(UsageError):
                require_model(folder)
            return "none"
        framework = NASiamConfig.from_pretrained(folder).framework
        matches = [k for k, ref in references.items()
                   if ref.keys() == weights.keys() and all(torch.equal(ref[t], weights[t]) for t in ref)]
        assert matches and framework == {"old": "simsiam", "new": "byol"}[matches[0]], (folder, framework, matches)
        return matches[0]

    seen, settled = {}, {}
    for name in sorted(report["killed"], key=int):
        folder = tmp_path / f"kill-{int(name):03d}"
        assert (folder / "run_args.json").read_text() == "{}"
        seen[name] = model_in(folder)  # killed before its name-th write: the ones before it were done
        expected = before if int(name) <= report["decided"] else "none" if int(name) <= report["commit"] else "new"
        assert seen[name] == expected, (name, report["decided"], report["commit"])
        finish_publish(folder)  # the next start
        settled[name] = model_in(folder)
        assert settled[name] == (before if int(name) <= report["decided"] else "new"), (name, report["decided"])
        if scenario == "replace":
            assert (folder / "README.md").read_text() == "the old card"  # the new save writes no card: kept
        for root, dirs, files in os.walk(folder):
            assert not any(os.path.islink(os.path.join(root, n)) for n in dirs + files)
        assert not any(n.startswith(".") for n in os.listdir(folder)), os.listdir(folder)
    assert set(settled.values()) == {before, "new"}, settled  # the kill points fall on both sides of the decision
    assert set(seen.values()) == {before, "none", "new"}, seen


# ---------------------------------------------------------------------------------------------------------------------
# Training killed at seeded-random moments, resumed with --resume_from_checkpoint latest each time
# ---------------------------------------------------------------------------------------------------------------------
KILLS = 5
WALL_CLOCK_FIELDS = {"images_per_second"}


def newest_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def kill_points(seed: int, total_steps: int) -> list[tuple[int, float]]:
    """KILLS (step, delay) pairs: kill ``delay`` seconds after the checkpoint of ``step`` appears (step 0: after the
    run has built its model), strictly increasing steps, the last one at least two steps before the end."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(0, total_steps - 1), KILLS))
    return [(step, rng.uniform(0.0, 0.3)) for step in steps]


def run_with_kills(command: list[str], out: Path, points: list[tuple[int, float]], started: str) -> list[str]:
    """Start the command (always with --resume_from_checkpoint latest), SIGKILL it at each point, then let the last
    run finish. Returns what happened, for the failure message."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    done = []
    for attempt, (step, delay) in enumerate(points):
        start = newest_step(out)
        log = out.with_name(f"{out.name}.log{attempt}")
        with open(log, "w") as sink:
            proc = subprocess.Popen([*command, "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
                                    cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (newest_step(out) >= step) if step else (started in log.read_text()):
                break
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        output = log.read_text()
        assert proc.returncode == -signal.SIGKILL, f"run {attempt} ended before its kill: {output[-2000:]}"
        # a run resumes exactly when an earlier one left a checkpoint: it says so before it trains
        if start == 0 or newest_step(out) > start:
            assert ("resumed from" in output) == (start > 0), output[-2000:]
        done.append(f"killed {delay:.2f}s after step {step} (newest checkpoint then: {newest_step(out)})")
    final = run_cli([*command, "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
                    env={"OMP_NUM_THREADS": "1"})
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}" in final.stdout + final.stderr, done  # it did not start again
    return done


def without_wall_clock(value):
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_FIELDS}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def assert_same_run(straight: Path, killed: Path, history: str, final_step: int, log: list[str]) -> dict:
    import torch
    from safetensors.torch import load_file

    step = f"step-{final_step:08d}"
    a, b = load_file(straight / "checkpoints" / step / "model.safetensors"), \
        load_file(killed / "checkpoints" / step / "model.safetensors")
    assert a.keys() == b.keys(), log
    for key in a:
        assert torch.equal(a[key], b[key]), (key, log)
    for optimizer in sorted(p.name for p in (straight / "checkpoints" / step).glob("optimizer*.bin")):
        sa = torch.load(straight / "checkpoints" / step / optimizer, weights_only=True)
        sb = torch.load(killed / "checkpoints" / step / optimizer, weights_only=True)
        for index, buffers in sa["state"].items():
            assert all(torch.equal(v, sb["state"][index][k]) for k, v in buffers.items()), (optimizer, log)
    states = [json.loads((run / "checkpoints" / step / "trainer_state.json").read_text()) for run in (straight, killed)]
    assert without_wall_clock(states[0]) == without_wall_clock(states[1]), log
    histories = [json.loads((run / history).read_text()) for run in (straight, killed)]
    assert without_wall_clock(histories[0]) == without_wall_clock(histories[1]), log
    return a


@pytest.mark.slow  # about 2-3 minutes: 7 training processes
def test_pretraining_killed_five_times_ends_bit_identical(tmp_path):
    train = write_image_parquet(tmp_path / "train.parquet", 48, size=16, seed=3)
    command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", "--train_file", str(train), "--genotype",
               "mocov2-cifar10-resnet18", "--queue_size", "16", "--num_train_epochs", "2",
               "--per_device_train_batch_size", "8", "--image_size", "16", "--seed", "11", "--knn_every", "0",
               "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--dataloader_num_workers", "0"]
    straight = tmp_path / "straight"
    result = run_cli([*command, "--output_dir", str(straight)], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    log = run_with_kills(command, killed, kill_points(seed=2024, total_steps=12), started="pretrain:")
    weights = assert_same_run(straight, killed, "training_history.json", 12, log)
    assert any(k.startswith("momentum_") for k in weights) and "queue.keys" in weights and "queue.ptr" in weights
    from safetensors.torch import load_file

    final = [load_file(run / "model.safetensors") for run in (straight, killed)]
    assert final[0].keys() == final[1].keys() and all(final[0][k].equal(final[1][k]) for k in final[0])


@pytest.mark.slow  # about 2-3 minutes: 7 search processes
def test_search_killed_five_times_ends_bit_identical(tmp_path):
    train = write_image_parquet(tmp_path / "train.parquet", 64, size=16, seed=4)
    command = [sys.executable, "-m", "nasiam_hf.commands.search", "--train_file", str(train), "--framework", "byol",
               "--projector_layers", "2", "--predictor_layers", "2", "--num_train_epochs", "2",
               "--per_device_train_batch_size", "8", "--image_size", "16", "--seed", "5",
               "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--dataloader_num_workers", "0"]
    straight = tmp_path / "straight"
    result = run_cli([*command, "--output_dir", str(straight)], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    log = run_with_kills(command, killed, kill_points(seed=7, total_steps=8), started="search:")
    weights = assert_same_run(straight, killed, "search_history.json", 8, log)
    assert any(k.endswith("alphas") for k in weights) and any(k.startswith("momentum_") for k in weights)
    genotypes = [json.loads((run / "genotype.json").read_text()) for run in (straight, killed)]
    assert genotypes[0] == genotypes[1]


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "save":
        save_worker(Path(rest[0]), rest[1], int(rest[2]), int(rest[3]))
