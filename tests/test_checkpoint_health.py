"""Damaged checkpoints and good ones (issue 20): ``latest`` falls back past a checkpoint with any unreadable part
(weights, MoCo queue, optimizer, scheduler, RNG states, trainer state), also when the damage keeps the file's size,
naming the file and never torch's ``weights_only=False`` advice; a non-finite stop names the newest checkpoint whose
weights are finite and sane, or says that none is."""

import json
import math
import os
import re

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from nasiam_hf import NASiamConfig, NASiamForPreTraining
from nasiam_hf.backbone_specs import backbone_config_values
from nasiam_hf.checkpoint_health import WEIGHT_BOUND, deep_problem, last_good
from nasiam_hf.checkpoints import Checkpointer, decide_output_dir
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.errors import DamagedCheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
UNSAFE_ADVICE = re.compile(r"weights_only\W+(set to\W+)?False")


def moco_checkpoints(out, backbone, steps=(2, 4, 6), blow_up=None):
    """Real checkpoints of a tiny MoCo v2 model (a tiny ConvNeXt) with an optimizer and a scheduler."""
    accelerator = Accelerator(cpu=True)
    config = NASiamConfig.from_preset("mocov2-baseline", image_size=8, queue_size=64,
                                      **backbone_config_values(str(backbone)))
    model = NASiamForPreTraining(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core = accelerator.unwrap_model(model)
    checkpointer = Checkpointer(accelerator, out, total_limit=len(steps), model=core)
    for step in steps:
        with torch.no_grad():
            for p in core.parameters():
                p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
        if blow_up and step in blow_up:
            with torch.no_grad():
                next(core.parameters()).mul_(0).add_(blow_up[step])
        checkpointer.save(step, {"epoch": 0, "step_in_epoch": step, "global_step": step}, loss=1.5)
    return checkpointer


def rewrite(path, data: bytes):
    """A new file in place of ``path`` (the test folders hard-link the pristine checkpoints' files)."""
    path.unlink()
    path.write_bytes(data)


def flip_bytes(path, start, count=16):
    data = bytearray(path.read_bytes())
    data[start:start + count] = bytes(255 - b for b in data[start:start + count])
    rewrite(path, bytes(data))  # same size: the cheap size check cannot see it


def queue_offset(path) -> int:
    """Where the MoCo queue's bytes begin in a safetensors file."""
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_size])
    key = next(k for k in header if k.startswith("queue."))
    return 8 + header_size + header[key]["data_offsets"][0]


def without_crc(checkpoint, name):
    """As a checkpoint written before checksums were recorded: only loading the part can find the damage."""
    manifest = json.loads((checkpoint / "checkpoint_files.json").read_text())
    manifest.pop("crc32")
    rewrite(checkpoint / "checkpoint_files.json", json.dumps(manifest).encode())
    return checkpoint / name


