"""Any backbone through the commands: ``nasiam-search`` and ``nasiam-pretrain`` with a timm ResNet, a timm ViT built at
32 px and a transformers ConvNeXt from a local config folder, whose outputs reload (features bit-identical, a
classifier through ``nasiam-finetune``, ``NASiamBackbone`` stages); and ``--backbone_weights`` through
``nasiam-pretrain``: the run starts from the given weights, the image processor follows the weights' statistics,
and weights that cannot be used end the command with one line naming the tensor or the alternative."""

import json

import pytest
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from transformers import AutoImageProcessor, AutoModel

import nasiam_hf  # noqa: F401  (registers the Auto classes)
from nasiam_hf import NASiamBackbone, NASiamConfig, NASiamForImageClassification, NASiamForPreTraining, NASiamModel
from nasiam_hf import run_pretrain, run_search
from nasiam_hf.arguments import PretrainCommand, SearchCommand
from nasiam_hf.commands import finetune as finetune_command
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.data import load_splits
from nasiam_hf.plans import check_pretrain_flags, plan_pretrain
from nasiam_hf.trainer import initialise_backbone

VIT_KWARGS = '{"img_size": 32, "patch_size": 4}'
# name -> (backbone flags, image size, pooled width, stages asked of NASiamBackbone, their channels)
BACKBONES = {
    "timm-resnet18": (["--backbone", "timm/resnet18"], 16, 512, ["layer3", "layer4"], [256, 512]),
    "timm-vit": (["--backbone", "timm/vit_tiny_patch16_224", "--backbone_kwargs", VIT_KWARGS], 32, 192,
                 ["blocks.5", "blocks.11"], [192, 192]),
    "convnext": (["--backbone", "CONVNEXT_FOLDER"], 16, 32, ["stage2", "stage4"], [16, 32]),
}
SMALL = ["--per_device_train_batch_size", "4", "--seed", "3", "--num_train_epochs", "1", "--checkpointing_steps", "no"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def images(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def one_error_line(capsys) -> str:
    """The command's one ``error:`` line, the last thing it wrote (progress bars of the data loading may come first)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Search -> pretraining -> reload / fine-tune / detection backbone, for each kind of backbone
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_search_pretrain_and_reload_on_any_backbone(name, tiny_parquet, convnext_folder, tmp_path):
    flags, size, width, stages, channels = BACKBONES[name]
    flags = [str(convnext_folder) if f == "CONVNEXT_FOLDER" else f for f in flags]
    train, test = tiny_parquet
    data = ["--train_file", str(train), "--image_size", str(size), "--max_train_samples", "16"]

    search = tmp_path / "search"
    supernet = run_search(SearchCommand.parse([*data, *flags, *SMALL, "--output_dir", str(search),
                                               "--projector_layers", "2", "--predictor_layers", "2",
                                               "--hessian_every", "0"]))
    assert supernet.config.hidden_size == width
    found = NASiamConfig.from_pretrained(search)
    assert found.backbone == flags[1] and found.hidden_size == width and len(found.projector_genotype) == 2

    pretrained = tmp_path / "pretrain"
    model = run_pretrain(PretrainCommand.parse([*data, "--validation_file", str(test), *flags, *SMALL, "--genotype",
                                                str(search), "--output_dir", str(pretrained), "--knn_k", "4"]))
    config = NASiamConfig.from_pretrained(pretrained)
    assert config.backbone == flags[1] and config.hidden_size == width
    assert (config.projector_genotype, config.predictor_genotype) == (found.projector_genotype,
                                                                      found.predictor_genotype)
    history = json.loads((pretrained / "training_history.json").read_text())
    assert len(history["epochs"]) == 1 and 0 <= history["epochs"][0]["knn_top1"] <= 100

    x = images(size)
    with torch.no_grad():
        reference = model.nasiam.eval()(x, output_hidden_states=True)
        for loader in (NASiamModel.from_pretrained, AutoModel.from_pretrained):
            assert torch.equal(loader(pretrained).eval()(x).pooler_output, reference.pooler_output)
        backbone = NASiamBackbone.from_pretrained(pretrained, out_features=stages).eval()
        maps = backbone(x).feature_maps
    assert backbone.channels == channels and [m.shape[1] for m in maps] == channels
    assert torch.equal(maps[-1], reference.hidden_states[config.stage_names.index(stages[-1])])

    tuned = tmp_path / "finetune"
    finetune_command.main(["--model_name_or_path", str(pretrained), "--train_file", str(train), "--validation_file",
                           str(test), "--image_size", str(size), "--output_dir", str(tuned), "--max_train_steps", "1",
                           "--per_device_train_batch_size", "4", "--checkpointing_steps", "no"])
    classifier = NASiamForImageClassification.from_pretrained(tuned).eval()
    assert classifier.config.num_labels == 4 and classifier.config.backbone == flags[1]
    with torch.no_grad():
        assert classifier(x).logits.shape == (4, 4)
    start = dict(model.nasiam.backbone.named_parameters())
    moved = [n for n, p in classifier.nasiam.backbone.named_parameters() if not torch.equal(p, start[n])]
    assert moved  # the one fine-tuning step trained the backbone too


# ---------------------------------------------------------------------------------------------------------------------
# --backbone_weights through nasiam-pretrain
# ---------------------------------------------------------------------------------------------------------------------
def timm_source(seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def weights_run(train, out, weights, *extra) -> list[str]:
    return ["--train_file", str(train), "--genotype", "simsiam-baseline", "--backbone", "timm/resnet18",
            "--backbone_weights", str(weights), "--output_dir", str(out), "--image_size", "16",
            "--per_device_train_batch_size", "4", "--seed", "1", "--knn_every", "0", *extra]


def test_pretraining_starts_from_a_safetensors_file(tiny_parquet, tmp_path):
    train, _ = tiny_parquet
    source = timm_source()
    file = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), file)
    out = tmp_path / "run"
    argv = weights_run(train, out, file, "--max_train_steps", "1", "--learning_rate", "1e-9",
                       "--checkpointing_steps", "1")

    # before the first step: the features of the model the command builds are the source model's
    command = PretrainCommand.parse(argv)
    splits = load_splits(command.data, command.run.seed)
    plan = plan_pretrain(command, splits.policy, splits.image_size, 1, check_pretrain_flags(command))
    model = NASiamForPreTraining(NASiamConfig(**plan.config))
    _, processor, start = initialise_backbone(model, str(file), splits, command.data, Accelerator(cpu=True))
    x = images(16)
    with torch.no_grad():
        assert torch.equal(model.nasiam.eval()(x).pooler_output, source(x))
    assert start["num_loaded"] == len(source.state_dict()) and start["new"] == []
    assert list(processor.image_mean) == pytest.approx(list(splits.mean))  # a bare file has no statistics

    pretrain_command.main(argv)
    record = json.loads((out / "training_args.json").read_text())
    assert record["starting_point"] == {**start, "source": f"file {file}"}
    assert record["backbone_weights"] == str(file)
    first = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    for key, value in source.state_dict().items():  # one step at lr 1e-9 x 8/256 leaves the weights where they were
        if value.is_floating_point() and "running_" not in key:
            torch.testing.assert_close(first[f"nasiam.backbone.model.{key}"], value, rtol=0, atol=1e-7)
    fresh = NASiamForPreTraining(NASiamConfig(**plan.config)).nasiam.backbone.model.conv1.weight
    assert not torch.allclose(first["nasiam.backbone.model.conv1.weight"], fresh, atol=1e-3)


def test_timm_folder_weights_bring_their_normalisation(tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    source = timm_source(seed=7)
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.6, 0.5, 0.4)}
    folder = tmp_path / "timm-folder"
    save_for_hf(source, str(folder), safe_serialization=True)
    out = tmp_path / "run"
    model = run_pretrain(PretrainCommand.parse(weights_run(train, out, folder, "--max_train_steps", "1",
                                                           "--learning_rate", "1e-9", "--checkpointing_steps", "no")))
    log = capsys.readouterr().out
    assert "normalisation mean [0.1, 0.2, 0.3], std [0.6, 0.5, 0.4] (pretrained_cfg in" in log
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == [0.1, 0.2, 0.3] and list(processor.image_std) == [0.6, 0.5, 0.4]
    record = json.loads((out / "training_args.json").read_text())
    assert record["starting_point"]["source"].startswith(f"timm folder {folder}")
    assert record["starting_point"]["preprocessing"]["mean"] == [0.1, 0.2, 0.3]
    loaded = model.nasiam.backbone.model.state_dict()
    assert torch.allclose(loaded["conv1.weight"], source.state_dict()["conv1.weight"], atol=1e-7)


def test_weights_of_the_wrong_shape_name_the_tensor(tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    state = timm_source().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    file = tmp_path / "bad.safetensors"
    save_file(state, file)
    with pytest.raises(SystemExit) as exit_info:
        pretrain_command.main(weights_run(train, tmp_path / "run", file))
    assert exit_info.value.code == 2
    err = one_error_line(capsys)
    assert "tensor 'layer2.0.conv1.weight' has shape (128, 64, 1, 1) there but (128, 64, 3, 3)" in err
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("backbone,weights,needs", [
    ("timm/resnet18.a1_in1k", "timm", "timm's weights of 'timm/resnet18.a1_in1k'"),
    ("resnet18", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet18"),
])
def test_offline_downloads_name_the_cache_and_the_local_alternative(backbone, weights, needs, tiny_parquet, tmp_path,
                                                                    monkeypatch, capsys):
    train, _ = tiny_parquet
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    argv = weights_run(train, tmp_path / "run", weights, "--cache_dir", str(cache))
    argv[argv.index("timm/resnet18")] = backbone
    with pytest.raises(SystemExit) as exit_info:
        pretrain_command.main(argv)
    assert exit_info.value.code == 2
    err = one_error_line(capsys)
    assert needs in err and "HF_HUB_OFFLINE=1" in err and str(cache) in err
    assert "or pass a local .safetensors file or model folder" in err
    assert not (tmp_path / "run").exists()
