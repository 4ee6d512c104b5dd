"""The NASiam bilevel search (first-order DARTS, the paper's Algorithm 1 interleaved per step).

Every step makes one architecture (alpha) update on a batch of the validation half and one weight update on a batch
of the training half. :func:`alpha_step` and :func:`weight_step` are the only places these updates happen; the
search command and the throughput benchmark both call them. Both take a batch of two views (with
``--augmentation_device accelerator`` the loop first draws them on the device with :mod:`nasiam_hf.augment`) and
hand them to the model in channels_last when the model was prepared that way (:func:`model_inputs`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import distributed as dist

from .arguments import SearchCommand
from .configuration_nasiam import NASiamConfig
from .fileio import atomic_write_json, staged_files
from .modeling_nasiam import NASiamForArchitectureSearch, NASiamPreTrainingOutput
from .optimization import (
    as_micro_batches, build_cosine_schedule, build_optimizer, build_weight_optimizer, model_inputs, momentum_for_step,
    predictor_param_groups, weight_step,
)
from .plans import SearchPlan, check_search_flags, plan_search
from .search_methods import (
    alpha_hessian_top_eigenvalue, alpha_objective, apply_schedule, beta_regularizer, cache_backbone_features,
    derive_genotype, genotype_shares,
)
from .budget import logging_interval, run_budget
from .checkpoints import Checkpointer
from .confidence import describe_confidence, genotype_confidence, genotype_record, undecided_warning
from .feeds import cycle_batches, first_batches, num_samples, view_feed
from .loop import StepLoop, restore_positions
from .run_lock import releases_output_dir
from .trainer import (
    DeviceSums, bad_image_count, describe_backbone_of, describe_count, initialise_backbone, mean_over_ranks,
    prepare_model_layout, report_bad_images, start_run, start_tracking,
)

ARCH_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
PROBE_BATCHES = 2  # fixed validation batches for the Hessian and DARTS-PT (heads only: cheap to evaluate)


def build_arch_optimizer(model: NASiamForArchitectureSearch, name: str = "adamw", lr: float = 1e-3,
                         weight_decay: float = 1e-3, implementation: str = "auto",
                         betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam or AdamW (``name``) over the alphas; kernels as in :func:`~.optimization.build_optimizer`."""
    return build_optimizer(ARCH_OPTIMIZER_CLASSES[name], model.arch_parameters(), implementation, lr=lr,
                           betas=tuple(betas), weight_decay=weight_decay)


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def alpha_step(model: NASiamForArchitectureSearch, batches: dict | list[dict], arch_optimizer: torch.optim.Optimizer,
               accelerator: Accelerator, guard=None, objective=None) -> list[NASiamPreTrainingOutput]:
    """One architecture update from one validation batch, or from the micro-batches of one update (their gradients
    are averaged, as the weight step's are).

    ``model`` must be the unwrapped supernet: calling it directly keeps DDP out of this step (DDP raises when a
    module takes no part in a forward). The backbone runs without autograd, gradients are taken for the alphas
    only, averaged over ranks by hand so every rank keeps identical alphas, and nothing else changes (no momentum
    update, no queue write; BatchNorm running statistics still move, as in any train-mode forward).
    ``guard`` (the update's :class:`~nasiam_hf.loop.UpdateGuard`) sees each validation loss; it takes no decision
    here: the weight step of the same update does, for both (a non-finite alpha loss reaches nothing saved: the run
    stops there). ``objective(loss)`` turns the validation loss into what is differentiated (beta-DARTS adds its
    regulariser there).
    """
    params = model.arch_parameters()
    micro = as_micro_batches(batches)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    outputs = []
    for batch in micro:
        if guard is not None:
            guard.before_micro_batch()
        view_1, view_2 = model_inputs(model, batch)
        with accelerator.autocast():
            out = model(view_1, view_2, backbone_grad=False)
        loss = out.loss if guard is None else guard.watch(out.loss, "alpha step")
        loss = loss if objective is None else objective(loss)
        loss = accelerator.scaler.scale(loss) if accelerator.scaler is not None else loss
        for t, g in zip(total, torch.autograd.grad(loss / len(micro), params)):
            t.add_(g.float())
        outputs.append(out)
    _all_reduce_mean(total)
    for p, g in zip(params, total):
        p.grad = g.to(p.dtype)
    arch_optimizer.step()
    arch_optimizer.zero_grad(set_to_none=True)
    return outputs


