"""Export to torchvision and detectron2, import from torchvision and from the authors' checkpoints."""

import pickletools
from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import nasiam_hf  # noqa: F401  (registers the Auto classes)
from nasiam_hf import NASiamConfig, NASiamForPreTraining, NASiamModel
from nasiam_hf.commands.convert import main as convert_main
from nasiam_hf.export import (
    describe_state_dict,
    detectron2_key,
    detectron2_state_dict,
    export_detectron2,
    export_torchvision,
    import_torchvision,
    read_torchvision_metadata,
    torchvision_resnet,
)
from nasiam_hf.official import load_official_checkpoint, parse_official_genotype


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights, so equality checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(7)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def nasiam(backbone="resnet18", cifar_stem=True, **kw):
    model = NASiamModel(NASiamConfig(backbone=backbone, cifar_stem=cifar_stem, image_size=16, **kw))
    return randomise_bn(model).eval()


@pytest.mark.parametrize("backbone,cifar_stem,size", [("resnet18", True, 8), ("resnet50", False, 32)])
def test_torchvision_export_gives_the_same_features(tmp_path, backbone, cifar_stem, size):
    model = nasiam(backbone, cifar_stem)
    path = export_torchvision(model, tmp_path / "backbone.safetensors")
    weights = load_file(path)
    reference = getattr(torchvision.models, backbone)(weights=None).state_dict()
    assert set(weights) == {k for k in reference if not k.startswith("fc.")}
    meta = read_torchvision_metadata(path)
    assert meta["arch"] == backbone and meta["cifar_stem"] == str(cifar_stem).lower()
    if cifar_stem:
        assert "3x3 stride-1" in meta["note"] and "maxpool" in meta["note"]
        assert weights["conv1.weight"].shape == (64, 3, 3, 3)
    resnet = torchvision_resnet(path)
    assert isinstance(resnet, torchvision.models.ResNet) and isinstance(resnet.fc, nn.Identity)
    assert isinstance(resnet.maxpool, nn.Identity) == cifar_stem
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x).pooler_output
        theirs = resnet(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_torchvision_import_round_trip_and_checks(tmp_path):
    model = nasiam("resnet18", True)
    path = export_torchvision(model, tmp_path / "r18.safetensors")
    back = import_torchvision(path)
    assert back.config.backbone == "resnet18" and back.config.cifar_stem
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(back.backbone.state_dict()[key], value), key
    # a plain torchvision model (with its fc) imports too, with the stem and depth read from the weights
    tv = randomise_bn(torchvision.models.resnet18(weights=None), seed=3)
    imported = import_torchvision(tv, framework="simclr")
    assert not imported.config.cifar_stem and imported.config.framework == "simclr"
    assert torch.equal(imported.backbone.layer3[1].bn2.running_var, tv.layer3[1].bn2.running_var)
    assert describe_state_dict(tv.state_dict()) == {"arch": "resnet18", "cifar_stem": False, "num_channels": 3}
    with pytest.raises(ValueError, match="cifar_stem"):
        import_torchvision(path, config=NASiamConfig(cifar_stem=False))
    with pytest.raises(ValueError, match="unsupported ResNet layout"):
        describe_state_dict(torchvision.models.resnet101(weights=None).state_dict())


def test_detectron2_names_for_resnet50(tmp_path):
    model = nasiam("resnet50", False)
    renamed = detectron2_state_dict(model)
    for key in ("stem.conv1.weight", "stem.conv1.norm.running_mean", "res2.0.conv1.weight",
                "res2.0.conv1.norm.weight", "res2.0.shortcut.weight", "res2.0.shortcut.norm.weight",
                "res3.3.conv2.norm.bias", "res4.5.conv3.weight", "res5.2.conv3.norm.running_var"):
        assert key in renamed, key
    assert not any("layer" in k or "bn" in k or "downsample" in k or "num_batches" in k for k in renamed)
    trunk = model.backbone.state_dict()
    assert len(renamed) == sum(not k.endswith("num_batches_tracked") for k in trunk)
    assert (renamed["res5.2.conv3.norm.running_var"] == trunk["layer4.2.bn3.running_var"].numpy()).all()
    assert detectron2_key("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"
    assert detectron2_key("bn1.weight") == "stem.conv1.norm.weight"

    path = export_detectron2(model, tmp_path / "r50.pkl")
    # Inspect the pickle's opcodes without unpickling it: the keys and the header are plain strings in the stream.
    strings = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if isinstance(arg, str)}
    assert {"model", "__author__", "nasiam-hf", "matching_heuristics", "res5.2.conv3.norm.running_var"} <= strings
    with pytest.raises(ValueError, match="CIFAR stem"):
        export_detectron2(nasiam("resnet18", True), tmp_path / "cifar.pkl")


# ---------------------------------------------------------------------------------------------------------------------
# Fake checkpoints of the authors' code: same module layout (hence the same state-dict keys), our own code.
# ---------------------------------------------------------------------------------------------------------------------
ACTIVATIONS = {"linear_relu": nn.ReLU, "linear_silu": nn.SiLU, "linear_hardswish": nn.Hardswish, "linear_elu": nn.ELU}


def official_op(name, d_in, d_out):
    if name in ACTIVATIONS:
        if d_in < d_out:
            return nn.Linear(d_in, d_out)
        return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), ACTIVATIONS[name]())
    core = {"identity": lambda: nn.Identity(),
            "avgpool_3x3": lambda: nn.Sequential(nn.AvgPool1d(3, stride=1, padding=1), nn.BatchNorm1d(d_out)),
            "maxpool_3x3": lambda: nn.Sequential(nn.MaxPool1d(3, stride=1, padding=1), nn.BatchNorm1d(d_out))}[name]()
    if d_in > d_out:
        return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(), core)
    if d_in < d_out:
        return nn.Sequential(nn.Linear(d_in, d_out), core)
    return core


