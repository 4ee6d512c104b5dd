"""NASiam models in the transformers format.

* :class:`NASiamModel`: backbone + projector + predictor; its ``pooler_output`` is the feature vector people use.
* :class:`NASiamForPreTraining`: the model with its siamese objective and momentum/queue state.
* :class:`NASiamForArchitectureSearch`: the supernet (search cells in place of discrete heads) for the bilevel search.
"""


import copy
import math
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.utils import ModelOutput

from transformers.backbone_utils import BackboneMixin
from .backbones import build_trunk, is_last_residual_norm
from .configuration_nasiam import NASiamConfig
from .fileio import publish_problem
from .heads import MLPHead, SearchCell
from .objectives import (
    MoCoQueue,
    byol_loss,
    collapse_std,
    ema_update,
    mocov2_loss,
    nt_xent_loss,
    shuffled_key_encode,
    siamese_loss,
    simsiam_loss,
)


@dataclass
class NASiamPreTrainingOutput(ModelOutput):
    """Output of a pretraining or search forward.

    Args:
        loss: the framework's loss on the two views.
        collapse_std: std of the l2-normalised projector output (``~1/sqrt(dim)`` healthy, 0 collapsed).
        momentum_keys: MoCo v2 keys of both views, to be written to the queue after the weight step.
    """

    loss: torch.FloatTensor | None = None
    collapse_std: torch.FloatTensor | None = None
    momentum_keys: torch.FloatTensor | None = None


class NASiamPreTrainedModel(PreTrainedModel):
    config: NASiamConfig
    base_model_prefix = "nasiam"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # A pretraining checkpoint loads into every head class; its momentum copies and queue are not needed there.
    _keys_to_ignore_on_load_unexpected = [r"^momentum_(backbone|projector)\.", r"^queue\."]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that reads only safetensors (nothing is unpickled) and says plainly
        when the weights file is damaged or a save into the folder did not finish."""
        problem = publish_problem(pretrained_model_name_or_path)
        if problem:
            raise OSError(problem)
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"the weights in {str(pretrained_model_name_or_path)!r} cannot be read: model.safetensors is "
                f"truncated or corrupted ({error}). Save the model again, or delete the file and download it again."
            ) from error

    def post_init(self):
        """transformers' ``post_init``; the config's ``auto_map`` names every registered head class, so a saved
        folder also loads with ``trust_remote_code=True`` where nasiam_hf is not installed."""
        super().post_init()
        self.config.auto_map = auto_map()

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise what this package builds: the torchvision trunk, the heads, the alphas and the MoCo queue.

        timm and transformers backbones keep their own initialisation (transformers ones are sub-models with their own
        ``_init_weights``; timm modules are marked by their trunk). With ``zero_init_residual`` the last BatchNorm of
        every torchvision residual block starts at zero (tensors loaded from a checkpoint are never re-initialised).
        """
        if getattr(module, "_nasiam_keeps_own_init", False):
            return
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            # torch's own default for Linear
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)):
            if module.weight is not None:
                if self.config.zero_init_residual and is_last_residual_norm(module):
                    init.zeros_(module.weight)
                else:
                    init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, SearchCell):
            init.normal_(module.alphas, std=1e-3)
        elif isinstance(module, MoCoQueue):
            init.normal_(module.keys)
            init.copy_(module.keys, nn.functional.normalize(module.keys, dim=1))
            init.zeros_(module.ptr)


