"""Pretraining and linear evaluation end to end: a real ``accelerate launch training/pretrain.py``, then
``training/linear_eval.py``; the other frameworks in-process."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import accelerate_launch
from nasiam_hf import NASiamConfig, NASiamForPreTraining, NASiamModel
from nasiam_hf.commands import linear_eval as linear_eval_command
from nasiam_hf.commands import pretrain as pretrain_command

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "1", "--knn_k", "10"]


@pytest.fixture(scope="module")
def pretrained(tiny_parquet, tmp_path_factory):
    train, test = tiny_parquet
    out = tmp_path_factory.mktemp("pretrain") / "simsiam"
    result = accelerate_launch(
        "training/pretrain.py", "--train_file", train, "--validation_file", test, "--genotype",
        "simsiam-cifar10-resnet18", "--output_dir", out, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
        *TINY,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    linear_eval_command.main([
        "--model_name_or_path", str(out), "--train_file", str(train), "--validation_file", str(test),
        "--num_train_epochs", "3", "--per_device_train_batch_size", "16", "--knn_k", "10",
    ])
    return out, result


@pytest.mark.slow  # an accelerate launch of a 2-epoch pretraining, then a linear evaluation
def test_pretraining_writes_a_loadable_model_folder(pretrained):
    out, result = pretrained
    log = result.stdout + result.stderr
    assert "fixed predictor lr" in log and "recipe cifar" in log
    config = NASiamConfig.from_pretrained(out)
    assert config.projector_genotype == NASiamConfig.from_preset("simsiam-cifar10-resnet18").projector_genotype
    assert json.loads((out / "config.json").read_text())["predictor_genotype"][1] == "avg_pool_3x3"
    # the folder holds the online model; its outputs equal the last checkpoint's online network
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    reference = NASiamForPreTraining(config)
    reference.load_state_dict(load_file(checkpoint / "model.safetensors"))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = reference.nasiam.eval()(x).pooler_output
        for loader in (NASiamModel.from_pretrained, AutoModel.from_pretrained):
            assert torch.equal(loader(out).eval()(x).pooler_output, expected)

    history = json.loads((out / "training_history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]
    for record in history["epochs"]:
        assert -1.0 <= record["loss"] <= 1.0 and record["collapse_std"] > 0
        assert 0.0 <= record["knn_top1"] <= 100.0 and record["images_per_second"] > 0
    assert history["collapse_reference"] == pytest.approx(1 / 2048 ** 0.5)
    for name in ("loss.png", "knn_accuracy.png", "collapse.png", "genotype.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    args = json.loads((out / "training_args.json").read_text())
    assert args["genotype"] == "simsiam-cifar10-resnet18" and args["learning_rate"] is None  # as given
    resolved = args["resolved"]["optimization"]  # what the run used: the recipe's values
    assert resolved["base_lr"] == 0.06 and resolved["recipe"] == "cifar" and args["command"] == "nasiam-pretrain"
    assert "transformers" in args["package_versions"]


@pytest.mark.slow  # uses the launched pretraining
def test_linear_eval_reports_and_fills_the_card(pretrained):
    out, _ = pretrained
    results = json.loads((out / "eval_results.json").read_text())
    probe = results["linear_probe"]
    assert 0.0 <= probe["top1"] <= 100.0 and probe["epochs"] == 3 and probe["split"] == "validation"
    assert "top5" not in probe  # 4 classes: no top-5
    assert 0.0 <= results["knn"]["top1"] <= 100.0
    assert (out / "linear_probe.safetensors").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "simsiam" in card.data.tags
    assert card.data.license == "apache-2.0"
    values = [r.metric_value for r in card.data.eval_results]
    assert probe["top1"] in values
    assert "linear_silu" in card.text and "citation" in card.text.lower()


@pytest.mark.parametrize("genotype", ["simclr-baseline", "mocov2-cifar10-resnet18", "byol-baseline"])
def test_other_frameworks_pretrain_in_process(genotype, tiny_parquet, tmp_path):
    train, test = tiny_parquet
    out = tmp_path / "run"
    extra = ["--queue_size", "16"] if genotype.startswith("mocov2") else []
    pretrain_command.main([
        "--train_file", str(train), "--validation_file", str(test), "--genotype", genotype,
        "--output_dir", str(out), "--num_train_epochs", "1", "--checkpointing_steps", "no", *TINY, *extra,
    ])
    config = NASiamConfig.from_pretrained(out)
    assert config.framework == genotype.split("-")[0]
    history = json.loads((out / "training_history.json").read_text())
    assert len(history["epochs"]) == 1 and "knn_top1" in history["epochs"][0]
    model = NASiamModel.from_pretrained(out)
    assert model.predictor is None if config.framework in ("simclr", "mocov2") else model.predictor is not None
    card = ModelCard.load(out / "README.md")
    assert config.framework in card.data.tags