def mean_loss(outputs: list[NASiamPreTrainingOutput]) -> torch.Tensor:
    """The mean loss of the micro-batches of one update (on the device: no sync)."""
    return torch.stack([o.loss.detach().float() for o in outputs]).mean()


def genotype_summary(genotype: dict[str, list[str]]) -> str:
    """A compact genotype for progress bars: ``lr|si|id...`` per cell."""
    short = {"max_pool_3x3": "mp", "avg_pool_3x3": "ap", "identity": "id"}
    def abbreviate(op):
        return short.get(op, op.removeprefix("linear_")[:2])
    return " ".join(f"{cell[:4]}:{'|'.join(abbreviate(op) for op in ops)}" for cell, ops in genotype.items())


def search_epoch_record(model: NASiamForArchitectureSearch, epoch: int, train_loss: float, val_loss: float,
                        collapse: float, lr: float, schedule: dict[str, float] | None = None,
                        hessian_eigenvalue: float | None = None, step: int | None = None) -> dict:
    """One epoch of ``search_history.json``: losses, the collapse statistic, the shares of identity and
    parameter-free ops in the current genotype, the variant's schedule values, the alphas' Hessian eigenvalue (on
    the epochs it is measured), the op weights and the confidence of the current argmax in every layer
    (:func:`~nasiam_hf.confidence.genotype_confidence`); ``step``: the updates done at the epoch's end."""
    weights = model.op_weights()
    record = {"epoch": epoch, **({"step": step} if step is not None else {}), "train_loss": train_loss,
              "val_loss": val_loss, "collapse_std": collapse, **genotype_shares(model), "lr": lr, **(schedule or {}),
              "beta_regularizer": float(beta_regularizer(model.arch_parameters(), 1.0).detach()),
              "genotype": model.genotype(), "op_weights": weights,
              "confidence": genotype_confidence(weights, model.config.search_ops)}
    if hessian_eigenvalue is not None:
        record["alpha_hessian_top_eigenvalue"] = hessian_eigenvalue
    return record


def write_search_outputs(model: NASiamForArchitectureSearch, history: dict, output_dir: str | Path,
                         command: SearchCommand | None = None, plan: SearchPlan | None = None,
                         genotype: dict[str, list[str]] | None = None,
                         starting_point: dict | None = None, confidence: dict | None = None,
                         outcome: dict | None = None) -> NASiamConfig:
    """config.json (a pretraining-ready NASiamConfig of ``genotype``, default the argmax of the alphas),
    genotype.json (with the per-layer ``confidence``), search_history.json, the run record (with the run's
    ``outcome``) and the plots, published together."""
    from .hub import plot_genotype, plot_search_history, save_run_metadata

    genotype = genotype or model.genotype()
    config = model.derive_config(projector_genotype=genotype["projector"],
                                 predictor_genotype=genotype.get("predictor"))
    with staged_files(output_dir) as staged:
        config.save_pretrained(staged)
        atomic_write_json(staged / "genotype.json", genotype_record(genotype, confidence))
        atomic_write_json(staged / "search_history.json", history)
        if command is not None:
            save_run_metadata(staged, command, command=command.name,
                              resolved=plan.to_dict() if plan is not None else None, starting_point=starting_point,
                              outcome=outcome)
        plot_search_history(history, staged)
        plot_genotype(config, staged / "genotype.png")
    return config


