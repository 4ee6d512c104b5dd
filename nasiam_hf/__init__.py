"""nasiam-hf: NASiam (differentiable architecture search for siamese SSL heads) in the Hugging Face format."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_nasiam import FRAMEWORKS, NASiamConfig
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
    "OPS",
    "PRESETS",
    "SEARCH_SPACES",
    "Genotype",
    "NASiamBackbone",
    "NASiamConfig",
    "NASiamForArchitectureSearch",
    "NASiamForImageClassification",
    "NASiamForPreTraining",
    "NASiamModel",
    "NASiamPreTrainedModel",
    "NASiamPreTrainingOutput",
    "register_op",
    "register_search_space",
]
