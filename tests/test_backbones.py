"""Any backbone (torchvision, timm, transformers), pretrained initialisation, zero-init residual, the strict config."""

import json

import pytest
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18
from transformers import AutoBackbone, AutoConfig, AutoModel, ConvNextConfig, ConvNextForImageClassification

from conftest import BLOCK_PACKAGE, run_cli

import nasiam_hf  # noqa: F401  (registers the Auto classes)
from nasiam_hf import (
    NASiamBackbone,
    NASiamConfig,
    NASiamForArchitectureSearch,
    NASiamForImageClassification,
    NASiamForPreTraining,
    NASiamModel,
)
from nasiam_hf.backbone_weights import BackboneWeightsError, load_backbone_weights
from nasiam_hf.backbones import backbone_config_values
from nasiam_hf.configuration_nasiam import NASiamConfigError
from nasiam_hf.processing import image_processor_for_preprocessing
from nasiam_hf.optimization import build_sgd, weight_step
from nasiam_hf.search import alpha_step, build_arch_optimizer

SMALL_HEADS = dict(projection_dim=32, projector_hidden_size=32, predictor_hidden_size=16, projector_layers=2,
                   predictor_layers=2)
VIT = ("timm/vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def backbone_values(kind: str, convnext_folder) -> dict:
    if kind == "timm-resnet18":
        return backbone_config_values("timm/resnet18")
    if kind == "timm-vit":
        return backbone_config_values(*VIT)
    return backbone_config_values(str(convnext_folder))


# (kind, pooled width, stages asked of NASiamBackbone, their channels)
BACKBONE_CASES = [
    ("timm-resnet18", 512, ["layer3", "layer4"], [256, 512]),
    ("timm-vit", 192, ["blocks.5", "blocks.11"], [192, 192]),
    ("convnext", 32, ["stage2", "stage4"], [16, 32]),
]


def views(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def _changed(before: dict, model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


# ---------------------------------------------------------------------------------------------------------------------
# Any backbone: search step, pretraining step, save/reload, classifier, NASiamBackbone
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,width,stages,channels", BACKBONE_CASES)
def test_search_and_pretraining_steps_on_any_backbone(kind, width, stages, channels, convnext_folder, tmp_path):
    values = backbone_values(kind, convnext_folder)
    accelerator = Accelerator(cpu=True)
    search = NASiamForArchitectureSearch(NASiamConfig(**values, framework="simsiam", **SMALL_HEADS)).train()
    assert search.config.hidden_size == width and search.config.head_spec("projector").widths[0] == width
    batch = dict(zip(("pixel_values", "pixel_values_2"), views()))
    arch = {n for n, p in search.named_parameters() if any(p is a for a in search.arch_parameters())}
    before = {n: p.detach().clone() for n, p in search.named_parameters()}
    alpha_step(search, batch, build_arch_optimizer(search), accelerator)
    assert _changed(before, search) == arch  # the alpha step moves the alphas only, the backbone runs without grad
    before = {n: p.detach().clone() for n, p in search.named_parameters()}
    weight_opt = build_sgd(search.weight_parameters(), lr=0.05, weight_decay=0.0)
    weight_step(search, batch, weight_opt, None, accelerator)
    changed = _changed(before, search)
    assert any(n.startswith("nasiam.backbone.") for n in changed) and not changed & arch
    derived = search.derive_config()
    assert derived.backbone == values["backbone"] and derived.hidden_size == width

    # BYOL: the momentum copy of a foreign backbone starts equal and then moves by its EMA only
    model = NASiamForPreTraining(NASiamConfig(**values, framework="byol", **SMALL_HEADS)).train()
    assert all(torch.equal(a, b) for a, b in model.momentum_pairs(with_buffers=True))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out = model(*views(seed=1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # every trainable backbone tensor gets a gradient (DDP needs that); ConvNeXt's unused stage norms are frozen
    assert all(p.grad is not None for p in model.nasiam.backbone.parameters() if p.requires_grad)
    frozen = {n for n, p in model.nasiam.backbone.named_parameters() if not p.requires_grad}
    assert frozen == ({f"model.hidden_states_norms.{s}.{w}" for s in ("stem", "stage1", "stage2", "stage3")
                       for w in ("weight", "bias")} if kind == "convnext" else set())
    served = NASiamBackbone(model.config)  # the detection backbone trains every stage norm
    assert all(p.requires_grad for p in served.parameters())
    opt.step()
    model.momentum_update(0.5)
    moved = [not torch.equal(a, b) for a, b in model.momentum_pairs()]
    assert any(moved)


@pytest.mark.parametrize("kind,width,stages,channels", BACKBONE_CASES)
def test_saved_folders_reload_as_every_head(kind, width, stages, channels, convnext_folder, tmp_path):
    values = backbone_values(kind, convnext_folder)
    config = NASiamConfig(**values, **SMALL_HEADS)
    pre = NASiamForPreTraining(config).train()
    with torch.no_grad():  # move BatchNorm statistics (where there are any) away from their initial values
        pre(*views(seed=2))
    pre.eval()
    x, _ = views(seed=3)
    with torch.no_grad():
        reference = pre.nasiam(x, output_hidden_states=True)
        assert torch.equal(reference.pooler_output, pre.nasiam.backbone(x))  # one trunk, one pooled feature
    assert reference.pooler_output.shape == (4, width) and len(reference.hidden_states) == len(config.stage_names)
    pre.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone"] == values["backbone"] and saved["stage_names"] == config.stage_names
    assert saved["backbone_requires"] == (["timm"] if kind.startswith("timm") else [])

    for loader in (NASiamModel.from_pretrained, AutoModel.from_pretrained):
        loaded = loader(tmp_path).eval()
        assert type(loaded) is NASiamModel
        with torch.no_grad():
            assert torch.equal(loaded(x).pooler_output, reference.pooler_output)

    clf = NASiamForImageClassification.from_pretrained(tmp_path, num_labels=3).train()
    with torch.no_grad():
        assert torch.equal(clf.eval()(x, output_hidden_states=True).hidden_states[-1], reference.hidden_states[-1])
    clf.freeze_backbone().freeze_backbone(False).train()
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    out = clf(x, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert all(p.grad is not None for p in clf.parameters() if p.requires_grad)  # what DDP needs
    opt.step()
    changed = _changed(before, clf)
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert any(n.startswith("nasiam.backbone.") for n in changed)

    backbone = NASiamBackbone.from_pretrained(tmp_path, out_features=stages).eval()
    assert backbone.out_features == stages and backbone.channels == channels
    with torch.no_grad():
        maps = backbone(x).feature_maps
    assert [m.shape[1] for m in maps] == channels
    assert torch.equal(maps[-1], reference.hidden_states[config.stage_names.index(stages[-1])])
    assert type(AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path))) is NASiamBackbone


def test_foreign_backbones_keep_their_own_initialisation(convnext_folder):
    name, kwargs = VIT
    torch.manual_seed(0)
    model = NASiamModel(NASiamConfig(backbone=name, backbone_kwargs=kwargs))
    torch.manual_seed(0)
    reference = timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=0, **kwargs)
    ours, theirs = model.backbone.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # timm's ViT starts its position embedding at std 0.02 and its LayerNorms at 1/0; our heads' init would not
    assert 0.01 < ours["pos_embed"].std() < 0.03

    values = backbone_config_values(str(convnext_folder))
    torch.manual_seed(0)
    model = NASiamModel(NASiamConfig(**values))
    torch.manual_seed(0)
    reference = AutoBackbone.from_config(values["backbone_config"])
    ours, theirs = model.backbone.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_timm_folder_needs_timm_and_says_so(tmp_path):
    model = NASiamModel(NASiamConfig(backbone="timm/resnet18", **SMALL_HEADS)).eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.save({"x": x, "y": model(x).pooler_output.detach()}, tmp_path / "ref.pt")
    script = BLOCK_PACKAGE + f"""
import torch
from transformers import AutoModel
class _NoTimm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "timm":
            raise ImportError("No module named 'timm'")
blocker = _NoTimm()
sys.meta_path.insert(0, blocker)
try:
    AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
except ImportError as error:
    print("IMPORT ERROR:", error)
sys.meta_path.remove(blocker)
model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
assert "nasiam_hf" not in sys.modules
assert torch.equal(model(ref["x"]).pooler_output, ref["y"]), "outputs differ"
print("OK", type(model).__name__)
"""
    import sys

    result = run_cli([sys.executable, "-c", script], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT ERROR:" in result.stdout and "pip install timm" in result.stdout
    assert "OK NASiamModel" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# backbone_config_values: what --backbone / --backbone_kwargs become
# ---------------------------------------------------------------------------------------------------------------------
def test_backbone_names_and_their_errors(convnext_folder, tmp_path):
    assert backbone_config_values("resnet50") == {"backbone": "resnet50", "backbone_kwargs": None,
                                                 "backbone_config": None}
    values = backbone_config_values(*VIT)
    assert values["backbone_kwargs"] == VIT[1] and NASiamConfig(**values).stage_names[-1] == "blocks.11"
    values = backbone_config_values(str(convnext_folder), {"drop_path_rate": 0.1})
    sub = values["backbone_config"]
    assert sub.model_type == "convnext" and sub.drop_path_rate == 0.1 and sub.out_features == sub.stage_names
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        backbone_config_values("timm/resnet_nope")
    with pytest.raises(ValueError, match="backbone_kwargs may not set 'num_classes'"):
        backbone_config_values("timm/resnet18", {"num_classes": 10})
    with pytest.raises(ValueError, match=r"timm cannot build it with backbone_kwargs=\{'no_such_arg': 1\}"):
        backbone_config_values("timm/resnet18", {"no_such_arg": 1})
    with pytest.raises(ValueError, match="backbone_kwargs apply to timm and transformers backbones, not to 'resnet18'"):
        backbone_config_values("resnet18", {"img_size": 32})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder without config.json"):
        backbone_config_values(str(tmp_path / "empty"))
    AutoConfig.for_model("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert' has no transformers backbone class.*'convnext'"):
        backbone_config_values(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"names a transformers backbone \(Hub id\).*Offline, a Hub id must already be "
                                         r"in the cache .*or pass a local folder"):
        backbone_config_values("someone/not-cached-anywhere", cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------------------
# The strict config
# ---------------------------------------------------------------------------------------------------------------------
def test_strict_config_checks_types_and_cross_field_rules(tmp_path, convnext_folder):
    with pytest.raises(NASiamConfigError, match=r"NASiamConfig\.cifar_stem must be bool \| None, got 'yes'"):
        NASiamConfig(cifar_stem="yes")
    with pytest.raises(ValueError, match=r"NASiamConfig\.image_size must be int, got True \(bool\)"):
        NASiamConfig(image_size=True)
    config = NASiamConfig()
    with pytest.raises(ValueError, match=r"NASiamConfig\.queue_size must be int \| None, got '4096'"):
        config.queue_size = "4096"  # assignment is type-checked at once
    config.framework = "nope"  # a valid str: only the cross-field check can catch it
    with pytest.raises(NASiamConfigError, match="unknown framework 'nope'; allowed frameworks"):
        config.validate()
    with pytest.raises(ValueError, match="unknown framework 'nope'"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()
    config = NASiamConfig(framework="simclr")
    config.temperature = -0.5
    with pytest.raises(ValueError, match="temperature must be a positive number, got -0.5"):
        config.validate()
    config = NASiamConfig(backbone="resnet50", cifar_stem=False)
    config.backbone = "timm/resnet18"
    with pytest.raises(ValueError, match="stage_names .* are not those of backbone 'timm/resnet18'"):
        config.validate()
    with pytest.raises(ValueError, match="cifar_stem applies to torchvision ResNets only; backbone 'timm/resnet18'"):
        NASiamConfig(backbone="timm/resnet18", cifar_stem=True)
    with pytest.raises(ValueError, match="backbone_kwargs apply to timm backbones only"):
        NASiamConfig(backbone="resnet18", backbone_kwargs={"img_size": 32})
    values = backbone_config_values(str(convnext_folder))
    with pytest.raises(ValueError, match="names a torchvision model but backbone_config holds a transformers"):
        NASiamConfig(**{**values, "backbone": "resnet18"})
    with pytest.raises(ValueError, match="num_channels is 1 but backbone_config.num_channels is 3"):
        NASiamConfig(**values, num_channels=1)
    # defaults and derived values per backbone kind, and a round trip of the sub-config
    assert NASiamConfig().cifar_stem is True and NASiamConfig(backbone="timm/resnet18").cifar_stem is None
    assert NASiamConfig(framework="simclr", temperature=1).temperature == 1  # an int is a number too
    config = NASiamConfig(**values, projector_genotype=("identity",) * 6)
    assert config.projector_genotype == ["identity"] * 6 and config.stage_names == ["stem", "stage1", "stage2",
                                                                                     "stage3", "stage4"]
    config.save_pretrained(tmp_path / "convnext")
    loaded = AutoConfig.from_pretrained(tmp_path / "convnext")
    assert isinstance(loaded.backbone_config, ConvNextConfig)
    assert loaded.backbone_config.hidden_sizes == [8, 16, 24, 32] and loaded.hidden_size == 32
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Zero-init of the last BatchNorm of each residual block
# ---------------------------------------------------------------------------------------------------------------------
def test_zero_init_residual_and_checkpoints_keep_their_values(tmp_path):
    for name, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        trunk = NASiamModel(NASiamConfig(backbone=name, image_size=8)).backbone
        blocks = [b for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for b in layer]
        assert all(torch.count_nonzero(getattr(b, last).weight) == 0 for b in blocks)
        assert all(torch.all(b.bn1.weight == 1) for b in blocks)  # only the last norm of each block
    trunk = NASiamModel(NASiamConfig(image_size=8, zero_init_residual=False)).backbone
    assert torch.all(trunk.layer1[0].bn2.weight == 1)
    model = NASiamForPreTraining(NASiamConfig(image_size=8, framework="byol"))
    with torch.no_grad():
        model.nasiam.backbone.layer1[0].bn2.weight.uniform_(0.5, 1.5)
    expected = model.nasiam.backbone.layer1[0].bn2.weight.clone()
    model.save_pretrained(tmp_path)
    for loaded in (NASiamForPreTraining.from_pretrained(tmp_path), NASiamModel.from_pretrained(tmp_path)):
        trunk = loaded.backbone if isinstance(loaded, NASiamModel) else loaded.nasiam.backbone
        assert torch.equal(trunk.layer1[0].bn2.weight, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained initialisation
# ---------------------------------------------------------------------------------------------------------------------
def test_weights_from_a_local_file_reproduce_the_source_features(tmp_path):
    name, kwargs = VIT
    source = timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=0, **kwargs).eval()
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    model = NASiamForPreTraining(NASiamConfig(backbone=name, backbone_kwargs=kwargs, framework="byol",
                                              **SMALL_HEADS)).eval()
    init = load_backbone_weights(model, str(tmp_path / "vit.safetensors"))
    assert len(init.loaded) == len(source.state_dict()) and init.new == () and init.preprocessing is None
    x, _ = views(seed=4)
    with torch.no_grad():
        assert torch.equal(model.nasiam(x).pooler_output, source(x))
        assert torch.equal(model.momentum_backbone(x), source(x))  # the momentum copy follows

    # a NASiam folder (a pretraining checkpoint, BatchNorm statistics included) into a fresh ResNet
    trained = NASiamForPreTraining(NASiamConfig(image_size=8)).train()
    with torch.no_grad():
        trained(*views(size=8, seed=5))
    trained.save_pretrained(tmp_path / "nasiam")
    fresh = NASiamModel(NASiamConfig(image_size=8)).eval()
    init = load_backbone_weights(fresh, str(tmp_path / "nasiam"))
    x, _ = views(size=8, seed=6)
    with torch.no_grad():
        assert torch.equal(fresh(x).pooler_output, trained.eval().nasiam(x).pooler_output)
    assert init.source.startswith("NASiam folder") and init.to_dict()["num_loaded"] == len(init.loaded)


def test_imagenet_weights_into_a_cifar_stem_keep_the_stem_new(tmp_path):
    source = resnet18()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "tv.safetensors")
    model = NASiamModel(NASiamConfig(image_size=8))
    stem_before = model.backbone.conv1.weight.clone()
    init = load_backbone_weights(model, str(tmp_path / "tv.safetensors"))
    assert init.new == ("bn1.bias", "bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var", "bn1.weight",
                        "conv1.weight")
    assert set(init.ignored) == {"fc.weight", "fc.bias"} and "CIFAR stem" in init.note
    assert torch.equal(model.backbone.conv1.weight, stem_before)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


def test_weights_that_do_not_fit_are_named(tmp_path):
    model = NASiamModel(NASiamConfig(image_size=8))
    state = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    save_file({**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)}, tmp_path / "shape.safetensors")
    with pytest.raises(BackboneWeightsError, match=r"tensor 'layer2.0.conv1.weight' has shape \(128, 64, 5, 5\) "
                                                   r"there but \(128, 64, 3, 3\) in this model's backbone"):
        load_backbone_weights(model, str(tmp_path / "shape.safetensors"))
    save_file(state, tmp_path / "r18.safetensors")
    with pytest.raises(BackboneWeightsError, match=r"do not fit this model's backbone \(resnet34\): missing 96 "
                                                   r"tensors: \['layer1.2.bn1.bias'"):
        load_backbone_weights(NASiamModel(NASiamConfig(backbone="resnet34", image_size=8)),
                              str(tmp_path / "r18.safetensors"))
    save_file({**state, "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(BackboneWeightsError, match=r"unexpected 1 tensors: \['layer5.0.conv1.weight'\]"):
        load_backbone_weights(model, str(tmp_path / "extra.safetensors"))
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(BackboneWeightsError, match="only .safetensors files are read"):
        load_backbone_weights(model, str(tmp_path / "r18.pth"))
    with pytest.raises(BackboneWeightsError, match=r"nor torchvision weights of resnet18; valid names: "
                                                   r"\['DEFAULT', 'IMAGENET1K_V1'\]"):
        load_backbone_weights(model, "IMAGENET1K_V2")


def test_downloads_fail_at_once_offline_naming_cache_and_alternative(tmp_path):
    cache = tmp_path / "empty-cache"
    with pytest.raises(BackboneWeightsError, match=rf"not in the cache \({cache}\) and the Hub is offline.*local "
                                                   r"\.safetensors file or model folder"):
        load_backbone_weights(NASiamModel(NASiamConfig(backbone="timm/resnet18", **SMALL_HEADS)), "timm",
                              cache_dir=str(cache))
    with pytest.raises(BackboneWeightsError, match=r"download of https://download.pytorch.org/models/resnet18-.*"
                                                   rf"not in the cache \({cache}\)"):
        load_backbone_weights(NASiamModel(NASiamConfig(image_size=8)), "DEFAULT", cache_dir=str(cache))
    with pytest.raises(BackboneWeightsError, match="'timm' need a timm backbone"):
        load_backbone_weights(NASiamModel(NASiamConfig(image_size=8)), "timm")


def test_timm_pretrained_weights_come_through_timm_from_the_cache(tmp_path):
    # A Hub cache holding "timm's pretrained weights" (here a random 224 px, patch-16 checkpoint), offline: timm's own
    # loader adapts them to the 32 px, patch-4 model (position and patch embeddings resampled), the rest is copied.
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    repo = tmp_path / "cache" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    name, kwargs = VIT
    model = NASiamModel(NASiamConfig(backbone=name, backbone_kwargs=kwargs, **SMALL_HEADS))
    init = load_backbone_weights(model, "timm", cache_dir=str(tmp_path / "cache"))
    assert init.source.startswith("timm pretrained vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert model.backbone.model.pos_embed.shape == (1, 65, 192) and init.new == ()
    assert torch.equal(model.backbone.model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    p = init.preprocessing  # timm's pretrained_cfg: mean/std 0.5, 224 px crop at crop_pct 0.9, bicubic
    assert (p.mean, p.image_size, p.resize_size, p.interpolation) == ((0.5, 0.5, 0.5), 224, 248, "bicubic")


def test_transformers_weights_and_their_preprocessing(convnext_folder, tmp_path):
    from transformers import ConvNextImageProcessor

    values = backbone_config_values(str(convnext_folder))
    source = ConvNextForImageClassification(ConvNextConfig.from_pretrained(convnext_folder)).eval()
    source.save_pretrained(tmp_path / "clf")
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, image_mean=[0.4, 0.5, 0.6],
                           image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "clf")
    model = NASiamModel(NASiamConfig(**values, **SMALL_HEADS)).eval()
    init = load_backbone_weights(model, str(tmp_path / "clf"))
    # the Backbone's per-stage norms are not in a classification checkpoint: new and named; its head is left out
    assert init.new and all(k.startswith("hidden_states_norms.") for k in init.new)
    assert set(init.ignored) == {"classifier.weight", "classifier.bias", "convnext.layernorm.weight",
                                 "convnext.layernorm.bias"}
    x, _ = views(seed=7)
    with torch.no_grad():
        ours = model.backbone.model.encoder(model.backbone.model.embeddings(x)).last_hidden_state
        assert torch.equal(ours, source.convnext.encoder(source.convnext.embeddings(x)).last_hidden_state)
    p = init.preprocessing
    assert (p.mean, p.std, p.image_size, p.resize_size, p.interpolation) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 224,
                                                                             256, "bicubic")
    processor = image_processor_for_preprocessing(p, image_size=32)
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 37}
    assert list(processor.image_mean) == [0.4, 0.5, 0.6] and processor.resample == 3



def test_backbone_weights_transfer_into_a_hosted_backbone():
    from nasiam_hf.export import transfer_backbone_weights

    name, kwargs = VIT
    config = NASiamConfig(backbone=name, backbone_kwargs=kwargs, **SMALL_HEADS)
    source, target = NASiamModel(config).eval(), NASiamBackbone(config).eval()
    assert transfer_backbone_weights(source, target) == len(source.backbone.state_dict())
    x, _ = views(seed=8)
    with torch.no_grad():
        assert torch.equal(target(x).feature_maps[-1], source(x, output_hidden_states=True).hidden_states[-1])
