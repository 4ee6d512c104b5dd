"""Streamed pretraining through the real command (issue 11): two processes over 4 equal parquet shards see disjoint
samples whose union is every key exactly once per epoch; with unequal shards every rank takes the minimum number of
steps; a run SIGKILLed mid-epoch and resumed with ``--resume_from_checkpoint latest`` ends bit-identical to an
uninterrupted one. Shards of images from the CIFAR-10 subset, trained at 8 px.

"Every key" when ranks hold different numbers of batches: each rank runs the steps every rank can take (the minimum
over the ranks of their full batches), so per epoch each key is seen at most once over all ranks, and the keys left
out are exactly those of the longer ranks' batches beyond that minimum (and, in any epoch, the rows after a lane's
last full batch); the next epoch deals the units to the ranks anew.
"""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import REPO_ROOT, accelerate_launch, cli_env, run_cli
from image_data import cifar_images, write_parquet_shards
from nasiam_hf.data import NORMALIZATION, build_transform, key_index, open_stream
from nasiam_hf.feeds import StreamFeed
from test_fault_injection import assert_same_run, newest_step

STREAMED = ["--streaming", "--image_size", "8", "--knn_every", "0", "--num_train_epochs", "2"]


def indices(keys: list[str]) -> list[int]:
    return sorted(key_index(k) for k in keys)


# ---------------------------------------------------------------------------------------------------------------------
# Ranks: disjoint, and complete per epoch
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about 40-60 s: a real 2-process accelerate launch (gloo), 2 epochs of 8 steps
def test_two_process_streamed_pretraining_sees_every_key_once_per_epoch(tmp_path):
    images, _ = cifar_images(64, seed=5)
    shards, keys = write_parquet_shards(tmp_path / "shards", images, [16] * 4, row_group_size=4)  # 16 units of 4
    out = tmp_path / "seen"
    flags = ["--train_file", str(shards), "--output_dir", str(tmp_path / "run"), "--genotype", "simclr-baseline",
             "--per_device_train_batch_size", "4", "--seed", "0", "--checkpointing_steps", "no",
             "--dataloader_num_workers", "0", *STREAMED]
    result = accelerate_launch("tests/stream_worker.py", out, "--", *flags, num_processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    ranks = [json.loads((out / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    expected = indices(keys)
    for epoch in ("0", "1"):
        seen = [r["seen"][epoch] for r in ranks]
        assert [r["updates"][epoch] for r in ranks] == [8, 8]  # 32 rows per rank, batches of 4
        assert [len(s) for s in seen] == [32, 32] and all(len(set(s)) == 32 for s in seen)
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == expected  # every key exactly once
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # each epoch has its own order
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_unequal_shards_every_rank_takes_the_minimum(tmp_path):
    """In process, the two ranks' real feeds side by side (a known length needs no communication)."""
    images, _ = cifar_images(60, seed=6)
    shards, keys = write_parquet_shards(tmp_path / "shards", images, [24, 16, 12, 8], row_group_size=4)  # 15 units
    stream = open_stream(train_file=str(shards))
    transform = build_transform("ssl", "cifar", 8, *NORMALIZATION["cifar10"])
    accelerator = Accelerator(cpu=True)

    def loader(rank):
        return stream.loader(4, transform=transform, seed=7, rank=rank, world_size=2)

    for epoch in (0, 1):
        full = []  # what each rank's loader holds in the epoch: together, every key once
        for rank in (0, 1):
            whole = loader(rank)
            whole.set_epoch(epoch)
            full.append([i for batch in whole for i in batch["index"].tolist()])
        assert sorted(full[0] + full[1]) == indices(keys) and sorted(len(f) for f in full) == [28, 32]
        feeds = [StreamFeed(loader(rank), accelerator) for rank in (0, 1)]
        assert [feed.updates_in_epoch(epoch) for feed in feeds] == [7, 7]  # the minimum of 8 and 7 batches
        seen = [[i for group in feed.groups(epoch) for batch in group for i in batch["index"].tolist()]
                for feed in feeds]
        assert seen == [f[:28] for f in full]  # each rank's first 7 batches, in its own order
        assert not set(seen[0]) & set(seen[1])
        longer = max((0, 1), key=lambda r: len(full[r]))
        assert set(indices(keys)) - set(seen[0]) - set(seen[1]) == set(full[longer][28:])  # its 8th batch only


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, resume, bit-identical end
# ---------------------------------------------------------------------------------------------------------------------
def kill_after_checkpoint(command: list[str], out, step: int) -> str:
    """Start ``command`` writing to ``out``, SIGKILL it as soon as the checkpoint of ``step`` exists, then resume it
    with ``--resume_from_checkpoint latest`` to the end; returns what the resumed run printed."""
    log = out.with_name(f"{out.name}.killed.log")
    with open(log, "w") as sink:
        process = subprocess.Popen([*command, "--output_dir", str(out)], cwd=REPO_ROOT, env=cli_env(), stdout=sink,
                                   stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while process.poll() is None and newest_step(out) < step and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before its kill: {log.read_text()[-2000:]}"
    resumed = run_cli([*command, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stdout + resumed.stderr


@pytest.mark.slow  # about 40-60 s each (more on a loaded machine): 3 training processes (straight, killed, resumed)
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_pretraining_killed_mid_epoch_ends_bit_identical(tmp_path, workers):
    images, _ = cifar_images(32, seed=8)
    shards, _ = write_parquet_shards(tmp_path / "shards", images, [8] * 4, row_group_size=4)  # 8 units of 4
    # one lane of 32 rows, or two lanes of 16: 4 batches of 8 an epoch either way, 8 steps in all
    command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", "--train_file", str(shards), *STREAMED,
               "--genotype", "byol-baseline", "--per_device_train_batch_size", "8", "--seed", "11",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
               "--dataloader_num_workers", str(workers)]
    straight = tmp_path / "straight"
    result = run_cli([*command, "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert newest_step(straight) == 8
    killed = tmp_path / "killed"
    log = kill_after_checkpoint(command, killed, step=2)
    assert re.search(r"resumed from \S+step-00000002 \(epoch 0, step 2\)", log), log[-2000:]  # mid-epoch
    state = json.loads((killed / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["data_position"]["train"][0]["lanes"] == max(1, workers)
    weights = assert_same_run(straight, killed, "training_history.json", 8, [log[-2000:]])
    assert any(k.startswith("momentum_") for k in weights)  # BYOL's momentum encoder is compared too
    final = [load_file(run / "model.safetensors") for run in (straight, killed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
