"""The training loop always ends (issue 20, loop half): one decision per update that all processes take together.

* a configuration that can never make an update is refused before training, naming the flags;
* an epoch that ends without an update (a stream that gave too little) stops the run with one line;
* a non-finite loss stops the run before the update is applied, on one process and on two (where only one process
  saw it: both stop within seconds, one line);
* SIGTERM stops a run that has made no update yet (nothing to save, or its first update saved), and one that has.

Faults come from the loop's fault-injection hook (``NASIAM_INJECT_FAULT``: a real SIGTERM the process sends itself
as update N starts, a loss made non-finite at update N on one process) or from outside (a SIGTERM to a subprocess).
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
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_ROOT, accelerate_launch, cli_env
from PIL import Image

from nasiam_hf import NASiamConfig, NASiamForPreTraining
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command
from nasiam_hf.errors import NonFiniteLossError
from nasiam_hf.loop import FAULT_ENV, UpdateGuard
from nasiam_hf.optimization import build_sgd, weight_step

TINY = ["--image_size", "16", "--seed", "0", "--knn_every", "0", "--dataloader_num_workers", "0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def pretrain(train, out, backbone, *extra, genotype="simclr-baseline"):
    pretrain_command.main(["--train_file", str(train), "--output_dir", str(out), "--genotype", genotype,
                           "--backbone", str(backbone), *TINY, *extra])


def exit_code(run, *args, **kwargs) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run(*args, **kwargs)
    return exit_info.value.code


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines of a command's stderr (library progress bars aside), checking it ends with one."""
    lines = text.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and lines[-1] == errors[-1], lines[-5:]
    return errors


def checkpoint_steps(out) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------------------------------------------------------------
# Runs that could never make an update
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [["--num_train_epochs", "2"], ["--max_train_steps", "5"]])
def test_an_accumulation_longer_than_an_epoch_is_refused_before_training(tiny_parquet, convnext_folder, tmp_path,
                                                                         capsys, length):
    train, _ = tiny_parquet  # 48 images: 6 micro-batches of 8 per epoch
    out = tmp_path / "run"
    code = exit_code(pretrain, train, out, convnext_folder, "--per_device_train_batch_size", "8",
                     "--gradient_accumulation_steps", "10", *length)
    assert code == 2
    error = error_lines(capsys.readouterr().err)
    assert len(error) == 1, error
    assert "6 micro-batches" in error[0] and "48 images" in error[0] and "--gradient_accumulation_steps 10" in error[0]
    assert "--per_device_train_batch_size 8" in error[0]
    assert not (out / "training_history.json").exists() and not (out / "checkpoints").exists()


