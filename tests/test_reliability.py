"""Bad input and faults: each gives a clear error naming the problem, and nothing half-written is left behind."""

import ast
import json
import os
import pathlib
import re
import sys

import pytest
import torch
from safetensors.torch import save_file
from conftest import run_cli
from transformers import BertConfig

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.fileio import atomic_write_json
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
    # one update at this rate already blew the weights up (about 5e34): that checkpoint is not named as good
    assert re.search(r"no checkpoint is known good \(step-00000001: weights up to \S+e\+\d\d \(in \S+\), above "
                     r"1e\+06\): restart with --overwrite_output_dir\)\. Try a lower --learning_rate", message), message
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


def test_unknown_genotype_on_the_command_line(tiny_parquet, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tiny_parquet, tmp_path / "run", "--genotype", "simsiam-imagenet-resnet18")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'simsiam-imagenet-resnet18' is neither a folder nor a preset" in message
    assert "simsiam-cifar10-resnet18" in message


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    from accelerate import Accelerator

    from nasiam_hf.checkpoints import Checkpointer
    from nasiam_hf.folders import TRAINER_STATE_FILE

    checkpointer = Checkpointer(Accelerator(cpu=True), tmp_path)
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / TRAINER_STATE_FILE).write_text('{"epoch": 0, "step_in_epoch": 4, "global_step": 4}')
    save_file({"w": torch.ones(2)}, root / "step-00000004" / "model.safetensors")
    (root / "step-00000010").mkdir()  # killed before its state file was written
    (root / ".staging-step-00000012").mkdir()  # killed mid-save
    (root / ".staging-step-00000012" / TRAINER_STATE_FILE).write_text("{}")
    assert checkpointer.resolve("latest") == root / "step-00000004"
    with pytest.raises(ValueError, match=r"step-00000010' is damaged: it has no trainer_state.json \(the save did "
                                         r"not finish\); the newest usable one there is .*step-00000004 "):
        checkpointer.resolve(str(root / "step-00000010"))
    assert Checkpointer(Accelerator(cpu=True), tmp_path / "new").resolve("latest") is None
    assert [p.name for p in checkpointer.clean_staging()] == [".staging-step-00000012"]


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


