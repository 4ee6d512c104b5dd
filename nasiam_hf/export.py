"""Moving NASiam backbones in and out of other formats.

* **torchvision**: :func:`export_torchvision` writes the backbone as a torchvision ResNet ``state_dict`` (safetensors,
  torchvision's exact key names, no ``fc.*``); the header metadata says which ResNet it is and whether it has the
  CIFAR stem. :func:`torchvision_resnet` rebuilds the matching torchvision model from such a file, and
  :func:`import_torchvision` turns any torchvision ResNet-18/34/50 state dict into a :class:`NASiamModel`.
* **detectron2**: :func:`export_detectron2` writes the pickle detectron2 reads for ``MODEL.WEIGHTS`` (the layout
  of MoCo's ``convert-pretrain-to-detectron2.py``: renamed numpy arrays under ``"model"``, ``matching_heuristics``).
* **a training checkpoint**: :func:`export_checkpoint` writes the model of a checkpoint as a model folder.
* **the authors' code**: :mod:`nasiam_hf.official` imports their checkpoints and genotype files.

Pickles are only ever written here (detectron2 has no other format); nothing in this package unpickles a file.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BackboneTrunk, ResNetTrunk, find_trunk
from .configuration_nasiam import NASiamConfig
from .errors import DamagedCheckpointError
from .fileio import atomic_write_bytes, atomic_write_json
from .folders import CONFIG_FILE, read_trainer_state

logger = logging.getLogger(__name__)

FORMAT_NAME = "nasiam-hf/torchvision-resnet"
CIFAR_STEM_NOTE = (
    "conv1 is a 3x3 stride-1 convolution (padding 1, no bias) and maxpool is Identity (CIFAR stem): build "
    "torchvision.models.{arch}(), replace conv1 with nn.Conv2d({channels}, 64, 3, 1, 1, bias=False) and maxpool with "
    "nn.Identity() before load_state_dict, or call nasiam_hf.export.torchvision_resnet(path)"
)
STANDARD_STEM_NOTE = (
    "standard torchvision stem: torchvision.models.{arch}() loads it with load_state_dict(strict=False) (no fc.*), or "
    "call nasiam_hf.export.torchvision_resnet(path)"
)
# Blocks per stage and block type of the ResNets we build, to recognise a state dict.
RESNET_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


# ---------------------------------------------------------------------------------------------------------------------
# Getting at a backbone
# ---------------------------------------------------------------------------------------------------------------------
def trunk_of(model_or_folder: Any) -> BackboneTrunk:
    """The backbone trunk of a NASiam model, a downstream head, a trunk itself, or a saved model folder."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        from .modeling_nasiam import NASiamBackbone

        if not Path(model_or_folder).is_dir():
            raise ValueError(f"{os.fspath(model_or_folder)!r} is not a model folder")
        return NASiamBackbone.from_pretrained(model_or_folder).backbone
    return find_trunk(model_or_folder)


def backbone_of(model_or_folder: Any) -> ResNetTrunk:
    """The torchvision :class:`ResNetTrunk` of a model or folder; other backbones are refused (these exports write
    torchvision and detectron2 ResNets)."""
    trunk = trunk_of(model_or_folder)
    if not isinstance(trunk, ResNetTrunk):
        raise ValueError(
            f"the torchvision and detectron2 exports write ResNets, and this model's backbone is a {trunk.kind} one; "
            "share it as a NASiam folder instead (save_pretrained; it loads as NASiamModel, "
            "NASiamForImageClassification or NASiamBackbone)"
        )
    return trunk


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Recognise a torchvision ResNet state dict: ``{"arch", "cifar_stem", "num_channels"}``.

    The block type and the number of blocks of every stage give the depth; the first conv's kernel the stem.
    """
    if "conv1.weight" not in state_dict:
        raise ValueError("not a torchvision ResNet state dict: no 'conv1.weight' key")
    kind = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in state_dict) else "basic"
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    arch = next((name for name, layout in RESNET_LAYOUTS.items() if layout == (kind, tuple(blocks))), None)
    if arch is None:
        raise ValueError(
            f"unsupported ResNet layout ({kind} blocks, {blocks} per stage); supported: {sorted(RESNET_LAYOUTS)}"
        )
    conv1 = state_dict["conv1.weight"]
    return {"arch": arch, "cifar_stem": conv1.shape[-1] == 3, "num_channels": int(conv1.shape[1])}


# ---------------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------------
def torchvision_state_dict(model_or_folder: Any) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's names (``conv1.weight``, ``layer1.0.bn1.running_mean``...)."""
    trunk = backbone_of(model_or_folder)
    return {k: v.detach().cpu().contiguous().clone() for k, v in trunk.state_dict().items()}