@releases_output_dir
def run_search(command: SearchCommand) -> NASiamForArchitectureSearch:
    """The whole search: data halves, supernet, interleaved alpha/weight updates, checkpoints, outputs.

    Returns the searched supernet (unwrapped; the outputs are in ``command.run.output_dir``).
    """
    from .data import split_in_halves
    from .hub.push import checkpoint_pusher, push_run_folder

    backbone = check_search_flags(command)
    run, data, speed = command.run, command.data, command.speed
    # the search evaluates nothing: no eval split is read (or downloaded)
    accelerator, output, splits = start_run(command, with_eval=False)
    plan = plan_search(command, splits.policy, splits.image_size, accelerator.num_processes, backbone)
    opt = plan.optimization
    config = NASiamConfig(**plan.config)
    supernet = NASiamForArchitectureSearch(config)
    splits, processor, starting_point = initialise_backbone(supernet, command.model.backbone_weights, splits, data,
                                                            accelerator, data.cache_dir)
    if splits.streaming:  # halves by a seeded hash of each sample's key
        train_half, val_half = splits.stream.halves(plan.train_portion, run.seed)
    else:
        train_half, val_half = split_in_halves(splits.train, plan.train_portion, run.seed)
    on_device = speed.augmentation_device == "accelerator"
    common = dict(batch_size=opt.per_device_batch, on_device=on_device, augment=not data.no_augmentation,
                  workers=data.dataloader_num_workers)
    train_feed, train_views = view_feed(accelerator, splits, train_half, seed=run.seed, accumulation=opt.accumulation,
                                        **common)
    # the validation half cycles: on a stream, each rank's epoch of it ends when its own share does
    val_feed, val_views = view_feed(accelerator, splits, val_half, seed=run.seed + 1, ends_together=False, **common)
    # a fixed few validation batches for the head-only measurements (Hessian, DARTS-PT), from their own loader so
    # the resumable validation position is not disturbed
    probe_feed, _ = view_feed(accelerator, splits, val_half, seed=run.seed + 2, ends_together=False,
                              **{**common, "workers": 0})
    variant = plan.variant

    def probe_batches():
        batches = first_batches(probe_feed, PROBE_BATCHES)
        batches = [val_views(b) for b in batches] if on_device else batches
        with torch.no_grad():
            return cache_backbone_features(supernet, batches)

    model = prepare_model_layout(supernet, accelerator, command.precision.channels_last, speed.torch_compile)
    accelerator.print(
        f"search: {config.framework} / {describe_backbone_of(config)}, space {config.search_space} "
        f"{list(config.search_ops)}, "
        f"{describe_count(num_samples(train_half))} train + {describe_count(num_samples(val_half))} val images, "
        f"{opt.describe()}" + (", fixed predictor lr" if plan.fix_predictor_lr else "")
    )
    implementation = speed.optimizer_implementation
    groups, fixed_groups = predictor_param_groups(model.weight_parameters(), model.nasiam.predictor,
                                                  plan.fix_predictor_lr)
    weight_optimizer, fixed_groups = build_weight_optimizer(
        opt.optimizer, groups, opt.lr, opt.weight_decay, opt.momentum, implementation, fixed_groups,
        opt.trust_coefficient, opt.trust_clip)
    arch_optimizer = build_arch_optimizer(model, plan.arch_optimizer, plan.arch_lr, plan.arch_weight_decay,
                                          implementation, betas=plan.arch_betas)
    model, weight_optimizer, arch_optimizer = accelerator.prepare(model, weight_optimizer, arch_optimizer)
    total_steps = opt.total_steps(train_feed)
    scheduler = accelerator.prepare(build_cosine_schedule(
        weight_optimizer, accelerator, opt.warmup_epochs, train_feed.updates_in_epoch(0), total_steps, fixed_groups))
    supernet = accelerator.unwrap_model(model)
    start_tracking(accelerator, command, "nasiam-search")

    checkpointer = Checkpointer(accelerator, run.output_dir, run.checkpoints_total_limit, model=supernet,
                                image_processor=processor, before_first_save=output.write_record)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "val_epoch": 0, "val_step": 0,
             "history": {"ops": list(config.search_ops), "epochs": []}, "running": [0.0, 0.0, 0.0, 0, 0]}
    state = checkpointer.resume(output.resume_from, state)
    restore_positions(state, {"train": train_feed, "val": val_feed})
    # the run's size now, its projected time after a few updates, its checkpoints' disk use at the first one
    budget = run_budget(accelerator, "search", command, opt, train_feed, total_steps, state["global_step"],
                        num_samples(train_half), note="plus as many images of the validation half for the alpha steps")
    logging_every = logging_interval(run.logging_steps, total_steps)
    state["history"]["updates_per_epoch"] = train_feed.updates_in_epoch(0)
    # a run of under two epochs is plotted against updates: its logged steps also keep the op weights
    short = budget.size.epochs_of(total_steps) is not None and budget.size.epochs_of(total_steps) < 2

    sums = DeviceSums(4)  # train loss, val loss, collapse std, bad images of the updates not yet folded in

    def fold_sums() -> list[float] | None:
        return sums.fold_into(state["running"])

    def on_epoch_end(epoch: int) -> None:
        fold_sums()
        running = state["running"]
        means = mean_over_ranks(accelerator, [r / max(running[-1], 1) for r in running[:3]])
        eigenvalue = alpha_hessian_top_eigenvalue(supernet, probe_batches()) if variant.hessian_due(epoch) else None
        record = search_epoch_record(supernet, epoch, *means, lr=scheduler.get_last_lr()[0], schedule=schedule,
                                     hessian_eigenvalue=eigenvalue, step=state["global_step"])
        report_bad_images(accelerator, record, running[3], epoch)
        state["history"]["epochs"].append(record)
        state["running"] = [0.0, 0.0, 0.0, 0, 0]
        if command.tracking.with_tracking:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(Path(run.output_dir) / "search_history.json", state["history"])

    val_iter = cycle_batches(val_feed, state, "val")
    pusher = checkpoint_pusher(command.hub) if accelerator.is_main_process else None
    loop = StepLoop(accelerator, train_feed, state, total_steps, checkpointer, run.checkpoint_every, on_epoch_end,
                    desc="search", before_save=fold_sums,
                    after_save=budget.after_save(pusher.submit if pusher else None),
                    epochs=None if opt.max_train_steps else opt.epochs, other_feeds={"val": val_feed})
    model.train()
    schedule = apply_schedule(supernet, variant, state["global_step"] / total_steps)
    budget.announce()
    for epoch, train_batches in budget.track(loop):
        lr_used = scheduler.get_last_lr()[0]  # this update's rate (the scheduler steps inside)
        progress = state["global_step"] / total_steps
        schedule = apply_schedule(supernet, variant, progress)  # DARTS-: this update's skip weight
        # what goes wrong with this rank's validation data waits for the update's decision, the training
        # micro-batches standing in meanwhile (the other ranks are about to enter the forwards' collectives)
        try:
            val_batches = [next(val_iter) for _ in train_batches]
        except Exception as error:  # noqa: BLE001 - e.g. a bad image: decided by every rank together
            loop.guard.data_failed(error)
            val_batches = list(train_batches)
        if any(b is None for b in val_batches):  # an epoch of this rank's validation share gave no batch
            loop.guard.missing_validation()
            val_batches = list(train_batches)
        bad = bad_image_count(train_batches)
        if on_device:
            train_batches = [train_views(b) for b in train_batches]
            val_batches = [val_views(b) for b in val_batches]
        a_out = alpha_step(supernet, val_batches, arch_optimizer, accelerator, guard=loop.guard,
                           objective=lambda loss: alpha_objective(loss, supernet, variant, progress))
        momentum = momentum_for_step(config, state["global_step"], total_steps)
        w_out = weight_step(model, train_batches, weight_optimizer, scheduler, accelerator, momentum,
                            guard=loop.guard, max_grad_norm=opt.max_grad_norm)
        sums.add(mean_loss(w_out), mean_loss(a_out), w_out[-1].collapse_std, bad)
        if (state["global_step"] + 1) % logging_every == 0:
            means = fold_sums()
            state["history"].setdefault("steps", []).append(
                {"step": state["global_step"] + 1, "train_loss": means[0], "val_loss": means[1],
                 "lr": lr_used, **({"op_weights": supernet.op_weights()} if short else {})})
            loop.set_postfix(loss=f"{means[0]:.3f}", val=f"{means[1]:.3f}",
                             genotype=genotype_summary(supernet.genotype()))

    apply_schedule(supernet, variant, 1.0)  # DARTS-: the skip is gone when the genotype is read off
    discretization = derive_genotype(supernet, variant,
                                     probe_batches() if variant.discretization == "perturbation" else None)
    confidence = genotype_confidence(
        supernet.op_weights(), config.search_ops, discretization.genotype,
        discretization.table if variant.discretization == "perturbation" else None)
    state["history"]["genotype"] = discretization.genotype
    state["history"]["discretization"] = discretization.to_dict()
    state["history"]["confidence"] = confidence
    outcome = budget.outcome(state["global_step"], learning_rate=opt.lr, base_learning_rate=opt.base_lr,
                             mixed_precision=accelerator.mixed_precision)
    if accelerator.is_main_process:
        output.write_record()
        final = write_search_outputs(supernet, state["history"], run.output_dir, command, plan,
                                     genotype=discretization.genotype, starting_point=starting_point,
                                     confidence=confidence, outcome=outcome)
        accelerator.print(f"genotype: projector {final.projector_genotype}, predictor {final.predictor_genotype}")
        for line in describe_confidence(confidence):
            accelerator.print(f"  {line}")
        warning = undecided_warning(confidence, config.framework)
        if warning:
            accelerator.print(warning)
        accelerator.print(f"search outputs written to {run.output_dir}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if pusher is not None:
            pusher.wait()
        push_run_folder(command.hub, run.output_dir, "Upload NASiam search")
    accelerator.end_training()
    return supernet
