"""Starting a backbone from existing weights (``--backbone_weights``), and the preprocessing those weights expect.

:func:`load_backbone_weights` fills the backbone of a freshly built NASiam model (and its momentum copy) from
``spec``:

* a torchvision weights name valid for the ResNet (``DEFAULT``, ``IMAGENET1K_V1``, ``IMAGENET1K_V2``...);
* ``timm``: timm's pretrained weights for the model's tag (``timm/resnet50.a1_in1k``), through ``timm.create_model(
  ..., pretrained=True)`` so that timm adapts them as it does for itself (a ViT built at 32 px gets resampled
  position and patch embeddings);
* a local ``.safetensors`` file or model folder: a NASiam folder, a timm folder (``config.json`` with
  ``architecture``) or a transformers folder; for a transformers backbone also a Hub id. Only safetensors are read.

Every tensor of the backbone must be filled, with its own shape; the error lists the missing and unexpected tensors
and names any tensor whose shape differs (with both shapes). Two kinds of tensors may stay new, and are named in the
returned :class:`BackboneInit`: the stem (``conv1``, ``bn1``) of a CIFAR-stem ResNet given ImageNet weights (a 3x3
conv cannot take a 7x7 kernel; the rest of the network loads), and the per-stage output norms
(``hidden_states_norms.*``) that a transformers Backbone adds on top of its base model. Offline (``HF_HUB_OFFLINE=1``)
a name that needs a download and is not in the cache fails at once, naming the cache and the local alternative.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .backbones import (
    TIMM, TIMM_PREFIX, TORCHVISION, TORCHVISION_BACKBONES, TRANSFORMERS, BackboneTrunk, create_timm_model, find_trunk,
)
from .network import offline_mode

STEM_KEYS = ("conv1.", "bn1.")
BACKBONE_NORM_KEYS = ("hidden_states_norms.",)
LOCAL_ALTERNATIVE = "or pass a local .safetensors file or model folder"
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class BackboneWeightsError(ValueError):
    """``--backbone_weights`` cannot be used: the message names the spec, the tensor or the cache."""


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared for the weights: normalisation and the evaluation resize / centre crop."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int  # side of the centre crop
    resize_size: int  # shorter side before the crop
    interpolation: str  # "bilinear", "bicubic" or "nearest"
    source: str


@dataclass(frozen=True)
class BackboneInit:
    """The starting point of a backbone, for ``training_args.json`` and the model card."""

    spec: str
    source: str
    loaded: tuple[str, ...]
    new: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    note: str = ""
    preprocessing: Preprocessing | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: counts for the loaded and ignored tensors, names of those that stayed new."""
        return {"spec": self.spec, "source": self.source, "num_loaded": len(self.loaded), "new": list(self.new),
                "num_ignored": len(self.ignored), "note": self.note,
                "preprocessing": asdict(self.preprocessing) if self.preprocessing else None}


def _offline_error(spec: str, what: str, cache: str | os.PathLike) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"backbone weights {spec!r} need a download of {what}, which is not in the cache ({os.fspath(cache)}) and "
        f"the Hub is offline (HF_HUB_OFFLINE=1): download it once with the network on, {LOCAL_ALTERNATIVE}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    state: dict[str, torch.Tensor]
    description: str
    preprocessing: Preprocessing | None = None
    ignored: tuple[str, ...] = ()  # tensors the source's own loader left out (a transformers head, its final norm)


def _torchvision_source(trunk: BackboneTrunk, spec: str, arch: str, cache_dir: str | None) -> _Source:
    from torchvision.models import get_model_weights

    weights = getattr(get_model_weights(arch), spec)  # a valid name: check_weights_spec said so
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    if not (folder / Path(urlparse(weights.url).path).name).is_file() and offline_mode():
        raise _offline_error(spec, weights.url, folder)
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, model_dir=os.fspath(folder), progress=False,
                                                   check_hash=True, weights_only=True)
    except OSError as error:
        raise BackboneWeightsError(f"backbone weights {spec!r}: cannot download {weights.url} into {folder} "
                                   f"({error}); {LOCAL_ALTERNATIVE}") from error
    t = weights.transforms()
    preprocessing = Preprocessing(tuple(t.mean), tuple(t.std), int(t.crop_size[0]), int(t.resize_size[0]),
                                  t.interpolation.value, f"torchvision {weights} transforms")
    return _Source(dict(state), f"torchvision {weights}", preprocessing)


def _timm_preprocessing(data_config: dict, source: str) -> Preprocessing:
    """timm's evaluation preprocessing (``timm.data.resolve_data_config``): centre crop of ``input_size`` after a
    resize of the shorter side to ``floor(size / crop_pct)``."""
    size = int(data_config["input_size"][-1])
    return Preprocessing(tuple(data_config["mean"]), tuple(data_config["std"]), size,
                         math.floor(size / data_config["crop_pct"]), data_config["interpolation"], source)


