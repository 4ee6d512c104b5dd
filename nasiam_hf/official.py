"""Checkpoints and genotype files of the authors' code (aheuillet/NASiam) as NASiam models.

:func:`load_official_checkpoint` reads a ``.pth.tar`` of the official repository (SimSiam, MoCo v2 or SimCLR) with
``torch.load(..., weights_only=True)`` (nothing is unpickled), and :func:`parse_official_genotype` its genotype text
files (parsed as data with a regular expression over op names, never evaluated).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONES
from .configuration_nasiam import NASiamConfig
from .export import _config_values, describe_state_dict
from .search_space import check_op_name

logger = logging.getLogger(__name__)


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

    try:
        loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - damaged, truncated, or holding code: the file is unusable
        from .errors import without_unsafe_advice

        reason = without_unsafe_advice(" ".join(f"{type(error).__name__}: {error}".split()))[:300]
        raise ValueError(f"{os.fspath(path)!r} cannot be read as a checkpoint of the official code ({reason}): it "
                         "is damaged, or not a PyTorch checkpoint") from None
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


__all__ = ["OFFICIAL_OP_NAMES", "genotype_cells_for", "load_official_checkpoint", "parse_official_genotype"]
