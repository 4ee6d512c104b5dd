"""Self-supervised pretraining of a NASiam model from a genotype, with a kNN monitor and the collapse statistic."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from accelerate import Accelerator

from .configuration_nasiam import NASiamConfig, check_preset
from .fileio import atomic_write_json, read_json
from .modeling_nasiam import NASiamForPreTraining
from .presets import PRESETS, RECIPES
from .search import build_weight_optimizer, momentum_for_step, weight_step
from .trainer import (
    Checkpointer, DeviceSums, StepLoop, build_cosine_schedule, check_finite, guard_output_dir, make_accelerator,
    mean_over_ranks, prepare_model_layout, scaled_lr, start_tracking,
)

logger = logging.getLogger(__name__)


def resolve_model_config(genotype: str, *, backbone: str | None = None, image_size: int | None = None,
                         cifar_stem: bool | None = None, **method_overrides) -> NASiamConfig:
    """The config to pretrain: from a search output folder, a paper preset, or ``<framework>-baseline``."""
    overrides = {k: v for k, v in method_overrides.items() if v is not None}
    if image_size is not None:
        overrides["image_size"] = image_size
    if cifar_stem is not None:
        overrides["cifar_stem"] = cifar_stem
    if backbone is not None:
        overrides["backbone"] = backbone
    if os.path.isdir(genotype):
        values = NASiamConfig.from_pretrained(genotype).to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "stage_names",
                    "out_features", "out_indices"):
            values.pop(key, None)
        if backbone is not None and backbone != values.get("backbone"):
            values.pop("projector_hidden_size", None)  # re-derive the width of the new backbone
        values.update(overrides)
        return NASiamConfig(**values)
    if genotype in PRESETS:
        return NASiamConfig(**{**check_preset(genotype), **overrides})
    raise ValueError(
        f"--genotype {genotype!r} is neither a search output folder nor a preset; presets: {sorted(PRESETS)}"
    )


def apply_recipe(args: argparse.Namespace, policy: str) -> None:
    """Fill the flags left unset from the CIFAR or ImageNet recipe (DESIGN.md facts)."""
    name = args.recipe or ("imagenet" if policy == "imagenet" else "cifar")
    recipe = RECIPES[name]
    pretrain = dict(recipe["pretrain"])
    framework_recipe = recipe.get(args.framework_hint, {}) if getattr(args, "framework_hint", None) else {}
    for flag, key in (("num_train_epochs", "epochs"), ("learning_rate", "lr"), ("weight_decay", "weight_decay"),
                      ("per_device_train_batch_size", "batch_size")):
        if getattr(args, flag) is None:
            setattr(args, flag, framework_recipe.get(key, pretrain[key]))
    args.recipe = name


def build_pretraining_optimizer(model: NASiamForPreTraining, lr: float, weight_decay: float, fix_predictor_lr: bool,
                                implementation: str = "auto"):
    """SGD over backbone + heads; SimSiam's predictor may keep a fixed lr (its own param group, index 1).
    ``implementation`` picks the optimizer kernels (:func:`~.trainer.build_optimizer`)."""
    predictor = model.nasiam.predictor
    predictor_ids = {id(p) for p in predictor.parameters()} if (predictor is not None and fix_predictor_lr) else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in predictor_ids]}]
    if predictor_ids:
        groups.append({"params": [p for p in trainable if id(p) in predictor_ids]})
    optimizer = build_weight_optimizer(groups, lr, weight_decay, implementation=implementation)
    return optimizer, ((1,) if predictor_ids else ())


class CollapseWatch:
    """Warns when the collapse statistic stays below ``threshold / sqrt(dim)`` for ``patience`` epochs in a row."""

    def __init__(self, reference: float, threshold: float, patience: int):
        self.limit, self.threshold, self.patience, self.low = reference * threshold, threshold, patience, 0

    def update(self, value: float, accelerator: Accelerator) -> bool:
        self.low = self.low + 1 if value < self.limit else 0
        if self.low >= self.patience:
            accelerator.print(
                f"warning: the collapse statistic has stayed below {self.limit:.4f} for {self.low} epochs "
                f"(now {value:.4f}; well-spread outputs give about {self.limit / self.threshold:.4f}): the "
                "representation may be collapsing. Check the augmentation, lower the learning rate, or try another "
                "genotype."
            )
            return True
        return False


def run_pretrain(args: argparse.Namespace) -> NASiamForPreTraining:
    """The whole pretraining: data, model, steps, kNN monitor, checkpoints, the saved model folder.

    Returns the trained model (unwrapped; the model folder is ``args.output_dir``).
    """
    from .data import make_loader, splits_from_args, view_dataset_for
    from .evaluation import evaluate_knn
    from .hub import push_folder_to_hub

    accelerator = make_accelerator(args)
    splits = splits_from_args(args)
    config = resolve_model_config(
        args.genotype, backbone=args.backbone, image_size=splits.image_size, cifar_stem=splits.policy == "cifar",
        temperature=args.temperature, queue_size=args.queue_size, momentum=args.momentum,
    )
    args.framework_hint = config.framework
    apply_recipe(args, splits.policy)
    guard_output_dir(args, accelerator)
    batch = args.per_device_train_batch_size
    workers = args.dataloader_num_workers
    on_device = args.augmentation_device == "accelerator"
    # on the device: the loader only decodes, and the views are drawn per batch, seeded per sample
    make_views = splits.batch_augmenter("eval" if args.no_augmentation else "ssl", args.seed) if on_device else None
    train_loader = make_loader(view_dataset_for(splits, "train", "ssl", seed=args.seed,
                                                augment=not args.no_augmentation,
                                                mode="decode" if on_device else None),
                               batch, shuffle=True, seed=args.seed, drop_last=True, num_workers=workers)
    knn_loaders = None
    if args.knn_every > 0 and splits.eval is not None:
        eval_batch = args.per_device_eval_batch_size
        knn_loaders = (
            make_loader(view_dataset_for(splits, "train", "eval"), eval_batch, shuffle=False, num_workers=workers),
            make_loader(view_dataset_for(splits, "eval", "eval"), eval_batch, shuffle=False, num_workers=workers),
        )
    elif args.knn_every > 0:
        accelerator.print("no evaluation split found: the kNN monitor is off (pass --validation_file/--validation_dir)")

    model = prepare_model_layout(NASiamForPreTraining(config), accelerator, args.channels_last,
                                 args.torch_compile)
    global_batch = batch * accelerator.num_processes
    lr = scaled_lr(args.learning_rate, global_batch)
    fix_predictor = config.framework == "simsiam" and not args.no_fix_predictor_lr
    optimizer, fixed_groups = build_pretraining_optimizer(model, lr, args.weight_decay, fix_predictor,
                                                          args.optimizer_implementation)
    accelerator.print(
        f"pretrain: {config.framework} / {config.backbone} ({'CIFAR stem' if config.cifar_stem else 'ImageNet stem'}), "
        f"projector {config.genotype('projector')}"
        + (f", predictor {config.genotype('predictor')}" if config.has_predictor else "")
        + f"; {len(splits.train)} images, global batch {global_batch}, effective lr {lr:.4g} "
        f"(= {args.learning_rate} x {global_batch}/256), recipe {args.recipe}"
        + (", fixed predictor lr" if fixed_groups else "")
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if knn_loaders is not None:
        knn_loaders = accelerator.prepare(*knn_loaders)
    total_steps = args.max_train_steps or args.num_train_epochs * len(train_loader)
    scheduler = accelerator.prepare(
        build_cosine_schedule(optimizer, accelerator, args, len(train_loader), total_steps, fixed_groups)
    )
    core = accelerator.unwrap_model(model)
    start_tracking(accelerator, args, "nasiam-pretrain")

    checkpointer = Checkpointer(accelerator, args.output_dir, args.checkpoints_total_limit)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "running": [0.0, 0.0, 0], "low_collapse_epochs": 0,
             "history": {"epochs": [], "collapse_reference": config.collapse_floor, "framework": config.framework}}
    state = checkpointer.resume(args.resume_from_checkpoint, state)
    watch = CollapseWatch(config.collapse_floor, args.collapse_threshold, args.collapse_patience)
    watch.low = state["low_collapse_epochs"]
    output_dir = Path(args.output_dir)
    timer = {"start": time.perf_counter(), "steps": 0}

    sums = DeviceSums(2)  # loss and collapse std of the steps not yet folded into state["running"]
    log_every = args.logging_steps

    def fold_sums() -> list[float] | None:
        return sums.fold_into(state["running"])

    def on_epoch_end(epoch: int) -> None:
        fold_sums()
        running = state["running"]
        steps = max(running[2], 1)
        loss, collapse = mean_over_ranks(accelerator, [running[0] / steps, running[1] / steps])
        elapsed = time.perf_counter() - timer["start"]
        record = {"epoch": epoch, "loss": loss, "collapse_std": collapse, "lr": scheduler.get_last_lr()[0],
                  "images_per_second": timer["steps"] * global_batch / max(elapsed, 1e-9)}
        last_epoch = state["global_step"] >= total_steps
        if knn_loaders is not None and ((epoch + 1) % args.knn_every == 0 or last_epoch):
            knn = evaluate_knn(core.nasiam.backbone, *knn_loaders, accelerator, splits.num_labels,
                               k=args.knn_k, temperature=args.knn_temperature)
            record.update({f"knn_{key}": value for key, value in knn.items()})
            model.train()
        state["history"]["epochs"].append(record)
        state["running"] = [0.0, 0.0, 0]
        watch.update(collapse, accelerator)
        state["low_collapse_epochs"] = watch.low
        accelerator.print(
            f"epoch {epoch}: loss {loss:.4f}, collapse std {collapse:.4f} (healthy ~{config.collapse_floor:.4f})"
            + (f", kNN top-1 {record['knn_top1']:.2f}%" if "knn_top1" in record else "")
        )
        if args.with_tracking:
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(output_dir / "training_history.json", state["history"])
        timer.update(start=time.perf_counter(), steps=0)

    loop = StepLoop(accelerator, args, train_loader, state, total_steps, checkpointer, on_epoch_end, desc="pretrain",
                    before_save=fold_sums)
    model.train()
    for epoch, batch_views in loop:
        where = f"epoch {epoch}, step {state['global_step'] + 1}"
        if make_views is not None:
            batch_views = make_views(batch_views)
        momentum = momentum_for_step(config, state["global_step"], total_steps)
        out = weight_step(model, batch_views, optimizer, scheduler, accelerator, momentum,
                          guard=lambda loss: check_finite(loss, where, checkpointer))
        sums.add(out.loss, out.collapse_std)
        timer["steps"] += 1
        if (state["global_step"] + 1) % log_every == 0:
            means = fold_sums()
            loop.set_postfix(loss=f"{means[0]:.4f}", std=f"{means[1]:.4f}")

    if accelerator.is_main_process:
        write_pretraining_outputs(core, state["history"], output_dir, args, splits)
        accelerator.print(f"model saved to {output_dir} (load it with NASiamModel.from_pretrained)")
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
        push_folder_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.end_training()
    return core


def write_pretraining_outputs(model: NASiamForPreTraining, history: dict, output_dir: Path,
                              args: argparse.Namespace, splits) -> None:
    """The model folder (weights, config, processor), history, plots, arguments and the model card."""
    from .hub import plot_genotype, plot_training_history, save_run_metadata, write_model_card
    from .processing import save_image_processor

    model.nasiam.save_pretrained(output_dir)
    save_image_processor(output_dir, splits)
    atomic_write_json(output_dir / "training_history.json", history)
    save_run_metadata(output_dir, args)
    plot_training_history(history, output_dir)
    plot_genotype(model.config, output_dir / "genotype.png")
    eval_path = output_dir / "eval_results.json"
    eval_results = read_json(eval_path) if eval_path.exists() else None
    write_model_card(output_dir, model.config, training_args=vars(args), eval_results=eval_results, history=history,
                     dataset_name=splits.name)
