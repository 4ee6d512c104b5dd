"""Flags that the chosen framework, search method or backbone would ignore, and bad values, are refused before any
data is loaded (issue 14, class 5): one ``error:`` line naming the flag, the framework (or method, or backbone) and
what applies; exit status 2; nothing written. Every case passes a training file that does not exist, so a check
that came after the data would report the file instead."""

import pytest

from nasiam_hf.commands import finetune, linear_eval, pretrain, search

KWARGS = '{"img_size":32}'  # one word: the flags below are split on spaces

# (command, flags, fragments the one error line must contain)
CASES = [
    # objective flags for the frameworks that do not use them (the framework is --framework, or the genotype's)
    (search, "--framework simclr --queue_size 16", ["--queue_size", "'simclr'", "mocov2 only"]),
    (search, "--framework byol --queue_size 16", ["--queue_size", "'byol'", "mocov2 only"]),
    (search, "--framework simclr --momentum 0.9", ["--momentum", "'simclr'", "mocov2 and byol only"]),
    (search, "--framework simsiam --momentum 0.9", ["--momentum", "'simsiam'", "mocov2 and byol only"]),
    (search, "--framework simsiam --temperature 0.2", ["--temperature", "'simsiam'", "simclr and mocov2 only"]),
    (search, "--framework byol --temperature 0.2", ["--temperature", "'byol'", "simclr and mocov2 only"]),
    (search, "--framework simclr --predictor_layers 2", ["--predictor_layers", "'simclr'", "simsiam and byol"]),
    (search, "--framework mocov2 --predictor_layers 2", ["--predictor_layers", "'mocov2'", "simsiam and byol"]),
    (pretrain, "--genotype simclr-baseline --queue_size 16", ["--queue_size", "'simclr'", "mocov2 only"]),
    (pretrain, "--genotype simclr-cifar10-resnet50 --momentum 0.9", ["--momentum", "'simclr'", "mocov2 and byol"]),
    (pretrain, "--genotype simsiam-baseline --temperature 0.2", ["--temperature", "'simsiam'", "simclr and mocov2"]),
    (pretrain, "--genotype byol-baseline --temperature 0.2", ["--temperature", "'byol'", "simclr and mocov2"]),
    (pretrain, "--genotype mocov2-cifar10-resnet18 --no_fix_predictor_lr",
     ["--no_fix_predictor_lr", "'mocov2'", "simsiam only"]),
    (pretrain, "--genotype byol-baseline --no_fix_predictor_lr", ["--no_fix_predictor_lr", "'byol'", "simsiam only"]),
    # search-method flags without their method
    (search, "--aux_skip_weight 0.5", ["--aux_skip_weight", "darts-minus only", "'darts'"]),
    (search, "--search_method beta-darts --aux_skip_weight 0.5", ["--aux_skip_weight", "darts-minus", "'beta-darts'"]),
    (search, "--beta_darts_weight 10", ["--beta_darts_weight", "beta-darts only", "'darts'"]),
    (search, "--search_method darts-minus --beta_darts_weight 10", ["--beta_darts_weight", "'darts-minus'"]),
    # backbone options without a backbone that takes them
    (search, f"--backbone_kwargs {KWARGS}", ["--backbone_kwargs", "timm", "'resnet18'"]),
    (pretrain, f"--backbone resnet50 --backbone_kwargs {KWARGS}", ["--backbone_kwargs", "timm", "'resnet50'"]),
    (pretrain, f"--backbone_kwargs {KWARGS}", ["--backbone_kwargs needs --backbone"]),
    (search, "--backbone_weights IMAGENET1K_V9", ["IMAGENET1K_V9", "torchvision weights of resnet18", "DEFAULT"]),
    (pretrain, "--backbone timm/resnet18 --backbone_weights DEFAULT", ["'DEFAULT'", "'timm'", "timm backbone"]),
    (pretrain, "--backbone_weights timm", ["'timm' need a timm backbone", "'resnet18'"]),
    (pretrain, "--backbone_weights ./nowhere/r18.safetensors", ["./nowhere/r18.safetensors", "no such file"]),
    # data options without what they apply to
    (search, "--shuffle_buffer_size 100", ["--shuffle_buffer_size", "--streaming only"]),
    (pretrain, "--shuffle_buffer_size 100", ["--shuffle_buffer_size", "--streaming only"]),
    (linear_eval, "--shuffle_buffer_size 100", ["--shuffle_buffer_size", "--streaming only"]),
    (finetune, "--shuffle_buffer_size 100", ["--shuffle_buffer_size", "--streaming only"]),
    # bad values
    (pretrain, "--knn_k 0", ["--knn_k", "at least 1", "0"]),
    (linear_eval, "--knn_k 0", ["--knn_k", "at least 1", "0"]),
    (pretrain, "--knn_every x", ["--knn_every", "'x'", "'Nsteps'"]),
    (search, "--checkpointing_steps x", ["--checkpointing_steps", "'x'", "'epoch' or 'no'"]),
    (pretrain, "--checkpointing_steps x", ["--checkpointing_steps", "'x'", "'epoch' or 'no'"]),
    (finetune, "--checkpointing_steps x", ["--checkpointing_steps", "'x'", "'epoch' or 'no'"]),
    (search, "--image_mean 1,2", ["--image_mean", "three comma-separated numbers", "'1,2'"]),
    (pretrain, "--image_std 0.2,0.2,0", ["--image_std", "above 0", "'0.2,0.2,0'"]),
    (linear_eval, "--image_mean 1,2", ["--image_mean", "'1,2'"]),
    (finetune, "--image_mean 1,2", ["--image_mean", "'1,2'"]),
    (search, "--train_portion 1", ["--train_portion", "between 0 and 1", "1"]),
    (search, "--momentum 1.0 --framework mocov2", ["--momentum", "[0, 1)", "1.0"]),
    (pretrain, "--genotype simsiam-imagenet-resnet18", ["'simsiam-imagenet-resnet18'", "simsiam-cifar10-resnet18"]),
    (finetune, "--classifier_lr_multiplier 0", ["--classifier_lr_multiplier", "positive", "0"]),
    # Hub options that cannot work together
    (pretrain, "--push_to_hub", ["--push_to_hub", "--hub_model_id"]),
    (search, "--hub_revision dev", ["--hub_revision", "--push_to_hub and --push_checkpoints only"]),
    # parsing errors: one line, with the closest choice or flag, never the usage (issue 19)
    (search, "--framework simclrr", ["error: argument --framework: invalid choice 'simclrr' (choose from simsiam, "
                                     "simclr, mocov2, byol, barlowtwins, vicreg); did you mean 'simclr'? (see --help)"]),
    (search, "--search_method darts_minus", ["argument --search_method: invalid choice 'darts_minus'",
                                             "did you mean 'darts-minus'?"]),
    (pretrain, "--recipe cifra", ["argument --recipe: invalid choice 'cifra' (choose from cifar, imagenet); did you "
                                  "mean 'cifar'? (see --help)"]),
    (pretrain, "--mixed_precision bf61", ["argument --mixed_precision: invalid choice 'bf61'", "'bf16'?"]),
    (linear_eval, "--feature_norm batchnom", ["argument --feature_norm: invalid choice 'batchnom'",
                                              "did you mean 'batchnorm'?"]),
    (finetune, "--on_bad_image skp", ["argument --on_bad_image: invalid choice 'skp' (choose from error, skip); "
                                      "did you mean 'skip'?"]),
    (pretrain, "--genotype simclr-basline", ["--genotype 'simclr-basline' is neither a folder nor a preset (nor a "
                                             ".json genotype file); did you mean 'simclr-baseline'?"]),
    (search, "--learning_rat 0.1", ["error: unrecognized arguments: --learning_rat 0.1; --learning_rat: did you "
                                    "mean '--learning_rate'? (see --help)"]),
    (linear_eval, "--knn_kk 5", ["unrecognized arguments: --knn_kk 5; --knn_kk: did you mean '--knn_k'?"]),
    (finetune, "--num_train_epochs two", ["error: argument --num_train_epochs: invalid int value: 'two' (see "
                                          "--help)"]),
    # learning rates: the rate itself or the rate per 256 images, not both (issue 21)
    (search, "--learning_rate 0.1 --base_learning_rate 0.2", ["pass --learning_rate (the rate itself, 0.1) or "
                                                              "--base_learning_rate (a rate per 256 images, 0.2",
                                                              "not both"]),
    (pretrain, "--learning_rate 0.1 --base_learning_rate 0.2", ["--learning_rate", "--base_learning_rate", "not both"]),
    (linear_eval, "--learning_rate 1 --base_learning_rate 2", ["--learning_rate", "--base_learning_rate", "not both"]),
    (finetune, "--learning_rate 0.1 --base_learning_rate 0.2", ["--learning_rate", "--base_learning_rate", "not both"]),
    (pretrain, "--base_learning_rate 0", ["--base_learning_rate must be positive, got 0.0"]),
    # fp16 on a CPU would train in fp32 while the record says fp16 (issue 19): refused where the device is known
    (search, "--mixed_precision fp16", ["error: --mixed_precision fp16 is not supported on a CPU, where it would train "
                                        "in fp32: bf16 is the CPU's half precision; pass --mixed_precision bf16"]),
    (pretrain, "--mixed_precision fp16", ["--mixed_precision fp16", "bf16 is the CPU's half precision"]),
]


