"""The one-call API (issue 21): ``nasiam_hf.search / pretrain / linear_eval / finetune(**flags)``. Each command runs
through it on tiny data and returns one ``RunResult`` whose model is the trained one and whose metrics are the
run's; the keywords build the same arguments as the same flags on the command line; unknown keywords, wrong types,
bad choices and contradictory values are refused naming the keyword and what it takes, before anything is written;
the README's one-call snippet runs as written."""

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nasiam_hf
from conftest import readme_blocks
from nasiam_hf import (
    FinetuneCommand, LinearEvalCommand, NASiamForArchitectureSearch, NASiamForImageClassification,
    NASiamForPreTraining, PretrainCommand, RunResult, SearchCommand,
)
from nasiam_hf.arguments.parsing import parse_keywords
from nasiam_hf.errors import UsageError

TINY = dict(image_size=16, per_device_train_batch_size=8, max_train_steps=2, checkpointing_steps="no")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def api_runs(tiny_parquet, tmp_path_factory):
    """search -> pretrain (the search's genotype) -> linear evaluation and fine-tuning of that model, each one call."""
    train, test = tiny_parquet
    root = tmp_path_factory.mktemp("api")
    data = dict(train_file=str(train), validation_file=test)  # a str and a Path: both are accepted
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {"search": nasiam_hf.search(**data, **TINY, output_dir=root / "search", projector_layers=1,
                                              predictor_layers=1, hessian_every=0)}
        results["pretrain"] = nasiam_hf.pretrain(**data, **TINY, genotype=str(root / "search"),
                                                 output_dir=str(root / "pretrain"), knn_k=5)
        results["linear_eval"] = nasiam_hf.linear_eval(**data, model_name_or_path=str(root / "pretrain"),
                                                       output_dir=str(root / "eval"), num_train_epochs=1,
                                                       per_device_train_batch_size=8, knn_k=5)
        results["finetune"] = nasiam_hf.finetune(**data, **TINY, model_name_or_path=str(root / "pretrain"),
                                                 output_dir=str(root / "finetune"), base_learning_rate=0.1)
    finally:
        torch.set_num_threads(previous)
    return root, results


def same_weights(model: torch.nn.Module, file: Path) -> bool:
    saved = load_file(file)
    live = {k: v for k, v in model.state_dict().items() if k in saved}
    return len(live) == len(saved) and all(torch.equal(live[k].cpu(), saved[k]) for k in saved)


def test_every_command_returns_one_result_with_its_folder_model_and_metrics(api_runs):
    root, results = api_runs
    for name, result in results.items():
        assert type(result) is RunResult, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.metrics = {}
    search, pretrain, evaluation, tuning = (results[k] for k in ("search", "pretrain", "linear_eval", "finetune"))
    assert [r.output_dir for r in results.values()] == [root / "search", root / "pretrain", root / "eval",
                                                        root / "finetune"]

    # search: the trained supernet, whose alphas give the genotype the folder holds
    assert isinstance(search.model, NASiamForArchitectureSearch)
    saved_genotype = json.loads((root / "search" / "genotype.json").read_text())
    assert search.model.genotype() == {k: saved_genotype[k] for k in ("projector", "predictor")}
    assert search.metrics["genotype"] == saved_genotype
    last = json.loads((root / "search" / "search_history.json").read_text())["epochs"][-1]
    # the last epoch's record, its genotype (the alphas' argmax then) replaced by the one the search settled on
    assert {k: v for k, v in search.metrics.items() if k != "genotype"} == {k: v for k, v in last.items()
                                                                            if k != "genotype"}

    # pretraining: the returned model is the one saved, and the metrics are the last epoch's
    assert isinstance(pretrain.model, NASiamForPreTraining)
    assert same_weights(pretrain.model.nasiam, root / "pretrain" / "model.safetensors")  # the folder: a NASiamModel
    assert pretrain.model.config.projector_genotype == saved_genotype["projector"]
    history = json.loads((root / "pretrain" / "training_history.json").read_text())["epochs"]
    assert pretrain.metrics == history[-1] and -1.0 <= pretrain.metrics["loss"] <= 1.0

    # linear evaluation: no model, the probe's and the kNN's results
    assert evaluation.model is None
    saved = json.loads((root / "eval" / "eval_results.json").read_text())
    assert evaluation.metrics["linear_probe"] == saved["linear_probe"] and evaluation.metrics["knn"] == saved["knn"]
    assert evaluation.metrics["knn"]["k_requested"] == 5 and evaluation.metrics["linear_probe"]["epochs"] == 1

    # fine-tuning: the classifier saved (4 classes), its results, and the rate the keyword asked for
    assert isinstance(tuning.model, NASiamForImageClassification) and tuning.model.config.num_labels == 4
    assert same_weights(tuning.model, root / "finetune" / "model.safetensors")
    assert tuning.metrics["fine_tuning"] == json.loads((root / "finetune" / "eval_results.json").read_text())[
        "fine_tuning"]
    resolved = json.loads((root / "finetune" / "training_args.json").read_text())["resolved"]["optimization"]
    assert (resolved["base_lr"], resolved["lr"], resolved["lr_source"]) == (0.1, pytest.approx(0.1 * 8 / 256), "base")