def _timm_source(trunk: BackboneTrunk, spec: str, config: Any, cache_dir: str | None) -> _Source:
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = trunk.pretrained_cfg
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    name = config.backbone
    if not hub_id and not url:
        raise BackboneWeightsError(f"backbone weights 'timm': timm has no pretrained weights for {name!r}; "
                                   f"{LOCAL_ALTERNATIVE}")
    if hub_id:
        cached = any(isinstance(try_to_load_from_cache(hub_id, f, cache_dir=cache_dir), str)
                     for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
        cache = cache_dir or constants.HF_HUB_CACHE
    else:
        cache = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        cached = (Path(cache) / Path(urlparse(url).path).name).is_file()
    if not cached and offline_mode():
        raise _offline_error(spec, f"timm's weights of {name!r} ({hub_id or url})", cache)
    try:
        source = create_timm_model(name, config.backbone_kwargs, config.num_channels, pretrained=True,
                                   cache_dir=cache_dir)
    except (ValueError, OSError) as error:
        raise BackboneWeightsError(f"backbone weights 'timm' for {name!r}: {error}; {LOCAL_ALTERNATIVE}") from error
    from timm.data import resolve_model_data_config

    return _Source(source.state_dict(), f"timm pretrained {cfg.get('architecture')}.{cfg.get('tag')} ({hub_id or url})",
                   _timm_preprocessing(resolve_model_data_config(source), f"timm pretrained_cfg of {name}"))


def _load_file(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged or missing file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError) as error:
        reason = " ".join(str(error).split())
        raise BackboneWeightsError(f"backbone weights {spec!r}: {os.fspath(path)!r} cannot be read, it is not a "
                                   f"whole safetensors file ({reason}); save or download it again") from None


def _read_json(path: Path, spec: str) -> dict:
    """A JSON file of a weights folder; an unreadable one is an error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BackboneWeightsError(f"backbone weights {spec!r}: {os.fspath(path)!r} is not readable JSON "
                                   f"({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise BackboneWeightsError(f"backbone weights {spec!r}: {os.fspath(path)!r} is not a JSON object")
    return data


def _read_safetensors(folder: Path, spec: str) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_file(single, spec)
    if index.is_file():
        weight_map = _read_json(index, spec).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BackboneWeightsError(f"backbone weights {spec!r}: {os.fspath(index)!r} has no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_file(folder / shard, spec))
        return state
    raise BackboneWeightsError(f"backbone weights {spec!r}: the folder has no model.safetensors (only safetensors "
                               "are read, nothing is unpickled)")


def processor_preprocessing(path: Path, source: str) -> Preprocessing | None:
    """Mean/std and evaluation size from a ``preprocessor_config.json`` (transformers image processors)."""
    if not path.is_file():
        return None
    data = _read_json(path, source)
    if not data.get("image_mean") or not data.get("image_std"):
        return None

    def side(value):
        return value if isinstance(value, int) or value is None else value.get("shortest_edge") or value.get("height")

    resize = side(data.get("size"))
    crop = side(data.get("crop_size")) if data.get("do_center_crop", data.get("crop_size") is not None) else None
    if resize is None:
        return None
    if crop is not None:
        size = crop
    elif data.get("crop_pct"):  # ConvNeXt: resize to size / crop_pct, then crop size
        size, resize = resize, int(resize / data["crop_pct"])
    else:
        size = resize
    return Preprocessing(tuple(data["image_mean"]), tuple(data["image_std"]), int(size), int(resize),
                         PIL_RESAMPLE.get(data.get("resample", 2), "bilinear"), source)


def _folder_source(trunk: BackboneTrunk, spec: str, folder: Path, config: Any) -> _Source:
    config_file = folder / "config.json"
    folder_config = _read_json(config_file, spec) if config_file.is_file() else {}
    if "architecture" in folder_config:  # a timm folder (timm's save/push_to_hub)
        from timm.data import resolve_data_config

        cfg = dict(folder_config.get("pretrained_cfg") or {})
        where = f"pretrained_cfg in {config_file}"
        preprocessing = (_timm_preprocessing(resolve_data_config(pretrained_cfg=cfg), where)
                         if cfg.get("mean") and cfg.get("input_size") else None)
        return _Source(_read_safetensors(folder, spec), f"timm folder {folder} ({folder_config['architecture']})",
                       preprocessing)
    if folder_config.get("model_type") not in (None, "nasiam") and trunk.kind == TRANSFORMERS:
        return _transformers_source(trunk, spec, os.fspath(folder), None)
    kind = "NASiam folder" if folder_config.get("model_type") == "nasiam" else "folder"
    if kind == "NASiam folder" and folder_config.get("backbone") != config.backbone and trunk.kind != TRANSFORMERS:
        raise BackboneWeightsError(f"backbone weights {spec!r}: that NASiam folder's backbone is "
                                   f"{folder_config.get('backbone')!r}, this model's is {config.backbone!r}")
    return _Source(_read_safetensors(folder, spec), f"{kind} {folder}",
                   processor_preprocessing(folder / "preprocessor_config.json", f"{folder}/preprocessor_config.json"))


def _transformers_source(trunk: BackboneTrunk, spec: str, where: str, cache_dir: str | None) -> _Source:
    """A transformers folder or Hub id, loaded by the backbone's own class (prefixes, shards, checks)."""
    from huggingface_hub import constants, try_to_load_from_cache

    is_local = Path(where).is_dir()
    if not is_local and offline_mode():
        cached = any(isinstance(try_to_load_from_cache(where, f, cache_dir=cache_dir), str)
                     for f in ("model.safetensors", "model.safetensors.index.json"))
        if not cached:
            raise _offline_error(spec, f"the Hub repository {where!r}", cache_dir or constants.HF_HUB_CACHE)
    try:
        loaded, info = type(trunk.model).from_pretrained(where, config=copy.deepcopy(trunk.model.config),
                                                         cache_dir=cache_dir, use_safetensors=True,
                                                         ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise BackboneWeightsError(f"backbone weights {spec!r}: {str(error).splitlines()[0].rstrip('.')}; "
                                   f"{LOCAL_ALTERNATIVE}") from error
    if info.get("mismatched_keys"):
        key, have, want = next(iter(info["mismatched_keys"]))
        raise BackboneWeightsError(f"backbone weights {spec!r}: tensor {key!r} has shape {tuple(have)} there but "
                                   f"{tuple(want)} in this model's backbone")
    preprocessing = None
    if is_local:
        preprocessing = processor_preprocessing(Path(where) / "preprocessor_config.json",
                                                f"{where}/preprocessor_config.json")
    else:
        path = try_to_load_from_cache(where, "preprocessor_config.json", cache_dir=cache_dir)
        if isinstance(path, str):
            preprocessing = processor_preprocessing(Path(path), f"{where}/preprocessor_config.json")
    missing = set(info.get("missing_keys") or ())
    return _Source({k: v for k, v in loaded.state_dict().items() if k not in missing},
                   f"transformers {'folder' if is_local else 'Hub repository'} {where}", preprocessing,
                   ignored=tuple(sorted(info.get("unexpected_keys") or ())))


def check_weights_spec(spec: str, backbone: str) -> None:
    """Refuse a ``--backbone_weights`` value that ``backbone`` (a config's ``backbone`` name) cannot take, without
    reading or downloading anything: the engines call this before any data is loaded."""
    kind = TORCHVISION if backbone in TORCHVISION_BACKBONES else TIMM if backbone.startswith(TIMM_PREFIX) else \
        TRANSFORMERS
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BackboneWeightsError(f"backbone weights {spec!r}: only .safetensors files are read (nothing is "
                                       "unpickled); convert it with safetensors.torch.save_file(state_dict, path)")
        return
    if path.is_dir():
        return
    if spec.endswith(".safetensors") or spec.startswith(("/", "./", "../", "~")):
        raise BackboneWeightsError(f"backbone weights {spec!r}: no such file or folder")
    if spec == "timm":
        if kind != TIMM:
            raise BackboneWeightsError(f"backbone weights 'timm' need a timm backbone (timm/<name>); this model's is "
                                       f"{backbone!r}")
        return
    if kind == TORCHVISION:
        from torchvision.models import get_model_weights

        names = ["DEFAULT", *[w.name for w in get_model_weights(backbone)]]
        if spec not in names:
            raise BackboneWeightsError(f"backbone weights {spec!r} are neither a local file or folder (no such path) "
                                       f"nor torchvision weights of {backbone}; valid names: {names}, "
                                       f"{LOCAL_ALTERNATIVE}")
    elif kind == TIMM:
        raise BackboneWeightsError(f"backbone weights {spec!r} are not 'timm' nor a local file or folder (a timm "
                                   f"backbone takes 'timm' for timm's pretrained weights, {LOCAL_ALTERNATIVE})")
    # a transformers backbone takes any other value as a Hub id, read when it is fetched


def _resolve_source(trunk: BackboneTrunk, spec: str, config: Any, cache_dir: str | None) -> _Source:
    check_weights_spec(spec, config.backbone)
    path = Path(spec)
    if path.is_file():
        return _Source(_load_file(path, spec), f"file {spec}")
    if path.is_dir():
        return _folder_source(trunk, spec, path, config)
    if spec == "timm":
        return _timm_source(trunk, spec, config, cache_dir)
    if trunk.kind == TORCHVISION:
        return _torchvision_source(trunk, spec, config.backbone, cache_dir)
    return _transformers_source(trunk, spec, spec, cache_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Matching a state dict to the backbone
# ---------------------------------------------------------------------------------------------------------------------
def _strip_prefix(state: dict[str, torch.Tensor], trunk: BackboneTrunk, target: set[str]) -> dict[str, torch.Tensor]:
    """The tensors under the prefix that matches the most backbone tensors (a NASiam file has ``backbone.``, a
    pretraining one ``nasiam.backbone.``, a DataParallel one ``module.``; a library's own file none)."""
    inner = trunk.native_prefix
    candidates = ["", "module.", "backbone.", "nasiam.backbone.", f"backbone.{inner}", f"nasiam.backbone.{inner}"]
    base = getattr(getattr(trunk, "model", None), "base_model_prefix", "")
    if base:
        candidates.append(f"{base}.")

    def overlap(prefix):
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in target)

    best = max(dict.fromkeys(candidates), key=overlap)
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)} if overlap(best) else {}


