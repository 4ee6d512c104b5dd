"""nasiam-hf: NASiam (differentiable architecture search for siamese SSL heads) in the Hugging Face format."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .arguments import FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand
from .backbones import backbone_config_values
from .configuration_nasiam import FRAMEWORKS, NASiamConfig, NASiamConfigError
from .modeling_nasiam import (
    NASiamBackbone,
    NASiamForArchitectureSearch,
    NASiamForImageClassification,
    NASiamForPreTraining,
    NASiamModel,
    NASiamPreTrainedModel,
    NASiamPreTrainingOutput,
)
from .presets import PRESETS
from .search_space import OPS, SEARCH_SPACES, Genotype, register_op, register_search_space

__version__ = "0.1.0"

# The engines import accelerate and the data layer: loaded on first use, so `import nasiam_hf` (and --help) stays light.
_ENGINES = {"run_search": "search", "run_pretrain": "pretrain", "run_linear_eval": "linear_eval",
            "run_finetune": "finetune"}


def __getattr__(name: str):
    if name in _ENGINES:
        import importlib

        return getattr(importlib.import_module(f".{_ENGINES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


AutoConfig.register("nasiam", NASiamConfig, exist_ok=True)
AutoModel.register(NASiamConfig, NASiamModel, exist_ok=True)
AutoModelForPreTraining.register(NASiamConfig, NASiamForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(NASiamConfig, NASiamForImageClassification, exist_ok=True)
AutoBackbone.register(NASiamConfig, NASiamBackbone, exist_ok=True)
# Saved folders carry the modeling code too, so they also load with trust_remote_code=True without this package.
NASiamModel.register_for_auto_class("AutoModel")
NASiamForPreTraining.register_for_auto_class("AutoModelForPreTraining")
NASiamForImageClassification.register_for_auto_class("AutoModelForImageClassification")
NASiamBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "FRAMEWORKS",
    "FinetuneCommand",
    "LinearEvalCommand",
    "PretrainCommand",
    "SearchCommand",
    "OPS",
    "PRESETS",
    "SEARCH_SPACES",
    "Genotype",
    "backbone_config_values",
    "NASiamBackbone",
    "NASiamConfig",
    "NASiamConfigError",
    "NASiamForArchitectureSearch",
    "NASiamForImageClassification",
    "NASiamForPreTraining",
    "NASiamModel",
    "NASiamPreTrainedModel",
    "NASiamPreTrainingOutput",
    "register_op",
    "register_search_space",
    "run_finetune",
    "run_linear_eval",
    "run_pretrain",
    "run_search",
]
