"""The run budget (nasiam_hf.budget) and the genotype confidence rule (nasiam_hf.confidence), on hand-made numbers;
the commands that print them are run in tests/test_run_reports.py."""

import math

import pytest
from accelerate import Accelerator

from nasiam_hf.arguments import FinetuneCommand, PretrainCommand
from nasiam_hf.budget import (
    RunBudget, RunSize, defaults_taken, format_bytes, logging_interval, planned_checkpoints,
)
from nasiam_hf.confidence import (
    DECIDED_MAX_RELATIVE_ENTROPY, DECIDED_MIN_MARGIN, genotype_confidence, layer_confidence, relative_entropy,
    undecided_warning,
)
from nasiam_hf.search_space import SEARCH_SPACES

OPS = list(SEARCH_SPACES["S"])


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_logging_adapts_to_short_runs_unless_given():
    assert logging_interval(None, 12) == 1  # a 12-update run shows its loss from the first update
    assert logging_interval(None, 100) == 10 and logging_interval(None, 1600) == 25
    assert logging_interval(7, 12) == 7  # given: kept


def test_defaults_taken_are_the_flags_not_given():
    pretrain = PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", "out"])
    assert defaults_taken(pretrain.optimization) == ("--num_train_epochs", "--per_device_train_batch_size")
    given = PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", "out", "--max_train_steps", "5",
                                   "--per_device_train_batch_size", "16"])
    assert defaults_taken(given.optimization) == ()
    finetune = FinetuneCommand.parse(["--model_name_or_path", "m", "--dataset_name", "demo", "--output_dir", "out",
                                      "--num_train_epochs", "3"])
    assert defaults_taken(finetune.optimization) == ("--per_device_train_batch_size",)


def test_projection_after_a_few_updates_and_the_long_run_warning(accelerator, capsys):
    clock = Clock()
    size = RunSize("pretrain", updates=1600, global_batch=512, train_images=1000, updates_per_epoch=2,
                   defaults=("--num_train_epochs", "--per_device_train_batch_size"), recipe="cifar")
    budget = RunBudget(accelerator, size, clock=clock)
    budget.announce()
    out = capsys.readouterr().out
    assert ("pretrain run size: 1600 updates x global batch 512 = 819200 training images (800 epochs of 2 updates "
            "over 1000 images); --num_train_epochs and --per_device_train_batch_size not given: the cifar recipe "
            "decided") in out
    for update in range(1, 6):  # the first update carries start-up costs; the next ones take 10 s each
        clock.now += 30.0 if update == 1 else 10.0  # 30 s: a tenth of it per update would be 80 min, no alarm yet
        budget.update_done()
        if update < 3:
            assert "budget:" not in capsys.readouterr().out  # the first timed update ends 10 s after the first
    out = capsys.readouterr().out
    # 30 s after the first update ended (updates 2-4), so the projection came at update 4: 60 s + 1596 x 10 s
    assert "budget: 10 s per update (timed over updates 2-4): about 4 h 27 min" in out
    assert ("warning: this run is long: it will take about 4 h 27 min (800 epochs at global batch 512, with "
            "--num_train_epochs and --per_device_train_batch_size taken from the cifar recipe's values). Shorten it "
            "with --num_train_epochs, --max_train_steps or --per_device_train_batch_size") in out
    assert budget.outcome(1600, learning_rate=0.12, base_learning_rate=0.06, mixed_precision="bf16") == {
        "updates": 1600, "planned_updates": 1600, "epochs": 800.0, "updates_per_epoch": 2, "global_batch": 512,
        "images_seen": 819200,
        "train_images": 1000, "learning_rate": 0.12, "base_learning_rate": 0.06, "mixed_precision": "bf16"}
    # the same length asked for explicitly: the projection, no warning
    budget = RunBudget(accelerator, RunSize("pretrain", 1600, 512, 1000, 2), clock=clock)
    for _ in range(5):
        clock.now += 10.0
        budget.update_done()
    out = capsys.readouterr().out
    assert "budget: 10 s per update (timed over updates 2-4)" in out and "warning" not in out
    # a first update so slow that a tenth of it per update is still too long: warned at once, then projected
    budget = RunBudget(accelerator, size, clock=clock)
    clock.now += 346.0
    budget.update_done()
    assert ("warning: this run is long: its first update took 6 min; even at a tenth of that, its 1599 updates to "
            "go take 15 h 22 min (800 epochs") in capsys.readouterr().out  # 34.6 s x 1599
    clock.now += 58.0
    budget.update_done()
    out = capsys.readouterr().out
    assert "budget: 58 s per update (timed over updates 2-2)" in out and "warning" not in out  # said once