def command_line(command, flags: str, tmp_path) -> list[str]:
    argv = ["--train_file", str(tmp_path / "missing.parquet"), *flags.split()]
    if command in (linear_eval, finetune):
        argv += ["--model_name_or_path", str(tmp_path / "no-model")]
    if command is not linear_eval:
        argv += ["--output_dir", str(tmp_path / "out")]
    return argv


@pytest.mark.parametrize("command, flags, fragments", CASES,
                         ids=[f"{c.__name__.rsplit('.', 1)[-1]}:{f}" for c, f, _ in CASES])
def test_refused_before_any_data_with_one_line(command, flags, fragments, tmp_path, capsys, fresh_accelerate_state):
    with pytest.raises(SystemExit) as info:
        command.main(command_line(command, flags, tmp_path))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "missing.parquet" not in lines[0]  # about the flag, not about the data
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command, flags", [
    (search, "--framework mocov2 --queue_size 16 --temperature 0.2 --momentum 0.9"),
    (search, "--framework byol --predictor_layers 2 --momentum 0.9"),
    (search, "--search_method darts-minus --aux_skip_weight 0.5"),
    (pretrain, "--genotype mocov2-baseline --queue_size 16"),
    (pretrain, "--genotype simsiam-baseline --no_fix_predictor_lr --backbone_weights DEFAULT"),
    (pretrain, '--backbone timm/resnet18 --backbone_kwargs {"drop_rate":0.1} --backbone_weights timm'),
])
def test_flags_that_apply_reach_the_data(command, flags, tmp_path, capsys):
    """The control: with flags that apply, the same command gets as far as the data (and then names the file)."""
    with pytest.raises(SystemExit) as info:
        command.main(command_line(command, flags, tmp_path))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and "missing.parquet" in message, message
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("command, drop", [(search, "--output_dir"), (pretrain, "--output_dir"),
                                           (finetune, "--output_dir"), (linear_eval, "--model_name_or_path"),
                                           (finetune, "--model_name_or_path")])