def _classifier_prefixes(trunk: BackboneTrunk) -> tuple[str, ...]:
    """Key prefixes of the classifier a library's checkpoint of this backbone holds (the trunk has none)."""
    if trunk.kind == TORCHVISION:
        return ("fc.",)
    if trunk.kind == TIMM:
        names = trunk.pretrained_cfg.get("classifier") or "head"
        return tuple(f"{name}." for name in ([names] if isinstance(names, str) else names))
    return ()


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}" + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_backbone_weights(model: nn.Module, spec: str, *, cache_dir: str | None = None) -> BackboneInit:
    """Fill the backbone of ``model`` (a NASiam model, pretraining/search model, classifier or NASiamBackbone) from
    ``spec`` (see the module docstring); the momentum copy of MoCo v2 / BYOL follows. Call it right after building
    the model, before the first step."""
    if not isinstance(spec, str) or not spec:
        raise BackboneWeightsError(f"backbone weights must be a non-empty string, got {spec!r}")
    config = model.config
    trunk = find_trunk(model)
    source = _resolve_source(trunk, spec, config, cache_dir)
    target = trunk.native.state_dict()
    state = _strip_prefix(source.state, trunk, set(target))
    if not state:
        raise BackboneWeightsError(
            f"backbone weights {spec!r}: none of its {len(source.state)} tensors is a tensor of this model's backbone "
            f"({config.backbone}); its names look like {_listing(source.state, 4)}, the backbone's like "
            f"{_listing(target, 4)}"
        )
    new, note = [], ""
    if getattr(trunk, "cifar_stem", False) and "conv1.weight" in state and state["conv1.weight"].shape[-1] != 3:
        new = [k for k in target if k.startswith(STEM_KEYS)]
        note = ("the CIFAR stem (3x3 conv1 and its bn1) stays new: the weights have a "
                f"{tuple(state['conv1.weight'].shape[-2:])} first conv; every other tensor is loaded")
        state = {k: v for k, v in state.items() if not k.startswith(STEM_KEYS)}
    if trunk.kind == TRANSFORMERS:
        new += [k for k in target if k.startswith(BACKBONE_NORM_KEYS) and k not in state]
    classifier = _classifier_prefixes(trunk)
    ignored = [k for k in state if k not in target and classifier and k.startswith(classifier)]
    state = {k: v for k, v in state.items() if k not in ignored}
    ignored += source.ignored
    for key, value in state.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            raise BackboneWeightsError(
                f"backbone weights {spec!r}: tensor {key!r} has shape {tuple(value.shape)} there but "
                f"{tuple(target[key].shape)} in this model's backbone ({config.backbone})"
            )
    missing = set(target) - set(state) - set(new)
    unexpected = set(state) - set(target)
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensors: {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}"] if unexpected else []
        raise BackboneWeightsError(f"backbone weights {spec!r} do not fit this model's backbone ({config.backbone}): "
                                   + "; ".join(parts))
    with torch.no_grad():
        trunk.native.load_state_dict(state, strict=False)
        momentum = getattr(model, "momentum_backbone", None)
        if isinstance(momentum, BackboneTrunk):
            momentum.load_state_dict(trunk.state_dict())
    return BackboneInit(spec=spec, source=source.description, loaded=tuple(sorted(state)), new=tuple(sorted(new)),
                        ignored=tuple(sorted(ignored)), note=note, preprocessing=source.preprocessing)


__all__ = ["BackboneInit", "BackboneWeightsError", "Preprocessing", "check_weights_spec", "load_backbone_weights",
           "processor_preprocessing"]
