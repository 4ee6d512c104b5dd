"""What the engines share to update weights: optimisers (with their kernels), the lr rules and schedules, and the
weight step (with gradient accumulation, clipping and the momentum/queue updates that follow it).

One optimizer update may consume several micro-batches (``--gradient_accumulation_steps``): they go through
``accelerator.accumulate`` one by one, so Accelerate skips DDP's gradient all-reduce and the optimizer step until the
last one and divides each loss by their number. The MoCo queue receives every micro-batch's keys (they are
negatives for the micro-batches after it, as in MoCo with a smaller batch); the momentum encoders move once per
update. What accumulation cannot reproduce: BatchNorm statistics and contrastive negatives stay per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from accelerate import Accelerator

OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")
WEIGHT_OPTIMIZERS = ("sgd", "lars")
TIMM_INSTALL = 'pip install "nasiam-hf[timm]"'
LARS_TRUST_COEFFICIENT = 0.001  # the LARS paper's eta, timm's and the Barlow Twins / VICReg references' default


def fused_optimizer_supported(device_type: str) -> bool:
    """Whether this torch build has fused SGD/Adam/AdamW kernels for ``device_type`` (CPU ones since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - very old or very new torch
        return device_type == "cuda"


def build_optimizer(cls: type[torch.optim.Optimizer], params, implementation: str = "auto", **kwargs
                    ) -> torch.optim.Optimizer:
    """``cls(params, **kwargs)`` with the step kernels of ``implementation``.

    "fused" one kernel for all parameters (SGD, Adam, AdamW; CUDA, and CPU since torch 2.4), "foreach" one kernel
    per operation over all parameters, "for_loop" per parameter. "auto" asks for fused when the parameters' device
    has fused kernels in this torch build and falls back to foreach when the optimizer refuses fused.
    """
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {implementation!r}")
    params = list(params)
    if implementation == "foreach":
        return cls(params, foreach=True, **kwargs)
    if implementation == "for_loop":
        return cls(params, foreach=False, **kwargs)
    if implementation == "fused":
        return cls(params, fused=True, **kwargs)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    device = tensors[0].device.type if tensors else "cpu"
    if fused_optimizer_supported(device):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # e.g. an optimizer or dtype without a fused kernel
            pass
    return cls(params, foreach=True, **kwargs)


def predictor_param_groups(params: Sequence[torch.nn.Parameter], predictor: torch.nn.Module | None,
                           fix_predictor_lr: bool) -> tuple[list[dict], tuple[int, ...]]:
    """``params`` as optimizer groups: SimSiam's predictor in a group of its own (index 1) when its lr stays fixed
    (SimSiam's ``fix_pred_lr``, which the paper's search and pretraining both use); returns (groups, fixed group
    indices) for :func:`build_cosine_schedule`."""
    params = [p for p in params if p.requires_grad]
    predictor_ids = {id(p) for p in predictor.parameters()} if (predictor is not None and fix_predictor_lr) else set()
    groups = [{"params": [p for p in params if id(p) not in predictor_ids]}]
    if predictor_ids:
        groups.append({"params": [p for p in params if id(p) in predictor_ids]})
    return groups, ((1,) if predictor_ids else ())


def build_sgd(params, lr: float, weight_decay: float, momentum: float = 0.9, implementation: str = "auto"
              ) -> torch.optim.SGD:
    """SGD with momentum, the weight optimiser of most recipes; kernels as in :func:`build_optimizer`."""
    return build_optimizer(torch.optim.SGD, params, implementation, lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def lars_class(why: str = "--optimizer lars") -> type[torch.optim.Optimizer]:
    """``timm.optim.Lars`` (timm is an extra, imported here only); a one-line error naming the install when absent
    (``why`` says what asked for LARS)."""
    try:
        from timm.optim import Lars
    except ImportError as error:
        raise ValueError(f"{why} uses timm's Lars and timm is not installed ({error}): {TIMM_INSTALL}") from None
    return Lars


def is_excluded_from_lars(parameter: torch.Tensor) -> bool:
    """Biases and norm parameters (every parameter of one dimension): no LARS adaptation, no weight decay."""
    return parameter.ndim <= 1


def lars_param_groups(groups: Sequence[dict], weight_decay: float, fixed_groups: tuple[int, ...] = ()
                      ) -> tuple[list[dict], tuple[int, ...]]:
    """``groups`` (dicts with ``params`` and any per-group options) split for ``timm.optim.Lars``: the weights of
    each group keep ``weight_decay`` and are always adapted (``always_adapt``), its biases and norm parameters go to a
    copy of the group with weight decay 0 and no adaptation, which timm's Lars steps as plain SGD with momentum (it
    adapts only where ``weight_decay != 0 or always_adapt``). Returns the groups and the new indices of
    ``fixed_groups``."""
    split, fixed = [], []
    for index, group in enumerate(groups):
        params = list(group["params"])
        for adapted in (True, False):
            chosen = [p for p in params if is_excluded_from_lars(p) is not adapted]
            if not chosen:
                continue
            if index in fixed_groups:
                fixed.append(len(split))
            split.append({**group, "params": chosen, "weight_decay": weight_decay if adapted else 0.0,
                          "always_adapt": adapted})
    return split, tuple(fixed)


def build_weight_optimizer(name: str, groups: Sequence[dict], lr: float, weight_decay: float, momentum: float = 0.9,
                           implementation: str = "auto", fixed_groups: tuple[int, ...] = (),
                           trust_coefficient: float | None = None, trust_clip: bool | None = None
                           ) -> tuple[torch.optim.Optimizer, tuple[int, ...]]:
    """The weight optimiser ``name`` ("sgd" or "lars") over ``groups``; returns it and the indices of the groups
    whose lr stays fixed (``fixed_groups`` renumbered after LARS' split, see :func:`lars_param_groups`).

    LARS is ``timm.optim.Lars`` (``trust_coefficient`` its ``trust_coeff``, default 0.001; ``trust_clip`` LARC's
    clipping of the adapted rate at the global one) with momentum, biases and norm parameters excluded from the
    adaptation and the weight decay, as the Barlow Twins, VICReg and BYOL references train."""
    if name == "sgd":
        return build_sgd(list(groups), lr, weight_decay, momentum, implementation), tuple(fixed_groups)
    if name != "lars":
        raise ValueError(f"--optimizer must be one of {list(WEIGHT_OPTIMIZERS)}, got {name!r}")
    lars = lars_class()
    if implementation == "fused":
        raise ValueError("--optimizer_implementation fused: timm's Lars has no fused kernel; pass auto, foreach or "
                         "for_loop with --optimizer lars")
    split, fixed = lars_param_groups(groups, weight_decay, fixed_groups)
    coefficient = LARS_TRUST_COEFFICIENT if trust_coefficient is None else trust_coefficient
    optimizer = build_optimizer(lars, split, implementation, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                trust_coeff=coefficient, trust_clip=bool(trust_clip))
    return optimizer, fixed


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the recipes: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then a half cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_cosine_schedule(optimizer, accelerator: Accelerator, warmup_epochs: float, steps_per_epoch: int | None,
                          total_steps: int, fixed_groups: tuple[int, ...] = ()):
    """Warmup + cosine over ``total_steps`` optimizer updates for every param group except ``fixed_groups``.

    Accelerate steps a prepared scheduler once per process for every optimiser update, hence the counts multiplied
    by the number of processes. ``steps_per_epoch`` None (a stream of unknown length) allows no warm-up in epochs.
    """
    if steps_per_epoch is None:
        if warmup_epochs:
            raise ValueError("--num_warmup_epochs needs a known epoch length; the streamed data's is unknown: "
                             "drop the warm-up or count the shards")
        steps_per_epoch = 0
    n = accelerator.num_processes
    warmup, total = int(warmup_epochs * steps_per_epoch) * n, total_steps * n
    lambdas = [
        (lambda step: 1.0) if i in fixed_groups else (lambda step: cosine_factor(step, warmup, total))
        for i in range(len(optimizer.param_groups))
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def momentum_for_step(config, step: int, total_steps: int) -> float | None:
    """BYOL's EMA momentum rises from its base to 1 along a cosine over the updates; MoCo v2 keeps its constant."""
    from .objectives import cosine_momentum

    if config.framework == "byol":
        return cosine_momentum(config.momentum, step / max(total_steps, 1))
    return config.momentum if config.has_momentum_encoder else None


def model_inputs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of ``batch``, in channels_last when the (unwrapped) model was prepared that way."""
    from .trainer import uses_channels_last

    views = batch["pixel_values"], batch["pixel_values_2"]
    if uses_channels_last(model):
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    return views


def as_micro_batches(batches: dict | Sequence[dict]) -> list[dict]:
    """One batch or the micro-batches of one update, as a list."""
    return [batches] if isinstance(batches, dict) else list(batches)


def weight_step(model, batches: dict | Sequence[dict], optimizer: torch.optim.Optimizer, scheduler,
                accelerator: Accelerator, momentum: float | None = None, guard=None,
                max_grad_norm: float | None = None):
    """One optimizer update of the weights (supernet or discrete model) from one batch or from the micro-batches
    of one update; returns the model outputs, one per micro-batch.

    ``model`` is the prepared (possibly DDP-wrapped) model. Each micro-batch goes through ``accelerator.accumulate``.
    ``guard`` (an :class:`~nasiam_hf.loop.UpdateGuard`) sees each loss after its forward and, after the last
    forward and before its backward (DDP's gradient all-reduce), takes the update's cross-process decision: it
    raises on every process alike when the update must not be applied (a non-finite loss), so no process leaves a
    collective the others entered. On the update: optional clipping to ``max_grad_norm``, the optimizer and
    scheduler steps, the momentum update (MoCo v2, BYOL). Gradients that reach the alphas are dropped: only the
    parameters in ``optimizer`` move.
    """
    core = accelerator.unwrap_model(model)
    outputs = []
    micro = as_micro_batches(batches)
    for i, batch in enumerate(micro):
        with accelerator.accumulate(model):
            if guard is not None:
                guard.before_micro_batch()
            view_1, view_2 = model_inputs(core, batch)
            with accelerator.autocast():
                out = model(pixel_values=view_1, pixel_values_2=view_2)
            loss = out.loss
            if guard is not None:
                loss = guard.watch(loss)
                if i == len(micro) - 1:
                    guard.decide()
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm is not None:
                accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            core.enqueue(out.momentum_keys)
            outputs.append(out)
    arch = getattr(core, "arch_parameters", None)
    for p in arch() if arch is not None else ():
        p.grad = None
    core.momentum_update(momentum)
    return outputs


__all__ = [
    "OPTIMIZER_IMPLEMENTATIONS",
    "as_micro_batches",
    "build_cosine_schedule",
    "build_optimizer",
    "build_sgd",
    "build_weight_optimizer",
    "is_excluded_from_lars",
    "lars_class",
    "lars_param_groups",
    "cosine_factor",
    "fused_optimizer_supported",
    "model_inputs",
    "momentum_for_step",
    "predictor_param_groups",
    "scaled_lr",
    "weight_step",
    "WEIGHT_OPTIMIZERS",
]
