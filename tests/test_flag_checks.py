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
def test_refused_before_any_data_with_one_line(command, flags, fragments, tmp_path, capsys):
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
