"""Moving NASiam backbones in and out of other formats.

* **torchvision**: :func:`export_torchvision` writes the backbone as a torchvision ResNet ``state_dict`` (safetensors,
  torchvision's exact key names, no ``fc.*``); the header metadata says which ResNet it is and whether it has the
  CIFAR stem. :func:`torchvision_resnet` rebuilds the matching torchvision model from such a file, and
  :func:`import_torchvision` turns any torchvision ResNet-18/34/50 state dict into a :class:`NASiamModel`.
* **detectron2**: :func:`export_detectron2` writes the pickle detectron2 reads for ``MODEL.WEIGHTS`` (the layout
  of MoCo's ``convert-pretrain-to-detectron2.py``: renamed numpy arrays under ``"model"``, ``matching_heuristics``).
* **the authors' code**: :func:`load_official_checkpoint` reads a ``.pth.tar`` of the official NASiam repository
  (SimSiam, MoCo v2 or SimCLR) with ``torch.load(..., weights_only=True)``, and :func:`parse_official_genotype` its
  genotype text files (parsed as data, never evaluated).

Pickles are only ever written here (detectron2 has no other format); nothing in this package unpickles a file.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONES, BackboneTrunk, ResNetTrunk, find_trunk
from .configuration_nasiam import NASiamConfig
from .fileio import atomic_write_bytes
from .search_space import check_op_name

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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(os.fspath(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
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
# Checkpoints and genotype files of the authors' code
# ---------------------------------------------------------------------------------------------------------------------
# The official op names that differ from ours.
OFFICIAL_OP_NAMES = {"avgpool_3x3": "avg_pool_3x3", "maxpool_3x3": "max_pool_3x3"}
_CELL_START = re.compile(r"([A-Za-z_]\w*)\s*=\s*\[")


def _matching_bracket(text: str, start: int) -> int:
    """Index just past the ``]`` closing the ``[`` at ``start`` (quotes respected)."""
    depth, quote, i = 0, None, start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets in the genotype text")


def _flatten_ops(value: Any, where: str) -> list[str]:
    """``[['linear_relu'], ['identity']]`` or ``['linear_relu', 'identity']`` -> op names (ours), checked."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of ops, got {value!r}")
    ops = []
    for layer in value:
        if isinstance(layer, (list, tuple)):
            if not layer:
                raise ValueError(f"{where}: empty layer in {value!r}")
            if len(layer) > 1:
                logger.warning("%s: layer %r lists several ops; the official Cell builds the first only", where, layer)
            layer = layer[0]
        if not isinstance(layer, str):
            raise ValueError(f"{where}: op names must be strings, got {layer!r}")
        ops.append(check_op_name(OFFICIAL_OP_NAMES.get(layer, layer), where=where))
    return ops


def parse_official_genotype(source: str | os.PathLike) -> dict[str, list[str]]:
    """Read a genotype of the official code, as data: ``{cell name: [op names]}`` with our op names.

    Accepts the repository's text files (``Genotype(encoder=[['linear_relu'], ...], predictor=[...])``), a bare
    list literal (``['linear_relu', ...]``, returned as ``{"projector": [...]}``) or our JSON form
    (``{"projector": [...], "predictor": [...]}``). Each list literal is read with ``ast.literal_eval`` and every
    op name is checked against the registry (``avgpool_3x3`` -> ``avg_pool_3x3``, ``maxpool_3x3`` ->
    ``max_pool_3x3``); nothing is ever evaluated as code.
    """
    text = os.fspath(source)
    if isinstance(source, os.PathLike) or not any(c in text for c in "[{(="):  # a file name, not genotype text
        if not Path(text).is_file():
            raise FileNotFoundError(f"genotype file not found: {text}")
        where = text
        text = Path(text).read_text(encoding="utf-8")
    else:
        where = "genotype text"
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        return {str(k): _flatten_ops(v, f"{where} ({k})") for k, v in data.items() if v is not None}
    if text.startswith("["):
        return {"projector": _flatten_ops(ast.literal_eval(text), where)}
    cells: dict[str, list[str]] = {}
    position = 0
    while (match := _CELL_START.search(text, position)) is not None:
        end = _matching_bracket(text, match.end() - 1)
        cells[match.group(1)] = _flatten_ops(ast.literal_eval(text[match.end() - 1:end]), f"{where} ({match.group(1)})")
        position = end
    if not cells:
        raise ValueError(f"{where}: no 'name=[...]' cell found in {text[:200]!r}")
    return cells


