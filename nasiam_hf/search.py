"""The NASiam bilevel search (first-order DARTS, the paper's Algorithm 1 interleaved per step).

Every step makes one architecture (alpha) update on a batch of the validation half and one weight update on a batch
of the training half. :func:`alpha_step` and :func:`weight_step` are the only places these updates happen; the
search command and the throughput benchmark both call them. Both take a batch of two views (with
``--augmentation_device accelerator`` the loop first draws them on the device with :mod:`nasiam_hf.augment`) and
hand them to the model in channels_last when the model was prepared that way (:func:`model_inputs`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import distributed as dist

from .configuration_nasiam import FRAMEWORK_DEFAULTS, NASiamConfig
from .fileio import atomic_write_json, staged_files
from .modeling_nasiam import NASiamForArchitectureSearch, NASiamPreTrainingOutput
from .objectives import cosine_momentum
from .search_space import identity_share
from .trainer import (
    Checkpointer, DeviceSums, StepLoop, build_cosine_schedule, build_optimizer, check_finite, guard_output_dir,
    make_accelerator, mean_over_ranks, prepare_model_layout, scaled_lr, start_tracking, uses_channels_last,
)

# Architecture optimisers of the paper's code: AdamW(1e-3) in general, Adam(3e-4) for MoCo v2; weight decay 1e-3.
ARCH_OPTIMIZERS = {"mocov2": (torch.optim.Adam, 3e-4)}
DEFAULT_ARCH_OPTIMIZER = (torch.optim.AdamW, 1e-3)


def build_arch_optimizer(model: NASiamForArchitectureSearch, lr: float | None = None,
                         weight_decay: float = 1e-3, implementation: str = "auto") -> torch.optim.Optimizer:
    """AdamW (Adam for MoCo v2) over the alphas; ``implementation`` as in :func:`~.trainer.build_optimizer`."""
    cls, default_lr = ARCH_OPTIMIZERS.get(model.config.framework, DEFAULT_ARCH_OPTIMIZER)
    return build_optimizer(cls, model.arch_parameters(), implementation, lr=lr or default_lr, betas=(0.9, 0.999),
                           weight_decay=weight_decay)


def build_weight_optimizer(params, lr: float, weight_decay: float, momentum: float = 0.9,
                           implementation: str = "auto") -> torch.optim.SGD:
    """SGD with momentum; ``implementation`` ("auto": fused where supported) as in
    :func:`~.trainer.build_optimizer`."""
    return build_optimizer(torch.optim.SGD, params, implementation, lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def model_inputs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of ``batch``, in channels_last when the (unwrapped) model was prepared that way."""
    views = batch["pixel_values"], batch["pixel_values_2"]
    if uses_channels_last(model):
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    return views


def alpha_step(model: NASiamForArchitectureSearch, batch: dict, arch_optimizer: torch.optim.Optimizer,
               accelerator: Accelerator, guard=None) -> NASiamPreTrainingOutput:
    """One architecture update on a validation batch.

    ``model`` must be the unwrapped supernet: calling it directly keeps DDP out of this step (DDP raises when a
    module takes no part in a forward). The backbone runs without autograd, gradients are taken for the alphas
    only, averaged over ranks by hand so every rank keeps identical alphas, and nothing else changes (no momentum
    update, no queue write; BatchNorm running statistics still move, as in any train-mode forward).
    ``guard(loss)`` runs before the update and may raise to prevent it.
    """
    params = model.arch_parameters()
    view_1, view_2 = model_inputs(model, batch)
    with accelerator.autocast():
        out = model(view_1, view_2, backbone_grad=False)
    if guard is not None:
        guard(out.loss)
    loss = accelerator.scaler.scale(out.loss) if accelerator.scaler is not None else out.loss
    grads = torch.autograd.grad(loss, params)
    grads = [g.float() for g in grads]
    _all_reduce_mean(grads)
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    arch_optimizer.step()
    arch_optimizer.zero_grad(set_to_none=True)
    return out


def weight_step(model, batch: dict, optimizer: torch.optim.Optimizer, scheduler, accelerator: Accelerator,
                momentum: float | None = None, guard=None) -> NASiamPreTrainingOutput:
    """One weight update on a training batch (supernet or discrete model), then the momentum/queue updates.

    ``model`` is the prepared (possibly DDP-wrapped) model. Gradients that reach the alphas are dropped: only the
    parameters in ``optimizer`` move. ``guard(loss)`` runs before the update and may raise to prevent it (a NaN).
    """
    core = accelerator.unwrap_model(model)
    view_1, view_2 = model_inputs(core, batch)
    with accelerator.autocast():
        out = model(pixel_values=view_1, pixel_values_2=view_2)
    if guard is not None:
        guard(out.loss)
    accelerator.backward(out.loss)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(core, NASiamForArchitectureSearch):
        for p in core.arch_parameters():
            p.grad = None
    if accelerator.sync_gradients:
        core.momentum_update(momentum)
        core.enqueue(out.momentum_keys)
    return out


