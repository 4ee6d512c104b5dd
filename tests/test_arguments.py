"""Typed arguments end to end (issue 15): the parsed bundles are frozen, the resolution and a run of every engine
leave them as they were, every command runs from a YAML config with flags overriding it, a run's
``training_args.json`` reruns it, config values are converted and checked like flags, ``--help`` documents every
flag by group without importing the engines, and each command keeps its own defaults."""

import contextlib
import copy
import dataclasses
import io
import json
import re
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_image_parquet
from nasiam_hf import FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand
from nasiam_hf.arguments import (
    COMMANDS, DataArguments, EvalModelArguments, EvalRunArguments, FinetuneModelArguments,
    FinetuneOptimizationArguments, FinetuneRunArguments, KnnArguments, MonitorArguments, OptimizationArguments,
    PretrainArguments, ProbeArguments, RunArguments, SearchArguments,
)
from nasiam_hf.commands import finetune, linear_eval, pretrain, search
from nasiam_hf.errors import UsageError
from nasiam_hf.hub import save_run_metadata
from nasiam_hf.plans import (
    check_pretrain_flags, check_search_flags, plan_finetune, plan_linear_eval, plan_pretrain, plan_search,
)

SMALL_SEARCH = dict(projector_layers=1, predictor_layers=1, hessian_every=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train, test) parquet files: 32 and 16 labelled images of 16x16 pixels."""
    folder = tmp_path_factory.mktemp("arguments-data")
    return (write_image_parquet(folder / "train.parquet", 32, seed=0),
            write_image_parquet(folder / "test.parquet", 16, seed=1))


def minimal_argv(cls, tmp_path) -> list[str]:
    argv = ["--dataset_name", "demo"]
    if cls in (LinearEvalCommand, FinetuneCommand):
        argv += ["--model_name_or_path", str(tmp_path / "model")]
    if cls is not LinearEvalCommand:
        argv += ["--output_dir", str(tmp_path / "out")]
    return argv


def assert_frozen(command) -> None:
    """Every group of ``command``, and the bundle itself, refuses any write."""
    for attribute in type(command).groups():
        group = getattr(command, attribute)
        for field in dataclasses.fields(group):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(group, field.name, getattr(group, field.name))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(command, attribute, group)


# ---------------------------------------------------------------------------------------------------------------------
# Frozen arguments: nothing writes into them
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(COMMANDS.values()), ids=list(COMMANDS))
def test_parsed_arguments_are_frozen(cls, tmp_path):
    assert_frozen(cls.parse(minimal_argv(cls, tmp_path)))


def test_resolution_leaves_the_arguments_unchanged(tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    searching = SearchCommand.parse(["--dataset_name", "demo", *out, "--framework", "mocov2", "--queue_size", "16",
                                     "--search_method", "beta-darts", "--gradient_accumulation_steps", "2"])
    pretraining = PretrainCommand.parse(["--dataset_name", "demo", *out, "--genotype", "mocov2-cifar10-resnet18",
                                         "--backbone", "resnet50", "--temperature", "0.3", "--recipe", "imagenet"])
    evaluating = LinearEvalCommand.parse(["--dataset_name", "demo", "--model_name_or_path", "m", "--recipe",
                                          "imagenet"])
    tuning = FinetuneCommand.parse(["--dataset_name", "demo", "--model_name_or_path", "m", *out])
    resolutions = [
        (searching, lambda c: plan_search(c, "cifar", 32, 2, check_search_flags(c))),
        (pretraining, lambda c: plan_pretrain(c, "imagenet", 224, 1, check_pretrain_flags(c))),
        (evaluating, lambda c: plan_linear_eval(c, "cifar", "simclr")),
        (tuning, lambda c: plan_finetune(c, 4)),
    ]
    plans = []
    for command, resolve in resolutions:
        before, values = copy.deepcopy(command), command.values()
        plans.append(resolve(command))
        assert command == before and command.values() == values
        assert_frozen(command)
        with pytest.raises(dataclasses.FrozenInstanceError):
            plans[-1].optimization = None  # the plans are frozen too
    search_plan, pretrain_plan, probe_plan, finetune_plan = plans
    # what was resolved sits in the plan, not in the arguments
    assert searching.optimization.per_device_train_batch_size is None
    assert search_plan.optimization.per_device_batch == 128 and search_plan.optimization.global_batch == 512
    assert search_plan.config["queue_size"] == 16 and search_plan.variant.search_method == "beta-darts"
    assert search_plan.arch_optimizer == "adam" and searching.search.arch_learning_rate is None
    assert pretraining.optimization.learning_rate is None and pretrain_plan.optimization.base_lr == 0.03
    assert pretrain_plan.config["backbone"] == "resnet50" and pretrain_plan.config["temperature"] == 0.3
    assert pretrain_plan.config["cifar_stem"] is False and pretrain_plan.config["queue_size"] == 65536
    assert probe_plan.recipe == "imagenet" and evaluating.probe.recipe == "imagenet"
    assert finetune_plan.optimization.global_batch == 512 and tuning.optimization.per_device_train_batch_size == 128


def test_engines_run_from_python_with_dataclass_arguments_and_leave_them_unchanged(data, tmp_path):
    from nasiam_hf import (
        NASiamForArchitectureSearch, NASiamForPreTraining, NASiamModel, run_finetune, run_linear_eval, run_pretrain,
        run_search,
    )

    train, test = data
    images = DataArguments(train_file=str(train), validation_file=str(test), image_size=8)
    steps = OptimizationArguments(per_device_train_batch_size=8, max_train_steps=2)
    searching = SearchCommand(data=images, search=SearchArguments(**SMALL_SEARCH), optimization=steps,
                              run=RunArguments(output_dir=str(tmp_path / "search"), checkpointing_steps="no"))
    pretraining = PretrainCommand(data=images, pretrain=PretrainArguments(genotype=str(tmp_path / "search")),
                                  monitor=MonitorArguments(knn_k=5), optimization=steps,
                                  run=RunArguments(output_dir=str(tmp_path / "pretrain"), checkpointing_steps="no"))
    evaluating = LinearEvalCommand(data=images, model=EvalModelArguments(model_name_or_path=str(tmp_path / "pretrain")),
                                   probe=ProbeArguments(num_train_epochs=1, per_device_train_batch_size=8),
                                   knn=KnnArguments(knn_k=5), run=EvalRunArguments(output_dir=str(tmp_path / "eval")))
    tuning = FinetuneCommand(
        data=images, model=FinetuneModelArguments(model_name_or_path=str(tmp_path / "pretrain")),
        optimization=FinetuneOptimizationArguments(per_device_train_batch_size=8, max_train_steps=2),
        run=FinetuneRunArguments(output_dir=str(tmp_path / "finetune"), checkpointing_steps="no"))
    results = {}
    for name, engine, command in (("search", run_search, searching), ("pretrain", run_pretrain, pretraining),
                                  ("eval", run_linear_eval, evaluating), ("finetune", run_finetune, tuning)):
        before, values = copy.deepcopy(command), command.values()
        results[name] = engine(command)
        assert command == before and command.values() == values, name
        assert_frozen(command)
    assert isinstance(results["search"], NASiamForArchitectureSearch)
    genotype = json.loads((tmp_path / "search" / "genotype.json").read_text())
    assert isinstance(results["pretrain"], NASiamForPreTraining)
    assert NASiamModel.from_pretrained(tmp_path / "pretrain").config.projector_genotype == genotype["projector"]
    assert results["eval"]["linear_probe"]["epochs"] == 1 and results["eval"]["knn"]["k_requested"] == 5
    assert results["finetune"] == tmp_path / "finetune" and (tmp_path / "finetune" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Config files: every command from YAML (or JSON), flags over the file, training_args.json reruns a run
# ---------------------------------------------------------------------------------------------------------------------
def write_config(path, values: dict):
    path.write_text(json.dumps(values) if path.suffix == ".json" else yaml.safe_dump(values), encoding="utf-8")
    return path


def record(folder) -> dict:
    return json.loads((folder / "training_args.json").read_text())


@pytest.fixture(scope="module")
def config_runs(data, tmp_path_factory):
    """Each command run from its config file with a flag overriding one of the file's values: search -> pretrain
    (from the search's genotype) -> linear evaluation and fine-tuning of that model. Returns the folders, the
    configs and the printed output of each run."""
    train, test = data
    root = tmp_path_factory.mktemp("config-runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    common = {"train_file": str(train), "validation_file": str(test), "image_size": 8}
    configs = {
        "search": write_config(root / "search.yaml", {
            **common, **SMALL_SEARCH, "output_dir": str(root / "search"), "per_device_train_batch_size": 8,
            "max_train_steps": 3, "checkpointing_steps": "no", "seed": 3}),
        "pretrain": write_config(root / "pretrain.yaml", {
            **common, "genotype": str(root / "search"), "output_dir": str(root / "pretrain"), "knn_k": 50,
            "per_device_train_batch_size": 8, "max_train_steps": 2, "checkpointing_steps": "no"}),
        "eval": write_config(root / "eval.yaml", {
            **common, "model_name_or_path": str(root / "pretrain"), "output_dir": str(root / "eval"),
            "num_train_epochs": 3, "per_device_train_batch_size": 8, "knn_k": 5}),
        "finetune": write_config(root / "finetune.yaml", {
            **common, "model_name_or_path": str(root / "pretrain"), "output_dir": str(root / "finetune"),
            "per_device_train_batch_size": 8, "max_train_steps": 3, "checkpointing_steps": "no",
            "learning_rate": 0.01}),
    }
    # YAML 1.1 reads 1e-3 as a string: written by hand, as a user would
    with open(configs["search"], "a", encoding="utf-8") as f:
        f.write("learning_rate: 1e-3\n")
    overrides = {"search": ["--max_train_steps", "2"], "pretrain": ["--knn_k", "5", "--base_learning_rate", "0.02"],
                 "eval": ["--num_train_epochs", "1"], "finetune": ["--max_train_steps", "2"]}
    logs = {}
    try:
        for name, command in (("search", search), ("pretrain", pretrain), ("eval", linear_eval),
                              ("finetune", finetune)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                command.main(["--config", str(configs[name]), *overrides[name]])
            logs[name] = out.getvalue()
    finally:
        torch.set_num_threads(previous)
    return {"root": root, "configs": configs, "logs": logs}


def test_every_command_runs_from_a_config_file_with_flags_over_it(config_runs):
    root, logs = config_runs["root"], config_runs["logs"]
    searched = record(root / "search")  # output_dir came from the file: the file satisfies a required flag
    assert searched["max_train_steps"] == 2 and searched["seed"] == 3  # the flag over the file; the file's seed
    assert searched["learning_rate"] == 0.001 and searched["resolved"]["optimization"]["lr"] == 0.001  # absolute
    assert searched["resolved"]["optimization"]["lr_source"] == "given"
    assert len(json.loads((root / "search" / "search_history.json").read_text())["epochs"]) == 1
    pretrained = record(root / "pretrain")
    assert pretrained["knn_k"] == 5 and pretrained["max_train_steps"] == 2
    assert "effective lr 0.000625 (= base 0.02 x 8/256)" in logs["pretrain"]  # the printed plan uses the flag
    evaluated = json.loads((root / "eval" / "eval_results.json").read_text())
    assert evaluated["linear_probe"]["epochs"] == 1 and evaluated["knn"]["k_requested"] == 5
    tuned = record(root / "finetune")
    assert tuned["max_train_steps"] == 2 and tuned["learning_rate"] == 0.01
    assert len(json.loads((root / "finetune" / "finetune_history.json").read_text())["epochs"]) == 1


@pytest.mark.parametrize("name, cls", [("search", SearchCommand), ("pretrain", PretrainCommand),
                                       ("finetune", FinetuneCommand)])
def test_training_args_json_parses_back_to_the_same_arguments(config_runs, name, cls, tmp_path):
    folder = config_runs["root"] / name
    original = cls.parse(["--config", str(folder / "training_args.json")])
    assert original.values() == {k: v for k, v in record(folder).items() if k in original.values()}
    moved = cls.parse(["--config", str(folder / "training_args.json"), "--output_dir", str(tmp_path)])
    assert moved == dataclasses.replace(original, run=dataclasses.replace(original.run, output_dir=str(tmp_path)))


def test_training_args_json_reruns_a_pretraining(config_runs, tmp_path):
    first = config_runs["root"] / "pretrain"
    again = tmp_path / "again"
    pretrain.main(["--config", str(first / "training_args.json"), "--output_dir", str(again)])
    before, after = record(first), record(again)
    assert after["resolved"] == before["resolved"]
    skip = {"output_dir", "timestamp_utc"}
    assert {k: v for k, v in after.items() if k not in skip} == {k: v for k, v in before.items() if k not in skip}
    old, new = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)  # the same run again


def test_a_redacted_token_is_dropped_from_a_rerun(tmp_path):
    command = PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", str(tmp_path / "out"),
                                     "--push_to_hub", "--hub_model_id", "someone/model", "--hub_token", "hf_secret"])
    path = save_run_metadata(tmp_path, command, command=command.name, resolved={"optimization": {}})
    assert json.loads(path.read_text())["hub_token"] == "<redacted>"
    rerun = PretrainCommand.parse(["--config", str(path)])
    assert rerun.hub.hub_token is None and rerun.hub.push_to_hub and rerun.hub.hub_model_id == "someone/model"
    assert rerun == dataclasses.replace(command, hub=dataclasses.replace(command.hub, hub_token=None))


def test_unknown_config_keys_are_refused_naming_them(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", {"dataset_name": "demo", "output_dir": str(tmp_path / "out"),
                                                  "learning_rat": 0.1, "bogus": 1})
    with pytest.raises(SystemExit) as info:
        pretrain.main(["--config", str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert "unknown keys 'bogus', 'learning_rat' (did you mean 'learning_rate'?)" in lines[0]
    assert str(config) in lines[0] and not (tmp_path / "out").exists()
    # a key of another command is unknown too
    write_config(config, {"dataset_name": "demo", "output_dir": str(tmp_path / "out"), "framework": "simclr"})
    with pytest.raises(ValueError, match="unknown keys 'framework'"):
        PretrainCommand.parse(["--config", str(config)])


def test_config_values_are_converted_and_checked_like_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        dataset_name: demo
        output_dir: {tmp_path / "out"}
        learning_rate: 1e-3
        num_train_epochs: "2"
        streaming: yes
        max_train_steps: 10
        framework: mocov2
        queue_size: 16
        search_method: darts-minus
        aux_skip_weight: 0.5
        backbone: timm/resnet18
        backbone_kwargs: {{drop_rate: 0.1}}
        image_mean: 0.5,0.5,0.5
        checkpointing_steps: 100steps
        """), encoding="utf-8")
    from_file = SearchCommand.parse(["--config", str(config)])
    assert type(from_file.optimization.learning_rate) is float and from_file.optimization.learning_rate == 0.001
    assert from_file.optimization.num_train_epochs == 2 and from_file.data.streaming is True
    assert json.loads(from_file.model.backbone_kwargs) == {"drop_rate": 0.1}
    from_flags = SearchCommand.parse([
        "--dataset_name", "demo", "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3",
        "--num_train_epochs", "2", "--streaming", "--max_train_steps", "10", "--framework", "mocov2",
        "--queue_size", "16", "--search_method", "darts-minus", "--aux_skip_weight", "0.5", "--backbone",
        "timm/resnet18", "--backbone_kwargs", '{"drop_rate": 0.1}', "--image_mean", "0.5,0.5,0.5",
        "--checkpointing_steps", "100steps"])
    assert from_file == from_flags
    as_json = write_config(tmp_path / "run.json", yaml.safe_load(config.read_text()))  # a JSON file reads the same
    assert SearchCommand.parse(["--config", str(as_json)]) == from_flags

    base = {"dataset_name": "demo", "output_dir": str(tmp_path / "out")}
    refused = [
        ({"framework": "nope"},
         r"framework: 'nope' is not one of \['simsiam', 'simclr', 'mocov2', 'byol', 'barlowtwins', 'vicreg'\]"),
        ({"search_method": "darts+"}, r"search_method: 'darts\+' is not one of"),
        ({"seed": 1.5}, r"seed: 1.5 is not a valid value"),
        ({"seed": True}, r"seed: True is not a valid value \(a boolean"),
        ({"learning_rate": "fast"}, r"learning_rate: 'fast' is not a valid value"),
        ({"checkpointing_steps": False}, r"checkpointing_steps: False is not a valid value .*quote the value"),
        ({"train_portion": [0.5]}, r"train_portion: \[0.5\] is not a valid value"),
        ({"knn_every": "x"}, "unknown keys 'knn_every'"),  # a pretraining flag, not a search one
        ({"train_portion": 1.5}, r"--train_portion must be strictly between 0 and 1, got 1.5"),
        ({"image_mean": "1,2"}, r"--image_mean must be three comma-separated numbers"),
    ]
    for values, message in refused:
        write_config(config, {**base, **values})
        with pytest.raises(ValueError, match=message):
            SearchCommand.parse(["--config", str(config)])


