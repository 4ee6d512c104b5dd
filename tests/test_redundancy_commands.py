"""Barlow Twins and VICReg through every command on tiny data: the search (LARS, as their recipes), the pretraining
from its result (collapse statistic, kNN monitor, card), linear evaluation, fine-tuning and the torchvision export."""

import json

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.commands import convert as convert_command
from nasiam_hf.commands import finetune as finetune_command
from nasiam_hf.commands import linear_eval as linear_eval_command
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "1", "--checkpointing_steps", "no"]
NARROW = ["--projector_hidden_size", "32", "--projection_dim", "16"]


@pytest.mark.parametrize("framework, name", [
    ("barlowtwins", "Barlow Twins"),
    pytest.param("vicreg", "VICReg", marks=pytest.mark.slow),  # the same path; about 40 s each here
])
def test_search_pretrain_evaluate_finetune_export(framework, name, tiny_parquet, tmp_path, capsys):
    train, test = tiny_parquet
    data = ["--train_file", str(train)]
    search = tmp_path / "search"
    search_command.main([*data, "--framework", framework, "--output_dir", str(search), "--num_train_epochs", "1",
                         "--projector_layers", "2", *NARROW, *TINY])
    printed = capsys.readouterr().out
    assert f"search: {framework} /" in printed and "LARS (trust coefficient 0.02, clipped" in printed
    searched = NASiamConfig.from_pretrained(search)
    assert (searched.framework, len(searched.projector_genotype), searched.predictor_genotype) == (framework, 2, None)
    assert (searched.projector_hidden_size, searched.projection_dim) == (32, 16)  # the flags', not the recipe's
    history = json.loads((search / "search_history.json").read_text())["epochs"]
    assert len(history) == 1 and history[0]["collapse_std"] > 0
    assert list(history[0]["op_weights"]) == ["projector"]

    model = tmp_path / "model"
    pretrain_command.main([*data, "--validation_file", str(test), "--genotype", str(search), "--output_dir",
                           str(model), "--num_train_epochs", "1", "--knn_k", "10", *TINY])
    config = NASiamConfig.from_pretrained(model)
    assert config.projector_genotype == searched.projector_genotype and config.projection_dim == 16
    assert config.loss_constants() == searched.loss_constants() and config.loss_constants()
    epochs = json.loads((model / "training_history.json").read_text())["epochs"]
    assert len(epochs) == 1 and 0 < epochs[0]["collapse_std"] < 1 and 0 <= epochs[0]["knn_top1"] <= 100
    loaded = NASiamModel.from_pretrained(model)
    assert loaded.predictor is None and loaded.projector.output.bias is None
    card = ModelCard.load(model / "README.md")
    assert framework in card.data.tags and name in card.text

    linear_eval_command.main(["--model_name_or_path", str(model), *data, "--validation_file", str(test),
                              "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--knn_k", "10"])
    probe = json.loads((model / "eval_results.json").read_text())
    assert 0 <= probe["linear_probe"]["top1"] <= 100 and 0 <= probe["knn"]["top1"] <= 100
    assert probe["linear_probe"]["top1"] in [r.metric_value for r in ModelCard.load(model / "README.md").data
                                             .eval_results]

    tuned = tmp_path / "tuned"
    finetune_command.main(["--model_name_or_path", str(model), *data, "--validation_file", str(test),
                           "--output_dir", str(tuned), "--max_train_steps", "1", "--optimizer", "lars", *TINY])
    assert "LARS (trust coefficient 0.001" in capsys.readouterr().out
    assert 0 <= json.loads((tuned / "eval_results.json").read_text())["fine_tuning"]["top1"] <= 100

    exported = tmp_path / "backbone.safetensors"
    convert_command.main(["torchvision", str(model), str(exported)])
    weights = load_file(exported)
    assert weights.keys() == loaded.backbone.state_dict().keys()


def test_the_one_call_api_searches_pretrains_and_embeds(tiny_parquet, tmp_path):
    import torch

    import nasiam_hf

    train, test = tiny_parquet
    tiny = dict(image_size=8, per_device_train_batch_size=8, max_train_steps=2, checkpointing_steps="no",
                projector_hidden_size=32, projection_dim=16)
    searched = nasiam_hf.search(train_file=train, framework="vicreg", projector_layers=2, output_dir=tmp_path / "s",
                                hessian_every=0, **tiny)
    genotype = searched.metrics["genotype"]  # these methods have no predictor
    assert searched.model.config.framework == "vicreg"
    assert len(genotype["projector"]) == 2 and genotype["predictor"] is None
    assert list(genotype["confidence"]) == ["projector"] and len(genotype["confidence"]["projector"]) == 2
    pretrained = nasiam_hf.pretrain(train_file=train, validation_file=test, genotype=str(tmp_path / "s"),
                                    output_dir=tmp_path / "m", knn_k=5, optimizer="sgd", **tiny)
    assert pretrained.model.config.framework == "vicreg" and 0 <= pretrained.metrics["knn_top1"] <= 100
    embedded = nasiam_hf.embed(model_name_or_path=tmp_path / "m", train_file=train, output_dir=tmp_path / "e",
                               embed="projector")
    assert (embedded.metrics["rows"], embedded.metrics["dimension"]) == (48, 16) and embedded.model is None
    with pytest.raises(ValueError, match=r"nasiam_hf.embed\(\): unknown keyword 'shard'"):
        nasiam_hf.embed(model_name_or_path=tmp_path / "m", train_file=train, output_dir=tmp_path / "x", shard=4)
    assert torch.is_tensor(pretrained.model.nasiam.projector.output.weight)