def momentum_for_step(config: NASiamConfig, step: int, total_steps: int) -> float | None:
    """BYOL's EMA momentum rises from its base to 1 along a cosine; MoCo v2 keeps its constant."""
    if config.framework == "byol":
        return cosine_momentum(config.momentum, step / max(total_steps, 1))
    return config.momentum if config.has_momentum_encoder else None


def genotype_summary(genotype: dict[str, list[str]]) -> str:
    """A compact genotype for progress bars: ``lr|si|id...`` per cell."""
    short = {"max_pool_3x3": "mp", "avg_pool_3x3": "ap", "identity": "id"}
    def abbreviate(op):
        return short.get(op, op.removeprefix("linear_")[:2])
    return " ".join(f"{cell[:4]}:{'|'.join(abbreviate(op) for op in ops)}" for cell, ops in genotype.items())


def search_epoch_record(model: NASiamForArchitectureSearch, epoch: int, train_loss: float, val_loss: float,
                        collapse: float, lr: float) -> dict:
    genotype = model.genotype()
    shares = [identity_share(ops, model.config.head_spec(cell).widths) for cell, ops in genotype.items()]
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "collapse_std": collapse,
        "identity_share": sum(shares) / len(shares),
        "lr": lr,
        "genotype": genotype,
        "op_weights": model.op_weights(),
    }


def write_search_outputs(model: NASiamForArchitectureSearch, history: dict, output_dir: str | Path,
                         args: argparse.Namespace | None = None) -> NASiamConfig:
    """config.json (a pretraining-ready NASiamConfig), genotype.json, search_history.json and the plots."""
    from .hub import plot_genotype, plot_search_history, save_run_metadata

    config = model.derive_config()
    with staged_files(output_dir) as staged:
        config.save_pretrained(staged)
        atomic_write_json(staged / "genotype.json", model.genotype())
        atomic_write_json(staged / "search_history.json", history)
        if args is not None:
            save_run_metadata(staged, args)
        plot_search_history(history, staged)
        plot_genotype(config, staged / "genotype.png")
    return config


