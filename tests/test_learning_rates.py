"""Learning rates the usual way (issue 21, the MAE/DeiT convention): ``--learning_rate`` is the rate itself,
``--base_learning_rate`` a rate per 256 images scaled by the global batch (what the recipes set), both at once is
refused; every command with a weight or probe rate resolves them the same way, prints and records both values, and
the optimizer runs at the resolved rate. The search's alpha rate is absolute and stays out of it."""

import json

import pytest
import torch

from nasiam_hf import FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand
from nasiam_hf.commands import linear_eval, search
from nasiam_hf.plans import plan_finetune, plan_linear_eval, plan_pretrain, plan_search


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def parse(cls, *flags):
    argv = ["--dataset_name", "demo", *flags]
    if cls in (LinearEvalCommand, FinetuneCommand):
        argv += ["--model_name_or_path", "m"]
    if cls is not LinearEvalCommand:
        argv += ["--output_dir", "out"]
    return cls.parse(argv)


def weight_plan(cls, *flags, num_processes=1):
    command = parse(cls, *flags)
    if cls is SearchCommand:
        return plan_search(command, "cifar", 32, num_processes).optimization
    if cls is PretrainCommand:
        return plan_pretrain(command, "cifar", 32, num_processes).optimization
    return plan_finetune(command, num_processes).optimization


@pytest.mark.parametrize("cls, recipe_base", [(SearchCommand, 0.06), (PretrainCommand, 0.06), (FinetuneCommand, 0.05)],
                         ids=["search", "pretrain", "finetune"])
def test_weight_rates_resolve_the_same_way_in_every_command(cls, recipe_base):
    batch = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2"]  # x 2 processes: 64
    default = weight_plan(cls, *batch, num_processes=2)
    assert default.global_batch == 64
    assert (default.lr, default.base_lr, default.lr_source) == (pytest.approx(recipe_base * 64 / 256), recipe_base,
                                                                "base")
    assert f"effective lr {recipe_base * 64 / 256:.4g} (= base {recipe_base:g} x 64/256)" in default.describe()

    base = weight_plan(cls, *batch, "--base_learning_rate", "0.2", num_processes=2)
    assert (base.lr, base.base_lr, base.lr_source) == (pytest.approx(0.05), 0.2, "base")
    assert "effective lr 0.05 (= base 0.2 x 64/256)" in base.describe()

    given = weight_plan(cls, *batch, "--learning_rate", "0.01", num_processes=2)
    assert (given.lr, given.base_lr, given.lr_source) == (0.01, pytest.approx(0.04), "given")  # 0.01 x 256 / 64
    assert "lr 0.01 (given; base-equivalent 0.04 per 256)" in given.describe()
    # the absolute rate does not move with the batch; the base rate does
    assert weight_plan(cls, *batch, "--learning_rate", "0.01", num_processes=4).lr == 0.01
    assert weight_plan(cls, *batch, "--base_learning_rate", "0.2", num_processes=4).lr == pytest.approx(0.1)


def test_the_alpha_rate_of_the_search_is_absolute_and_untouched_by_the_weight_rates():
    for flags in ([], ["--learning_rate", "0.5"], ["--base_learning_rate", "0.5"]):
        for processes in (1, 8):
            plan = plan_search(parse(SearchCommand, *flags), "cifar", 32, processes)
            assert plan.arch_lr == 1e-3  # the recipe's AdamW rate, whatever the batch
    assert plan_search(parse(SearchCommand, "--arch_learning_rate", "3e-4"), "cifar", 32, 8).arch_lr == 3e-4


@pytest.mark.parametrize("flags, batch, expected", [
    ([], 64, (0.03 * 64 / 256, 0.03, "base")),  # the recipe's rate on batch-normalised features
    (["--feature_norm", "none"], 256, (30.0, 30.0, "base")),  # the official probe: 30 per 256 on raw features
    (["--base_learning_rate", "0.1"], 128, (0.05, 0.1, "base")),
    (["--learning_rate", "0.5"], 128, (0.5, 1.0, "given")),
])
def test_probe_rates_resolve_once_the_probe_batch_is_known(flags, batch, expected):
    plan = plan_linear_eval(parse(LinearEvalCommand, *flags), "cifar", "simsiam")
    rate = plan.learning_rate(batch)
    lr, base_lr, source = expected
    assert (rate.lr, rate.base_lr, rate.source) == (pytest.approx(lr), pytest.approx(base_lr), source)


def test_a_search_prints_records_and_runs_at_the_given_rate(tiny_parquet, tmp_path, capsys):
    """The start line and training_args.json give both values, and the weight optimizer's schedule starts from the
    absolute rate (read back from the checkpoint's scheduler state, not from what the run printed)."""
    train, _ = tiny_parquet
    out = tmp_path / "search"
    search.main(["--train_file", str(train), "--output_dir", str(out), "--image_size", "16",
                 "--per_device_train_batch_size", "8", "--max_train_steps", "1", "--checkpointing_steps", "1",
                 "--projector_layers", "1", "--predictor_layers", "1", "--hessian_every", "0",
                 "--learning_rate", "0.01"])
    assert "lr 0.01 (given; base-equivalent 0.32 per 256)" in capsys.readouterr().out  # 0.01 x 256 / 8
    resolved = json.loads((out / "training_args.json").read_text())["resolved"]["optimization"]
    assert (resolved["lr"], resolved["base_lr"], resolved["lr_source"]) == (0.01, pytest.approx(0.32), "given")
    (checkpoint,) = (out / "checkpoints").glob("step-*")
    weights = torch.load(checkpoint / "scheduler.bin", weights_only=True)  # the weights' cosine schedule
    assert weights["base_lrs"] and set(weights["base_lrs"]) == {0.01}


def test_a_linear_evaluation_prints_and_records_both_rates(tiny_parquet, tmp_path, capsys):
    from nasiam_hf import NASiamConfig, NASiamModel

    train, test = tiny_parquet
    model = tmp_path / "model"
    NASiamModel(NASiamConfig(image_size=16)).save_pretrained(model)
    linear_eval.main(["--train_file", str(train), "--validation_file", str(test), "--model_name_or_path", str(model),
                      "--output_dir", str(tmp_path / "eval"), "--num_train_epochs", "1", "--no_augmentation",
                      "--per_device_train_batch_size", "16", "--base_learning_rate", "0.08", "--knn_k", "5"])
    assert "global batch 16, effective lr 0.005 (= base 0.08 x 16/256)" in capsys.readouterr().out
    probe = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["linear_probe"]
    assert (probe["lr"], probe["base_lr"], probe["global_batch"]) == (pytest.approx(0.005), 0.08, 16)