def test_the_first_checkpoint_says_what_the_checkpoints_take(accelerator, capsys, tmp_path):
    assert planned_checkpoints(("steps", 500), 1600, 2) == 3 and planned_checkpoints(("epochs", 1), 7, 3) == 3
    assert planned_checkpoints(None, 100, 10) == 0 and planned_checkpoints(("epochs", 1), 100, None) is None
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"x" * 3_000_000)
    (checkpoint / "sub" / "optimizer.bin").write_bytes(b"x" * 1_500_000)
    pushed = []
    budget = RunBudget(accelerator, RunSize("search", 10, 8, 24, 3), checkpoint_every=("steps", 2),
                       checkpoints_total_limit=2)
    callback = budget.after_save(pushed.append)
    callback(checkpoint)
    callback(checkpoint)
    out = capsys.readouterr().out
    assert out.count("checkpoint step-00000002") == 1 and pushed == [checkpoint, checkpoint]
    assert (f"checkpoint step-00000002: 4.5 MB; this run writes 5 and keeps the last 2 (--checkpoints_total_limit 2): "
            f"about 9.0 MB on disk under {checkpoint.parent}") in out
    assert format_bytes(999) == "999 B" and format_bytes(2_500_000_000) == "2.5 GB"


def test_the_issues_near_uniform_layer_is_undecided_and_a_clear_argmax_decided():
    # the search that prompted the rule: every weight between 0.140 and 0.146 (uniform 1/7 = 0.143)
    near_uniform = [0.146, 0.145, 0.143, 0.143, 0.142, 0.141, 0.140]
    row = layer_confidence(near_uniform, OPS)
    assert row["op"] == OPS[0] and row["runner_up"] == OPS[1] and row["margin"] == pytest.approx(0.001)
    entropy = -sum(w * math.log(w) for w in near_uniform) / math.log(7)  # the weights sum to 1.000
    assert row["relative_entropy"] == pytest.approx(entropy, abs=1e-6) and entropy > 0.9999
    assert row["decided"] is False
    clear = [0.125] * 7
    clear[3] = 0.25  # twice every other op's weight (0.25 + 6 x 0.125 = 1)
    row = layer_confidence(clear, OPS)
    assert (row["op"], row["margin"], row["decided"]) == ("linear_relu", 0.125, True)
    assert row["relative_entropy"] == pytest.approx(0.9796, abs=1e-4) and 0.9796 < DECIDED_MAX_RELATIVE_ENTROPY
    # both conditions: a clear margin in a near-uniform layer, and a low entropy split between two ops
    assert not layer_confidence([0.19] + [0.81 / 6] * 6, OPS)["decided"]  # margin 0.055, entropy 0.9957
    assert not layer_confidence([0.49, 0.47, 0.01, 0.01, 0.01, 0.005, 0.005], OPS)["decided"]  # margin 0.02
    assert relative_entropy([1.0, 0.0, 0.0]) == 0.0 and relative_entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert DECIDED_MIN_MARGIN == 0.05


def test_a_chosen_op_other_than_the_argmax_and_the_perturbation_rule():
    weights = [0.30, 0.25, 0.20, 0.10, 0.05, 0.05, 0.05]
    capped = layer_confidence(weights, OPS, chosen="linear_relu")  # a cap switched a pool to a linear op
    assert capped["margin"] == pytest.approx(0.10 - 0.30) and capped["runner_up"] == "max_pool_3x3"
    assert not capped["decided"]
    masked = {op: 1.0 for op in OPS}
    masked.update(linear_relu=1.5, linear_silu=1.2)  # removing linear_relu hurts most: +0.5 against +0.2
    table = [{"cell": "projector", "layer": 0, "base_loss": 1.0, "masked_loss": masked, "chosen": "linear_relu"}]
    confidence = genotype_confidence({"projector": [[1 / 7] * 7]}, OPS, {"projector": ["linear_relu"]}, table)
    row = confidence["projector"][0]
    assert (row["loss_increase"], row["runner_up_by_loss"], row["loss_margin"]) == (0.5, "linear_silu", 0.3)
    assert row["decided"] is True and row["layer"] == 1
    masked["linear_silu"] = 1.46  # runner-up within 10 % of the chosen op's increase
    assert not genotype_confidence({"projector": [[1 / 7] * 7]}, OPS, {"projector": ["linear_relu"]},
                                   table)["projector"][0]["decided"]


def test_the_undecided_warning_names_the_layers_and_what_to_do():
    confidence = genotype_confidence({"projector": [[0.25] + [0.125] * 6, [1 / 7] * 7],
                                      "predictor": [[1 / 7] * 7]}, OPS)
    warning = undecided_warning(confidence, "simclr", source="runs/search")
    assert warning.startswith("warning: the genotype of runs/search is undecided in 2 of 3 layers (projector layer "
                              "2, predictor layer 1)")
    assert "--num_train_epochs" in warning and "--max_train_steps" in warning
    assert "--genotype simclr-baseline" in warning
    decided = genotype_confidence({"projector": [[0.25] + [0.125] * 6]}, OPS)
    assert undecided_warning(decided) is None and undecided_warning(None) is None