class OfficialCell(nn.Module):
    def __init__(self, dim, genes, hidden=None, out=None):
        super().__init__()
        hidden, out = hidden or dim, out or dim
        dims = [dim] + [hidden] * (len(genes) - 1) + [out]
        self._ops = nn.ModuleList(nn.ModuleList([official_op(g, a, b)]) for g, a, b in zip(genes, dims, dims[1:]))

    def forward(self, x):
        for layer in self._ops:
            x = sum(op(x) for op in layer)
        return x


def official_cifar_resnet18(out_dim):
    net = torchvision.models.resnet18(weights=None, num_classes=out_dim)
    parts = []
    for name, module in net.named_children():
        if name == "conv1":
            module = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if isinstance(module, nn.MaxPool2d):
            continue
        if isinstance(module, nn.Linear):
            parts.append(("flatten", nn.Flatten(1)))
        parts.append((name, module))
    return nn.Sequential(OrderedDict(parts))


SIMSIAM_GENOTYPE = ("Genotype(encoder=[['linear_relu'], ['linear_silu'], ['linear_elu'], ['identity'], ['identity'], "
                    "['linear_relu']], predictor=[['linear_hardswish'], ['avgpool_3x3'], ['avgpool_3x3'], "
                    "['linear_hardswish']])")


class OfficialSimSiam(nn.Module):
    def __init__(self, genes):
        super().__init__()
        self.encoder = official_cifar_resnet18(2048)
        self.cell_encoder = OfficialCell(512, genes["encoder"])
        self.encoder.fc = nn.Sequential(self.cell_encoder, self.encoder.fc, nn.BatchNorm1d(2048, affine=False))
        self.cell_predictor = OfficialCell(2048, genes["predictor"], hidden=512)
        self.predictor = nn.Sequential(self.cell_predictor)


def save_official(tmp_path, module, arch="resnet18"):
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    path = tmp_path / "checkpoint_0799.pth.tar"
    torch.save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def official_genes(text):
    cells = {}
    for cell in ("encoder", "predictor"):
        if f"{cell}=" in text:
            inner = text.split(f"{cell}=")[1].split("]]")[0]
            cells[cell] = [op.strip(" ['") for op in inner.split("],")]
    return cells


def test_official_simsiam_checkpoint_imports_backbone_and_heads(tmp_path):
    torch.manual_seed(0)
    official = randomise_bn(OfficialSimSiam(official_genes(SIMSIAM_GENOTYPE))).eval()
    path = save_official(tmp_path, official)
    (tmp_path / "cifar10_resnet18.txt").write_text(SIMSIAM_GENOTYPE)
    model = load_official_checkpoint(path, genotype=tmp_path / "cifar10_resnet18.txt")
    config = model.config
    assert (config.framework, config.backbone, config.cifar_stem) == ("simsiam", "resnet18", True)
    assert config.projector_genotype == ["linear_relu", "linear_silu", "linear_elu", "identity", "identity",
                                         "linear_relu"]
    assert config.predictor_genotype == ["linear_hardswish", "avg_pool_3x3", "avg_pool_3x3", "linear_hardswish"]
    official_trunk = {k: v for k, v in official.encoder.state_dict().items() if not k.startswith("fc.")}
    assert set(official_trunk) == set(model.backbone.state_dict())
    for key, value in official_trunk.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        z_official = official.encoder(x)  # backbone + projector, eval mode
        features = model(x).pooler_output
        torch.testing.assert_close(model.project(features), z_official, rtol=1e-5, atol=1e-5)  # bias folded into BN
        torch.testing.assert_close(model.predict(z_official), official.predictor(z_official), rtol=1e-5, atol=1e-5)