# ---------------------------------------------------------------------------------------------------------------------
# The keywords are the flags
# ---------------------------------------------------------------------------------------------------------------------
EQUIVALENT = [  # (command, keywords, the same on the command line)
    (SearchCommand,
     dict(dataset_name="demo", output_dir="out", framework="mocov2", queue_size=16, base_learning_rate=0.1,
          streaming=True, max_train_steps=5, search_method="darts-minus", aux_skip_weight=0.5,
          backbone="timm/resnet18", backbone_kwargs={"drop_rate": 0.1}, checkpointing_steps="100steps"),
     "--dataset_name demo --output_dir out --framework mocov2 --queue_size 16 --base_learning_rate 0.1 --streaming "
     "--max_train_steps 5 --search_method darts-minus --aux_skip_weight 0.5 --backbone timm/resnet18 "
     """--backbone_kwargs '{"drop_rate": 0.1}' --checkpointing_steps 100steps"""),
    (PretrainCommand,
     dict(train_dir=Path("photos"), output_dir="out", genotype="simclr-baseline", num_train_epochs=2,
          learning_rate=1, no_augmentation=True, recipe="imagenet", mixed_precision="bf16", knn_every="50steps"),
     "--train_dir photos --output_dir out --genotype simclr-baseline --num_train_epochs 2 --learning_rate 1 "
     "--no_augmentation --recipe imagenet --mixed_precision bf16 --knn_every 50steps"),
    (LinearEvalCommand,
     dict(train_file="t.parquet", model_name_or_path="m", feature_norm="none", base_learning_rate=30,
          knn_k=10, seed=3),
     "--train_file t.parquet --model_name_or_path m --feature_norm none --base_learning_rate 30 --knn_k 10 "
     "--seed 3"),
    (FinetuneCommand,
     dict(train_dir="photos", model_name_or_path="m", output_dir="out", freeze_backbone=True,
          classifier_lr_multiplier=5.0, per_device_train_batch_size=4),
     "--train_dir photos --model_name_or_path m --output_dir out --freeze_backbone --classifier_lr_multiplier 5 "
     "--per_device_train_batch_size 4"),
]


@pytest.mark.parametrize("cls, keywords, flags", EQUIVALENT, ids=[c.name for c, _, _ in EQUIVALENT])
def test_keywords_build_the_same_arguments_as_the_flags(cls, keywords, flags):
    from_keywords = parse_keywords(cls, keywords, "test")
    assert from_keywords == cls.parse(shlex.split(flags))
    assert not any(isinstance(v, Path) for v in from_keywords.values().values())  # a Path arrives as a string


