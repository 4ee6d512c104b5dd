"""Exact resume for every framework on every data path (issue 20): {SimSiam, SimCLR, MoCo v2, BYOL} x {map-style,
streamed} x {resumed from a mid-epoch checkpoint without a kill, stopped by SIGTERM, killed by SIGKILL}, each resumed
run ending bit-identical to the uninterrupted one: weights, momentum encoder, MoCo queue, optimizer state, trainer
state (data position included) and history (wall-clock fields aside).

Every cell shares one uninterrupted reference run per framework and data path (in-process, made once): 16 images of
16 px, a tiny ConvNeXt backbone, updates of 2 micro-batches of 4 (accumulation, the MoCo queue written per
micro-batch, Shuffle-BN over 2 groups), 2 updates an epoch, 2 epochs, a checkpoint after every update. The resume
without a kill starts from the reference's checkpoint of update 1 (mid-epoch 0). The SIGTERM comes from the loop's
fault-injection hook (a real signal the process sends itself as update 3 starts, mid-epoch 1: that update is
finished and saved); the SIGKILL from outside, to a subprocess, once its first checkpoint exists (slow: one process
start per cell).
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, cli_env, write_image_parquet
from safetensors.torch import load_file
from test_fault_injection import assert_same_run, newest_step

from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command
from nasiam_hf.loop import FAULT_ENV

FRAMEWORKS = ("simsiam", "simclr", "mocov2", "byol")
PATHS = ("map", "streamed")
CELLS = [(framework, path) for framework in FRAMEWORKS for path in PATHS]
TOTAL = 4  # 2 epochs of 2 updates


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, convnext_folder):
    """The cells' command lines and their uninterrupted references (made on first use, then shared)."""
    folder = tmp_path_factory.mktemp("matrix")
    train = write_image_parquet(folder / "train.parquet", 16, size=16, seed=3)
    references = {}

    class Matrix:
        @staticmethod
        def flags(framework: str, path: str) -> list[str]:
            flags = ["--train_file", str(train), "--genotype", f"{framework}-baseline", "--backbone",
                     str(convnext_folder), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                     "--image_size", "16", "--seed", "11", "--knn_every", "0", "--num_train_epochs", "2",
                     "--checkpointing_steps", "1", "--checkpoints_total_limit", "10", "--dataloader_num_workers",
                     "0"]
            flags += ["--queue_size", "32"] if framework == "mocov2" else []
            return flags + (["--streaming"] if path == "streamed" else [])

        @staticmethod
        def reference(framework: str, path: str):
            if (framework, path) not in references:
                out = folder / f"straight-{framework}-{path}"
                train_in_process(Matrix.flags(framework, path), out)
                assert newest_step(out) == TOTAL
                references[framework, path] = out
            return references[framework, path]

        root = folder

    return Matrix


