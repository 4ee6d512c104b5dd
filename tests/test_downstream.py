"""Downstream use: classifier and backbone heads, image processor, pipelines, DETR on a NASiam backbone, fine-tuning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import run_without_package

import nasiam_hf  # noqa: F401  (registers the Auto classes)
from nasiam_hf import NASiamBackbone, NASiamConfig, NASiamForImageClassification, NASiamForPreTraining, NASiamModel
from nasiam_hf.commands.finetune import main as finetune_main
from nasiam_hf.data import build_transform
from nasiam_hf.processing import build_image_processor, image_processor_for_config

LABELS = ["ant", "bee", "cat"]
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {name: i for i, name in enumerate(LABELS)}
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def busy_statistics(model: nn.Module) -> nn.Module:
    """A few train-mode forwards so BatchNorm statistics differ from their initial values."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def assert_same_backbone(trunk_a, trunk_b):
    a, b = trunk_a.state_dict(), trunk_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pretraining checkpoint (NASiamForPreTraining) and a NASiamModel folder with an image processor."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("downstream")
    pre = NASiamForPreTraining(NASiamConfig(image_size=8))
    busy_statistics(pre.nasiam.backbone)
    pre.save_pretrained(root / "pre")
    pre.nasiam.save_pretrained(root / "model")
    build_image_processor(8, MEAN, STD, "cifar").save_pretrained(root / "model")
    return {"pre": root / "pre", "model": root / "model", "reference": pre}


@pytest.mark.parametrize("which", ["pre", "model"])
def test_checkpoints_load_into_the_downstream_heads(folders, which):
    reference = folders["reference"].nasiam.backbone
    clf, info = NASiamForImageClassification.from_pretrained(
        folders[which], num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, output_loading_info=True)
    assert_same_backbone(clf.nasiam.backbone, reference)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # the new classifier, nothing else
    assert clf.nasiam.projector is None and clf.nasiam.predictor is None  # SSL heads are not carried along
    assert clf.config.id2label == ID2LABEL and clf.classifier.out_features == 3
    backbone, info = NASiamBackbone.from_pretrained(folders[which], out_features=["stage1", "stage3"],
                                                    output_loading_info=True)
    assert_same_backbone(backbone.backbone, reference)
    assert not info["missing_keys"]
    assert backbone.out_features == ["stage1", "stage3"] and backbone.channels == [64, 256]


