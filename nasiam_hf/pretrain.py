"""Self-supervised pretraining of a NASiam model from a genotype, with a kNN monitor and the collapse statistic."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from accelerate import Accelerator

from .arguments import PretrainCommand
from .configuration_nasiam import NASiamConfig
from .checkpoints import Checkpointer
from .fileio import atomic_write_json, read_json, staged_files
from .modeling_nasiam import NASiamForPreTraining
from .optimization import build_cosine_schedule, build_sgd, momentum_for_step, predictor_param_groups, weight_step
from .plans import PretrainPlan, check_pretrain_flags, plan_pretrain
from .processing import image_processor_for_splits
from .trainer import (
    DeviceSums, StepLoop, check_finite, due, guard_output, make_accelerator, mean_over_ranks, prepare_model_layout,
    start_tracking,
)

logger = logging.getLogger(__name__)


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


def run_pretrain(command: PretrainCommand) -> NASiamForPreTraining:
    """The whole pretraining: data, model, updates, kNN monitor, checkpoints, the saved model folder.

    Returns the trained model (unwrapped; the model folder is ``command.run.output_dir``).
    """
    from .data import make_loader, view_dataset_for
    from .data_loading import load_splits
    from .evaluation import KNNNeighbourhoodWarning, evaluate_knn
    from .hub.push import checkpoint_pusher, push_run_folder
    from .search import mean_loss

    check_pretrain_flags(command)
    command.data.require_source()
    run, data, speed, monitor = command.run, command.data, command.speed, command.monitor
    accelerator = make_accelerator(run.output_dir, run.seed, command.precision, command.tracking,
                                   command.optimization.gradient_accumulation_steps)
    output = guard_output(command, accelerator)
    splits = load_splits(data, run.seed)
    plan = plan_pretrain(command, splits.policy, splits.image_size, accelerator.num_processes)
    opt = plan.optimization
    config = NASiamConfig(**plan.config)
    batch, workers = opt.per_device_batch, data.dataloader_num_workers
    on_device = speed.augmentation_device == "accelerator"
    # on the device: the loader only decodes, and the views are drawn per batch, seeded per sample
    make_views = splits.batch_augmenter("eval" if data.no_augmentation else "ssl", run.seed) if on_device else None
    train_loader = make_loader(view_dataset_for(splits, "train", "ssl", seed=run.seed,
                                                augment=not data.no_augmentation,
                                                mode="decode" if on_device else None),
                               batch, shuffle=True, seed=run.seed, drop_last=True, num_workers=workers)
    knn_loaders = None
    knn_every = monitor.every
    if knn_every is not None and splits.eval is not None:
        eval_batch = command.optimization.per_device_eval_batch_size
        knn_loaders = (
            make_loader(view_dataset_for(splits, "train", "eval"), eval_batch, shuffle=False, num_workers=workers),
            make_loader(view_dataset_for(splits, "eval", "eval"), eval_batch, shuffle=False, num_workers=workers),
        )
    elif knn_every is not None:
        accelerator.print("no evaluation split found: the kNN monitor is off (pass --validation_file/--validation_dir)")

    model = prepare_model_layout(NASiamForPreTraining(config), accelerator, command.precision.channels_last,
                                 speed.torch_compile)
    groups, fixed_groups = predictor_param_groups(model.parameters(), model.nasiam.predictor, plan.fix_predictor_lr)
    optimizer = build_sgd(groups, opt.lr, opt.weight_decay, opt.momentum, implementation=speed.optimizer_implementation)
    accelerator.print(
        f"pretrain: {config.framework} / {config.backbone} ({'CIFAR stem' if config.cifar_stem else 'ImageNet stem'}), "
        f"projector {config.genotype('projector')}"
        + (f", predictor {config.genotype('predictor')}" if config.has_predictor else "")
        + f"; {len(splits.train)} images, {opt.describe()}" + (", fixed predictor lr" if fixed_groups else "")
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if knn_loaders is not None:
        knn_loaders = accelerator.prepare(*knn_loaders)
    steps_per_epoch = len(train_loader) // opt.accumulation
    total_steps = opt.total_steps(steps_per_epoch)
    scheduler = accelerator.prepare(
        build_cosine_schedule(optimizer, accelerator, opt.warmup_epochs, steps_per_epoch, total_steps, fixed_groups)
    )
    core = accelerator.unwrap_model(model)
    start_tracking(accelerator, command, "nasiam-pretrain")

    checkpointer = Checkpointer(accelerator, run.output_dir, run.checkpoints_total_limit, model=core,
                                image_processor=image_processor_for_splits(splits),
                                before_first_save=output.write_record)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "running": [0.0, 0.0, 0], "low_collapse_epochs": 0,
             "history": {"epochs": [], "collapse_reference": config.collapse_floor, "framework": config.framework}}
    state = checkpointer.resume(output.resume_from, state)
    watch = CollapseWatch(config.collapse_floor, command.pretrain.collapse_threshold,
                          command.pretrain.collapse_patience)
    watch.low = state["low_collapse_epochs"]
    output_dir = Path(run.output_dir)
    timer = {"start": time.perf_counter(), "steps": 0}

    sums = DeviceSums(2)  # loss and collapse std of the updates not yet folded into state["running"]

    def fold_sums() -> list[float] | None:
        return sums.fold_into(state["running"])

    def on_epoch_end(epoch: int) -> None:
        fold_sums()
        running = state["running"]
        steps = max(running[2], 1)
        loss, collapse = mean_over_ranks(accelerator, [running[0] / steps, running[1] / steps])
        elapsed = time.perf_counter() - timer["start"]
        record = {"epoch": epoch, "loss": loss, "collapse_std": collapse, "lr": scheduler.get_last_lr()[0],
                  "images_per_second": timer["steps"] * opt.global_batch / max(elapsed, 1e-9)}
        last_epoch = state["global_step"] >= total_steps
        if knn_loaders is not None and (due(knn_every, state["global_step"], epoch, True) or last_epoch):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", KNNNeighbourhoodWarning)
                knn = evaluate_knn(core.nasiam.backbone, *knn_loaders, accelerator, splits.num_labels,
                                   k=monitor.knn_k, temperature=monitor.knn_temperature)
            for warning in caught[:1] if not timer.get("knn_noted") else ():  # once per run, as one line
                accelerator.print(f"warning: {warning.message}")
                timer["knn_noted"] = True
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
        if command.tracking.with_tracking:
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(output_dir / "training_history.json", state["history"])
        timer.update(start=time.perf_counter(), steps=0)

    pusher = checkpoint_pusher(command.hub) if accelerator.is_main_process else None
    loop = StepLoop(accelerator, train_loader, state, total_steps, checkpointer, run.checkpoint_every, on_epoch_end,
                    desc="pretrain", before_save=fold_sums, accumulation=opt.accumulation,
                    after_save=pusher.submit if pusher else None)
    model.train()
    for epoch, batches in loop:
        where = f"epoch {epoch}, step {state['global_step'] + 1}"
        if make_views is not None:
            batches = [make_views(b) for b in batches]
        momentum = momentum_for_step(config, state["global_step"], total_steps)
        outs = weight_step(model, batches, optimizer, scheduler, accelerator, momentum,
                           guard=lambda loss: check_finite(loss, where, checkpointer), max_grad_norm=opt.max_grad_norm)
        sums.add(mean_loss(outs), outs[-1].collapse_std)
        timer["steps"] += 1
        if (state["global_step"] + 1) % run.logging_steps == 0:
            means = fold_sums()
            loop.set_postfix(loss=f"{means[0]:.4f}", std=f"{means[1]:.4f}")

    if accelerator.is_main_process:
        output.write_record()
        write_pretraining_outputs(core, state["history"], output_dir, command, plan, splits)
        accelerator.print(f"model saved to {output_dir} (load it with NASiamModel.from_pretrained)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if pusher is not None:
            pusher.wait()
        push_run_folder(command.hub, output_dir)
    accelerator.end_training()
    return core


def write_pretraining_outputs(model: NASiamForPreTraining, history: dict, output_dir: Path,
                              command: PretrainCommand, plan: PretrainPlan, splits) -> None:
    """The model folder (weights, config, processor), history, plots, the run record and the model card, published
    as one version (:func:`~nasiam_hf.fileio.staged_files`): a reader sees the old model or the new one."""
    from .hub import plot_genotype, plot_training_history, save_run_metadata, write_model_card
    from .processing import save_image_processor

    eval_path = output_dir / "eval_results.json"
    eval_results = read_json(eval_path) if eval_path.exists() else None
    with staged_files(output_dir) as staged:
        model.nasiam.save_pretrained(staged)
        save_image_processor(staged, splits)
        atomic_write_json(staged / "training_history.json", history)
        record = save_run_metadata(staged, command, command=command.name, resolved=plan.to_dict())
        plot_training_history(history, staged)
        plot_genotype(model.config, staged / "genotype.png")
        write_model_card(staged, model.config, training_args=read_json(record), eval_results=eval_results,
                         history=history, dataset_name=splits.name)
