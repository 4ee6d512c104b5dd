"""One run per output folder (issue 20): a run holds a lock on its ``--output_dir`` for its whole life. A second
run into the folder is refused naming the holder, with or without ``--overwrite_output_dir``; the lock of a run
killed with SIGKILL never blocks; the lock files are neither pushed nor counted as another tool's files."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, accelerate_launch, cli_env
from nasiam_hf.checkpoints import decide_output_dir
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.errors import OutputDirError
from nasiam_hf.folders import RUN_HOLDER_FILE, RUN_LOCK_FILE
from nasiam_hf.hub import DEFAULT_IGNORE_PATTERNS
from nasiam_hf.run_lock import lock_output_dir, releases_output_dir

TINY = ["--genotype", "simclr-baseline", "--image_size", "8", "--per_device_train_batch_size", "8", "--seed", "0",
        "--knn_every", "0", "--dataloader_num_workers", "0"]
HOLDER = re.compile(r"is in use by nasiam-pretrain, pid (\d+) on host '[^']+', started \d{4}-\d\d-\d\d "
                    r"\d\d:\d\d:\d\d UTC")


def error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_the_lock_names_its_holder_and_leaves_the_path_as_it_found_it(tmp_path):
    out = tmp_path / "new" / "run"
    held = lock_output_dir(out, "nasiam-pretrain")
    holder = json.loads((out / RUN_HOLDER_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "nasiam-pretrain"
    with pytest.raises(OutputDirError, match=r"is in use by nasiam-pretrain, pid \d+ .*\(this Python process: an "
                                             r"earlier run in it has not released the folder\)"):
        lock_output_dir(out, "nasiam-search")
    # the guard sees a new folder (the lock files are not a run's files, nor another tool's)
    assert decide_output_dir(out, {"seed": 0}, mutable_keys=set()).action == "new"
    held.release()
    assert not (tmp_path / "new").exists()  # both folders were made for the lock: removed with it
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    lock_output_dir(tmp_path / "kept").release()
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]

    @releases_output_dir
    def failing_run():
        lock_output_dir(tmp_path / "failed")
        raise ValueError("bad data")

    with pytest.raises(ValueError):
        failing_run()
    assert not (tmp_path / "failed").exists()  # released on the error, the folder it made removed
    assert {RUN_LOCK_FILE, RUN_HOLDER_FILE} <= set(DEFAULT_IGNORE_PATTERNS)  # never pushed


def test_a_lock_file_left_by_a_killed_holder_never_blocks(tmp_path):
    """A holder killed with SIGKILL leaves both files; the next run takes the lock and rewrites the holder."""
    out = tmp_path / "run"
    ready, signal_ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, says so, waits to be killed
        try:
            lock_output_dir(out, "x")
            os.write(signal_ready, b"1")
            time.sleep(600)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        with pytest.raises(OutputDirError, match=rf"is in use by x, pid {pid} "):
            lock_output_dir(out)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready), os.close(signal_ready)
    assert (out / RUN_LOCK_FILE).exists() and (out / RUN_HOLDER_FILE).exists()  # left behind by the kill
    lock_output_dir(out, "nasiam-search").release()


def _start(tiny_parquet, out, *extra):
    train, _ = tiny_parquet
    command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", "--train_file", str(train), "--output_dir",
               str(out), *TINY, *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # about 20-30 s: two training processes started together, two in-process runs
def test_two_runs_into_one_folder_one_is_refused_naming_the_holder(tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    long_run = ["--num_train_epochs", "500", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"]
    runs = [_start(tiny_parquet, out, *long_run) for _ in range(2)]
    try:
        _wait_for(lambda: any(run.poll() is not None for run in runs))
        refused = next(run for run in runs if run.poll() is not None)
        winner = next(run for run in runs if run is not refused)
        text = refused.stdout.read()
        assert refused.returncode == 2, text[-3000:]
        line = error_line(text)
        assert HOLDER.search(line) and int(HOLDER.search(line).group(1)) == winner.pid, line
        assert "two runs must not write one folder" in line
        assert winner.poll() is None  # the first run goes on

        # the refusal's other way out, --overwrite_output_dir, is refused too while the run is going
        _wait_for(lambda: list(out.glob("checkpoints/step-*")))
        before = sorted(os.listdir(out))
        with pytest.raises(SystemExit) as info:
            pretrain_command.main(["--train_file", str(tiny_parquet[0]), "--output_dir", str(out), *TINY,
                                   "--overwrite_output_dir", "--learning_rate", "0.1"])
        line = error_line(capsys.readouterr().err)
        assert info.value.code == 2 and HOLDER.search(line) and int(HOLDER.search(line).group(1)) == winner.pid
        assert "--overwrite_output_dir cannot replace a run that is still going" in line
        assert sorted(os.listdir(out)) == before and winner.poll() is None  # nothing deleted, the run goes on
    finally:
        for run in runs:
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
            run.wait(timeout=60)
            run.stdout.close()

    # the lock of the killed run does not block: the run resumes there and ends
    assert (out / RUN_LOCK_FILE).exists()
    step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoints/step-*"))
    pretrain_command.main(["--train_file", str(tiny_parquet[0]), "--output_dir", str(out), *TINY, *long_run,
                           "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 1)])
    assert "resumed from" in capsys.readouterr().out and (out / "model.safetensors").exists()
    assert not (out / RUN_LOCK_FILE).exists() and not (out / RUN_HOLDER_FILE).exists()  # released at its end


@pytest.mark.slow  # about 20-30 s: a two-process accelerate launch
def test_every_rank_of_a_two_process_run_refuses_a_held_folder(tiny_parquet, tmp_path):
    out = tmp_path / "run"
    held = lock_output_dir(out, "nasiam-search")
    try:
        result = accelerate_launch("training/pretrain.py", "--train_file", tiny_parquet[0],
                                   "--output_dir", out, *TINY, "--num_train_epochs", "1", num_processes=2)
    finally:
        held.release()
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(lines) == 2, result.stderr[-3000:]  # each rank, the same line
    assert lines[0] == lines[1] and f"is in use by nasiam-search, pid {os.getpid()} " in lines[0]
    assert not out.exists()