# ---------------------------------------------------------------------------------------------------------------------
# One publish of plain files: config.json deleted first and moved in last
# ---------------------------------------------------------------------------------------------------------------------
def weights_of(folder):
    return NASiamModel.from_pretrained(folder).state_dict()


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_plain(folder):
    """No entry under ``folder`` is a link, and no save left a staging folder or a temporary file."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            assert not os.path.islink(os.path.join(root, name)), os.path.join(root, name)
            assert not name.endswith(".tmp"), os.path.join(root, name)


def test_saves_publish_plain_files_and_leave_other_files(tmp_path):
    from nasiam_hf.fileio import staged_files

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run_args.json").write_text("{}")
    with staged_files(tmp_path) as staged:
        NASiamModel(NASiamConfig(image_size=8)).save_pretrained(staged)
        (staged / "README.md").write_text("the card")
    second = NASiamModel(NASiamConfig(image_size=8, framework="byol"))
    with staged_files(tmp_path) as staged:
        second.save_pretrained(staged)
    names = sorted(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_nasiam.py", "README.md", "run_args.json"} <= set(names)
    assert not [n for n in names if n.startswith(".")]
    assert_plain(tmp_path)
    assert (tmp_path / "README.md").read_text() == "the card"  # not rewritten by the second save: kept
    assert (tmp_path / "run_args.json").read_text() == "{}" and (tmp_path / "checkpoints").is_dir()
    assert same_weights(weights_of(tmp_path), second.state_dict())
    assert NASiamConfig.from_pretrained(tmp_path).framework == "byol"


def test_a_card_refresh_replaces_the_card_alone(tmp_path):
    from nasiam_hf.fileio import atomic_write_text, staged_files

    model = NASiamModel(NASiamConfig(image_size=8))
    with staged_files(tmp_path) as staged:
        model.save_pretrained(staged)
        (staged / "README.md").write_text("old card")
    inode = os.stat(tmp_path / "model.safetensors").st_ino
    atomic_write_text(tmp_path / "README.md", "new card")
    assert (tmp_path / "README.md").read_text() == "new card"
    assert os.stat(tmp_path / "model.safetensors").st_ino == inode  # the weights were not touched
    assert_plain(tmp_path)
    assert same_weights(weights_of(tmp_path), model.state_dict())


def test_a_save_that_fails_before_the_switch_leaves_the_previous_model(tmp_path, monkeypatch):
    """Stopped before publish.json exists: the old model stays, nothing is left. Stopped at the commit point (the
    new config.json moving in): every reader refuses in one line until the next save or run start completes it."""
    from nasiam_hf import fileio
    from nasiam_hf.folders import FolderKind, inspect_path, require_model

    model = NASiamModel(NASiamConfig(image_size=8))
    with fileio.staged_files(tmp_path) as staged:
        model.save_pretrained(staged)
    before = weights_of(tmp_path)
    real_replace = os.replace
    stop_at = {}

    def replace(src, dst):
        if os.path.basename(dst) == stop_at["name"]:
            raise KeyboardInterrupt(f"killed at {dst}")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    new = NASiamModel(NASiamConfig(image_size=8, framework="simclr"))
    stop_at["name"] = fileio.MANIFEST  # before the publish is decided
    with pytest.raises(KeyboardInterrupt), fileio.staged_files(tmp_path) as staged:
        new.save_pretrained(staged)
    assert same_weights(weights_of(tmp_path), before) and NASiamConfig.from_pretrained(tmp_path).framework == "simsiam"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    stop_at["name"] = "config.json"  # decided: the old config.json is gone, the new one not in yet
    with pytest.raises(KeyboardInterrupt), fileio.staged_files(tmp_path) as staged:
        new.save_pretrained(staged)
    monkeypatch.undo()
    assert not (tmp_path / "config.json").exists()
    for load in (NASiamModel.from_pretrained, NASiamConfig.from_pretrained, require_model):
        with pytest.raises((OSError, ValueError)) as refusal:
            load(tmp_path)
        assert "did not finish (interrupted, or still running)" in str(refusal.value)
        assert f"python -m nasiam_hf.fileio {tmp_path}" in str(refusal.value) and "\n" not in str(refusal.value)
    assert inspect_path(tmp_path).kind is FolderKind.PUBLISHING
    assert fileio.finish_publish(tmp_path) == "finished"  # what the next save or run start does first
    assert fileio.finish_publish(tmp_path) is None
    assert same_weights(weights_of(tmp_path), new.state_dict()) and inspect_path(tmp_path).kind is FolderKind.MODEL
    assert_plain(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# One-line errors: exit status 2 for bad input, 1 for a failure during the run, no traceback unless asked
# ---------------------------------------------------------------------------------------------------------------------
def test_library_errors_become_one_line_with_the_right_status(tmp_path):
    from safetensors import SafetensorError

    from nasiam_hf.errors import NonFiniteLossError, PushError, UsageError, describe_error

    cases = [
        (UsageError("--knn_k must be at least 1, got 0"), "--knn_k must be at least 1, got 0", 2),
        (NonFiniteLossError("the loss became nan at epoch 0"), "the loss became nan", 1),
        (PushError("Cannot reach the Hub.\nThe model is saved locally at /x"), "Hub. The model is saved", 1),
        (RuntimeError("Pushing to 'a/b' failed: 500"), "Pushing to 'a/b' failed", 1),
        (FileNotFoundError(2, "No such file or directory", "data/train.parquet"),
         "'data/train.parquet' does not exist: check the path", 2),
        (NotADirectoryError(20, "Not a directory", "out/run"), "'out/run': a file is in the way", 2),
        (IsADirectoryError(21, "Is a directory", "out"), "'out' is a folder where a file was expected", 2),
        (OSError("runs/x does not appear to have a file named config.json."), "does not appear to have a file", 2),
        (SafetensorError("Error while deserializing header: HeaderTooLarge"), "truncated or corrupted", 2),
        (OSError(28, "No space left on device", "out/model.safetensors"), "no space left for", 1),
        (KeyError("boom"), "unexpected KeyError", 1),
    ]
    for error, words, code in cases:
        message, status = describe_error(error)
        assert words in message and status == code and "\n" not in message, (error, message, status)


CONVERT = [sys.executable, "-m", "nasiam_hf.commands.convert"]


def test_convert_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from nasiam_hf.commands import convert

    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pth.tar").write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("x")
    cases = [
        (["torchvision", str(tmp_path / "empty"), str(tmp_path / "r.safetensors")],
         f"MODEL '{tmp_path / 'empty'}' must be a NASiam model folder for the torchvision export, but it is an empty"),
        (["checkpoint", str(tmp_path / "empty"), str(tmp_path / "out")], "must be a checkpoint folder"),
        (["official", str(tmp_path / "garbage.pth.tar"), str(tmp_path / "out")], "cannot be read as a checkpoint"),
        (["official", str(tmp_path / "nope.pth.tar"), str(tmp_path / "out")], "nothing: no such file or folder"),
        (["official", str(tmp_path / "garbage.pth.tar"), str(tmp_path / "file")], "holds a file (file)"),
        (["detectron2", str(tmp_path / "nope"), str(tmp_path / "x.pkl")], "must be a NASiam model folder"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            convert.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # the same through a real process: one line, exit status 2; --debug adds the traceback
    argv = [*CONVERT, "checkpoint", str(tmp_path / "empty"), str(tmp_path / "out")]
    result = run_cli(argv, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: CHECKPOINT '{tmp_path / 'empty'}' must be")
    result = run_cli([*argv, "--debug"], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr and "error: CHECKPOINT" in result.stderr
    monkeypatch.setenv("NASIAM_DEBUG", "1")
    with pytest.raises(SystemExit):
        convert.main(cases[0][0])
    assert "Traceback" in capsys.readouterr().err


def test_a_pretraining_checkpoint_exports_as_a_model(tmp_path, capsys):
    from test_folders import make_run_checkpoint

    from nasiam_hf.commands import convert

    checkpoint, model = make_run_checkpoint(tmp_path / "run", step=3, preset="mocov2-cifar10-resnet18")
    convert.main(["checkpoint", str(checkpoint), str(tmp_path / "exported")])
    assert "its NASiamModel (with default normalisation statistics: check them)" in capsys.readouterr().out
    loaded = NASiamModel.from_pretrained(tmp_path / "exported").state_dict()
    online = {k.removeprefix("nasiam."): v for k, v in model.state_dict().items() if k.startswith("nasiam.")}
    assert same_weights(loaded, online)
    assert NASiamConfig.from_pretrained(tmp_path / "exported").framework == "mocov2"
    assert (tmp_path / "exported" / "preprocessor_config.json").is_file()
    with pytest.raises(SystemExit) as exit_info:  # the output holds a run now: not a place for a model
        convert.main(["checkpoint", str(checkpoint), str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "writing a model there would mix them" in capsys.readouterr().err


def test_a_search_checkpoint_exports_the_genotype_found_so_far(tmp_path, capsys):
    from test_folders import make_run_checkpoint

    from nasiam_hf.commands import convert
    from nasiam_hf.folders import require_genotype_source

    checkpoint, supernet = make_run_checkpoint(tmp_path / "search", step=2, preset="byol-baseline", search=True)
    convert.main(["checkpoint", str(checkpoint), str(tmp_path / "genotype")])
    assert "the genotype found so far" in capsys.readouterr().out
    require_genotype_source(tmp_path / "genotype")  # usable as --genotype
    config = NASiamConfig.from_pretrained(tmp_path / "genotype")
    assert config.projector_genotype == supernet.genotype()["projector"]
    assert config.predictor_genotype == supernet.genotype()["predictor"]
