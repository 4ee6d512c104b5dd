"""Self-supervised pretraining of a NASiam model from a genotype, with a kNN monitor and the collapse statistic."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from accelerate import Accelerator

from .arguments import PretrainCommand
from .budget import logging_interval, run_budget
from .configuration_nasiam import NASiamConfig
from .checkpoints import Checkpointer
from .fileio import atomic_write_json, read_json, staged_files
from .modeling_nasiam import NASiamForPreTraining
from .optimization import (
    build_cosine_schedule, build_weight_optimizer, momentum_for_step, predictor_param_groups, weight_step,
)
from .plans import PretrainPlan, check_pretrain_flags, genotype_source_record, plan_pretrain
from .feeds import num_samples, view_feed
from .loop import StepLoop, due, restore_positions
from .run_lock import releases_output_dir
from .trainer import (
    DeviceSums, bad_image_count, describe_backbone_of, describe_count, initialise_backbone, mean_over_ranks,
    prepare_model_layout, report_bad_images, start_run, start_tracking,
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


@releases_output_dir
def run_pretrain(command: PretrainCommand) -> NASiamForPreTraining:
    """The whole pretraining: data, model, updates, kNN monitor, checkpoints, the saved model folder.

    Returns the trained model (unwrapped; the model folder is ``command.run.output_dir``).
    """
    from .data import make_loader
    from .confidence import undecided_warning
    from .evaluation import KNNNeighbourhoodWarning, describe_accuracy, evaluate_knn, few_queries_warning
    from .hub.push import checkpoint_pusher, push_run_folder
    from .search import mean_loss

    backbone = check_pretrain_flags(command)
    run, data, speed, monitor = command.run, command.data, command.speed, command.monitor
    # eval data only for the kNN monitor
    accelerator, output, splits = start_run(command, with_eval=monitor.every is not None)
    plan = plan_pretrain(command, splits.policy, splits.image_size, accelerator.num_processes, backbone)
    opt = plan.optimization
    config = NASiamConfig(**plan.config)
    model = NASiamForPreTraining(config)
    splits, processor, starting_point = initialise_backbone(model, command.model.backbone_weights, splits, data,
                                                            accelerator, data.cache_dir)
    on_device = speed.augmentation_device == "accelerator"
    source = splits.stream if splits.streaming else splits.train
    train_feed, make_views = view_feed(accelerator, splits, source, batch_size=opt.per_device_batch, seed=run.seed,
                                       on_device=on_device, augment=not data.no_augmentation,
                                       workers=data.dataloader_num_workers, accumulation=opt.accumulation)
    knn_every, knn_loaders = monitor.every, None
    if knn_every is not None:  # labelled data when some is given; a seeded split of a lone labelled set; else off
        knn_sets = splits.knn_sets(run.seed)
        accelerator.print(knn_sets.note)
        if knn_sets.enabled:
            eval_batch = command.optimization.per_device_eval_batch_size
            knn_loaders = accelerator.prepare(*(make_loader(views, eval_batch, shuffle=False,
                                                            num_workers=data.dataloader_num_workers)
                                                for views in knn_sets.view_datasets(splits)))
            few = few_queries_warning(len(knn_sets.queries), "kNN monitor top-1", data.max_eval_samples)
            if few:
                accelerator.print(few)

    model = prepare_model_layout(model, accelerator, command.precision.channels_last, speed.torch_compile)
    groups, fixed_groups = predictor_param_groups(model.parameters(), model.nasiam.predictor, plan.fix_predictor_lr)
    optimizer, fixed_groups = build_weight_optimizer(
        opt.optimizer, groups, opt.lr, opt.weight_decay, opt.momentum, speed.optimizer_implementation, fixed_groups,
        opt.trust_coefficient, opt.trust_clip)
    accelerator.print(
        f"pretrain: {config.framework} / {describe_backbone_of(config)}, "
        f"projector {config.genotype('projector')}"
        + (f", predictor {config.genotype('predictor')}" if config.has_predictor else "")
        + f"; {describe_count(num_samples(source))} images, {opt.describe()}"
        + (", fixed predictor lr" if fixed_groups else "")
    )
    genotype_source = genotype_source_record(command.pretrain.genotype)
    warning = undecided_warning((genotype_source or {}).get("confidence"), config.framework,
                                source=command.pretrain.genotype)
    if warning:
        accelerator.print(warning)
    model, optimizer = accelerator.prepare(model, optimizer)
    total_steps = opt.total_steps(train_feed)
    scheduler = accelerator.prepare(build_cosine_schedule(
        optimizer, accelerator, opt.warmup_epochs, train_feed.updates_in_epoch(0), total_steps, fixed_groups))
    core = accelerator.unwrap_model(model)
    start_tracking(accelerator, command, "nasiam-pretrain")

    checkpointer = Checkpointer(accelerator, run.output_dir, run.checkpoints_total_limit, model=core,
                                image_processor=processor, before_first_save=output.write_record)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "running": [0.0, 0.0, 0.0, 0],
             "low_collapse_epochs": 0,
             "history": {"epochs": [], "collapse_reference": config.collapse_floor, "framework": config.framework}}
    state = checkpointer.resume(output.resume_from, state)
    restore_positions(state, {"train": train_feed})
    # the run's size now, its projected time after a few updates, its checkpoints' disk use at the first one
    budget = run_budget(accelerator, "pretrain", command, opt, train_feed, total_steps, state["global_step"],
                        num_samples(source))
    logging_every = logging_interval(run.logging_steps, total_steps)
    state["history"]["updates_per_epoch"] = train_feed.updates_in_epoch(0)
    watch = CollapseWatch(config.collapse_floor, command.pretrain.collapse_threshold,
                          command.pretrain.collapse_patience)
    watch.low = state["low_collapse_epochs"]
    output_dir = Path(run.output_dir)
    timer = {"start": time.perf_counter(), "steps": 0}

    sums = DeviceSums(3)  # loss, collapse std and bad images of the updates not yet folded into state["running"]

    def fold_sums() -> list[float] | None:
        return sums.fold_into(state["running"])

    noted = []  # the kNN neighbourhood warning is printed once per run

    def knn_accuracy() -> dict[str, float]:
        """The kNN monitor now: ``{"knn_top1": ..., "knn_top5": ..., "knn_k": ..., "knn_num_queries": ...,
        "knn_top1_stderr": ..., "knn_top1_ci95": [...]}``."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KNNNeighbourhoodWarning)
            knn = evaluate_knn(core.nasiam.backbone, *knn_loaders, accelerator, splits.num_labels,
                               k=monitor.knn_k, temperature=monitor.knn_temperature)
        if caught and not noted:
            accelerator.print(f"warning: {caught[0].message}")
            noted.append(True)
        model.train()
        return {f"knn_{key}": value for key, value in knn.items()}

    def knn_at_step(step: int) -> None:
        """``--knn_every Nsteps``: the monitor every N updates, recorded in ``history["knn_steps"]``."""
        result = {"step": step, **knn_accuracy()}
        state["history"].setdefault("knn_steps", []).append(result)
        accelerator.print(f"step {step}: kNN top-1 {describe_accuracy(result['knn_top1'], result['knn_num_queries'])}")

    def on_epoch_end(epoch: int) -> None:
        fold_sums()
        running = state["running"]
        steps = max(running[-1], 1)
        loss, collapse = mean_over_ranks(accelerator, [running[0] / steps, running[1] / steps])
        elapsed = time.perf_counter() - timer["start"]
        record = {"epoch": epoch, "step": state["global_step"], "loss": loss, "collapse_std": collapse,
                  "lr": scheduler.get_last_lr()[0],
                  "images_per_second": timer["steps"] * opt.global_batch / max(elapsed, 1e-9)}
        # the last epoch: its updates are done, or (a stream whose skipped images shortened it) it is the last one
        last_epoch = state["global_step"] >= total_steps or (opt.max_train_steps is None and opt.epochs is not None
                                                              and epoch == opt.epochs - 1)
        if knn_loaders is not None and (last_epoch or (knn_every[0] == "epochs"
                                                       and due(knn_every, state["global_step"], epoch, True))):
            record.update(knn_accuracy())
        report_bad_images(accelerator, record, running[2], epoch)
        state["history"]["epochs"].append(record)
        state["running"] = [0.0, 0.0, 0.0, 0]
        watch.update(collapse, accelerator)
        state["low_collapse_epochs"] = watch.low
        accelerator.print(
            f"epoch {epoch}: loss {loss:.4f}, collapse std {collapse:.4f} (healthy ~{config.collapse_floor:.4f})"
            + (f", kNN top-1 {describe_accuracy(record['knn_top1'], record['knn_num_queries'])}"
               if "knn_top1" in record else "")
        )
        if command.tracking.with_tracking:
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(output_dir / "training_history.json", state["history"])
        timer.update(start=time.perf_counter(), steps=0)

    pusher = checkpoint_pusher(command.hub) if accelerator.is_main_process else None
    loop = StepLoop(accelerator, train_feed, state, total_steps, checkpointer, run.checkpoint_every, on_epoch_end,
                    desc="pretrain", before_save=fold_sums,
                    after_save=budget.after_save(pusher.submit if pusher else None),
                    epochs=None if opt.max_train_steps else opt.epochs)
    model.train()
    budget.announce()
    for epoch, batches in budget.track(loop):
        lr_used = scheduler.get_last_lr()[0]  # this update's rate (the scheduler steps inside)
        bad = bad_image_count(batches)
        if make_views is not None:
            batches = [make_views(b) for b in batches]
        momentum = momentum_for_step(config, state["global_step"], total_steps)
        outs = weight_step(model, batches, optimizer, scheduler, accelerator, momentum, guard=loop.guard,
                           max_grad_norm=opt.max_grad_norm)
        sums.add(mean_loss(outs), outs[-1].collapse_std, bad)
        if knn_loaders is not None and knn_every[0] == "steps" and (state["global_step"] + 1) % knn_every[1] == 0:
            knn_at_step(state["global_step"] + 1)
        timer["steps"] += 1
        if (state["global_step"] + 1) % logging_every == 0:
            means = fold_sums()
            state["history"].setdefault("steps", []).append(
                {"step": state["global_step"] + 1, "loss": means[0], "collapse_std": means[1],
                 "lr": lr_used})
            loop.set_postfix(loss=f"{means[0]:.4f}", std=f"{means[1]:.4f}")

    outcome = budget.outcome(state["global_step"], learning_rate=opt.lr, base_learning_rate=opt.base_lr,
                             mixed_precision=accelerator.mixed_precision)
    if accelerator.is_main_process:
        output.write_record()
        write_pretraining_outputs(core, state["history"], output_dir, command, plan, splits, processor,
                                  starting_point, outcome=outcome, genotype_source=genotype_source)
        accelerator.print(f"model saved to {output_dir} (load it with NASiamModel.from_pretrained)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if pusher is not None:
            pusher.wait()
        push_run_folder(command.hub, output_dir)
    accelerator.end_training()
    return core


def write_pretraining_outputs(model: NASiamForPreTraining, history: dict, output_dir: Path,
                              command: PretrainCommand, plan: PretrainPlan, splits, processor,
                              starting_point: dict | None = None, outcome: dict | None = None,
                              genotype_source: dict | None = None) -> None:
    """The model folder (weights, config, processor), history, plots, the run record (with the run's ``outcome``
    and the genotype's source) and the model card, published together
    (:func:`~nasiam_hf.fileio.staged_files`): a reader sees the old model or the new one, never a mix."""
    from .hub import model_name_of, plot_genotype, plot_training_history, save_run_metadata, write_model_card

    eval_path = output_dir / "eval_results.json"
    eval_results = read_json(eval_path) if eval_path.exists() else None
    with staged_files(output_dir) as staged:
        model.nasiam.save_pretrained(staged)
        processor.save_pretrained(staged)
        atomic_write_json(staged / "training_history.json", history)
        record = save_run_metadata(staged, command, command=command.name, resolved=plan.to_dict(),
                                   starting_point=starting_point, outcome=outcome, genotype_source=genotype_source)
        plot_training_history(history, staged)
        plot_genotype(model.config, staged / "genotype.png")
        write_model_card(staged, model.config, training_args=read_json(record), eval_results=eval_results,
                         history=history, dataset_name=splits.name,
                         model_name=model_name_of(command.run.output_dir, command.hub.hub_model_id),
                         repo_id=command.hub.hub_model_id)