def test_a_missing_required_flag_is_one_line(command, drop, tmp_path, capsys):
    argv = command_line(command, "", tmp_path)
    at = argv.index(drop)
    with pytest.raises(SystemExit) as info:
        command.main(argv[:at] + argv[at + 2:])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert lines == [f"error: the following arguments are required: {drop} (see --help)"], lines


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state per process: start from none (an earlier test's precision would stick), and leave
    none behind."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_fp16_from_the_accelerate_config_is_refused_on_a_cpu_too(tmp_path, capsys, monkeypatch,
                                                                  fresh_accelerate_state):
    """No flag, fp16 from accelerate's own settings (here its environment variable): the same refusal, naming where
    fp16 came from; and the process can run again afterwards (the refused state is not left behind)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SystemExit) as info:
        pretrain.main(command_line(pretrain, "", tmp_path))
    message = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(message) == 1
    assert message[0].startswith("error: mixed_precision fp16 (from the accelerate config) is not supported on a CPU")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(SystemExit):
        pretrain.main(command_line(pretrain, "", tmp_path))
    assert "missing.parquet" in capsys.readouterr().err  # reached the data: fp16 was not kept from the refused run


@pytest.mark.parametrize("command", [linear_eval, finetune], ids=["linear_eval", "finetune"])
def test_the_commands_from_a_model_refuse_fp16_on_a_cpu_before_reading_the_data(command, tmp_path, capsys,
                                                                                 fresh_accelerate_state):
    """They check their model folder first, so they get a real one here."""
    from nasiam_hf import NASiamConfig, NASiamModel

    model = tmp_path / "model"
    NASiamModel(NASiamConfig(image_size=16)).save_pretrained(model)
    before = sorted(p.name for p in model.iterdir())
    argv = ["--train_file", str(tmp_path / "missing.parquet"), "--model_name_or_path", str(model),
            "--mixed_precision", "fp16"] + (["--output_dir", str(tmp_path / "out")] if command is finetune else [])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        command.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert "--mixed_precision fp16" in lines[0] and "bf16 is the CPU's half precision" in lines[0]
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["torchvison", "a", "b"], "error: argument target: invalid choice 'torchvison' (choose from torchvision, "
                               "detectron2, official, checkpoint); did you mean 'torchvision'? (see --help)"),
    (["official", "x.pth.tar", "out", "--framework", "simclrr"], "error: argument --framework: invalid choice "
                                                                 "'simclrr' (choose from simsiam, mocov2, simclr); did "
                                                                 "you mean 'simclr'? (see --help)"),
    (["torchvision", "model"], "error: the following arguments are required: output (see --help)"),
])
def test_convert_argument_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    from nasiam_hf.commands import convert

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        convert.main(argv)
    assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []
