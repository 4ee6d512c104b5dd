"""Bad input and faults: each gives a clear error naming the problem, and nothing half-written is left behind."""

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from conftest import run_cli
from PIL import Image
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
# One atomic publish: model files in a versioned subfolder, made current by one os.replace
# ---------------------------------------------------------------------------------------------------------------------
def weights_of(folder):
    return NASiamModel.from_pretrained(folder).state_dict()


def one_current_version(folder) -> bool:
    """Only ``.model-current`` and the version it points to are hidden in ``folder`` (no leftovers)."""
    hidden = sorted(p for p in os.listdir(folder) if p.startswith("."))
    return len(hidden) == 2 and os.readlink(Path(folder) / ".model-current") == hidden[0]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saves_publish_whole_versions_and_leave_other_files(tmp_path):
    from nasiam_hf.fileio import CURRENT_LINK, current_version, is_published_link

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run_args.json").write_text("{}")
    first = NASiamModel(NASiamConfig(image_size=8))
    first.save_pretrained(tmp_path)
    second = NASiamModel(NASiamConfig(image_size=8, framework="byol"))
    second.save_pretrained(tmp_path)
    assert os.readlink(tmp_path / CURRENT_LINK) == ".model-000002"
    version_files = sorted(os.listdir(current_version(tmp_path)))
    assert {"config.json", "model.safetensors", "modeling_nasiam.py"} <= set(version_files)
    assert all(is_published_link(tmp_path / name) for name in version_files)
    hidden = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
    assert hidden == [".model-000002", CURRENT_LINK]  # the old version and the staging folder are gone
    assert sorted(set(os.listdir(tmp_path)) - set(version_files) - set(hidden)) == ["checkpoints", "run_args.json"]
    assert same_weights(weights_of(tmp_path), second.state_dict())
    assert NASiamConfig.from_pretrained(tmp_path).framework == "byol"


def test_a_card_refresh_links_the_weights_instead_of_copying(tmp_path):
    from nasiam_hf.fileio import atomic_write_text, staged_files

    model = NASiamModel(NASiamConfig(image_size=8))
    with staged_files(tmp_path) as staged:  # model, processor and card published together
        model.save_pretrained(staged)
        (staged / "README.md").write_text("old card")
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".model-0")]) == 1  # one version, not two
    inode = os.stat(tmp_path / "model.safetensors").st_ino
    atomic_write_text(tmp_path / "README.md", "new card")  # goes through a new version
    assert os.readlink(tmp_path / ".model-current") == ".model-000002"
    assert (tmp_path / "README.md").read_text() == "new card"
    assert os.stat(tmp_path / "model.safetensors").st_ino == inode  # the same file: linked, not copied
    assert same_weights(weights_of(tmp_path), model.state_dict())


def test_a_save_that_fails_before_the_switch_leaves_the_previous_model(tmp_path, monkeypatch):
    from nasiam_hf import fileio

    model = NASiamModel(NASiamConfig(image_size=8))
    model.save_pretrained(tmp_path)
    before = weights_of(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == fileio.CURRENT_LINK:
            raise KeyboardInterrupt("killed just before the switch")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        NASiamModel(NASiamConfig(image_size=8, framework="simclr")).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert same_weights(weights_of(tmp_path), before)
    assert NASiamConfig.from_pretrained(tmp_path).framework == "simsiam"
    leftovers = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
    assert ".model-000002" in leftovers and os.readlink(tmp_path / ".model-current") == ".model-000001"  # stays...
    model.save_pretrained(tmp_path)  # ...until the next save removes what the failed one left
    assert one_current_version(tmp_path)
    assert same_weights(weights_of(tmp_path), model.state_dict())


def test_files_written_directly_are_adopted_without_a_visible_change(tmp_path):
    """A folder of regular files (an older release, or a file written before the model) becomes versioned links."""
    from nasiam_hf.fileio import is_published_link

    old = NASiamModel(NASiamConfig(image_size=8))
    old.save_pretrained(tmp_path / "v")
    for item in (tmp_path / "v").iterdir():
        if not item.name.startswith("."):
            shutil.copyfile(item, tmp_path / item.name)  # the old layout: plain files
    shutil.rmtree(tmp_path / "v")
    new = NASiamModel(NASiamConfig(image_size=8))
    new.save_pretrained(tmp_path)
    assert is_published_link(tmp_path / "model.safetensors") and is_published_link(tmp_path / "config.json")
    assert same_weights(weights_of(tmp_path), new.state_dict())
    # a published file replaced by another tool's atomic write keeps its newer content through the next save
    (tmp_path / "elsewhere.json").write_text('{"newer": true}')
    os.replace(tmp_path / "elsewhere.json", tmp_path / "config.json")
    NASiamModel(NASiamConfig(image_size=8)).save_pretrained(tmp_path)  # rewrites config.json: its version wins
    assert NASiamConfig.from_pretrained(tmp_path).framework == "simsiam" and is_published_link(tmp_path / "config.json")
    from nasiam_hf.fileio import staged_files

    with staged_files(tmp_path) as staged:
        (staged / "card.md").write_text("card")
    (tmp_path / "new_card.md").write_text("edited card")
    os.replace(tmp_path / "new_card.md", tmp_path / "card.md")  # the link replaced by a plain file
    NASiamModel(NASiamConfig(image_size=8)).save_pretrained(tmp_path)  # card.md is carried over, not rewritten
    assert (tmp_path / "card.md").read_text() == "edited card" and is_published_link(tmp_path / "card.md")


def test_copies_pushes_and_loaders_see_the_resolved_files(tmp_path):
    from huggingface_hub import HfApi
    from transformers import AutoImageProcessor, pipeline

    from nasiam_hf.fileio import HIDDEN_MODEL_PATTERNS, staged_files
    from nasiam_hf.hub import DEFAULT_IGNORE_PATTERNS
    from nasiam_hf.processing import image_processor_for_config

    folder = tmp_path / "model"
    model = NASiamModel(NASiamConfig(image_size=8)).eval()
    for _ in range(2):  # two versions, so a stale one could show up if anything looked behind the links
        with staged_files(folder) as staged:
            model.save_pretrained(staged)
            image_processor_for_config(model.config).save_pretrained(staged)
    reference = model.state_dict()
    shutil.copytree(folder, tmp_path / "followed")  # copies the link targets as files
    shutil.copytree(folder, tmp_path / "kept", symlinks=True)
    subprocess.run(["cp", "-r", str(folder), str(tmp_path / "cp")], check=True)
    for copy in ("followed", "kept", "cp"):
        assert same_weights(weights_of(tmp_path / copy), reference), copy
    model.save_pretrained(tmp_path / "followed")  # saving into a plain copy works and cleans it up
    assert one_current_version(tmp_path / "followed")
    assert AutoImageProcessor.from_pretrained(folder).crop_size == {"height": 8, "width": 8}
    features = pipeline("image-feature-extraction", model=str(folder), pool=True)(Image.new("RGB", (8, 8)))
    assert len(features[0]) == model.config.hidden_size
    # what huggingface_hub's upload_folder would send: the published files, resolved, and no hidden version
    operations = HfApi()._prepare_upload_folder_additions(
        folder, "", ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *HIDDEN_MODEL_PATTERNS])
    sent = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert sorted(sent) == sorted(p for p in os.listdir(folder) if not p.startswith("."))
    assert Path(sent["model.safetensors"]).read_bytes() == (folder / "model.safetensors").read_bytes()


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