DAMAGES = {  # part -> (damage it keeping its size, words of the reason)
    "optimizer": (lambda c: flip_bytes(c / "optimizer.bin", len((c / "optimizer.bin").read_bytes()) // 2),
                  r"optimizer\.bin is damaged: its bytes differ from those written \(CRC-32 \w{8} where \w{8} was "
                  r"recorded\)"),
    "moco queue": (lambda c: flip_bytes(c / "model.safetensors", queue_offset(c / "model.safetensors") + 64),
                   r"model\.safetensors is damaged: its bytes differ"),
    "scheduler": (lambda c: flip_bytes(c / "scheduler.bin", 40), r"scheduler\.bin is damaged"),
    "rng states": (lambda c: flip_bytes(c / "random_states_0.pkl", 100), r"random_states_0\.pkl is damaged"),
    "rng states, no checksum": (
        lambda c: rewrite(p := without_crc(c, "random_states_0.pkl"), b"\x80\x02" + bytes(p.stat().st_size - 2)),
        r"random_states_0\.pkl cannot be loaded \(UnpicklingError: not a file of tensors that loads without running "
        r"pickled code"),
    "optimizer, no checksum": (
        lambda c: rewrite(p := without_crc(c, "optimizer.bin"), bytes(p.stat().st_size)),
        r"optimizer\.bin cannot be loaded \(RuntimeError: a file in torch's legacy \.tar format, which loads only by "
        r"running pickled code\)"),
    "trainer state": (lambda c: rewrite(c / "trainer_state.json", b"{\"epoch\": 0,"),
                      r"its trainer_state\.json is unreadable"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, convnext_folder):
    root = tmp_path_factory.mktemp("moco") / "run"
    moco_checkpoints(root, convnext_folder)
    (root / "run_args.json").write_text(json.dumps({"seed": 0}))
    return root


@pytest.mark.parametrize("part", sorted(DAMAGES))
def test_latest_falls_back_past_any_damaged_part(pristine, tmp_path, part, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pristine, out, copy_function=os.link)
    newest = out / "checkpoints" / "step-00000006"
    damage, reason = DAMAGES[part]
    damage(newest)
    assert re.match(reason, deep_problem(newest)), deep_problem(newest)
    plan = decide_output_dir(out, {"seed": 0}, mutable_keys=set(), resume="latest")
    assert plan.resume_from == out / "checkpoints" / "step-00000004"
    assert re.search(rf"skipping the damaged checkpoint {re.escape(str(newest))} \({reason}", plan.message)
    checkpointer = Checkpointer(Accelerator(cpu=True), out)
    assert checkpointer.resolve("latest") == out / "checkpoints" / "step-00000004"
    with pytest.raises(DamagedCheckpointError, match=rf"step-00000006' is damaged: {reason}.*; the newest usable one "
                                                     r"there is .*step-00000004"):
        decide_output_dir(out, {"seed": 0}, mutable_keys=set(), resume=str(newest))
    assert not UNSAFE_ADVICE.search(plan.message + capsys.readouterr().out)


def test_a_damaged_optimizer_through_the_command(tiny_parquet, tmp_path, capsys):
    """The issue's case: optimizer.bin damaged without its size changing; the run resumes from the checkpoint
    before it, and naming the damaged one explicitly is one error line naming the file, without torch's advice."""
    out = tmp_path / "run"
    argv = ["--train_file", str(tiny_parquet[0]), "--output_dir", str(out), "--genotype", "simclr-baseline",
            "--image_size", "8", "--per_device_train_batch_size", "8", "--seed", "0", "--knn_every", "0",
            "--dataloader_num_workers", "0", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    pretrain_command.main(argv)
    damaged = out / "checkpoints" / "step-00000004"
    (damaged / "optimizer.bin").write_bytes(bytes((damaged / "optimizer.bin").stat().st_size))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain_command.main([*argv, "--resume_from_checkpoint", str(damaged)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and not UNSAFE_ADVICE.search(err)
    assert re.search(r"error: --resume_from_checkpoint '.*step-00000004' is damaged: optimizer\.bin is damaged: its "
                     r"bytes differ from those written .*the newest usable one there is .*step-00000002", err), err
    pretrain_command.main([*argv, "--resume_from_checkpoint", "latest"])
    log = capsys.readouterr().out
    assert f"skipping the damaged checkpoint {damaged} (optimizer.bin is damaged" in log
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} (epoch 0, step 2)" in log
    assert deep_problem(damaged) is None  # the resumed run wrote step 4 again, whole


def test_the_last_good_checkpoint_has_finite_sane_weights(tmp_path, convnext_folder):
    checkpointer = moco_checkpoints(tmp_path / "run", convnext_folder, steps=(1, 2, 3, 4),
                                    blow_up={3: 5e34, 4: math.nan})
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    health = state["checkpoint_health"]
    assert health["weights_finite"] and 0 < health["max_abs_weight"] < WEIGHT_BOUND and health["loss"] == 1.5
    good = checkpointer.last_good()
    assert good.step == 2 and [p.name for p, _ in good.skipped] == ["step-00000004", "step-00000003"]
    text = checkpointer.describe_last_good()
    assert re.match(r"the last good checkpoint is .*step-00000002 \(step 2, weights finite, up to \S+, loss 1\.5\); "
                    r"newer ones are not: step-00000004 \(non-finite weights \(in \S+\)\), step-00000003 \(weights up "
                    r"to 5e\+34 \(in \S+\), above 1e\+06\)", text), text
    with safe_open(tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors", "pt") as f:
        assert max(f.get_tensor(k).abs().max().item() for k in f.keys()) == pytest.approx(5e34, rel=1e-6)
    # a checkpoint written before health was recorded is judged from its weights
    for step in (1, 2):
        path = tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "trainer_state.json"
        state = json.loads(path.read_text())
        state.pop("checkpoint_health")
        path.write_text(json.dumps(state))
    assert last_good(tmp_path / "run" / "checkpoints").step == 2

    blown = moco_checkpoints(tmp_path / "blown", convnext_folder, steps=(1, 2), blow_up={1: 1e7, 2: 1e9})
    assert blown.last_good() is None
    assert re.match(r"no checkpoint is known good \(step-00000002: weights up to 1e\+09 \(in \S+\), above 1e\+06, "
                    r"step-00000001: weights up to 1e\+07 .*\): restart with --overwrite_output_dir$",
                    blown.describe_last_good())
    nothing = Checkpointer(Accelerator(cpu=True), tmp_path / "empty")
    assert nothing.describe_last_good() == ("no checkpoint had been written yet: restart with "
                                            "--overwrite_output_dir")