REFUSED = [  # (function, keywords beyond the required ones, the message)
    (nasiam_hf.search, dict(learning_rat=0.1), r"nasiam_hf\.search\(\): unknown keyword 'learning_rat' \(did you "
                                               r"mean 'learning_rate'\?\)"),
    (nasiam_hf.pretrain, dict(genotpye="simclr-baseline"), r"unknown keyword 'genotpye' \(did you mean 'genotype'"),
    (nasiam_hf.pretrain, dict(framework="simclr"), r"unknown keyword 'framework'; the keywords are the flags of "
                                                   r"`nasiam-pretrain --help`"),
    (nasiam_hf.linear_eval, dict(knn_kk=5), r"nasiam_hf\.linear_eval\(\): unknown keyword 'knn_kk' \(did you mean "
                                            r"'knn_k'\?\)"),
    (nasiam_hf.finetune, dict(freeze=True), r"nasiam_hf\.finetune\(\): unknown keyword 'freeze'"),
    (nasiam_hf.search, dict(num_train_epochs="2"), r"num_train_epochs='2' is of type str; it takes an int"),
    (nasiam_hf.search, dict(num_train_epochs=2.0), r"num_train_epochs=2\.0 is of type float; it takes an int"),
    (nasiam_hf.pretrain, dict(streaming="yes"), r"streaming='yes' is of type str; it takes True or False"),
    (nasiam_hf.pretrain, dict(learning_rate="0.1"), r"learning_rate='0\.1' is of type str; it takes a number"),
    (nasiam_hf.linear_eval, dict(seed=True), r"seed=True is of type bool; it takes an int"),
    (nasiam_hf.finetune, dict(train_dir=3), r"train_dir=3 is of type int; it takes a string"),
    (nasiam_hf.finetune, dict(seed=None), r"seed=None is not allowed; it takes an int \(default 42\)"),
    (nasiam_hf.search, dict(framework="simclrr"), r"framework: invalid choice 'simclrr' \(choose from simsiam, "
                                                  r"simclr, mocov2, byol, barlowtwins, vicreg\); did you mean 'simclr'\?"),
    (nasiam_hf.linear_eval, dict(feature_norm="batchnom"), r"feature_norm: invalid choice 'batchnom' \(choose "
                                                           r"from batchnorm, none\); did you mean 'batchnorm'\?"),
    (nasiam_hf.pretrain, dict(learning_rate=0.1, base_learning_rate=0.2), r"pass --learning_rate .* or "
                                                                          r"--base_learning_rate .*, not both"),
    (nasiam_hf.search, dict(train_portion=1.5), r"--train_portion must be strictly between 0 and 1"),
    (nasiam_hf.finetune, dict(push_to_hub=True), r"--push_to_hub and --push_checkpoints need --hub_model_id"),
]


@pytest.mark.parametrize("call, extra, message", REFUSED, ids=[f"{c.__name__}:{next(iter(k))}" for c, k, _ in REFUSED])
def test_bad_keywords_are_refused_naming_the_keyword(call, extra, message, tmp_path):
    required = {"train_dir": str(tmp_path / "photos"), "output_dir": str(tmp_path / "out")}
    if call in (nasiam_hf.linear_eval, nasiam_hf.finetune):
        required["model_name_or_path"] = str(tmp_path / "model")
    with pytest.raises(ValueError, match=message):  # UsageError for the keyword checks, a ValueError
        call(**{**required, **extra})
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("call, needs", [(nasiam_hf.search, "output_dir=..."), (nasiam_hf.pretrain, "output_dir"),
                                         (nasiam_hf.linear_eval, "model_name_or_path=..."),
                                         (nasiam_hf.finetune, "model_name_or_path=..., output_dir=...")])
def test_a_missing_required_keyword_is_named(call, needs):
    with pytest.raises(UsageError, match=rf"nasiam_hf\.{call.__name__}\(\): missing keyword .*{needs}"):
        call(dataset_name="demo")


def test_the_functions_stay_on_the_package_beside_their_engine_modules():
    import nasiam_hf.search  # noqa: F401 - the engine module of the same name
    from nasiam_hf.pretrain import run_pretrain
    from nasiam_hf.search import alpha_step  # noqa: F401

    assert nasiam_hf.search is nasiam_hf.api.search and nasiam_hf.pretrain is nasiam_hf.api.pretrain
    assert nasiam_hf.run_pretrain is run_pretrain
    assert {"search", "pretrain", "linear_eval", "finetune", "RunResult", "run_search"} <= set(dir(nasiam_hf))


# ---------------------------------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------------------------------
def test_the_readme_one_call_snippet_runs(tmp_path, monkeypatch, capsys):
    """The first block of README's Python section, as written, on a small folder of photos in class sub-folders."""
    code = readme_blocks("## Python", "python")[0]
    assert "nasiam_hf.pretrain(" in code and 'train_dir="photos"' in code
    for index in range(16):
        folder = tmp_path / "photos" / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 + 6 * index, 200 - 5 * index, 90 + 50 * (index % 2))).save(
            folder / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_python_snippet"}
    exec(compile(code, "README.md Python snippet", "exec"), namespace)  # noqa: S102 - the README's own example
    result = namespace["result"]
    assert result.output_dir == Path("runs/from-python") and (tmp_path / "runs/from-python/config.json").is_file()
    assert namespace["model"] is result.model and isinstance(result.model, NASiamForPreTraining)
    assert f"runs/from-python {result.metrics['loss']}" in capsys.readouterr().out
    history = json.loads((tmp_path / "runs/from-python/training_history.json").read_text())["epochs"]
    assert len(history) == 2 and result.metrics == history[-1]  # num_train_epochs=2