def test_auto_classes_and_remote_code(folders, tmp_path):
    from transformers import AutoBackbone, AutoConfig, AutoModelForImageClassification

    clf = AutoModelForImageClassification.from_pretrained(folders["model"], num_labels=3, id2label=ID2LABEL,
                                                          label2id=LABEL2ID)
    assert type(clf) is NASiamForImageClassification
    # transformers 5.24's AutoBackbone.from_pretrained only accepts Hub ids (it asks the Hub whether the repo exists);
    # the Auto mapping itself resolves our class:
    assert type(AutoBackbone.from_config(AutoConfig.from_pretrained(folders["model"]))) is NASiamBackbone
    clf.save_pretrained(tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageClassification"] == "modeling_nasiam.NASiamForImageClassification"
    assert saved["auto_map"]["AutoBackbone"] == "modeling_nasiam.NASiamBackbone"
    build_image_processor(8, MEAN, STD, "cifar").save_pretrained(tmp_path / "clf")
    # Without nasiam_hf: the modeling code saved in the folders serves both pipelines.
    result = run_without_package(f"""
        import torch
        torch.set_num_threads(1)
        from PIL import Image
        from transformers import pipeline
        image = Image.new("RGB", (8, 8), (10, 200, 30))
        preds = pipeline("image-classification", model={str(tmp_path / "clf")!r}, trust_remote_code=True)(image)
        assert sorted(p["label"] for p in preds) == {sorted(LABELS)!r}, preds
        feats = pipeline("image-feature-extraction", model={str(folders["model"])!r}, trust_remote_code=True)(
            image, pool=True)
        assert len(feats[0]) == 512
        print("OK", type(preds).__name__)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK list" in result.stdout


def test_classifier_losses_follow_the_problem_type():
    x = torch.randn(4, 3, 8, 8)
    model = NASiamForImageClassification(NASiamConfig(image_size=8, num_labels=3)).eval()
    labels = torch.tensor([0, 2, 1, 0])
    out = model(x, labels=labels)
    assert out.logits.shape == (4, 3) and model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    loss, logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    multi = NASiamForImageClassification(NASiamConfig(image_size=8, num_labels=3,
                                                      problem_type="multi_label_classification")).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    out = multi(x, labels=targets)
    torch.testing.assert_close(out.loss, nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    regression = NASiamForImageClassification(NASiamConfig(image_size=8, num_labels=1)).eval()
    values = torch.randn(4)
    out = regression(x, labels=values)
    torch.testing.assert_close(out.loss, nn.functional.mse_loss(out.logits.squeeze(), values))
    hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == 5 and hidden[-1].shape == (4, 512, 1, 1)


def test_freeze_backbone_trains_the_classifier_only():
    model = NASiamForImageClassification(NASiamConfig(image_size=8, num_labels=3)).freeze_backbone()
    model.train()
    assert model.backbone_frozen and not model.nasiam.training and model.classifier.training
    assert all(not p.requires_grad for p in model.nasiam.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 8, 8), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}  # BN statistics included: unchanged
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters()) and model.nasiam.training


@pytest.mark.parametrize("backbone,cifar_stem,size,channels", [
    ("resnet18", True, 8, [64, 64, 128, 256, 512]), ("resnet50", False, 32, [64, 256, 512, 1024, 2048])])
def test_backbone_feature_maps(backbone, cifar_stem, size, channels):
    config = NASiamConfig(backbone=backbone, cifar_stem=cifar_stem, image_size=size, out_indices=[0, 2, 4])
    model = NASiamBackbone(config).eval()
    assert model.num_features == channels  # torchvision's stage widths
    assert model.out_features == ["stem", "stage2", "stage4"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert [m.shape[1] for m in out.feature_maps] == model.channels
    assert len(out.hidden_states) == 5 and out.feature_maps[-1] is out.hidden_states[-1]
    reference = NASiamModel(config).eval()
    reference.backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out.feature_maps[-1].mean(dim=(2, 3)), reference(x).pooler_output)
        assert model(x).hidden_states is None
        maps, = model(x, return_dict=False)
    assert len(maps) == 3


def test_detr_runs_on_a_nasiam_backbone(folders, tmp_path):
    from transformers import AutoConfig, DetrConfig, DetrForObjectDetection

    from nasiam_hf.export import transfer_backbone_weights

    backbone_config = NASiamConfig.from_pretrained(folders["model"], out_features=["stage3", "stage4"])
    config = DetrConfig(backbone_config=backbone_config, use_timm_backbone=False, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2,
                        decoder_attention_heads=2, num_queries=4, num_labels=3)
    detector = DetrForObjectDetection(config).eval()
    assert transfer_backbone_weights(folders["model"], detector) > 0
    hosted = [m for m in detector.modules() if isinstance(m, NASiamBackbone)][0]
    reference = folders["reference"].nasiam.backbone.state_dict()
    for key, value in hosted.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.no_grad():
        out = detector(pixel_values=torch.randn(1, 3, 16, 16))
    assert out.logits.shape == (1, 4, 4) and out.pred_boxes.shape == (1, 4, 4)
    config.save_pretrained(tmp_path / "detr")
    assert type(AutoConfig.from_pretrained(tmp_path / "detr").backbone_config) is NASiamConfig


def test_image_processor_matches_the_eval_transform(folders):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folders["model"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    ours = build_transform("eval", "cifar", 8, MEAN, STD)(image)
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"][0], ours, rtol=0, atol=1e-5)
    wide = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    assert processor(wide, return_tensors="pt")["pixel_values"].shape == (1, 3, 8, 8)
    imagenet = build_image_processor(224, MEAN, STD, "imagenet")
    assert imagenet.size["shortest_edge"] == 256 and imagenet.crop_size == {"height": 224, "width": 224}
    default = image_processor_for_config(NASiamConfig(cifar_stem=False, image_size=64))
    assert default.size["shortest_edge"] == 73 and list(default.image_mean) == [0.485, 0.456, 0.406]
    with pytest.raises(ValueError):
        build_image_processor(32, MEAN, STD, "svhn")


def test_feature_extraction_pipeline_pools(folders):
    from transformers import AutoImageProcessor, pipeline

    image = Image.new("RGB", (8, 8), (200, 40, 90))
    extractor = pipeline("image-feature-extraction", model=str(folders["model"]))
    pooled = extractor(image, pool=True, return_tensors=True)
    model = NASiamModel.from_pretrained(folders["model"]).eval()
    inputs = AutoImageProcessor.from_pretrained(folders["model"])(image, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pooled, model(**inputs).pooler_output)


def write_parquet(path, n, seed):
    import datasets

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 3
        pixels = np.clip((40, 128, 215)[label] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


def test_finetune_command_lowers_the_loss_and_saves_a_classifier(tmp_path):
    from transformers import AutoModelForImageClassification, pipeline

    train, test = write_parquet(tmp_path / "train.parquet", 32, 0), write_parquet(tmp_path / "test.parquet", 12, 1)
    NASiamForPreTraining(NASiamConfig(image_size=16)).save_pretrained(tmp_path / "pre")
    out = tmp_path / "ft"
    common = ["--model_name_or_path", str(tmp_path / "pre"), "--train_file", train, "--validation_file", test,
              "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--seed", "0"]
    finetune_main(common + ["--output_dir", str(out), "--num_train_epochs", "3", "--base_learning_rate", "0.02",
                            "--checkpointing_steps", "no"])
    history = json.loads((out / "finetune_history.json").read_text())["epochs"]
    assert len(history) == 3 and history[-1]["loss"] < 0.8 * history[0]["loss"]
    results = json.loads((out / "eval_results.json").read_text())["fine_tuning"]
    assert 0 <= results["top1"] <= 100 and results["epochs"] == 3 and results["frozen_backbone"] is False
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_args.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "## Fine-tuning" in card
    assert "No evaluation was run" not in card and "config: fine-tuning" in card
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == ID2LABEL and model.config.image_size == 16
    predictions = pipeline("image-classification", model=str(out))(Image.new("RGB", (16, 16), (215, 215, 215)))
    assert {p["label"] for p in predictions} == set(LABELS)
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4

    # --freeze_backbone: only the classifier moves; fine-tuning a classifier folder again replaces nothing else
    frozen = tmp_path / "frozen"
    finetune_main(common + ["--output_dir", str(frozen), "--max_train_steps", "2", "--freeze_backbone",
                            "--model_name_or_path", str(out), "--checkpointing_steps", "no"])
    again = NASiamForImageClassification.from_pretrained(frozen)
    assert_same_backbone(again.nasiam.backbone, model.nasiam.backbone)
    assert not torch.equal(again.classifier.weight, model.classifier.weight)
    assert json.loads((frozen / "eval_results.json").read_text())["fine_tuning"]["frozen_backbone"] is True