def genotype_cells_for(cells: Mapping[str, list[str]], framework: str) -> dict[str, list[str] | None]:
    """Map the official cell names onto ours: SimSiam/BYOL ``encoder`` -> projector, ``predictor`` -> predictor; for
    MoCo v2 and SimCLR (one cell) the single cell is the projector (SimCLR's file calls it ``predictor``)."""
    if "projector" in cells:
        return {"projector": list(cells["projector"]), "predictor": cells.get("predictor")}
    if framework in ("simsiam", "byol"):
        if "encoder" not in cells:
            raise ValueError(f"a {framework} genotype needs an 'encoder' cell, got {sorted(cells)}")
        return {"projector": list(cells["encoder"]), "predictor": cells.get("predictor")}
    if len(cells) != 1:
        raise ValueError(f"a {framework} genotype has one cell, got {sorted(cells)}")
    return {"projector": list(next(iter(cells.values()))), "predictor": None}


# Where each framework of the official code keeps its online encoder and heads (after dropping "module.").
_OFFICIAL_LAYOUT = {
    "simsiam": {"encoder": "encoder.", "projector": "encoder.fc.", "predictor": "predictor."},
    "mocov2": {"encoder": "encoder_q.", "projector": "encoder_q.fc.", "predictor": None},
    "simclr": {"encoder": "f.", "projector": "g.", "predictor": None},
}
# SimCLR's encoder is an nn.Sequential without names: index -> torchvision module.
_SIMCLR_INDICES = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}


def _official_framework(keys: list[str]) -> str:
    if any(k.startswith("encoder_q.") for k in keys):
        return "mocov2"
    if any(k.startswith("encoder.") for k in keys):
        return "simsiam"
    if any(k.startswith("f.0.") for k in keys):
        return "simclr"
    raise ValueError(
        "cannot tell the framework of this checkpoint (no encoder_q.*, encoder.* or f.* keys); pass framework="
    )


def _official_backbone(state: Mapping[str, torch.Tensor], framework: str) -> dict[str, torch.Tensor]:
    prefix = _OFFICIAL_LAYOUT[framework]["encoder"]
    weights = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if framework == "simclr":
            head, _, rest = key.partition(".")
            if head not in _SIMCLR_INDICES:
                continue
            key = f"{_SIMCLR_INDICES[head]}.{rest}"
        if key.startswith("fc."):
            continue
        weights[key] = value
    return weights


def _copy_by_position(items: list[tuple[str, torch.Tensor]], module: nn.Module, what: str) -> bool:
    """Copy tensors into ``module`` in state-dict order when every shape matches; else warn and copy nothing."""
    target = list(module.state_dict().items())
    source_shapes = [tuple(v.shape) for _, v in items]
    target_shapes = [tuple(v.shape) for _, v in target]
    if source_shapes != target_shapes:
        logger.warning(
            "%s: the official head does not have the structure of ours (%d tensors vs %d); it stays initialised",
            what, len(items), len(target),
        )
        return False
    module.load_state_dict({name: value for (name, _), (_, value) in zip(target, items)}, strict=True)
    return True


def _official_head(state: Mapping[str, torch.Tensor], prefix: str, framework: str, cell: str):
    """The head's tensors in state-dict order; SimSiam's frozen projector bias is folded into the BatchNorm after it
    (``Linear(bias) + BN(affine=False)`` equals ``Linear(no bias) + BN`` with ``running_mean - bias``)."""
    items = [(k, v) for k, v in state.items() if k.startswith(prefix)]
    if framework == "simsiam" and cell == "projector":
        keys = dict(items)
        bias, mean = keys.get(f"{prefix}1.bias"), keys.get(f"{prefix}2.running_mean")
        if bias is not None and mean is not None and f"{prefix}2.weight" not in keys:
            items = [(k, (v - bias) if k == f"{prefix}2.running_mean" else v) for k, v in items
                     if k != f"{prefix}1.bias"]
    return items