class NASiamModel(NASiamPreTrainedModel):
    """Backbone with the searched (or standard) projector and predictor heads.

    ``model(pixel_values).pooler_output`` is the ``(B, C)`` backbone feature vector used for downstream tasks (``C``
    is ``config.hidden_size``, the backbone's pooled width); ``project`` and ``predict`` run the heads. The backbone
    is a :class:`~nasiam_hf.backbones.BackboneTrunk` (torchvision ResNet, timm model or transformers backbone).
    """

    _searchable = False

    def __init__(self, config: NASiamConfig):
        super().__init__(config)
        self.backbone = build_trunk(config)
        self.projector = self._build_head(config, "projector")
        self.predictor = self._build_head(config, "predictor") if config.has_predictor else None
        self.post_init()

    def _build_head(self, config: NASiamConfig, cell: str) -> nn.Module:
        spec = config.head_spec(cell)
        if self._searchable:
            return SearchCell(config.search_ops, spec)
        return MLPHead(config.genotype(cell), spec)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.backbone(pixel_values, return_stages=True)
        hidden_states = tuple(out.feature_maps) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (out.last_hidden_state, out.pooler_output, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output, hidden_states=hidden_states
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def predict(self, projections: torch.Tensor) -> torch.Tensor:
        if self.predictor is None:
            raise ValueError(f"framework {self.config.framework!r} has no predictor")
        return self.predictor(projections)


class NASiamSupernet(NASiamModel):
    """NASiamModel whose heads are search cells (mixed ops weighted by ``alphas``)."""

    _searchable = True


class NASiamForPreTraining(NASiamPreTrainedModel):
    """A NASiam model with its self-supervised objective.

    ``model(pixel_values=view_1, pixel_values_2=view_2)`` returns the loss and the collapse statistic. MoCo v2 and
    BYOL keep momentum copies of the backbone and projector; after each weight step the trainer calls
    :meth:`momentum_update` (and, for MoCo v2, :meth:`enqueue` with ``output.momentum_keys``).
    """

    _base_model_class = NASiamModel
    # Momentum copies and the queue are initialised from the online weights, not at random: not worth a warning.
    _keys_to_ignore_on_load_missing = [r"^momentum_(backbone|projector)\.", r"^queue\."]

    def __init__(self, config: NASiamConfig):
        super().__init__(config)
        self.nasiam = self._base_model_class(config)
        if config.has_momentum_encoder:
            self.momentum_backbone = copy.deepcopy(self.nasiam.backbone)
            self.momentum_projector = copy.deepcopy(self.nasiam.projector)
            for p in (*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()):
                p.requires_grad_(False)
        if config.framework == "mocov2":
            self.queue = MoCoQueue(config.projection_dim, config.queue_size)
        self.post_init()

    def initialize_weights(self) -> None:
        """Initialise what was not loaded; momentum copies that were not loaded start as copies of the online weights.

        This runs after every module's ``_init_weights`` (and after loading), so the online weights are final here.
        ``init.copy_`` skips tensors that came from the checkpoint.
        """
        super().initialize_weights()
        if self.config.has_momentum_encoder:
            with torch.no_grad():
                for online, target in self.momentum_pairs(with_buffers=True):
                    init.copy_(target, online)

    def momentum_pairs(self, with_buffers: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online, momentum) tensors of the backbone and projector, parameters (and buffers) in module order."""
        pairs = []
        for online, target in ((self.nasiam.backbone, self.momentum_backbone),
                               (self.nasiam.projector, self.momentum_projector)):
            pairs += list(zip(online.parameters(), target.parameters()))
            if with_buffers:
                pairs += list(zip(online.buffers(), target.buffers()))
        return pairs

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """EMA step of the momentum encoder (MoCo v2, BYOL); call after a weight step, never after an alpha step."""
        if not self.config.has_momentum_encoder:
            return
        m = self.config.momentum if momentum is None else momentum
        online, target = zip(*self.momentum_pairs())
        ema_update(online, target, m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor | None) -> None:
        """Write MoCo v2 keys (from every rank) into the queue; a no-op for the other frameworks."""
        if self.config.framework == "mocov2" and keys is not None:
            self.queue.enqueue(keys)

    def _encode(self, pixel_values: torch.Tensor, backbone_grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            features = self.nasiam.backbone(pixel_values)
        return self.nasiam.project(features)

    @torch.no_grad()
    def _momentum_encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        def encode(images: torch.Tensor) -> torch.Tensor:
            return self.momentum_projector(self.momentum_backbone(images))

        splits = self.config.key_bn_splits
        return shuffled_key_encode(encode, pixel_values, splits) if splits else encode(pixel_values)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_2: torch.Tensor | None = None,
        backbone_grad: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> NASiamPreTrainingOutput | tuple:
        """Loss of the two views. ``backbone_grad=False`` runs the backbone without autograd (architecture step)."""
        if pixel_values_2 is None:
            raise ValueError("NASiamForPreTraining needs two augmented views: pass pixel_values and pixel_values_2")
        if pixel_values.shape != pixel_values_2.shape:
            raise ValueError(
                f"the two views must have the same shape, got {tuple(pixel_values.shape)} and "
                f"{tuple(pixel_values_2.shape)}"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cfg = self.config
        z1 = self._encode(pixel_values, backbone_grad)
        z2 = self._encode(pixel_values_2, backbone_grad)
        keys = None
        if cfg.framework == "simsiam":
            loss = simsiam_loss(self.nasiam.predict(z1), self.nasiam.predict(z2), z1, z2)
        elif cfg.framework == "byol":
            t1, t2 = self._momentum_encode(pixel_values), self._momentum_encode(pixel_values_2)
            loss = byol_loss(self.nasiam.predict(z1), self.nasiam.predict(z2), t1, t2)
        elif cfg.framework == "simclr":
            loss = nt_xent_loss(z1, z2, cfg.temperature)
        elif cfg.framework == "mocov2":
            k1, k2 = self._momentum_encode(pixel_values), self._momentum_encode(pixel_values_2)
            loss = mocov2_loss(z1, z2, k1, k2, self.queue.keys, cfg.temperature)
            keys = torch.cat([k1, k2])
        else:  # barlowtwins, vicreg: the projections of both views, no predictor, no momentum encoder
            loss = siamese_loss(cfg.framework, z1, z2, **cfg.loss_constants())
        std = collapse_std(z1)
        if not return_dict:
            return tuple(v for v in (loss, std, keys) if v is not None)
        return NASiamPreTrainingOutput(loss=loss, collapse_std=std, momentum_keys=keys)


class NASiamForArchitectureSearch(NASiamForPreTraining):
    """The supernet of the search: search cells instead of discrete heads, same objective.

    ``arch_parameters()`` are the alphas of the online cells, ``weight_parameters()`` every other trainable
    parameter; the two are disjoint and together cover all trainable parameters.
    """

    _base_model_class = NASiamSupernet

    def cells(self) -> dict[str, SearchCell]:
        cells = {"projector": self.nasiam.projector}
        if self.nasiam.predictor is not None:
            cells["predictor"] = self.nasiam.predictor
        return cells

    def arch_parameters(self) -> list[nn.Parameter]:
        return [cell.alphas for cell in self.cells().values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in arch]

    def genotype(self) -> dict[str, list[str]]:
        """The op of largest alpha in every layer of every cell."""
        return {name: cell.genotype() for name, cell in self.cells().items()}

    def op_weights(self) -> dict[str, list[list[float]]]:
        """Softmaxed alphas of every layer, per cell (what the search history records)."""
        return {name: cell.op_weights().tolist() for name, cell in self.cells().items()}

    def derive_config(self, **overrides) -> NASiamConfig:
        """A NASiamConfig of discrete heads with the current genotype, ready for pretraining."""
        values = self.config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "stage_names"):
            values.pop(key, None)
        genotype = self.genotype()
        values["projector_genotype"] = genotype["projector"]
        values["predictor_genotype"] = genotype.get("predictor")
        values.update(overrides)
        return NASiamConfig(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Downstream heads: image classification and a detection/segmentation backbone.
# ---------------------------------------------------------------------------------------------------------------------
# Keys of a NASiam checkpoint that a downstream model does not use: the SSL heads (with or without the "nasiam."
# prefix, depending on which class saved the checkpoint) and, for the backbone, a fine-tuned classifier.
_HEAD_KEYS = r"^(nasiam\.)?(projector|predictor)\."


class NASiamEncoder(NASiamModel):
    """:class:`NASiamModel` without the projector and predictor: the feature extractor the downstream heads wrap.

    Its weights have the same names as a :class:`NASiamModel`'s backbone (``backbone.*``), so any NASiam checkpoint
    fills it; the SSL heads of that checkpoint are skipped without a warning.
    """

    _keys_to_ignore_on_load_unexpected = [*NASiamPreTrainedModel._keys_to_ignore_on_load_unexpected, _HEAD_KEYS]

    def _build_head(self, config: NASiamConfig, cell: str) -> None:
        return None


class NASiamForImageClassification(NASiamPreTrainedModel):
    """A NASiam backbone with a linear classifier on its pooled features (``pooler_output``).

    ``from_pretrained`` of any NASiam folder (``NASiamModel``, ``NASiamForPreTraining``, or a classifier) keeps the
    backbone weights; the classifier is new unless the folder holds one of the same shape. The projector and
    predictor are not part of this model (they only serve pretraining), so they are neither loaded nor saved.
    ``num_labels``, ``id2label`` and ``label2id`` come from the config (pass them to ``from_pretrained``); the loss
    follows ``config.problem_type`` (cross-entropy for single-label classification, BCE for multi-label, MSE for
    regression), as in transformers' other image classifiers.

    :meth:`freeze_backbone` trains the classifier only, with the backbone's BatchNorm statistics frozen as well.
    """

    _keys_to_ignore_on_load_unexpected = [*NASiamPreTrainedModel._keys_to_ignore_on_load_unexpected, _HEAD_KEYS]

    def __init__(self, config: NASiamConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nasiam = NASiamEncoder(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self._backbone_frozen = False
        self.post_init()

    def freeze_backbone(self, freeze: bool = True) -> "NASiamForImageClassification":
        """Stop (or resume, ``freeze=False``) training the backbone: no gradients, BatchNorm in eval mode."""
        self._backbone_frozen = freeze
        for parameter in self.nasiam.parameters():
            parameter.requires_grad_(not freeze)
        for parameter in self.nasiam.backbone.unused_in_pooling():  # no gradient would reach them (DDP raises)
            parameter.requires_grad_(False)
        self.train(self.training)
        return self

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_backbone_frozen", False):
            self.nasiam.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.nasiam(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class NASiamBackbone(BackboneMixin, NASiamPreTrainedModel):
    """The backbone as a transformers backbone (``AutoBackbone``), for DETR, Mask2Former, UperNet and the like.

    Returns :class:`~transformers.modeling_outputs.BackboneOutput` whose ``feature_maps`` are the maps of the stages
    named by ``config.out_features`` / ``config.out_indices`` among ``config.stage_names`` (``["stem", "stage1", ...,
    "stage4"]`` for torchvision ResNets, timm's feature_info names for timm models, the sub-config's for transformers
    backbones); ``num_features`` gives the channels of every stage (torchvision's: 64, 64, 128, 256, 512 for
    ResNet-18/34 and 64, 256, 512, 1024, 2048 for ResNet-50). Its weights are named like a :class:`NASiamModel`'s
    backbone (``backbone.*``), so ``from_pretrained`` of any NASiam folder loads them.
    """

    has_attentions = False
    _keys_to_ignore_on_load_unexpected = [
        *NASiamPreTrainedModel._keys_to_ignore_on_load_unexpected, _HEAD_KEYS, r"^classifier\.",
    ]

    def __init__(self, config: NASiamConfig):
        super().__init__(config)
        self.backbone = build_trunk(config, serve_stages=True)
        self.num_features = list(self.backbone.stage_channels)
        self.post_init()

    def post_init(self):
        # BackboneMixin.post_init installs output-capturing hooks on every sub-model again (transformers 5.24 does not
        # check that a sub-model has them), so a transformers backbone inside would record each stage twice. This
        # class records nothing itself: plain post_init.
        NASiamPreTrainedModel.post_init(self)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        maps = self.backbone(pixel_values, return_stages=True).feature_maps
        wanted = set(self.out_features)
        feature_maps = tuple(m for name, m in zip(self.stage_names, maps) if name in wanted)
        hidden_states = tuple(maps) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)


def auto_map() -> dict[str, str]:
    """Auto classes of every NASiam class registered with ``register_for_auto_class``."""
    classes = [c for c in globals().values() if isinstance(c, type) and issubclass(c, NASiamPreTrainedModel)]
    mapping = {"AutoConfig": "configuration_nasiam.NASiamConfig"}
    mapping.update({c._auto_class: f"modeling_nasiam.{c.__name__}" for c in classes if c.__dict__.get("_auto_class")})
    return mapping


__all__ = [
    "NASiamPreTrainedModel",
    "NASiamModel",
    "NASiamForPreTraining",
    "NASiamForArchitectureSearch",
    "NASiamPreTrainingOutput",
    "NASiamEncoder",
    "NASiamForImageClassification",
    "NASiamBackbone",
]
