"""Search variants that resist DARTS' collapse into parameter-free ops, and the diagnostics that show a collapse.

Plain first-order DARTS (the paper's Algorithm 1) stays the default. Beside it, as options of ``nasiam-search``:

* **DARTS-** (Chu et al., ICLR 2021): every layer that keeps its width gets an auxiliary skip ``beta * x`` outside
  the softmax, with ``beta`` decaying linearly from ``aux_skip_weight`` to 0 over the search. The skip carries the
  gradient that otherwise makes the identity op win; at the end it is gone and the alphas decide alone.
* **beta-DARTS** (Ye et al., CVPR 2022): the Beta-Decay regulariser ``lambda * mean over layers of
  logsumexp(alpha_layer)`` is added to the alpha step's loss, ``lambda`` rising linearly from 0 to
  ``beta_darts_weight`` (the authors' code: 0 to 50 over the search).
* **DARTS-PT** (Wang et al., ICLR 2021): the genotype is not the argmax of the alphas; layer after layer, each op is
  masked out of the mixture (its weight set to 0, the others kept) and the op whose removal raises the supernet's
  loss most is kept; the layer is then fixed to it (one-hot) before the next is decided. The losses are computed on
  cached backbone features, through the heads only (no fine-tuning between decisions, unlike the paper: the heads
  are cheap to evaluate, not to retrain).
* A cap on the parameter-free layers (identity, pools) a head may keep, applied to either discretisation.

How sure the genotype is, layer by layer (the chosen op's weight, its margin over the runner-up, the entropy of the
layer's weights relative to uniform; for DARTS-PT the loss increases), and the rule that calls a layer decided, are in
:mod:`nasiam_hf.confidence`; :func:`genotype_confidence` is re-exported here.

Diagnostics for every epoch: the identity and parameter-free shares of the current genotype and the largest
eigenvalue of the Hessian of the validation loss with respect to the alphas (exact: the Hessian has about 70 x 70
entries), the curvature that rises before DARTS collapses (Zela et al., ICLR 2020).

Losses over cached features follow the framework's own objective (:func:`~nasiam_hf.objectives.siamese_loss`) with
the heads in the model's current mode; BatchNorm running statistics are restored afterwards, so evaluating leaves
the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import distributed as dist
from torch import nn

from .confidence import DECIDED_RULE, genotype_confidence, undecided_layers
from .heads import SearchCell
from .objectives import full, siamese_loss
from .search_space import OPS, identity_share, is_parameter_free, parameter_free_share

SEARCH_METHODS = ("darts", "darts-minus", "beta-darts")
DISCRETIZATIONS = ("argmax", "perturbation")
DEFAULT_AUX_SKIP_WEIGHT = 1.0  # DARTS-: beta_0 = 1
DEFAULT_BETA_DARTS_WEIGHT = 50.0  # beta-DARTS' code: lambda from 0 to 50 over the search


@dataclass(frozen=True)
class SearchVariant:
    """Which search runs and how its genotype is derived; the fields are the ``nasiam-search`` flags.

    ``aux_skip_weight`` applies to ``darts-minus`` only and ``beta_darts_weight`` to ``beta-darts`` only (``None``:
    not given; the method's default is used). ``max_parameter_free_layers`` caps the identity/pool layers of each
    head (``None``: no cap); ``hessian_every`` is the number of epochs between Hessian measurements (0: never).
    """

    search_method: str = "darts"
    aux_skip_weight: float | None = None
    beta_darts_weight: float | None = None
    discretization: str = "argmax"
    max_parameter_free_layers: int | None = None
    hessian_every: int = 0

    def __post_init__(self):
        if self.search_method not in SEARCH_METHODS:
            raise ValueError(f"--search_method {self.search_method!r} is not one of {list(SEARCH_METHODS)}")
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"--discretization {self.discretization!r} is not one of {list(DISCRETIZATIONS)}")
        for flag, method in (("aux_skip_weight", "darts-minus"), ("beta_darts_weight", "beta-darts")):
            value = getattr(self, flag)
            if value is None:
                continue
            if self.search_method != method:
                raise ValueError(f"--{flag} applies to --search_method {method} only, not {self.search_method!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"--{flag} must be a number >= 0, got {value!r}")
        cap = self.max_parameter_free_layers
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"--max_parameter_free_layers must be an integer >= 0 (or unset), got {cap!r}")
        if isinstance(self.hessian_every, bool) or not isinstance(self.hessian_every, int) or self.hessian_every < 0:
            raise ValueError(f"--hessian_every must be an integer >= 0 (0: off), got {self.hessian_every!r}")

    def aux_skip_at(self, progress: float) -> float:
        """DARTS-'s skip weight after ``progress`` (0..1) of the search; 0 for the other methods."""
        if self.search_method != "darts-minus":
            return 0.0
        start = DEFAULT_AUX_SKIP_WEIGHT if self.aux_skip_weight is None else float(self.aux_skip_weight)
        return aux_skip_schedule(progress, start)

    def regularizer_weight_at(self, progress: float) -> float:
        """beta-DARTS' regulariser weight after ``progress`` (0..1) of the search; 0 for the other methods."""
        if self.search_method != "beta-darts":
            return 0.0
        final = DEFAULT_BETA_DARTS_WEIGHT if self.beta_darts_weight is None else float(self.beta_darts_weight)
        return beta_darts_schedule(progress, final)

    def hessian_due(self, epoch: int) -> bool:
        """Whether the Hessian is measured at the end of 0-based ``epoch``."""
        return self.hessian_every > 0 and (epoch + 1) % self.hessian_every == 0


def _clamp(progress: float) -> float:
    return min(max(float(progress), 0.0), 1.0)


def aux_skip_schedule(progress: float, start: float) -> float:
    """DARTS-: ``start`` at the beginning, decaying linearly to 0 at the end of the search."""
    return start * (1.0 - _clamp(progress))


def beta_darts_schedule(progress: float, final: float) -> float:
    """beta-DARTS: 0 at the beginning, rising linearly to ``final`` at the end of the search."""
    return final * _clamp(progress)


def search_cells(model: nn.Module) -> Iterator[SearchCell]:
    """Every search cell of ``model``, momentum copies included."""
    return (module for module in model.modules() if isinstance(module, SearchCell))


def set_aux_skip_weight(model: nn.Module, weight: float) -> None:
    """Set DARTS-'s skip weight on every search cell (online and momentum heads share one architecture)."""
    for cell in search_cells(model):
        cell.aux_skip_weight = float(weight)


def beta_regularizer(alphas: torch.Tensor | Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """beta-DARTS' Beta-Decay regulariser: ``weight * mean over all layers of logsumexp(alpha_layer)``.

    Its gradient with respect to ``alpha[l, k]`` is ``weight * softmax(alpha_l)[k] / (number of layers)``: every
    alpha is pulled down in proportion to its own op weight, which keeps one op from running away.
    """
    alphas = [alphas] if isinstance(alphas, torch.Tensor) else list(alphas)
    per_layer = torch.cat([torch.logsumexp(full(a), dim=-1).reshape(-1) for a in alphas])
    return weight * per_layer.mean()


def alpha_objective(loss: torch.Tensor, model: nn.Module, variant: SearchVariant, progress: float) -> torch.Tensor:
    """The loss the alpha step differentiates: the validation loss, plus beta-DARTS' regulariser when chosen."""
    weight = variant.regularizer_weight_at(progress)
    if not weight:
        return loss
    return loss + beta_regularizer(model.arch_parameters(), weight).to(loss.dtype)


def apply_schedule(model: nn.Module, variant: SearchVariant, progress: float) -> dict[str, float]:
    """Set this step's DARTS- skip weight on the model; returns the step's schedule values (for the history)."""
    skip = variant.aux_skip_at(progress)
    set_aux_skip_weight(model, skip)
    return {"aux_skip_weight": skip, "beta_darts_weight": variant.regularizer_weight_at(progress)}


# --------------------------------------------------------------------------------------------------------------------
# head-only losses over cached backbone features
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedViews:
    """Backbone features of one batch of two views; the momentum backbone's too for MoCo v2 and BYOL."""

    features: tuple[torch.Tensor, torch.Tensor]
    momentum_features: tuple[torch.Tensor, torch.Tensor] | None = None


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BatchNorm running statistics, the queue) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@torch.no_grad()
def cache_backbone_features(model: nn.Module, batches: Iterable) -> list[CachedViews]:
    """Run the backbone(s) once over ``batches`` (dicts with ``pixel_values`` / ``pixel_values_2``, or pairs of
    view tensors) so head-only losses can be evaluated many times; the model's buffers are left unchanged."""
    momentum = getattr(model, "momentum_backbone", None)
    cached = []
    with preserved_buffers(model):
        for batch in batches:
            views = (batch["pixel_values"], batch["pixel_values_2"]) if isinstance(batch, Mapping) else tuple(batch)
            features = tuple(full(model.nasiam.backbone(v)) for v in views)
            extra = tuple(full(momentum(v)) for v in views) if momentum is not None else None
            cached.append(CachedViews(features=features, momentum_features=extra))
    if not cached:
        raise ValueError("no batches to cache backbone features from")
    return cached


def head_loss(model: nn.Module, views: CachedViews, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The framework's loss of one cached batch through the heads only.

    ``weights`` maps a cell name (``"projector"``, ``"predictor"``) to the op weights (layers x ops) to use instead
    of its softmaxed alphas. Momentum heads keep their own weights and run without gradients.
    """
    weights = weights or {}
    cells = model.cells()
    config = model.config
    z1, z2 = (cells["projector"](h, weights.get("projector")) for h in views.features)
    p1 = p2 = t1 = t2 = None
    if "predictor" in cells:
        p1, p2 = (cells["predictor"](z, weights.get("predictor")) for z in (z1, z2))
    if config.has_momentum_encoder:
        if views.momentum_features is None:
            raise ValueError(f"{config.framework} needs the momentum backbone's features in the cache")
        with torch.no_grad():
            t1, t2 = (model.momentum_projector(h) for h in views.momentum_features)
    queue = model.queue.keys if config.framework == "mocov2" else None
    return siamese_loss(config.framework, z1, z2, p1=p1, p2=p2, t1=t1, t2=t2, queue=queue,
                        temperature=config.temperature, **config.loss_constants())


def mean_head_loss(model: nn.Module, cached: Sequence[CachedViews],
                   weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`head_loss` averaged over the cached batches. In train mode this moves BatchNorm running statistics:
    callers that must leave the model as it was wrap the whole computation, backward included, in
    :func:`preserved_buffers` (restoring them before a backward would invalidate the saved graph)."""
    return torch.stack([head_loss(model, views, weights) for views in cached]).mean()


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean over processes, so every rank takes the same decision from its own batches."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# --------------------------------------------------------------------------------------------------------------------
# discretisation: argmax or perturbation, under an optional cap on parameter-free layers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Discretization:
    """A derived genotype and how it was reached.

    ``table`` holds DARTS-PT's losses (one entry per decided layer: the loss with every op present, the loss with
    each op masked, the op kept); ``capped`` lists the layers switched to a linear op to respect
    ``max_parameter_free_layers`` (cell, layer, the op that would have been kept, the op kept instead).
    """

    genotype: dict[str, list[str]]
    method: str
    max_parameter_free_layers: int | None = None
    table: list[dict] = field(default_factory=list)
    capped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _linear_ops(op_names: Sequence[str]) -> list[int]:
    linear = [k for k, op in enumerate(op_names) if OPS[op].is_linear]
    if not linear:
        raise ValueError(
            f"the search space {list(op_names)} has no linear op, so --max_parameter_free_layers cannot be met; "
            "unset it or add a linear op to --search_space"
        )
    return linear


def _capped_by_scores(scores: torch.Tensor, op_names: Sequence[str], keeps_width: Sequence[bool],
                      cap: int | None, cell: str) -> tuple[list[int], list[dict]]:
    """Per layer the op of highest score; with a cap, the parameter-free picks on width-keeping layers that cost the
    least score are switched to their best linear op until at most ``cap`` remain (the best genotype under the cap
    when scores add up over layers, as log-softmax alphas do)."""
    picks = scores.argmax(dim=-1).tolist()
    free = [i for i, k in enumerate(picks) if keeps_width[i] and is_parameter_free(op_names[k])]
    if cap is None or len(free) <= cap:
        return picks, []
    linear = _linear_ops(op_names)
    best_linear = {i: max(linear, key=lambda k: scores[i, k].item()) for i in free}
    cost = {i: (scores[i, picks[i]] - scores[i, best_linear[i]]).item() for i in free}
    capped = []
    for i in sorted(free, key=lambda i: (cost[i], i))[: len(free) - cap]:
        capped.append({"cell": cell, "layer": i, "from": op_names[picks[i]], "to": op_names[best_linear[i]]})
        picks[i] = best_linear[i]
    return picks, sorted(capped, key=lambda c: c["layer"])


def argmax_genotype(model: nn.Module, max_parameter_free_layers: int | None = None) -> Discretization:
    """The op of largest alpha in every layer (Algorithm 1), under the optional cap on parameter-free layers
    (ranked by log-softmax alphas: the most probable genotype that respects it)."""
    genotype, capped = {}, []
    for name, cell in model.cells().items():
        scores = torch.log_softmax(cell.alphas.detach().float(), dim=-1)
        picks, switched = _capped_by_scores(scores, cell.op_names, cell.width_keeping_layers(),
                                            max_parameter_free_layers, name)
        genotype[name] = [cell.op_names[k] for k in picks]
        capped += switched
    return Discretization(genotype, "argmax", max_parameter_free_layers, capped=capped)


@torch.no_grad()
def perturbation_genotype(model: nn.Module, cached: Sequence[CachedViews],
                          max_parameter_free_layers: int | None = None) -> Discretization:
    """DARTS-PT on the model's cells, each decision scored by the head-only loss on ``cached`` (averaged over
    processes, so every rank derives the same genotype)."""
    def loss_of(weights: Mapping[str, torch.Tensor]) -> float:
        return _mean_over_ranks(mean_head_loss(model, cached, weights)).item()

    with preserved_buffers(model):
        return perturbation_select(model.cells(), loss_of, max_parameter_free_layers)


@torch.no_grad()
def perturbation_select(cells: Mapping[str, SearchCell], loss_of: Callable[[Mapping[str, torch.Tensor]], float],
                        max_parameter_free_layers: int | None = None) -> Discretization:
    """Decide layer by layer (cells in order, layers in order) the op whose masking raises ``loss_of`` most, then
    fix that layer to it (one-hot) for the decisions that follow.

    ``loss_of`` takes the op weights of every cell (cell name -> layers x ops). Masking sets one op's weight to 0
    and keeps the others, as DARTS-PT does. With a cap, once a cell holds ``max_parameter_free_layers``
    parameter-free ops on width-keeping layers, its later width-keeping layers keep their best linear op instead
    (recorded in ``capped``).
    """
    weights = {name: cell.op_weights().detach().clone() for name, cell in cells.items()}
    result = Discretization({}, "perturbation", max_parameter_free_layers)
    for name, cell in cells.items():
        keeps_width, free_kept, picks = cell.width_keeping_layers(), 0, []
        for layer in range(len(cell.layers)):
            base = loss_of(weights)
            masked = []
            for k in range(len(cell.op_names)):
                trial = {n: w.clone() for n, w in weights.items()}
                trial[name][layer, k] = 0.0
                masked.append(loss_of(trial))
            choice = max(range(len(masked)), key=lambda k: masked[k])
            if (max_parameter_free_layers is not None and keeps_width[layer]
                    and free_kept >= max_parameter_free_layers and is_parameter_free(cell.op_names[choice])):
                best = max(_linear_ops(cell.op_names), key=lambda k: masked[k])
                result.capped.append({"cell": name, "layer": layer, "from": cell.op_names[choice],
                                      "to": cell.op_names[best]})
                choice = best
            free_kept += keeps_width[layer] and is_parameter_free(cell.op_names[choice])
            weights[name][layer] = 0.0
            weights[name][layer, choice] = 1.0
            picks.append(cell.op_names[choice])
            result.table.append({"cell": name, "layer": layer, "base_loss": base,
                                 "masked_loss": dict(zip(cell.op_names, masked)), "chosen": cell.op_names[choice]})
        result.genotype[name] = picks
    return result


def derive_genotype(model: nn.Module, variant: SearchVariant,
                    cached: Sequence[CachedViews] | None = None) -> Discretization:
    """The genotype the variant's discretisation derives (``cached`` features are needed for ``perturbation``)."""
    if variant.discretization == "perturbation":
        if not cached:
            raise ValueError("--discretization perturbation needs cached validation features (pass some batches)")
        return perturbation_genotype(model, cached, variant.max_parameter_free_layers)
    return argmax_genotype(model, variant.max_parameter_free_layers)


# --------------------------------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------------------------------


def genotype_shares(model: nn.Module, genotype: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Identity and parameter-free shares of ``genotype`` (default: the current argmax), averaged over the cells,
    each counted over the layers that keep their width."""
    genotype = genotype or model.genotype()
    widths = {cell: model.config.head_spec(cell).widths for cell in genotype}
    identity = [identity_share(ops, widths[cell]) for cell, ops in genotype.items()]
    free = [parameter_free_share(ops, widths[cell]) for cell, ops in genotype.items()]
    return {"identity_share": sum(identity) / len(identity), "parameter_free_share": sum(free) / len(free)}


def alpha_hessian(model: nn.Module, cached: Sequence[CachedViews]) -> torch.Tensor:
    """The exact Hessian of the mean head-only loss on ``cached`` with respect to every alpha of the online cells
    (flattened cell by cell, projector first), symmetrised."""
    cells = model.cells()
    shapes = [(name, cell.alphas.shape) for name, cell in cells.items()]
    flat = torch.cat([cell.alphas.detach().reshape(-1) for cell in cells.values()])

    def loss_of(values: torch.Tensor) -> torch.Tensor:
        weights, offset = {}, 0
        for name, shape in shapes:
            count = shape.numel()
            weights[name] = torch.softmax(values[offset: offset + count].view(shape), dim=-1)
            offset += count
        return mean_head_loss(model, cached, weights)

    with torch.enable_grad(), preserved_buffers(model):
        hessian = torch.autograd.functional.hessian(loss_of, flat)
    return 0.5 * (hessian + hessian.T)


def alpha_hessian_top_eigenvalue(model: nn.Module, cached: Sequence[CachedViews]) -> float:
    """The largest eigenvalue of :func:`alpha_hessian` (the dominant curvature of the loss in alpha space)."""
    hessian = _mean_over_ranks(alpha_hessian(model, cached).detach())
    return torch.linalg.eigvalsh(hessian.double()).max().item()


__all__ = [
    "CachedViews",
    "DECIDED_RULE",
    "DISCRETIZATIONS",
    "Discretization",
    "SEARCH_METHODS",
    "SearchVariant",
    "alpha_hessian",
    "alpha_hessian_top_eigenvalue",
    "alpha_objective",
    "apply_schedule",
    "argmax_genotype",
    "aux_skip_schedule",
    "beta_darts_schedule",
    "beta_regularizer",
    "cache_backbone_features",
    "derive_genotype",
    "genotype_confidence",
    "genotype_shares",
    "head_loss",
    "mean_head_loss",
    "perturbation_genotype",
    "perturbation_select",
    "preserved_buffers",
    "set_aux_skip_weight",
    "undecided_layers",
]