def export_torchvision(model_or_folder: Any, path: str | os.PathLike) -> Path:
    """Write the backbone as a torchvision ResNet state dict (safetensors, no ``fc.*``) to ``path``.

    The header metadata holds ``arch``, ``cifar_stem`` (``"true"``/``"false"``), ``num_channels`` and a ``note``
    on how to build the matching torchvision model; :func:`torchvision_resnet` reads them.
    """
    from safetensors.torch import save

    tensors = torchvision_state_dict(model_or_folder)
    info = describe_state_dict(tensors)
    note = (CIFAR_STEM_NOTE if info["cifar_stem"] else STANDARD_STEM_NOTE).format(
        arch=info["arch"], channels=info["num_channels"]
    )
    metadata = {
        "format": "pt",
        "source": FORMAT_NAME,
        "arch": info["arch"],
        "cifar_stem": "true" if info["cifar_stem"] else "false",
        "num_channels": str(info["num_channels"]),
        "note": note,
    }
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_torchvision_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file (``{}`` when it has none)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_state_dict(source: Any) -> dict[str, torch.Tensor]:
    """A state dict from a dict, a module, a safetensors file or a torch file (``weights_only=True``)."""
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(os.fspath(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - damaged, truncated, or holding code: the file is unusable
        from .errors import without_unsafe_advice

        reason = without_unsafe_advice(" ".join(f"{type(error).__name__}: {error}".split()))[:300]
        raise ValueError(f"{os.fspath(path)!r} cannot be read as a state dict ({reason})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(loaded)


def _trunk_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a classifier (``fc.*``) and a leading ``module.`` (DataParallel) from a torchvision state dict."""
    stripped = ((key.removeprefix("module."), value) for key, value in state_dict.items())
    return {key: value for key, value in stripped if not key.startswith("fc.")}


def torchvision_resnet(path: str | os.PathLike) -> nn.Module:
    """The torchvision ResNet of a file written by :func:`export_torchvision`, weights loaded, in eval mode.

    The stem is rebuilt as the metadata says (CIFAR stem: 3x3 stride-1 ``conv1``, ``maxpool = Identity``) and ``fc``
    is ``nn.Identity()``: the model returns the pooled ``(B, C)`` features, bit-for-bit those of the NASiam backbone.
    Attach your own classifier with ``model.fc = nn.Linear(C, num_classes)``.
    """
    import torchvision

    weights = _trunk_weights(_read_state_dict(path))
    metadata = read_torchvision_metadata(path) if Path(path).suffix == ".safetensors" else {}
    info = describe_state_dict(weights)
    if "cifar_stem" in metadata and (metadata["cifar_stem"] == "true") != info["cifar_stem"]:
        raise ValueError(f"{path}: the metadata says cifar_stem={metadata['cifar_stem']} but conv1 disagrees")
    model = getattr(torchvision.models, info["arch"])(weights=None)
    channels = info["num_channels"]
    if info["cifar_stem"]:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _backbone_fields(info: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that the weights of a backbone (described by :func:`describe_state_dict`) fix."""
    return {"backbone": info["arch"], "cifar_stem": info["cifar_stem"], "num_channels": info["num_channels"]}


def _config_values(info: Mapping[str, Any]) -> dict[str, Any]:
    """Config values for a model around these weights: their fields, and 224-pixel inputs for the ImageNet stem."""
    return {**_backbone_fields(info), **({} if info["cifar_stem"] else {"image_size": 224})}


def _check_backbone_config(config: NASiamConfig, info: Mapping[str, Any], where: str) -> None:
    wrong = {k: (getattr(config, k), v) for k, v in _backbone_fields(info).items() if getattr(config, k) != v}
    if wrong:
        shown = ", ".join(f"{k}={have!r} but the weights need {need!r}" for k, (have, need) in wrong.items())
        raise ValueError(f"config does not fit the weights of {where}: {shown}")


def import_torchvision(source: Any, config: NASiamConfig | None = None, **config_overrides):
    """A :class:`NASiamModel` whose backbone holds the weights of a torchvision ResNet-18/34/50.

    ``source``: a file from :func:`export_torchvision` or any safetensors/torch file of a torchvision ResNet state
    dict (``fc.*`` ignored), a state dict, or a torchvision model. ``config``: the NASiam config (framework, heads);
    by default one is made from the weights (depth, stem) and ``config_overrides``. The heads start initialised.
    """
    from .modeling_nasiam import NASiamModel

    weights = _trunk_weights(_read_state_dict(source))
    info = describe_state_dict(weights)
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if config is None:
        config = NASiamConfig(**{**_config_values(info), **config_overrides})
    elif config_overrides:
        raise ValueError("pass either a config or config overrides, not both")
    _check_backbone_config(config, info, where)
    model = NASiamModel(config)
    model.backbone.load_state_dict(weights, strict=True)
    return model.eval()


def transfer_backbone_weights(source: Any, target: nn.Module) -> int:
    """Copy a NASiam backbone's weights into the :class:`NASiamBackbone` inside ``target`` (e.g. the one DETR,
    UperNet or Mask2Former built from a ``NASiamConfig`` ``backbone_config``); returns how many tensors were copied.

    ``source``: a model folder or any NASiam model, of any backbone kind. Heads that swap BatchNorm for a frozen
    variant (DETR) have no ``num_batches_tracked`` buffers; those are skipped, every other tensor must match.
    """
    from .modeling_nasiam import NASiamBackbone

    hosts = [m for m in target.modules() if isinstance(m, NASiamBackbone)]
    if len(hosts) != 1:
        raise ValueError(f"expected exactly one NASiamBackbone inside {type(target).__name__}, found {len(hosts)}")
    trunk = hosts[0].backbone
    weights = {k: v.detach() for k, v in trunk_of(source).state_dict().items()}
    wanted = trunk.state_dict()
    weights = {k: v for k, v in weights.items() if k in wanted or not k.endswith("num_batches_tracked")}
    trunk.load_state_dict(weights, strict=True)
    return len(weights)


# ---------------------------------------------------------------------------------------------------------------------
# detectron2
# ---------------------------------------------------------------------------------------------------------------------
_STAGE = re.compile(r"^layer([1-4])\.")
_BN = re.compile(r"(^|\.)bn([1-3])\.")


def detectron2_key(name: str) -> str:
    """Rename one torchvision ResNet key to detectron2's ResNet naming.

    ``layerN.`` -> ``res{N+1}.``; ``bnK`` -> ``convK.norm``; ``downsample.0`` -> ``shortcut`` and ``downsample.1`` ->
    ``shortcut.norm``; stem keys (``conv1``, ``bn1``) go under ``stem.``.
    """
    stage = _STAGE.match(name)
    if stage:
        name = f"res{int(stage.group(1)) + 1}." + name[stage.end():]
    else:
        name = "stem." + name
    name = _BN.sub(lambda m: f"{m.group(1)}conv{m.group(2)}.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def detectron2_state_dict(model_or_folder: Any) -> dict[str, "Any"]:
    """The backbone's weights as detectron2 names them, as numpy arrays (``num_batches_tracked`` dropped)."""
    return {
        detectron2_key(k): v.numpy()
        for k, v in torchvision_state_dict(model_or_folder).items()
        if not k.endswith("num_batches_tracked")
    }


def export_detectron2(model_or_folder: Any, path: str | os.PathLike, allow_cifar_stem: bool = False) -> Path:
    """Write the backbone in detectron2's checkpoint format (a pickle, load it with ``MODEL.WEIGHTS path``).

    The file holds ``{"model": {renamed numpy arrays}, "__author__": "nasiam-hf", "matching_heuristics": True}``,
    the layout MoCo's ``convert-pretrain-to-detectron2.py`` writes; ``num_batches_tracked`` buffers are left out
    (detectron2's frozen BatchNorm has none). detectron2's ResNet has the ImageNet stem (7x7 stride-2 conv and
    max-pool): a CIFAR-stem backbone would load with a mismatched ``stem.conv1``, so it is refused unless
    ``allow_cifar_stem=True``. Use a ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` matching the model's normalisation
    (0-255 scale, RGB ``INPUT.FORMAT``) as in MoCo's detection configs.
    """
    trunk = backbone_of(model_or_folder)
    if trunk.conv1.kernel_size == (3, 3) and not allow_cifar_stem:
        raise ValueError(
            "this backbone has the CIFAR stem (3x3 stride-1 conv1, no max-pool), which detectron2's ResNet does not "
            "have; pass allow_cifar_stem=True to export it anyway (stem.conv1 will not match detectron2's 7x7 conv)"
        )
    payload = {"model": detectron2_state_dict(trunk), "__author__": "nasiam-hf", "matching_heuristics": True}
    return atomic_write_bytes(path, pickle.dumps(payload, protocol=4))


# ---------------------------------------------------------------------------------------------------------------------
# A checkpoint as a model folder
# ---------------------------------------------------------------------------------------------------------------------
def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike) -> str:
    """Write the model of a checkpoint as a folder that loads without the training state; returns a summary line.

    A pretraining checkpoint gives its :class:`NASiamModel` (as the end of the run would: without the momentum
    encoder and queue), a fine-tuning checkpoint its classifier, a search checkpoint the genotype found so far
    (``config.json`` + ``genotype.json`` + ``search_history.json``, usable as ``--genotype``). The image processor is
    the checkpoint's when it has one. Everything is published at once (:func:`~nasiam_hf.fileio.staged_files`).
    """
    from safetensors.torch import load_file

    from . import modeling_nasiam
    from .configuration_nasiam import NASiamConfig
    from .fileio import staged_files
    from .checkpoint_health import require_usable_checkpoint
    from .folders import require_exportable_checkpoint, require_model_output
    from .processing import image_processor_for_config

    require_usable_checkpoint(checkpoint, "CHECKPOINT")  # every part read: damage that keeps sizes is found too
    info = require_exportable_checkpoint(checkpoint)
    require_model_output(output)
    path, output = info.path, Path(output)
    architecture = info.config["architectures"][0]
    config = NASiamConfig.from_pretrained(path)
    model = getattr(modeling_nasiam, architecture)(config)
    weights = load_file(os.fspath(path / "model.safetensors"))
    if weights and all(k.startswith("module.") for k in weights):  # saved from a DDP-wrapped model
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise DamagedCheckpointError(f"the weights of {str(path)!r} do not fit its {CONFIG_FILE} "
                                     f"({' '.join(str(error).split())[:300]})") from None
    state = read_trainer_state(path)
    history = state.get("history") or {}
    with staged_files(output) as staged:
        if architecture == "NASiamForArchitectureSearch":
            from .confidence import genotype_confidence, genotype_record

            genotype = model.genotype()
            confidence = genotype_confidence(model.op_weights(), config.search_ops)  # how sure the search is so far
            model.derive_config().save_pretrained(staged)
            atomic_write_json(staged / "genotype.json", genotype_record(genotype, confidence))
            atomic_write_json(staged / "search_history.json", {**history, "genotype": genotype,
                                                               "confidence": confidence})
            what = f"the genotype found so far ({genotype})"
        else:
            target = model.nasiam if architecture == "NASiamForPreTraining" else model
            target.save_pretrained(staged)
            processor = path / "preprocessor_config.json"
            if processor.is_file():
                shutil.copyfile(processor, staged / processor.name)
            else:
                image_processor_for_config(config).save_pretrained(staged)
            if history:
                atomic_write_json(staged / "training_history.json", history)
            what = f"its {type(target).__name__}" + ("" if processor.is_file() else
                                                     " (with default normalisation statistics: check them)")
    return f"wrote {output}: {what}, from {path} (epoch {state['epoch']}, step {state['global_step']})"


__all__ = [
    "export_checkpoint",
    "backbone_of",
    "describe_state_dict",
    "detectron2_key",
    "detectron2_state_dict",
    "export_detectron2",
    "export_torchvision",
    "import_torchvision",
    "read_torchvision_metadata",
    "torchvision_resnet",
    "torchvision_state_dict",
    "transfer_backbone_weights",
    "trunk_of",
]
