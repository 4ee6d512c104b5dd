"""Every ```python block of README.md's "## Downstream use" section runs, offline, against small real folders.

Convention: the snippets name their inputs with placeholder paths, string literals starting with ``path/to/``. This
test builds a small model for each placeholder it knows (``PLACEHOLDERS`` below) and substitutes the placeholder by
that folder or file before executing the block in a fresh namespace, with the working directory in ``tmp_path``
(so files a snippet writes land there). A placeholder the test does not know fails the test: add it here when
adding a snippet. ```bash blocks are documentation only and are not run.
"""

import re
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import nasiam_hf  # noqa: F401
from conftest import readme_blocks
from nasiam_hf import NASiamConfig, NASiamForImageClassification, NASiamModel
from nasiam_hf.processing import build_image_processor

SECTION = "## Downstream use"
PLACEHOLDER = re.compile(r"""(["'])(path/to/[^"']+)\1""")


BLOCKS = readme_blocks(SECTION, "python")


def fake_official_checkpoint(folder):
    """A .pth.tar laid out like the authors' SimSiam checkpoints (CIFAR ResNet-18 under module.encoder.*)."""
    net = torchvision.models.resnet18(weights=None, num_classes=2048)
    parts = [("conv1", nn.Conv2d(3, 64, 3, 1, 1, bias=False))]
    parts += [(name, m) for name, m in net.named_children() if name not in ("conv1", "maxpool", "fc")]
    encoder = nn.Sequential(OrderedDict(parts + [("flatten", nn.Flatten(1)), ("fc", net.fc)]))
    state = {f"module.encoder.{k}": v for k, v in encoder.state_dict().items()}
    path = folder / "checkpoint_0799.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state}, path)
    genotype = folder / "cifar10_resnet18.txt"
    genotype.write_text("Genotype(encoder=[['linear_relu'], ['linear_silu'], ['linear_elu'], ['identity'], "
                        "['identity'], ['linear_relu']], predictor=[['linear_hardswish'], ['avgpool_3x3'], "
                        "['avgpool_3x3'], ['linear_hardswish']])")
    return path, genotype


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    processor = build_image_processor(32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "cifar")
    NASiamModel(NASiamConfig(image_size=32)).save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    labels = ["plane", "car"]
    classifier = NASiamForImageClassification(NASiamConfig(
        image_size=32, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}))
    classifier.save_pretrained(root / "classifier")
    processor.save_pretrained(root / "classifier")
    NASiamModel(NASiamConfig(image_size=64, cifar_stem=False)).save_pretrained(root / "imagenet-model")
    checkpoint, genotype = fake_official_checkpoint(root)
    return {
        "path/to/model": root / "model",
        "path/to/classifier": root / "classifier",
        "path/to/imagenet-model": root / "imagenet-model",
        "path/to/checkpoint_0799.pth.tar": checkpoint,
        "path/to/cifar10_resnet18.txt": genotype,
    }


def test_the_section_has_python_snippets():
    assert len(BLOCKS) >= 4, "README.md's downstream section lost its python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(index, placeholders, tmp_path, monkeypatch):
    code = BLOCKS[index]
    unknown = {m.group(2) for m in PLACEHOLDER.finditer(code)} - set(placeholders)
    assert not unknown, f"snippet {index} uses placeholders this test does not provide: {sorted(unknown)}"
    code = PLACEHOLDER.sub(lambda m: repr(str(placeholders[m.group(2)])), code)
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = {"__name__": f"readme_snippet_{index}"}
    try:
        exec(compile(code, f"README.md downstream snippet {index}", "exec"), namespace)
        for marker, check in STATED.items():  # what the snippet's comments say it gives
            if marker in code:
                check(namespace, placeholders)
    finally:
        torch.set_num_threads(previous)


def _same_features(ns, placeholders):
    """``features`` is (1, 512) and the pipeline's pooled output is "the same features"."""
    assert tuple(ns["features"].shape) == (1, 512)
    pooled = torch.tensor(ns["pooled"], dtype=torch.float32).reshape(1, -1)
    torch.testing.assert_close(pooled, ns["features"], rtol=1e-4, atol=1e-5)


def _predictions(ns, placeholders):
    """``[{"label": ..., "score": ...}, ...]`` over the classifier's labels."""
    assert {p["label"] for p in ns["predictions"]} == {"plane", "car"}
    assert sum(p["score"] for p in ns["predictions"]) == pytest.approx(1.0, abs=1e-4)
    assert ns["out"].loss.ndim == 0 and ns["out"].logits.shape == (4, 3)


def _channels(ns, placeholders):
    assert ns["backbone"].channels == [256, 512]  # "[256, 512] for a ResNet-18"


def _round_trip(ns, placeholders):
    """The torchvision export, the ResNet built from it and the NASiamModel imported back give the same features."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = NASiamModel.from_pretrained(placeholders["path/to/model"]).eval()(x).pooler_output
        torch.testing.assert_close(ns["resnet"](x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ns["model"].eval()(x).pooler_output, expected, rtol=1e-4, atol=1e-5)
    assert not ns["resnet"].training  # "eval mode"


STATED = {"pooled = extractor(": _same_features, "predictions = classifier(": _predictions,
          "backbone.channels": _channels, "torchvision_resnet(": _round_trip}