def search_config_from_args(args: argparse.Namespace, image_size: int, cifar_stem: bool) -> NASiamConfig:
    values = dict(
        framework=args.framework, backbone=args.backbone, cifar_stem=cifar_stem, image_size=image_size,
        search_space=args.search_space, projector_layers=args.projector_layers,
    )
    if FRAMEWORK_DEFAULTS[args.framework]["predictor_layers"]:
        values["predictor_layers"] = args.predictor_layers
    for key in ("temperature", "queue_size", "momentum", "projection_dim"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return NASiamConfig(**values)


def run_search(args: argparse.Namespace) -> NASiamForArchitectureSearch:
    """The whole search: data halves, supernet, interleaved alpha/weight steps, checkpoints, outputs.

    Returns the searched supernet (unwrapped; the outputs are in ``args.output_dir``).
    """
    from .data import ViewDataset, make_loader, set_loader_epoch, split_in_halves, splits_from_args
    from .hub import push_folder_to_hub

    accelerator = make_accelerator(args)
    guard_output_dir(args, accelerator)
    splits = splits_from_args(args)
    train_half, val_half = split_in_halves(splits.train, args.train_portion, args.seed)
    kind = "eval" if args.no_augmentation else "ssl"
    batch = args.per_device_train_batch_size
    workers = args.dataloader_num_workers
    on_device = args.augmentation_device == "accelerator"
    if on_device:  # the loaders only decode; the views are drawn on the device, seeded like the per-image ones
        mode, transform = "decode", splits.decode_transform()
        train_views, val_views = splits.batch_augmenter(kind, args.seed), splits.batch_augmenter(kind, args.seed + 1)
    else:
        mode, transform = "two_view", splits.transform(kind)
        train_views = val_views = None
    train_loader = make_loader(ViewDataset(train_half, mode, transform, seed=args.seed), batch, shuffle=True,
                               seed=args.seed, drop_last=True, num_workers=workers)
    val_loader = make_loader(ViewDataset(val_half, mode, transform, seed=args.seed + 1), batch, shuffle=True,
                             seed=args.seed + 1, drop_last=True, num_workers=workers)

    config = search_config_from_args(args, splits.image_size, cifar_stem=splits.policy == "cifar")
    model = prepare_model_layout(NASiamForArchitectureSearch(config), accelerator, args.channels_last,
                                 args.torch_compile)
    global_batch = batch * accelerator.num_processes
    lr = scaled_lr(args.learning_rate, global_batch)
    accelerator.print(
        f"search: {config.framework} / {config.backbone}, space {config.search_space} {list(config.search_ops)}, "
        f"{len(train_half)} train + {len(val_half)} val images, global batch {global_batch}, "
        f"effective lr {lr:.4g} (= {args.learning_rate} x {global_batch}/256)"
    )
    implementation = args.optimizer_implementation
    weight_optimizer = build_weight_optimizer(model.weight_parameters(), lr, args.weight_decay,
                                              implementation=implementation)
    arch_optimizer = build_arch_optimizer(model, args.arch_learning_rate, args.arch_weight_decay, implementation)
    model, weight_optimizer, arch_optimizer, train_loader, val_loader = accelerator.prepare(
        model, weight_optimizer, arch_optimizer, train_loader, val_loader
    )
    total_steps = args.max_train_steps or args.num_train_epochs * len(train_loader)
    scheduler = accelerator.prepare(build_cosine_schedule(weight_optimizer, accelerator, args, len(train_loader),
                                                          total_steps))
    supernet = accelerator.unwrap_model(model)
    start_tracking(accelerator, args, "nasiam-search")

    checkpointer = Checkpointer(accelerator, args.output_dir, args.checkpoints_total_limit)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "val_epoch": 0, "val_step": 0,
             "history": {"ops": list(config.search_ops), "epochs": []}, "running": [0.0, 0.0, 0.0, 0]}
    state = checkpointer.resume(args.resume_from_checkpoint, state)

    def validation_batches():
        """One persistent iterator over the validation half, cycling through its epochs (resumable)."""
        while True:
            set_loader_epoch(val_loader, state["val_epoch"])
            skip = state["val_step"]
            for b in accelerator.skip_first_batches(val_loader, skip) if skip else val_loader:
                state["val_step"] += 1
                yield b
            state["val_epoch"] += 1
            state["val_step"] = 0

    sums = DeviceSums(3)  # train loss, val loss, collapse std of the steps not yet folded into state["running"]
    log_every = args.logging_steps

    def fold_sums() -> list[float] | None:
        return sums.fold_into(state["running"])

    def on_epoch_end(epoch: int) -> None:
        fold_sums()
        running = state["running"]
        means = mean_over_ranks(accelerator, [r / max(running[3], 1) for r in running[:3]])
        record = search_epoch_record(supernet, epoch, *means, lr=scheduler.get_last_lr()[0])
        state["history"]["epochs"].append(record)
        state["running"] = [0.0, 0.0, 0.0, 0]
        if args.with_tracking:
            accelerator.log({k: record[k] for k in ("train_loss", "val_loss", "collapse_std", "identity_share", "lr")},
                            step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(Path(args.output_dir) / "search_history.json", state["history"])

    val_iter = validation_batches()
    loop = StepLoop(accelerator, args, train_loader, state, total_steps, checkpointer, on_epoch_end, desc="search",
                    before_save=fold_sums)
    model.train()
    for epoch, train_batch in loop:
        where = f"epoch {epoch}, step {state['global_step'] + 1}"
        val_batch = next(val_iter)
        if on_device:
            train_batch, val_batch = train_views(train_batch), val_views(val_batch)
        a_out = alpha_step(supernet, val_batch, arch_optimizer, accelerator,
                           guard=lambda loss: check_finite(loss, f"{where} (alpha step)", checkpointer))
        momentum = momentum_for_step(config, state["global_step"], total_steps)
        w_out = weight_step(model, train_batch, weight_optimizer, scheduler, accelerator, momentum,
                            guard=lambda loss: check_finite(loss, f"{where} (weight step)", checkpointer))
        sums.add(w_out.loss, a_out.loss, w_out.collapse_std)
        if (state["global_step"] + 1) % log_every == 0:
            means = fold_sums()
            loop.set_postfix(loss=f"{means[0]:.3f}", val=f"{means[1]:.3f}",
                             genotype=genotype_summary(supernet.genotype()))

    state["history"]["genotype"] = supernet.genotype()
    if accelerator.is_main_process:
        final = write_search_outputs(supernet, state["history"], args.output_dir, args)
        accelerator.print(f"genotype: projector {final.projector_genotype}, predictor {final.predictor_genotype}")
        accelerator.print(f"search outputs written to {args.output_dir}")
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
        push_folder_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.end_training()
    return supernet
