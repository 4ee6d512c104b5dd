"""The output-folder guard: each rule, what it prints, what it deletes and keeps; and the checkpointer's choice of
the checkpoint to resume from."""

import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from test_folders import make_run_checkpoint
from transformers import BertConfig

from nasiam_hf.checkpoints import Checkpointer, decide_output_dir, guard_output_dir
from nasiam_hf.errors import DamagedCheckpointError, OutputDirError

IDENTITY = {"learning_rate": 0.06, "seed": 0, "genotype": "simsiam-baseline", "num_train_epochs": 2,
            "logging_steps": 25, "hub_token": "hf_secret", "output_dir": "ignored", "resume_from_checkpoint": None}
MUTABLE = {"num_train_epochs", "max_train_steps", "logging_steps"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = make_run_checkpoint(tmp_path_factory.mktemp("source") / "run", step=6)
    return path


def start(plan):
    """What a run does with its plan: apply it, and record its identity (with its first checkpoint or outputs)."""
    plan.apply()
    plan.write_record()
    return plan


def run_folder(root, checkpoint, steps=(6,), record=IDENTITY, model=False):
    """A run folder as a run leaves it: its record, checkpoints (hard-linked copies of a real one), maybe a model."""
    root.mkdir(parents=True, exist_ok=True)
    if record is not None:
        start(decide_output_dir(root, record, mutable_keys=MUTABLE))
    for step in steps:
        shutil.copytree(checkpoint, root / "checkpoints" / f"step-{step:08d}", copy_function=os.link)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state["global_step"] = step
        linked = root / "checkpoints" / f"step-{step:08d}" / "trainer_state.json"
        linked.unlink()  # a hard link to the source checkpoint's file: write a new file instead
        linked.write_text(json.dumps(state))
    if model:
        from nasiam_hf import NASiamConfig, NASiamModel

        NASiamModel(NASiamConfig(image_size=8)).save_pretrained(root)
    return root


def decide(out, resume=None, overwrite=False, **changes):
    return decide_output_dir(out, {**IDENTITY, **changes}, mutable_keys=MUTABLE, resume=resume, overwrite=overwrite)


def test_a_new_folder_is_used_and_latest_starts_from_step_0(tmp_path):
    plan = decide(tmp_path / "new")
    assert plan.action == "new" and plan.resume_from is None and "new run" in plan.message
    plan = decide(tmp_path / "new", resume="latest")
    assert plan.resume_from is None and "holds no checkpoint yet; starting from step 0" in plan.message
    start(plan)
    record = json.loads((tmp_path / "new" / "run_args.json").read_text())
    assert record["learning_rate"] == 0.06 and "hub_token" not in record and "output_dir" not in record


def test_a_failed_run_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    start(decide(out, learning_rate=10.0))  # the failed run: recorded, then it died before a checkpoint
    (out / "training_history.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    plan = decide(out)
    assert plan.action == "fresh" and "left nothing to keep" in plan.message and "learning_rate: 10.0 -> 0.06" in \
        plan.message
    start(plan)
    assert sorted(os.listdir(out)) == ["notes.txt", "run_args.json"]
    assert json.loads((out / "run_args.json").read_text())["learning_rate"] == 0.06


def test_the_same_run_resumes_and_may_be_extended(tmp_path, checkpoint):
    out = run_folder(tmp_path / "run", checkpoint, steps=(3, 6), model=True)
    with pytest.raises(OutputDirError, match=r"already holds this run \(checkpoints up to step 6, a saved model\).*"
                                             r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        decide(out)
    plan = decide(out, resume="latest")
    assert plan.action == "resume" and plan.resume_from == out / "checkpoints" / "step-00000006"
    assert "resuming the run from" in plan.message and "changed" not in plan.message
    plan = decide(out, resume="latest", num_train_epochs=4, logging_steps=5)
    assert plan.resume_from == out / "checkpoints" / "step-00000006"
    assert "changed since the run started: logging_steps: 25 -> 5, num_train_epochs: 2 -> 4" in plan.message
    assert "schedule is recomputed over the new length" in plan.message
    explicit = out / "checkpoints" / "step-00000003"
    assert decide(out, resume=str(explicit)).resume_from == explicit


def test_a_different_run_is_refused_naming_keys_and_values(tmp_path, checkpoint):
    out = run_folder(tmp_path / "run", checkpoint)
    before = sorted(os.listdir(out))
    with pytest.raises(OutputDirError, match=r"already holds a different run \(learning_rate: 0.06 -> 0.1, seed: 0 "
                                             r"-> 1; it has checkpoints up to step 6\)"):
        decide(out, learning_rate=0.1, seed=1)
    with pytest.raises(OutputDirError, match=r"cannot resume the run in .*: genotype: 'simsiam-baseline' -> "
                                             r"'byol-baseline', and these may not change on resume \(only "
                                             r"logging_steps, num_train_epochs may\)"):
        decide(out, resume="latest", genotype="byol-baseline")
    assert sorted(os.listdir(out)) == before  # refusals touch nothing


def test_overwrite_with_resume_is_a_contradiction(tmp_path, checkpoint):
    out = run_folder(tmp_path / "run", checkpoint)
    with pytest.raises(OutputDirError, match=r"--overwrite_output_dir and --resume_from_checkpoint contradict each "
                                             r"other: overwriting deletes the checkpoints"):
        decide(out, resume="latest", overwrite=True)
    assert (out / "checkpoints" / "step-00000006").is_dir()


def test_overwrite_deletes_what_runs_write_and_keeps_the_rest(tmp_path, checkpoint):
    out = run_folder(tmp_path / "run", checkpoint, model=True)
    (out / "training_history.json").write_text("{}")
    (out / "my_notes.txt").write_text("keep me")
    (out / "data").mkdir()
    (out / ".nasiam-publish.tmp").mkdir()  # a staging folder left by a killed save (before it was decided)
    plan = decide(out, learning_rate=0.1, overwrite=True)
    assert plan.action == "overwrite"
    assert "deleting" in plan.message and "checkpoints/" in plan.message and "model.safetensors" in plan.message
    assert "keeping data, my_notes.txt (not written by nasiam-hf)" in plan.message
    start(plan)
    assert sorted(os.listdir(out)) == ["data", "my_notes.txt", "run_args.json"]


def test_other_tools_files_are_refused_unless_overwriting(tmp_path):
    out = tmp_path / "bert"
    BertConfig(num_hidden_layers=1).save_pretrained(out)
    (out / "vocab.txt").write_text("[PAD]")
    with pytest.raises(OutputDirError, match=r"holds a 'bert' model .* and no run record of nasiam-hf \(run_args"
                                             r".json\).*it deletes the files a run writes: config.json"):
        decide(out)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"png")
    with pytest.raises(OutputDirError, match=r"holds a folder of other files \(cat.png\)"):
        decide(other)
    plan = decide(out, overwrite=True)
    start(plan)
    assert sorted(os.listdir(out)) == ["run_args.json", "vocab.txt"]


def test_paths_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"--output_dir .*file' is a file: pass a folder"):
        decide(tmp_path / "file")
    with pytest.raises(OutputDirError, match=r"cannot be created: .*file' is a file"):
        decide(tmp_path / "file" / "run")


def test_a_record_older_than_a_flag_compares_with_its_default(tmp_path, checkpoint):
    out = run_folder(tmp_path / "run", checkpoint)
    identity = {**IDENTITY, "image_column": None}
    plan = decide_output_dir(out, identity, mutable_keys=MUTABLE, resume="latest", defaults={"image_column": None})
    assert plan.action == "resume"
    with pytest.raises(OutputDirError, match=r"image_column: unset -> 'pixels'"):
        decide_output_dir(out, {**identity, "image_column": "pixels"}, mutable_keys=MUTABLE, resume="latest",
                          defaults={"image_column": None})


def test_resuming_another_runs_checkpoint_into_a_new_folder(tmp_path, checkpoint):
    source = run_folder(tmp_path / "source", checkpoint)
    step = source / "checkpoints" / "step-00000006"
    plan = decide(tmp_path / "copy", resume=str(step))
    assert plan.resume_from == step and "continuing the run of" in plan.message
    with pytest.raises(OutputDirError, match=r"its run had seed: 0 -> 5"):
        decide(tmp_path / "copy", resume=str(step), seed=5)


def test_latest_skips_damaged_checkpoints_and_an_explicit_one_is_an_error(tmp_path, checkpoint, capsys):
    out = run_folder(tmp_path / "run", checkpoint, steps=(2, 4, 6))
    newest = out / "checkpoints" / "step-00000006"
    (newest / "random_states_0.pkl").unlink()
    (out / "checkpoints" / "step-00000004" / "trainer_state.json").write_text("{")
    plan = decide(out, resume="latest")
    assert plan.resume_from == out / "checkpoints" / "step-00000002"
    assert f"skipping the damaged checkpoint {newest} (random_states_0.pkl is missing)" in plan.message
    assert "step-00000004 (its trainer_state.json is unreadable" in plan.message
    checkpointer = Checkpointer(Accelerator(cpu=True), out)
    assert checkpointer.resolve("latest") == out / "checkpoints" / "step-00000002"
    assert "skipping the damaged checkpoint" in capsys.readouterr().out
    with pytest.raises(DamagedCheckpointError, match=r"step-00000006' is damaged: random_states_0.pkl is missing; "
                                                     r"the newest usable one there is .*step-00000002 \(or pass "
                                                     r"'latest'"):
        decide(out, resume=str(newest))


def test_guard_prints_and_applies_on_the_main_process(tmp_path, capsys):
    plan = guard_output_dir(Accelerator(cpu=True), tmp_path / "run", IDENTITY, mutable_keys=MUTABLE, resume="latest")
    assert "starting from step 0" in capsys.readouterr().out
    # nothing is written before the run has something to keep: the record comes with the first checkpoint
    assert plan.action == "new" and not (tmp_path / "run").exists()
    plan.write_record()
    assert json.loads((tmp_path / "run" / "run_args.json").read_text())["learning_rate"] == 0.06


def test_checkpointer_replaces_rotates_and_names_a_load_that_fails(tmp_path):
    from nasiam_hf import NASiamConfig, NASiamForPreTraining

    accelerator = Accelerator(cpu=True)
    model = NASiamForPreTraining(NASiamConfig.from_preset("simsiam-baseline", image_size=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(accelerator, tmp_path, total_limit=2, model=accelerator.unwrap_model(model))
    state = {"epoch": 0, "step_in_epoch": 1, "global_step": 1}
    for step in (1, 2, 2, 3):
        checkpointer.save(step, {**state, "global_step": step})
    assert [p.name for p in checkpointer.checkpoints()] == ["step-00000002", "step-00000003"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002", "step-00000003"]  # no staging left
    other = NASiamForPreTraining(NASiamConfig.from_preset("byol-baseline", image_size=8))  # another model's shapes
    accelerator2 = Accelerator(cpu=True)
    accelerator2.prepare(other)
    with pytest.raises(DamagedCheckpointError, match=r"cannot be loaded .*written by a run with other model"):
        Checkpointer(accelerator2, tmp_path).load(tmp_path / "checkpoints" / "step-00000003")
