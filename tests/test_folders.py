"""Every kind of folder is recognised for what it is, and every use refuses the kinds it cannot take, saying what it
found and what to do."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig

from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch, NASiamForPreTraining, NASiamModel
from nasiam_hf.checkpoints import Checkpointer
from nasiam_hf.errors import DamagedCheckpointError, FolderKindError, UsageError
from nasiam_hf.folders import (
    FolderKind,
    checkpoint_problem,
    inspect_path,
    require_checkpoint,
    require_exportable_checkpoint,
    require_genotype_source,
    require_model,
    safetensors_problem,
)

SMALL = dict(image_size=8)


def make_run_checkpoint(out, step: int = 3, preset: str = "simsiam-baseline", search: bool = False,
                        with_model_config: bool = True):
    """A real checkpoint of a tiny run under ``out/checkpoints`` (Accelerate save_state + trainer state), as the
    engines write it. Returns (checkpoint path, the unwrapped model)."""
    accelerator = Accelerator(cpu=True)
    config = NASiamConfig.from_preset(preset, **SMALL)
    model = (NASiamForArchitectureSearch if search else NASiamForPreTraining)(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    checkpointer = Checkpointer(accelerator, out, model=core if with_model_config else None)
    history = {"epochs": [{"epoch": 0, "loss": -0.5}], "framework": config.framework}
    path = checkpointer.save(step, {"epoch": 1, "step_in_epoch": 0, "global_step": step, "history": history})
    return path, core


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One folder of every kind, built by the real writers."""
    root = tmp_path_factory.mktemp("kinds")
    made = {}
    made["missing"] = root / "nope"
    made["file"] = root / "genotype.json"
    made["file"].write_text("[]")
    made["empty"] = root / "empty"
    made["empty"].mkdir()
    made["model"] = root / "model"
    NASiamModel(NASiamConfig(**SMALL)).save_pretrained(made["model"])
    made["config_only"] = root / "config_only"
    NASiamConfig(**SMALL).save_pretrained(made["config_only"])
    made["search_output"] = root / "search"
    NASiamConfig(**SMALL).save_pretrained(made["search_output"])
    (made["search_output"] / "genotype.json").write_text(json.dumps({"projector": ["identity"] * 6}))
    (made["search_output"] / "search_history.json").write_text(json.dumps({"epochs": []}))
    made["unfinished_search"] = root / "running-search"
    made["unfinished_search"].mkdir()
    (made["unfinished_search"] / "run_args.json").write_text("{}")
    (made["unfinished_search"] / "search_history.json").write_text(json.dumps({"epochs": []}))
    make_run_checkpoint(made["unfinished_search"], step=2, preset="simsiam-baseline", search=True)
    made["failed_run"] = root / "failed"
    made["failed_run"].mkdir()
    (made["failed_run"] / "run_args.json").write_text("{}")
    made["run_with_checkpoints"] = root / "pretrain-run"
    made["checkpoint"], _ = make_run_checkpoint(made["run_with_checkpoints"])
    made["checkpoints"] = made["run_with_checkpoints"] / "checkpoints"
    made["bert"] = root / "bert"
    BertConfig(num_hidden_layers=1).save_pretrained(made["bert"])
    made["timm"] = root / "timm"
    made["timm"].mkdir()
    (made["timm"] / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    made["weights_only"] = root / "weights_only"
    made["weights_only"].mkdir()
    (made["weights_only"] / "checkpoint_0799.pth.tar").write_bytes(b"\x80\x04")
    made["other_files"] = root / "notes"
    made["other_files"].mkdir()
    (made["other_files"] / "notes.txt").write_text("hello")
    made["damaged_model"] = root / "damaged"
    NASiamModel(NASiamConfig(**SMALL)).save_pretrained(made["damaged_model"])
    weights = made["damaged_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 3])
    made["publishing"] = root / "publishing"
    interrupted_save(made["publishing"])
    return made


def interrupted_save(folder):
    """A model folder whose second save was interrupted at its commit point (the new config.json moved in): the
    real publish, with os.replace failing there."""
    from nasiam_hf import fileio

    NASiamModel(NASiamConfig(**SMALL)).save_pretrained(folder)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "config.json":
            raise KeyboardInterrupt("killed at the commit point")
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fileio.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt), fileio.staged_files(folder) as staged:
            NASiamModel(NASiamConfig(**SMALL, framework="byol")).save_pretrained(staged)


EXPECTED = {
    "missing": FolderKind.MISSING, "file": FolderKind.FILE, "empty": FolderKind.EMPTY, "model": FolderKind.MODEL,
    "config_only": FolderKind.CONFIG_ONLY, "search_output": FolderKind.SEARCH_OUTPUT,
    "unfinished_search": FolderKind.UNFINISHED_RUN, "failed_run": FolderKind.UNFINISHED_RUN,
    "run_with_checkpoints": FolderKind.UNFINISHED_RUN, "checkpoint": FolderKind.CHECKPOINT,
    "checkpoints": FolderKind.CHECKPOINTS, "bert": FolderKind.OTHER_MODEL, "timm": FolderKind.OTHER_MODEL,
    "weights_only": FolderKind.OTHER_MODEL, "other_files": FolderKind.OTHER_FILES, "damaged_model": FolderKind.DAMAGED,
    "publishing": FolderKind.PUBLISHING,
}


def test_every_kind_is_recognised(kinds):
    found = {name: inspect_path(path).kind for name, path in kinds.items()}
    assert found == EXPECTED
    assert inspect_path(kinds["unfinished_search"]).run_kind == "search"
    run = inspect_path(kinds["run_with_checkpoints"])
    assert run.run_kind == "pretraining" and run.checkpoints == (kinds["checkpoint"],)
    assert "step 3, epoch 1" in inspect_path(kinds["checkpoint"]).what
    assert "'bert' model" in inspect_path(kinds["bert"]).what
    assert "truncated" in inspect_path(kinds["damaged_model"]).problem


# What each use accepts; everything else must be refused with a message naming what was found.
ACCEPTS = {
    "genotype": {"model", "config_only", "search_output", "file"},  # a .json file: a genotype file, read later
    "model": {"model"},
    "checkpoint": {"checkpoint"},
}


@pytest.mark.parametrize("use", sorted(ACCEPTS))
def test_each_use_refuses_what_it_cannot_take(kinds, use):
    check = {"genotype": require_genotype_source, "model": require_model, "checkpoint": require_checkpoint}[use]
    for name, path in kinds.items():
        if name in ACCEPTS[use]:
            assert check(path).path == path
            continue
        if use == "model" and name == "missing":
            continue  # "nope" could be a Hub id: checked below
        with pytest.raises(UsageError) as info:
            check(path)
        message = str(info.value)
        assert str(path) in message and "but it is" in message or "neither a folder nor a preset" in message, message
        assert "\n" not in message


def test_messages_say_what_to_do(kinds):
    with pytest.raises(FolderKindError, match=r"resume it with `nasiam-search \.\.\. --output_dir .*--resume_from.*"
                                              r"export the genotype found so far with `nasiam-convert checkpoint"):
        require_genotype_source(kinds["unfinished_search"])  # a search still running: no config.json yet
    with pytest.raises(FolderKindError, match=r"no checkpoint yet: if it is still running, let it finish; if it "
                                              r"failed, run it again"):
        require_genotype_source(kinds["failed_run"])
    with pytest.raises(FolderKindError, match=r"nasiam-convert checkpoint .*step-00000003 OUTPUT"):
        require_model(kinds["run_with_checkpoints"])
    with pytest.raises(FolderKindError, match=r"a checkpoint is for resuming: continue its run with `--output_dir"):
        require_model(kinds["checkpoint"], flag="--model_name_or_path")
    with pytest.raises(FolderKindError, match=r"a search result is a genotype, not trained weights: pretrain it"):
        require_model(kinds["search_output"])
    with pytest.raises(FolderKindError, match=r"has no model.safetensors"):
        require_model(kinds["config_only"])
    with pytest.raises(FolderKindError, match=r"last save did not finish \(interrupted, or still running\): if the "
                                              r"save was interrupted, complete it with `python -m nasiam_hf.fileio "):
        require_model(kinds["publishing"])
    with pytest.raises(FolderKindError, match=r"nasiam-convert official"):
        require_genotype_source(kinds["weights_only"] / "checkpoint_0799.pth.tar")
    with pytest.raises(FolderKindError, match=r"presets: \[.*simsiam-cifar10-resnet18"):
        require_genotype_source(kinds["missing"])
    with pytest.raises(FolderKindError, match=r"it is a run folder: pass --output_dir .* --resume_from_checkpoint "):
        require_checkpoint(kinds["run_with_checkpoints"])
    with pytest.raises(FolderKindError):
        require_model(kinds["missing"], allow_hub_id=False)


def test_a_hub_id_passes_to_the_loader_when_it_can_be_fetched(tmp_path, monkeypatch):
    """Offline, a name that is no local path must be in the Hub cache: else the error says both."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FolderKindError, match=r"--model_name_or_path 'uoft-cs/nasiam-simsiam' is not a local path \(no "
                                              r"such file or folder here\), and as a Hub repository id it is not in "
                                              r"the local cache \(.*hub\) while offline mode is on"):
        require_model("uoft-cs/nasiam-simsiam")
    repo = tmp_path / "hub" / "models--uoft-cs--nasiam-simsiam"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert require_model("uoft-cs/nasiam-simsiam").kind is FolderKind.MISSING  # cached: the loader reads it


def test_damaged_checkpoints_are_named(tmp_path):
    path, _ = make_run_checkpoint(tmp_path / "run")
    assert checkpoint_problem(path) is None
    state = path / "trainer_state.json"
    good = state.read_text()
    state.write_text("{not json")
    assert "trainer_state.json is unreadable" in checkpoint_problem(path)
    state.write_text(json.dumps({"epoch": 1}))
    assert "no integer step_in_epoch, global_step" in checkpoint_problem(path)
    state.write_text(good)
    optimizer = path / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])  # a different size from the one written
    assert "optimizer.bin has" in checkpoint_problem(path)
    optimizer.unlink()
    assert checkpoint_problem(path) == "optimizer.bin is missing"
    with pytest.raises(DamagedCheckpointError, match=r"is damaged: optimizer.bin is missing; no intact checkpoint"):
        require_checkpoint(path)


def test_safetensors_damage_is_found_from_the_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64)}, path)
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    for damaged, reason in ((data[:-1], "not fully covered"), (data + b"\0", "not fully covered"),
                            (data[:4], "header too small"), (b"\x10" + b"\x00" * 7 + b"x" * 16 + data[24:], "header"),
                            (b"garbage" * 10, "header too large")):
        path.write_bytes(damaged)
        problem = safetensors_problem(path)
        assert problem.startswith(f"w.safetensors is truncated or corrupted ({len(damaged)} bytes; ") and reason in \
            problem, problem
    path.unlink()
    assert safetensors_problem(path).startswith("w.safetensors cannot be read (No such file or directory")


def test_exporting_needs_a_checkpoint_with_its_config(tmp_path):
    path, _ = make_run_checkpoint(tmp_path / "old", with_model_config=False)
    with pytest.raises(FolderKindError, match=r"has no NASiam config.json, .*--resume_from_checkpoint latest"):
        require_exportable_checkpoint(path)
    path, _ = make_run_checkpoint(tmp_path / "new")
    assert require_exportable_checkpoint(path).config["architectures"] == ["NASiamForPreTraining"]
    assert os.path.isfile(path / "checkpoint_files.json")