def train_in_process(flags: list[str], out, *extra, command=pretrain_command) -> int:
    """The command's ``main`` in this process, with one thread (as the subprocesses of the SIGKILL cells); returns its
    exit status (0 when it returns)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        command.main([*flags, "--output_dir", str(out), *extra])
        return 0
    except SystemExit as stop:
        return stop.code
    finally:
        torch.set_num_threads(previous)


def assert_resumed_exactly(reference, resumed, note: str) -> None:
    weights = assert_same_run(reference, resumed, "training_history.json", TOTAL, [note])
    final = [load_file(run / "model.safetensors") for run in (reference, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0]), note
    return weights


@pytest.mark.parametrize("framework,path", CELLS)
def test_resume_from_a_mid_epoch_checkpoint_without_a_kill(matrix, framework, path, capsys):
    reference = matrix.reference(framework, path)
    resumed = matrix.root / f"resumed-{framework}-{path}"
    checkpoint = reference / "checkpoints" / "step-00000001"  # epoch 0, 1 of its 2 updates
    assert train_in_process(matrix.flags(framework, path), resumed, "--resume_from_checkpoint", str(checkpoint)) == 0
    assert f"resumed from {checkpoint} (epoch 0, step 1)" in capsys.readouterr().out
    weights = assert_resumed_exactly(reference, resumed, f"{framework} {path}: resumed from step 1")
    if framework == "mocov2":
        assert "queue.keys" in weights and "queue.ptr" in weights
    if framework in ("mocov2", "byol"):
        assert any(k.startswith("momentum_") for k in weights)


@pytest.mark.slow  # two more runs per cell (the resume column above keeps every cell in the quick suite)
@pytest.mark.parametrize("framework,path", CELLS)
def test_sigterm_mid_epoch_then_resume(matrix, framework, path, monkeypatch, capsys):
    reference = matrix.reference(framework, path)
    stopped = matrix.root / f"sigterm-{framework}-{path}"
    monkeypatch.setenv(FAULT_ENV, "sigterm@3")  # update 3: the first of epoch 1
    # a checkpoint at 4 only: the stop saves update 3 (after a checkpoint at 2 it would end at once, losing nothing)
    every = ["--checkpointing_steps", "4"]
    assert train_in_process(matrix.flags(framework, path), stopped, *every) == 0
    printed = capsys.readouterr().out
    assert f"stop requested: checkpoint saved at {stopped / 'checkpoints' / 'step-00000003'}" in printed
    assert newest_step(stopped) == 3 and not (stopped / "model.safetensors").exists()
    monkeypatch.delenv(FAULT_ENV)
    assert train_in_process(matrix.flags(framework, path), stopped, *every, "--resume_from_checkpoint", "latest") == 0
    assert "(epoch 1, step 3)" in capsys.readouterr().out
    assert_resumed_exactly(reference, stopped, f"{framework} {path}: SIGTERM at update 3")


@pytest.mark.slow  # one training subprocess per cell (its start dominates): 10-30 s each here
@pytest.mark.parametrize("framework,path", CELLS)
def test_sigkill_mid_epoch_then_resume(matrix, framework, path, capsys):
    reference = matrix.reference(framework, path)
    killed = matrix.root / f"sigkill-{framework}-{path}"
    log = matrix.root / f"sigkill-{framework}-{path}.log"
    command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", *matrix.flags(framework, path), "--output_dir",
               str(killed)]
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env({"OMP_NUM_THREADS": "1"}), stdout=sink,
                                   stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while process.poll() is None and newest_step(killed) < 1 and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before its kill: {log.read_text()[-2000:]}"
    step = newest_step(killed)
    assert 1 <= step < TOTAL
    assert train_in_process(matrix.flags(framework, path), killed, "--resume_from_checkpoint", "latest") == 0
    assert re.search(rf"resumed from \S+step-{step:08d}", capsys.readouterr().out)
    assert_resumed_exactly(reference, killed, f"{framework} {path}: SIGKILL after step {step}")
    assert not [p for p in os.listdir(killed / "checkpoints") if p.startswith(".")]  # the killed save's leftovers


@pytest.mark.parametrize("path", [pytest.param("map", marks=pytest.mark.slow), "streamed"])
def test_a_search_resumed_mid_epoch_ends_bit_identical(matrix, convnext_folder, path, capsys):
    """The search too (MoCo v2: the queue, Shuffle-BN; the alpha step's validation half, which cycles on its own
    position, per process on a stream): resumed from a mid-epoch checkpoint, the same supernet, optimizers (weights
    and alphas), trainer state and history as the uninterrupted run."""
    train = matrix.root / "search.parquet"
    if not train.exists():
        write_image_parquet(train, 24, size=16, seed=4)
    flags = ["--train_file", str(train), "--framework", "mocov2", "--queue_size", "32",
             "--backbone", str(convnext_folder), "--projector_layers", "2", "--per_device_train_batch_size", "4",
             "--image_size", "16", "--seed", "5", "--num_train_epochs", "2", "--checkpointing_steps", "1",
             "--checkpoints_total_limit", "10", "--dataloader_num_workers", "0", "--hessian_every", "0"]
    flags += ["--streaming"] if path == "streamed" else []
    straight, resumed = matrix.root / f"search-{path}", matrix.root / f"search-resumed-{path}"
    assert train_in_process(flags, straight, command=search_command) == 0
    total = newest_step(straight)  # about 12 training images: 3 updates an epoch (a stream's halves are hashed)
    checkpoint = straight / "checkpoints" / "step-00000001"
    assert train_in_process(flags, resumed, "--resume_from_checkpoint", str(checkpoint), command=search_command) == 0
    assert f"resumed from {checkpoint} (epoch 0, step 1)" in capsys.readouterr().out  # mid-epoch
    weights = assert_same_run(straight, resumed, "search_history.json", total, [f"search {path}"])
    assert any(k.endswith("alphas") for k in weights) and "queue.keys" in weights