# ---------------------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------------------
def help_sections(text: str) -> dict[str, dict[str, str]]:
    """``{group heading: {flag: its help text, whitespace removed}}`` of an argparse help page."""
    sections, flag = {}, None
    for line in text.splitlines():
        heading = re.fullmatch(r"(\S.*):", line)
        entry = re.match(r"  (--\w+)(.*)", line)
        if heading:
            sections[heading.group(1)], flag = {}, None
        elif entry and sections:
            flag = entry.group(1)
            current = list(sections.values())[-1]
            spec, _, rest = entry.group(2).partition("  ")  # the help starts on the same line after two spaces
            current[flag] = re.sub(r"\s+", "", rest)
        elif flag is not None and line.startswith("   "):
            current[flag] += re.sub(r"\s+", "", line)
        else:
            flag = None
    return sections


@pytest.mark.parametrize("name, main", [("search", search.main), ("pretrain", pretrain.main),
                                        ("linear-eval", linear_eval.main), ("finetune", finetune.main)])
def test_help_lists_every_flag_with_help_and_default_by_group(name, main, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    sections = help_sections(text)
    cls = COMMANDS[f"nasiam-{name}"]
    usage = text.split("\n\n", 1)[0]
    for dtype in cls.groups().values():
        heading = dtype._argument_group_name
        assert heading in sections, (heading, list(sections))
        for field in dataclasses.fields(dtype):
            flag = f"--{field.name}"
            assert flag in sections[heading], (heading, flag)
            shown = sections[heading][flag]
            assert re.sub(r"\s+", "", field.metadata["help"]) in shown, flag  # its help text
            assert shown.endswith(f"(default:{str(field.default).replace(' ', '')})"), (flag, shown)  # its default
            in_brackets = re.search(rf"\[{flag}[ \]]", usage) is not None
            assert in_brackets is not field.metadata.get("required", False), flag  # required flags are marked
            others = [h for h, flags in sections.items() if h != heading and flag in flags]
            assert not others, (flag, others)  # in its own group only
    assert "--config" in sections["options"]


def test_help_imports_no_torch_datasets_accelerate_nor_the_engines():
    """Every command's --help (the console scripts' path: the command module, then main) parses with the arguments
    package and transformers' argument parser alone: no torch, torchvision, datasets, accelerate, nor our engines."""
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from nasiam_hf.commands import convert, finetune, linear_eval, pretrain, search
        for command in (search, pretrain, linear_eval, finetune, convert):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    command.main(["--help"])
                except SystemExit as exit:
                    assert exit.code == 0, exit.code
            assert "usage:" in out.getvalue(), command
        print(json.dumps(sorted(sys.modules)))
        """)
    result = run_cli([sys.executable, "-c", script], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "transformers.hf_argparser" in modules  # the control: the parser did run

    def present(prefix):
        return [m for m in modules if m == prefix or m.startswith(prefix + ".")]

    for heavy in ("torch", "torchvision", "datasets", "accelerate", "pyarrow", "timm", "safetensors",
                  "transformers.modeling_utils", "transformers.models.auto", "nasiam_hf.configuration_nasiam",
                  "nasiam_hf.modeling_nasiam", "nasiam_hf.data", "nasiam_hf.search", "nasiam_hf.pretrain",
                  "nasiam_hf.linear_eval", "nasiam_hf.finetune", "nasiam_hf.trainer", "nasiam_hf.plans",
                  "nasiam_hf.feeds", "nasiam_hf.checkpoints", "nasiam_hf.evaluation", "nasiam_hf.hub"):
        assert not present(heavy), (heavy, present(heavy)[:5])


# ---------------------------------------------------------------------------------------------------------------------
# Per-command defaults
# ---------------------------------------------------------------------------------------------------------------------
def test_each_command_keeps_its_own_defaults(tmp_path, capsys):
    parsed = {cls: cls.parse(minimal_argv(cls, tmp_path)) for cls in COMMANDS.values()}
    searching, pretraining = parsed[SearchCommand], parsed[PretrainCommand]
    evaluating, tuning = parsed[LinearEvalCommand], parsed[FinetuneCommand]
    assert [c.run.seed for c in (searching, pretraining, evaluating, tuning)] == [42, 42, 0, 42]
    # batch sizes: the recipe's global 512 for search and pretraining, the probe's 256, fine-tuning's 128 per device
    assert searching.optimization.per_device_train_batch_size is None
    assert plan_search(searching, "cifar", 32, 1).optimization.per_device_batch == 512
    assert plan_pretrain(pretraining, "cifar", 32, 1).optimization.per_device_batch == 512
    assert plan_linear_eval(evaluating, "cifar", "simsiam").per_device_batch == 256
    options = tuning.optimization
    assert (options.per_device_train_batch_size, options.num_train_epochs, options.learning_rate,
            options.base_learning_rate, options.weight_decay, options.classifier_lr_multiplier) == (
        128, 30, None, None, 5e-4, 10.0)
    assert plan_finetune(tuning, 1).optimization.base_lr == 0.05  # fine-tuning's default rate per 256 images
    # --output_dir: required by the training commands, optional for the evaluation (default: the model folder)
    assert evaluating.run.output_dir is None
    for cls in (SearchCommand, PretrainCommand, FinetuneCommand):
        argv = [a for a in minimal_argv(cls, tmp_path) if a not in ("--output_dir", str(tmp_path / "out"))]
        with pytest.raises(UsageError, match=r"^the following arguments are required: --output_dir \(see --help\)$"):
            cls.parse(argv)
        with pytest.raises(ValueError, match=rf"{cls.__name__} needs .*run=RunArguments\(output_dir=\.\.\.\)"):
            cls()
