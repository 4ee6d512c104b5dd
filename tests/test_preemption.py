"""A pretraining process killed mid-epoch resumes from its last checkpoint to exactly the uninterrupted result."""

import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, cli_env, run_cli


def test_killed_pretraining_resumes_to_the_same_weights(tiny_parquet, tmp_path):
    train, _ = tiny_parquet
    command = [sys.executable, "training/pretrain.py", "--train_file", str(train), "--genotype",
               "mocov2-cifar10-resnet18", "--queue_size", "16", "--num_train_epochs", "2",
               "--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "7", "--knn_every", "0",
               "--checkpointing_steps", "1", "--checkpoints_total_limit", "3"]
    straight = tmp_path / "straight"
    result = run_cli([*command, "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--output_dir", str(killed)], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-00000003"  # mid-way through the first of two 6-step epochs
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()

    result = run_cli([*command, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    # the final checkpoints hold everything: online and momentum encoders, queue and its pointer
    a = load_file(straight / "checkpoints" / "step-00000012" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-00000012" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("momentum_") for k in a) and "queue.keys" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    final_a, final_b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