def load_official_checkpoint(
    path: str | os.PathLike,
    genotype: str | os.PathLike | Mapping[str, list[str]] | None = None,
    framework: str | None = None,
    **config_overrides,
):
    """A :class:`NASiamModel` (with ``.config``) from a checkpoint of the official NASiam code.

    ``path``: a ``.pth.tar``/``.pth`` saved by the official scripts (``{"epoch", "arch", "state_dict", ...}`` or a
    bare state dict), read with ``torch.load(..., weights_only=True)``. Keys may carry DataParallel's ``module.``:
    SimSiam ``encoder.*`` (torchvision ResNet, projector in ``encoder.fc``) and ``predictor.*``; MoCo v2
    ``encoder_q.*`` (the key encoder and queue are dropped); SimCLR ``f.*`` / ``g.*``.
    ``genotype``: the matching genotype file (or text, or ``{"projector": [...], ...}``). ``framework`` is
    inferred from the keys unless given; the depth and stem come from the weights.

    The backbone weights are always mapped exactly. A head's weights are mapped when its genotype is known and its
    tensors have our shapes in order; otherwise it stays initialised and a warning says so.
    """
    from .modeling_nasiam import NASiamModel

    loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    state = loaded["state_dict"] if isinstance(loaded.get("state_dict"), Mapping) else loaded
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    framework = framework or _official_framework(list(state))
    if framework not in _OFFICIAL_LAYOUT:
        raise ValueError(f"the official code has no {framework!r} model; known: {sorted(_OFFICIAL_LAYOUT)}")
    backbone = _official_backbone(state, framework)
    info = describe_state_dict(backbone)
    arch = loaded.get("arch") if isinstance(loaded.get("arch"), str) else None
    if arch is not None and arch in BACKBONES and arch != info["arch"]:
        raise ValueError(f"{path}: 'arch' says {arch} but the weights are a {info['arch']}")

    values: dict[str, Any] = {"framework": framework, **_config_values(info)}
    cells = None
    if genotype is not None:
        parsed = genotype if isinstance(genotype, Mapping) else parse_official_genotype(genotype)
        cells = genotype_cells_for(parsed, framework)
        values["projector_genotype"] = cells["projector"]
        values["projector_layers"] = len(cells["projector"])
        if framework == "simsiam" and cells.get("predictor"):
            values["predictor_genotype"] = cells["predictor"]
            values["predictor_layers"] = len(cells["predictor"])
    layout = _OFFICIAL_LAYOUT[framework]
    projector_items = _official_head(state, layout["projector"], framework, "projector")
    weights2d = [v for _, v in projector_items if v.ndim == 2]
    if weights2d:  # the head's output width, from its last linear layer
        values["projection_dim"] = int(weights2d[-1].shape[0])
        if framework == "simclr" and len(weights2d) > 1:
            values["projector_hidden_size"] = int(weights2d[0].shape[0])
    if framework == "simsiam":
        predictor_weights = [v for k, v in state.items() if k.startswith(layout["predictor"]) and v.ndim == 2]
        if predictor_weights:
            values["predictor_hidden_size"] = int(predictor_weights[0].shape[0])
    values.update(config_overrides)
    model = NASiamModel(NASiamConfig(**values))
    model.backbone.load_state_dict(backbone, strict=True)

    if cells is None:
        logger.warning("%s: no genotype given, so the heads' ops are unknown; the heads stay initialised", path)
    else:
        _copy_by_position(projector_items, model.projector, f"{path} projector")
        if model.predictor is not None:
            predictor_items = _official_head(state, layout["predictor"], framework, "predictor")
            _copy_by_position(predictor_items, model.predictor, f"{path} predictor")
    return model.eval()


__all__ = [
    "OFFICIAL_OP_NAMES",
    "backbone_of",
    "describe_state_dict",
    "detectron2_key",
    "detectron2_state_dict",
    "export_detectron2",
    "export_torchvision",
    "genotype_cells_for",
    "import_torchvision",
    "load_official_checkpoint",
    "parse_official_genotype",
    "read_torchvision_metadata",
    "torchvision_resnet",
    "torchvision_state_dict",
    "transfer_backbone_weights",
    "trunk_of",
]