def test_official_moco_checkpoint_and_missing_genotype(tmp_path, caplog):
    torch.manual_seed(1)
    genes = ["avgpool_3x3", "identity", "identity"]

    class OfficialMoCo(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_q, self.encoder_k = official_cifar_resnet18(128), official_cifar_resnet18(128)
            self.cell_encoder = OfficialCell(512, genes)
            self.encoder_q.fc = nn.Sequential(self.cell_encoder, self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(self.cell_encoder, self.encoder_k.fc)
            self.register_buffer("queue", torch.randn(128, 64))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    official = randomise_bn(OfficialMoCo()).eval()
    path = save_official(tmp_path, official)
    model = load_official_checkpoint(path, genotype="Genotype(encoder=[['avgpool_3x3'], ['identity'], ['identity']])")
    assert (model.config.framework, model.config.projector_layers, model.config.projection_dim) == ("mocov2", 3, 128)
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, official.encoder_q.layer4[1].bn2.running_mean)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.project(model(x).pooler_output), official.encoder_q(x), rtol=1e-5, atol=1e-5)
    # without a genotype the heads' ops are unknown: backbone mapped, heads left initialised, with a warning
    with caplog.at_level("WARNING", logger="nasiam_hf.export"):
        bare = load_official_checkpoint(path)
    assert "no genotype" in caplog.text
    assert torch.equal(bare.backbone.conv1.weight, official.encoder_q.conv1.weight)
    # the console entry writes a loadable folder with an image processor
    (tmp_path / "g.txt").write_text("Genotype(encoder=[['avgpool_3x3'], ['identity'], ['identity']])")
    convert_main(["official", str(path), str(tmp_path / "imported"), "--genotype", str(tmp_path / "g.txt")])
    reloaded = NASiamModel.from_pretrained(tmp_path / "imported")
    assert torch.equal(reloaded.backbone.conv1.weight, official.encoder_q.conv1.weight)
    assert (tmp_path / "imported" / "preprocessor_config.json").is_file()


def test_genotype_files_are_parsed_as_data(tmp_path):
    assert parse_official_genotype(SIMSIAM_GENOTYPE)["predictor"][1] == "avg_pool_3x3"
    simclr = parse_official_genotype("Genotype(predictor=[['linear_hardswish'], ['avgpool_3x3'], ['linear_relu']])")
    assert simclr == {"predictor": ["linear_hardswish", "avg_pool_3x3", "linear_relu"]}
    assert parse_official_genotype("['identity', 'maxpool_3x3']") == {"projector": ["identity", "max_pool_3x3"]}
    assert parse_official_genotype('{"projector": ["linear_elu"], "predictor": null}') == {"projector": ["linear_elu"]}
    marker = tmp_path / "executed"
    for hostile in (f"Genotype(encoder=[__import__('pathlib').Path({str(marker)!r}).touch()])",
                    f"__import__('pathlib').Path({str(marker)!r}).touch()",
                    "Genotype(encoder=[['linear_relu'], ['conv_7x7']])"):
        with pytest.raises(ValueError):
            parse_official_genotype(hostile)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        parse_official_genotype(tmp_path / "missing.txt")


def test_pretraining_folder_exports_like_its_model(tmp_path):
    pre = NASiamForPreTraining(NASiamConfig(image_size=8))
    randomise_bn(pre.nasiam.backbone)
    pre.save_pretrained(tmp_path / "pre")
    path = export_torchvision(tmp_path / "pre", tmp_path / "from_folder.safetensors")
    weights = load_file(path)
    for key, value in pre.nasiam.backbone.state_dict().items():
        assert torch.equal(weights[key], value), key
    convert_main(["torchvision", str(tmp_path / "pre"), str(tmp_path / "cli.safetensors")])
    assert load_file(tmp_path / "cli.safetensors").keys() == weights.keys()


def test_resnet_only_exports_refuse_other_backbones(tmp_path):
    model = NASiamModel(NASiamConfig(backbone="timm/resnet18", projection_dim=32, projector_hidden_size=32))
    for export in (export_torchvision, export_detectron2):
        with pytest.raises(ValueError, match="write ResNets, and this model's backbone is a timm one"):
            export(model, tmp_path / "x.out")
    assert not (tmp_path / "x.out").exists()
