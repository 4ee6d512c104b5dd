"""Bad input and faults: each gives a clear error naming the problem, and nothing half-written is left behind."""

import ast
import json
import os
import pathlib

import pytest
import torch
from transformers import BertConfig

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.fileio import atomic_write_json, publish_files, staging_dir
from nasiam_hf.pretrain import CollapseWatch

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nasiam_hf"
TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "0", "--knn_every", "0"]


def pretrain(tiny_parquet, out, *extra):
    train, _ = tiny_parquet
    pretrain_command.main(["--train_file", str(train), "--output_dir", str(out), "--genotype", "simsiam-baseline",
                           "--num_train_epochs", "1", *TINY, *extra])


def test_config_of_another_model_type_is_refused(tmp_path):
    BertConfig().save_pretrained(tmp_path)
    for load in (NASiamConfig.from_pretrained, NASiamModel.from_pretrained):
        with pytest.raises(ValueError, match=r"describes a 'bert' model, not a NASiam one"):
            load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_are_named(tmp_path, damage):
    NASiamModel(NASiamConfig()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    with pytest.raises(OSError, match=r"model.safetensors is truncated or corrupted"):
        NASiamModel.from_pretrained(tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path):
    model = NASiamModel(NASiamConfig())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        NASiamModel.from_pretrained(tmp_path)


def test_package_never_unpickles_or_evaluates():
    """Static check of the package source: no eval/exec, no pickle.load, every torch.load with weights_only=True."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("eval", "exec", "pickle.load", "pickle.loads"), f"{path.name}: {name}"
            if name == "torch.load":
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                where = f"{path.name}:{node.lineno}"
                assert kwargs.get("weights_only") == "True", f"{where} torch.load without weights_only"


def test_output_dir_holding_a_different_run_is_refused(tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(tiny_parquet, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tiny_parquet, out, "--learning_rate", "0.1")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "already holds a different run" in message and "learning_rate: unset -> 0.1" in message
    assert "--overwrite_output_dir" in message
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    pretrain(tiny_parquet, out, "--resume_from_checkpoint", "latest")  # the same run may resume there
    pretrain(tiny_parquet, out, "--learning_rate", "0.1", "--overwrite_output_dir")
    assert json.loads((out / "run_args.json").read_text())["learning_rate"] == 0.1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tiny_parquet, out, "--learning_rate", "1e36", "--checkpointing_steps", "1", "--genotype",
                 "simclr-baseline")
    assert exit_info.value.code == 1  # a failure during training
    message = capsys.readouterr().err
    assert "the loss became nan" in message.lower() or "the loss became inf" in message.lower()
    assert "last good checkpoint is" in message and "step-00000001" in message
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert checkpoints and checkpoints[0] == "step-00000001"
    state = json.loads((out / "checkpoints" / checkpoints[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoints[-1].split("-")[1])
    assert not (out / "model.safetensors").exists()  # no final model from a diverged run


def test_collapse_warning(capsys):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    watch = CollapseWatch(reference=0.02, threshold=0.5, patience=2)
    assert not watch.update(0.001, accelerator)
    assert watch.update(0.001, accelerator)
    assert "may be collapsing" in capsys.readouterr().out
    assert not watch.update(0.02, accelerator)  # recovered: the count restarts


def test_batch_larger_than_the_dataset(tiny_parquet, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain(tiny_parquet, tmp_path / "run", "--per_device_train_batch_size", "4096")
    message = capsys.readouterr().err
    assert "4096" in message and "48" in message


def test_atomic_json_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": object()})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_save_killed_midway_leaves_the_previous_model(tmp_path, monkeypatch):
    model = NASiamModel(NASiamConfig())
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def broken_publish(staged, folder):
        # the staged weights were written; die before they are moved into place
        assert (pathlib.Path(staged) / "model.safetensors").exists()
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr("nasiam_hf.fileio.publish_files", broken_publish)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder was cleaned up
    NASiamModel.from_pretrained(tmp_path)


def test_publish_files_replaces_each_file_whole(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "keep.txt").write_text("other output")
    staged = staging_dir(folder)
    (staged / "config.json").write_text("{}")
    publish_files(staged, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "keep.txt"]
    assert not staged.exists()


def test_unknown_genotype_on_the_command_line(tiny_parquet, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tiny_parquet, tmp_path / "run", "--genotype", "simsiam-imagenet-resnet18")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'simsiam-imagenet-resnet18' is neither a search output folder nor a preset" in message
    assert "simsiam-cifar10-resnet18" in message


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    from accelerate import Accelerator

    from nasiam_hf.trainer import TRAINER_STATE_FILE, Checkpointer

    checkpointer = Checkpointer(Accelerator(cpu=True), tmp_path)
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / TRAINER_STATE_FILE).write_text("{}")
    (root / "step-00000010").mkdir()  # killed before its state file was written
    (root / ".staging-step-00000012").mkdir()  # killed mid-save
    (root / ".staging-step-00000012" / TRAINER_STATE_FILE).write_text("{}")
    assert checkpointer.resolve("latest") == root / "step-00000004"
    with pytest.raises(ValueError, match=r"is not a complete checkpoint folder.*step-00000004"):
        checkpointer.resolve(str(root / "step-00000010"))
    assert Checkpointer(Accelerator(cpu=True), tmp_path / "new").resolve("latest") is None


def test_linear_eval_without_an_evaluation_split(tiny_parquet, tmp_path, capsys):
    from nasiam_hf.commands import linear_eval

    train, _ = tiny_parquet
    NASiamModel(NASiamConfig(image_size=8)).save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit):
        linear_eval.main(["--model_name_or_path", str(tmp_path / "model"), "--train_file", str(train)])
    assert "has no evaluation split: pass --validation_file" in capsys.readouterr().err


def test_bad_flag_values_end_with_one_line_errors(tmp_path, capsys):
    from nasiam_hf.commands import pretrain as pretrain_command
    from nasiam_hf.commands import search as search_command

    for main, flags, message in (
        (pretrain_command.main, ["--learning_rate", "-1"], "error: --learning_rate must be positive, got -1.0"),
        (search_command.main, ["--search_space", "S,linear_foo"], "error: unknown search space or op 'linear_foo'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--dataset_name", "demo", "--output_dir", str(tmp_path / "run"), *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