def test_the_search_refuses_an_accumulation_longer_than_its_training_half(tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet  # 24 training images: 3 micro-batches of 8
    code = exit_code(search_command.main, ["--train_file", str(train), "--output_dir", str(tmp_path / "search"),
                                           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4",
                                           "--image_size", "8", "--num_train_epochs", "1", "--projector_layers", "2",
                                           "--predictor_layers", "2"])
    assert code == 2
    error = error_lines(capsys.readouterr().err)[0]
    assert "3 micro-batches" in error and "24 images" in error and "--gradient_accumulation_steps 4" in error


def write_mostly_broken_parquet(path, good: int, broken: int):
    """A parquet file of ``good`` real 16-px images followed by ``broken`` rows whose bytes are no image."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    cells = []
    for _ in range(good):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    cells += [{"bytes": b"not an image", "path": None}] * broken
    pq.write_table(pa.table({"image": cells}), str(path))
    return path


def test_an_epoch_without_an_update_stops_the_run_with_one_line(convnext_folder, tmp_path, capsys):
    """A stream whose undecodable images are skipped: 16 rows promise 2 updates of 2 x 4, but only 5 images decode
    (one full batch): the epoch ends with no update and the run stops instead of turning over empty epochs."""
    train = write_mostly_broken_parquet(tmp_path / "train.parquet", good=5, broken=11)
    out = tmp_path / "run"
    code = exit_code(pretrain, train, out, convnext_folder, "--streaming", "--on_bad_image", "skip",
                     "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                     "--max_train_steps", "50")
    assert code == 1
    error = error_lines(capsys.readouterr().err)
    assert len(error) == 1, error
    assert re.match(r"error: epoch 0 gave no full update \(2 micro-batches of --per_device_train_batch_size 4",
                    error[0])
    assert not (out / "training_history.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A non-finite loss
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_non_finite_loss_is_never_applied(monkeypatch, request, micro_batches):
    """Through the engines' weight step: the poisoned losses of the update stop it before its last
    backward; weights, optimizer state, momentum encoder and (one micro-batch) MoCo queue are untouched."""
    monkeypatch.setenv(FAULT_ENV, "nan_loss@1")

    def reset():  # Accelerate keeps its state in singletons: this test's accumulation, not an earlier test's
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    request.addfinalizer(reset)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro_batches)
    config = NASiamConfig(framework="mocov2", image_size=8, queue_size=64, projection_dim=16,
                          projector_hidden_size=16, projector_layers=2)
    model = NASiamForPreTraining(config).train()
    optimizer = build_sgd(model.parameters(), lr=0.5, weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [{k: torch.randn(4, 3, 8, 8, generator=g) for k in ("pixel_values", "pixel_values_2")}
               for _ in range(micro_batches)]
    guard = UpdateGuard(accelerator)
    guard.begin("epoch 0, step 1", 1)
    with pytest.raises(NonFiniteLossError, match=r"the loss became nan at epoch 0, step 1; stopping before the "
                                                 r"update was applied \(no checkpoint had been written yet\)"):
        weight_step(model, batches, optimizer, None, accelerator, momentum=0.99, guard=guard)
    after = accelerator.unwrap_model(model).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if micro_batches == 1:
        assert changed == [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    else:  # the first micro-batch's keys reached the queue before the decision (the run stops: it is never saved)
        assert {k for k in changed if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))} == {
            "queue.keys", "queue.ptr"}
    assert not optimizer.state_dict()["state"]  # no optimizer step was taken


def test_a_non_finite_loss_stops_the_command_and_names_the_last_good_checkpoint(tiny_parquet, convnext_folder,
                                                                               tmp_path, capsys, monkeypatch):
    train, _ = tiny_parquet
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "nan_loss@3")
    code = exit_code(pretrain, train, out, convnext_folder, "--per_device_train_batch_size", "8",
                     "--num_train_epochs", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "5")
    assert code == 1
    error = error_lines(capsys.readouterr().err)
    assert len(error) == 1, error
    assert error[0].startswith(f"error: the loss became nan at epoch 0, step 3; stopping before the update was applied "
                               f"(the last good checkpoint is {out / 'checkpoints' / 'step-00000002'} (step 2, weights "
                               "finite")
    assert error[0].endswith("). Try a lower --learning_rate, --mixed_precision no, or a different --seed.")
    assert checkpoint_steps(out) == [1, 2] and not (out / "model.safetensors").exists()


@pytest.mark.slow  # a two-process accelerate launch (gloo), about 30-40 s here
def test_a_non_finite_loss_on_one_of_two_processes_stops_both(tiny_parquet, convnext_folder, tmp_path):
    train, _ = tiny_parquet
    out = tmp_path / "run"
    flags = ["--train_file", str(train), "--output_dir", str(out), "--genotype", "mocov2-baseline", "--backbone",
             str(convnext_folder), "--queue_size", "32", "--per_device_train_batch_size", "4", "--num_train_epochs",
             "1", "--checkpointing_steps", "1", *TINY]
    start = time.time()
    result = accelerate_launch("training/pretrain.py", *flags, num_processes=2, env={FAULT_ENV: "nan_loss@3:rank=1"},
                               timeout=240)  # a hang fails as a timeout
    took = time.time() - start
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    # the one process that saw it prints the line (maybe after the other's progress bar: they share the terminal)
    errors = re.findall(r"error: [^\r\n]*", result.stdout + result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: the loss became nan at epoch 0, step 3 on process 1; stopping before the "
                                "update was applied (the last good checkpoint is ")
    assert checkpoint_steps(out) == [1, 2] and not (out / "model.safetensors").exists()
    # the launcher reports when each process ended: both within seconds of each other (no one waits in a collective)
    ends = {rank: stamp for stamp, rank in re.findall(r"time\s*: (\S+)\s+host\s*: \S+\s+rank\s*: (\d)",
                                                      result.stderr)}
    assert set(ends) == {"0", "1"}, result.stderr[-2000:]
    seconds = [time.mktime(time.strptime(t, "%Y-%m-%d_%H:%M:%S")) for t in ends.values()]
    assert max(seconds) - min(seconds) <= 5 and took < 200


@pytest.mark.slow  # a two-process accelerate launch (gloo), about 30-40 s here
def test_two_processes_end_an_epoch_together_when_one_runs_out_first(tmp_path):
    """A stream with skipped images, so its known length is only an upper bound: 64 rows in 16 units of 4, each
    process promised 8 batches of 4, but the unit of 4 undecodable rows leaves one process 7 each epoch. The feed
    reads an update ahead, the update decision ends the epoch on both after 7 updates (no hang, no process alone in
    a collective), each process having trained its own first 7 batches."""
    import numpy as np
    from image_data import write_parquet_shards

    from nasiam_hf.data import NORMALIZATION, build_transform, open_stream

    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(64)]
    shards, _ = write_parquet_shards(tmp_path / "shards", images, [16] * 4, row_group_size=4,
                                     broken={i: b"no image" for i in range(20, 24)})
    flags = ["--train_file", str(shards), "--streaming", "--on_bad_image", "skip", "--output_dir",
             str(tmp_path / "run"), "--genotype", "simclr-baseline", "--per_device_train_batch_size", "4",
             "--num_train_epochs", "2", "--image_size", "8", "--seed", "0", "--knn_every", "0",
             "--checkpointing_steps", "no", "--dataloader_num_workers", "0"]
    result = accelerate_launch("tests/stream_worker.py", tmp_path / "seen", "--", *flags, num_processes=2,
                               timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = [json.loads((tmp_path / "seen" / f"seen-rank{r}.json").read_text())["seen"] for r in (0, 1)]
    stream = open_stream(train_file=str(shards), on_bad_image="skip")
    transform = build_transform("ssl", "cifar", 8, *NORMALIZATION["cifar10"])
    for epoch in (0, 1):
        own = []  # what each process's share holds in the epoch, alone
        for rank in (0, 1):
            loader = stream.loader(4, transform=transform, seed=0, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            own.append([b["index"].tolist() for b in loader if "pixel_values" in b])
        assert sorted(len(o) for o in own) == [7, 8]  # one process runs out first
        for rank in (0, 1):
            assert seen[rank][str(epoch)] == [i for batch in own[rank][:7] for i in batch]


@pytest.mark.slow  # a two-process accelerate launch (gloo), about 30-40 s here
def test_a_bad_image_met_by_one_of_two_processes_stops_both(tmp_path):
    """``--on_bad_image error`` and an undecodable image that only one process meets, during training: both stop at
    that update's decision, the one that met it naming the file and row."""
    import numpy as np
    from image_data import write_parquet
    from test_bad_data_commands import GARBAGE, _row_outside_the_load_time_sample

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(96)]
    row = _row_outside_the_load_time_sample(tmp_path, images, seed=3)
    data = write_parquet(tmp_path / "scraped.parquet", images, broken={row: GARBAGE})
    out = tmp_path / "run"
    flags = ["--train_file", str(data), "--output_dir", str(out), "--genotype", "simclr-baseline",
             "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--checkpointing_steps", "1",
             "--image_size", "8", "--seed", "3", "--knn_every", "0", "--dataloader_num_workers", "0"]
    result = accelerate_launch("training/pretrain.py", *flags, num_processes=2, timeout=240)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    errors = re.findall(r"error: [^\r\n]*", result.stdout + result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.match(rf"error: cannot decode the image of train file '{re.escape(str(data))}', row {row}: .*; the run "
                    r"stopped \((the last checkpoint is \S+step-\d{8}|no checkpoint had been written yet)\): "
                    r"rerun with --on_bad_image skip", errors[0])
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------------------------------
def test_a_stop_before_the_first_update_exits_with_nothing_to_save(tiny_parquet, convnext_folder, tmp_path, capsys,
                                                                    monkeypatch):
    """A real SIGTERM as the first update starts (4 micro-batches per update): the run ends at the next
    micro-batch, saves nothing (there is nothing), and the folder takes a fresh run afterwards."""
    train, _ = tiny_parquet
    out = tmp_path / "run"
    args = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--num_train_epochs", "1"]
    monkeypatch.setenv(FAULT_ENV, "sigterm@1")
    assert exit_code(pretrain, train, out, convnext_folder, *args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "stop requested before the first update: nothing to save"
    assert not (out / "checkpoints").exists() and not (out / "run_args.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop put the handlers back
    monkeypatch.delenv(FAULT_ENV)
    pretrain(train, out, convnext_folder, *args)  # nothing was left to refuse a new run
    assert (out / "model.safetensors").exists()


def test_a_stop_after_updates_finishes_the_update_and_saves_it(tiny_parquet, convnext_folder, tmp_path, capsys,
                                                               monkeypatch):
    train, _ = tiny_parquet
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "sigterm@3")
    assert exit_code(pretrain, train, out, convnext_folder, "--per_device_train_batch_size", "8",
                     "--gradient_accumulation_steps", "2", "--num_train_epochs", "1",
                     "--checkpointing_steps", "no") == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == (f"stop requested: checkpoint saved at {out / 'checkpoints' / 'step-00000003'}; continue "
                           "with --resume_from_checkpoint latest")
    assert checkpoint_steps(out) == [3]
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 3)  # the epoch's 3 updates


@pytest.mark.slow  # a training subprocess: 20-80 s on this machine, by its load
def test_sigterm_from_outside_stops_a_run_that_has_made_no_update(tiny_parquet, convnext_folder, tmp_path):
    """A real SIGTERM from outside, sent once the loop has started and before its first update is done (one update
    of 6 micro-batches per epoch, on a ResNet-18): the run stops at once with one line, exit status 0."""
    train, _ = tiny_parquet
    out = tmp_path / "run"
    command = [sys.executable, "-m", "nasiam_hf.commands.pretrain", "--train_file", str(train), "--output_dir",
               str(out), "--genotype", "simclr-baseline", "--per_device_train_batch_size", "8",
               "--gradient_accumulation_steps", "6", "--num_train_epochs", "50", *TINY]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env({"OMP_NUM_THREADS": "1"}), stdout=sink,
                                   stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while process.poll() is None and not re.search(r"pretrain:\s+0%", log.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    process.wait(timeout=120)
    took = time.time() - sent
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last in ("stop requested before the first update: nothing to save",
                    f"stop requested: checkpoint saved at {out / 'checkpoints' / 'step-00000001'}; continue with "
                    "--resume_from_checkpoint latest"), output[-2000:]
    assert checkpoint_steps(out) in ([], [1]) and took < 60
