"""nasiam-hf: NASiam (differentiable architecture search for siamese SSL heads) in the Hugging Face format.

The package is lazy: ``import nasiam_hf`` loads no torch, transformers model code or datasets; each name below is
imported on first use, so the console scripts parse their flags (and answer ``--help``) at the cost of the argument
parser alone. The NASiam classes are still registered with transformers' Auto classes, right when transformers
loads its Auto machinery (:mod:`nasiam_hf.auto_registration`), so ``import nasiam_hf`` followed by
``AutoModel.from_pretrained(folder)`` works in either import order.

``nasiam_hf.search``, ``pretrain``, ``linear_eval``, ``finetune`` and ``embed`` are the one-call API
(:mod:`nasiam_hf.api`), although modules of the same names hold the engines: those stay importable by their full
name (``from nasiam_hf.search import alpha_step``) and never replace the functions on the package.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import auto_registration

__version__ = "0.1.0"

_EXPORTS = {  # module -> the names it provides here
    "api": ("RunResult", "search", "pretrain", "linear_eval", "finetune", "embed"),
    "arguments": ("FinetuneCommand", "LinearEvalCommand", "PretrainCommand", "SearchCommand"),
    "backbones": ("backbone_config_values",),
    "configuration_nasiam": ("FRAMEWORKS", "NASiamConfig", "NASiamConfigError"),
    "modeling_nasiam": ("NASiamBackbone", "NASiamForArchitectureSearch", "NASiamForImageClassification",
                        "NASiamForPreTraining", "NASiamModel", "NASiamPreTrainedModel", "NASiamPreTrainingOutput"),
    "presets": ("PRESETS",),
    "search_space": ("OPS", "SEARCH_SPACES", "Genotype", "register_op", "register_search_space"),
    "search": ("run_search",),
    "pretrain": ("run_pretrain",),
    "linear_eval": ("run_linear_eval",),
    "finetune": ("run_finetune",),
    "embed": ("run_embed",),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}
_ONE_CALL = frozenset(_EXPORTS["api"]) - {"RunResult"}  # names shared by a function and an engine module

__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module; importing the engine module ``nasiam_hf.search`` would otherwise set the attribute
    ``search`` to that module, hiding the one-call function of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _ONE_CALL and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules under its full name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
auto_registration.install()

if TYPE_CHECKING:  # what static tools and IDEs see
    from .api import RunResult, embed, finetune, linear_eval, pretrain, search  # noqa: F401
    from .embed import run_embed  # noqa: F401
    from .arguments import FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand  # noqa: F401
    from .backbones import backbone_config_values  # noqa: F401
    from .configuration_nasiam import FRAMEWORKS, NASiamConfig, NASiamConfigError  # noqa: F401
    from .finetune import run_finetune  # noqa: F401
    from .linear_eval import run_linear_eval  # noqa: F401
    from .modeling_nasiam import (  # noqa: F401
        NASiamBackbone, NASiamForArchitectureSearch, NASiamForImageClassification, NASiamForPreTraining, NASiamModel,
        NASiamPreTrainedModel, NASiamPreTrainingOutput,
    )
    from .presets import PRESETS  # noqa: F401
    from .pretrain import run_pretrain  # noqa: F401
    from .search import run_search  # noqa: F401
    from .search_space import OPS, SEARCH_SPACES, Genotype, register_op, register_search_space  # noqa: F401
