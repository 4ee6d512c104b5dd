"""Fine-tuning a NASiam backbone for image classification (the engine of ``nasiam-finetune``).

``NASiamForImageClassification.from_pretrained(--model_name_or_path)`` with the dataset's labels, then SGD (momentum
0.9, cosine schedule with optional warmup, learning rate scaled by ``global batch / 256``) on light augmentation
(random crop + flip), evaluated every epoch on the un-augmented evaluation split. The classifier's learning rate is
``--classifier_lr_multiplier`` times the backbone's (a new layer next to pretrained ones); ``--freeze_backbone``
trains the classifier alone with the backbone's BatchNorm statistics frozen (a linear probe on images).

SGD rather than AdamW: it is what the ResNet literature and NASiam's own evaluations use for ResNets, and the same
recipe then serves both full fine-tuning and the frozen probe.

Outputs in ``--output_dir``: the classifier (``config.json`` with ``id2label``, ``model.safetensors``), its image
processor, ``finetune_history.json``, ``eval_results.json`` (``{"fine_tuning": {...}}``), ``training_args.json`` and a
model card; resumable checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .arguments import FinetuneCommand
from .budget import logging_interval, run_budget
from .checkpoints import Checkpointer
from .configuration_nasiam import NASiamConfig
from .feeds import LoaderFeed
from .evaluation import binomial_stderr, describe_accuracy, few_queries_warning, wilson_interval
from .fileio import atomic_write_json, read_json, staged_files
from .folders import require_model
from .processing import image_processor_for_splits
from .optimization import build_cosine_schedule, build_weight_optimizer
from .loop import StepLoop
from .run_lock import releases_output_dir
from .trainer import mean_over_ranks, prepare_model_layout, start_run, start_tracking

HISTORY_FILE = "finetune_history.json"
EVAL_RESULTS_FILE = "eval_results.json"


def load_classifier(model_name_or_path: str, num_labels: int, id2label: dict[int, str], label2id: dict[str, int],
                    **kwargs):
    """``NASiamForImageClassification.from_pretrained`` with new labels: backbone kept, classifier new unless the
    folder holds one of the same shape (a classifier of another size is replaced, not an error)."""
    from .modeling_nasiam import NASiamForImageClassification

    return NASiamForImageClassification.from_pretrained(
        model_name_or_path, num_labels=num_labels, id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True, **kwargs,
    )


def build_finetune_optimizer(model, lr: float, weight_decay: float, classifier_lr_multiplier: float,
                             momentum: float = 0.9, implementation: str = "auto", optimizer: str = "sgd",
                             trust_coefficient: float | None = None, trust_clip: bool | None = None
                             ) -> torch.optim.Optimizer:
    """SGD (or LARS, :func:`~.optimization.build_weight_optimizer`) over the trainable parameters: the backbone at
    ``lr`` (absent when frozen), the classifier at ``lr * classifier_lr_multiplier``."""
    classifier = [p for p in model.classifier.parameters() if p.requires_grad]
    classifier_ids = {id(p) for p in classifier}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in classifier_ids]
    groups = []
    if backbone:
        groups.append({"params": backbone, "lr": lr})
    groups.append({"params": classifier, "lr": lr * classifier_lr_multiplier})
    return build_weight_optimizer(optimizer, groups, lr, weight_decay, momentum, implementation,
                                  trust_coefficient=trust_coefficient, trust_clip=trust_clip)[0]


@torch.no_grad()
def evaluate_accuracy(model, loader, accelerator) -> dict[str, float | None]:
    """Top-1 (and top-5 with at least 5 classes) accuracy in % and mean loss over ``loader``, gathered from every
    rank with ``gather_for_metrics`` (duplicates of the last batch dropped)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        for batch in loader:
            with accelerator.autocast():
                logits = model(pixel_values=batch["pixel_values"]).logits
            logits, labels = accelerator.gather_for_metrics((logits.float().contiguous(), batch["labels"]))
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(dim=1).sum().item()
            seen += labels.numel()
    finally:
        model.train(was_training)
    num_labels = accelerator.unwrap_model(model).config.num_labels
    top1 = 100.0 * correct1 / max(seen, 1)
    low, high = wilson_interval(top1, seen)
    return {
        "top1": top1,
        "top5": 100.0 * correct5 / max(seen, 1) if num_labels >= 5 else None,
        "loss": loss_sum / max(seen, 1),
        "samples": seen,
        "num_queries": seen,
        "top1_stderr": binomial_stderr(top1, seen),
        "top1_ci95": [low, high],
    }


def _hub_model_id(path: str) -> str | None:
    """The base model for the card's metadata: only a Hub id, never a local path."""
    return None if os.path.exists(path) or path.count("/") != 1 else path


def classification_step(model, batches: list[dict], optimizer, scheduler, accelerator, guard,
                        max_grad_norm: float | None = None) -> list:
    """One optimizer update of the classifier from the micro-batches of one update; returns their outputs.
    ``guard``: the update's :class:`~nasiam_hf.loop.UpdateGuard` (decides after the last forward, before its
    backward, as :func:`~nasiam_hf.optimization.weight_step` does)."""
    outputs = []
    for i, batch in enumerate(batches):
        with accelerator.accumulate(model):
            guard.before_micro_batch()
            with accelerator.autocast():
                out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            loss = guard.watch(out.loss)
            if i == len(batches) - 1:
                guard.decide()
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            outputs.append(out)
    return outputs


@releases_output_dir
def run_finetune(command: FinetuneCommand) -> Path:
    """Fine-tune ``--model_name_or_path`` on the labelled data; the classifier folder is ``--output_dir``."""
    from .data import make_loader, view_dataset_for
    from .hub.push import checkpoint_pusher, push_run_folder
    from .plans import plan_finetune

    run, data, speed = command.run, command.data, command.speed
    if data.streaming:
        raise ValueError("--streaming is not supported by nasiam-finetune: it needs the labelled set as a dataset; "
                         "pass the data without --streaming")
    require_model(command.model.model_name_or_path, purpose="fine-tuning")
    # at the resolution the model was trained at, unless told otherwise
    trained_at = NASiamConfig.from_pretrained(command.model.model_name_or_path).image_size
    accelerator, output, splits = start_run(command, require_labels=True, image_size=data.image_size or trained_at)
    plan = plan_finetune(command, accelerator.num_processes)
    opt = plan.optimization
    model = load_classifier(command.model.model_name_or_path, splits.num_labels, splits.id2label, splits.label2id)
    config = model.config
    if config.backbone_kind == "torchvision" and config.cifar_stem != (splits.policy == "cifar"):
        accelerator.print(
            f"warning: the backbone has the {'CIFAR' if config.cifar_stem else 'ImageNet'} stem but the data follows "
            f"the {splits.policy} policy ({splits.image_size}px); features may transfer poorly"
        )
    config.image_size = splits.image_size
    if command.model.freeze_backbone:
        model.freeze_backbone()
    model = prepare_model_layout(model, accelerator, command.precision.channels_last, speed.torch_compile)

    batch, workers = opt.per_device_batch, data.dataloader_num_workers
    on_device = speed.augmentation_device == "accelerator"
    # on the device: the loader only decodes and the light views are drawn per batch, seeded per sample
    make_view = splits.batch_augmenter("eval" if data.no_augmentation else "light", run.seed,
                                       num_views=1) if on_device else None
    train_set = view_dataset_for(splits, "train", "light", seed=run.seed, augment=not data.no_augmentation,
                                 mode="decode" if on_device else None)
    train_loader = make_loader(train_set, batch, shuffle=True, seed=run.seed, drop_last=len(train_set) > batch,
                               num_workers=workers)
    eval_loader = None
    if splits.eval is not None:
        eval_loader = make_loader(view_dataset_for(splits, "eval", "eval"),
                                  command.optimization.per_device_eval_batch_size, shuffle=False, num_workers=workers)
    else:
        accelerator.print("no evaluation split found: accuracy is not measured (pass --validation_file/_dir)")

    optimizer = build_finetune_optimizer(model, opt.lr, opt.weight_decay, plan.classifier_lr_multiplier,
                                         implementation=speed.optimizer_implementation, optimizer=opt.optimizer,
                                         trust_coefficient=opt.trust_coefficient, trust_clip=opt.trust_clip)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eval_size = len(splits.eval) if splits.eval is not None else 0
    accelerator.print(
        f"finetune data: {len(splits.train)} train images of the {splits.train_source}, "
        + (f"{eval_size} eval images of the {splits.eval_source}" if eval_size else "no eval images")
        + f", {splits.num_labels} classes ({', '.join(list(map(str, splits.id2label.values()))[:10])}"
        + (", ..." if splits.num_labels > 10 else "") + ")"
    )
    if eval_size:
        few = few_queries_warning(eval_size, "fine-tuning top-1", data.max_eval_samples)
        if few:
            accelerator.print(few)
    accelerator.print(
        f"finetune: {config.backbone} ({'frozen' if command.model.freeze_backbone else 'trained'} backbone), "
        f"{trainable:,} trainable parameters, {opt.describe()} (classifier x{plan.classifier_lr_multiplier:g})"
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    train_feed = LoaderFeed(train_loader, accelerator, opt.accumulation, batch)
    total_steps = opt.total_steps(train_feed)
    scheduler = accelerator.prepare(
        build_cosine_schedule(optimizer, accelerator, opt.warmup_epochs, train_feed.updates_in_epoch(0), total_steps)
    )
    start_tracking(accelerator, command, "nasiam-finetune")

    checkpointer = Checkpointer(accelerator, run.output_dir, run.checkpoints_total_limit,
                                model=accelerator.unwrap_model(model),
                                image_processor=image_processor_for_splits(splits),
                                before_first_save=output.write_record)
    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "running": [0.0, 0, 0, 0],
                             "history": {"epochs": []}}
    state = checkpointer.resume(output.resume_from, state)
    output_dir = Path(run.output_dir)
    timer = {"start": time.perf_counter()}
    # the run's size now, its projected time after a few updates, its checkpoints' disk use at the first one
    budget = run_budget(accelerator, "finetune", command, opt, train_feed, total_steps, state["global_step"],
                        len(splits.train))
    logging_every = logging_interval(run.logging_steps, total_steps)

    def on_epoch_end(epoch: int) -> None:
        loss_sum, steps, correct, seen = state["running"]
        loss, accuracy = mean_over_ranks(accelerator, [loss_sum / max(steps, 1), correct / max(seen, 1)])
        record = {"epoch": epoch, "step": state["global_step"], "loss": loss, "train_top1": 100.0 * accuracy,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - timer["start"]}
        if eval_loader is not None:
            metrics = evaluate_accuracy(model, eval_loader, accelerator)
            record.update({"eval_top1": metrics["top1"], "eval_top5": metrics["top5"], "eval_loss": metrics["loss"],
                           "eval_num_queries": metrics["num_queries"], "eval_top1_stderr": metrics["top1_stderr"],
                           "eval_top1_ci95": metrics["top1_ci95"]})
        state["history"]["epochs"].append(record)
        state["running"] = [0.0, 0, 0, 0]
        accelerator.print(
            f"epoch {epoch}: loss {record['loss']:.4f}, train top-1 {record['train_top1']:.2f}%"
            + (f", eval top-1 {describe_accuracy(record['eval_top1'], record['eval_num_queries'])}"
               if "eval_top1" in record else "")
        )
        if command.tracking.with_tracking:
            accelerator.log({k: v for k, v in record.items() if k != "epoch" and v is not None},
                            step=state["global_step"])
        if accelerator.is_main_process:
            atomic_write_json(output_dir / HISTORY_FILE, state["history"])
        timer["start"] = time.perf_counter()

    pusher = checkpoint_pusher(command.hub) if accelerator.is_main_process else None
    loop = StepLoop(accelerator, train_feed, state, total_steps, checkpointer, run.checkpoint_every, on_epoch_end,
                    desc="finetune", after_save=budget.after_save(pusher.submit if pusher else None),
                    epochs=None if opt.max_train_steps else opt.epochs)
    model.train()
    budget.announce()
    for epoch, batches in budget.track(loop):
        lr_used = scheduler.get_last_lr()[0]  # this update's rate (the scheduler steps inside)
        if make_view is not None:
            batches = [make_view(b) for b in batches]
        outs = classification_step(model, batches, optimizer, scheduler, accelerator,
                                   guard=loop.guard, max_grad_norm=opt.max_grad_norm)
        loss_value = sum(out.loss.item() for out in outs) / len(outs)
        state["running"][0] += loss_value
        state["running"][1] += 1
        for out, batch_data in zip(outs, batches):
            state["running"][2] += (out.logits.argmax(dim=1) == batch_data["labels"]).sum().item()
            state["running"][3] += batch_data["labels"].numel()
        loop.set_postfix(loss=f"{loss_value:.4f}")
        if (state["global_step"] + 1) % logging_every == 0:
            state["history"].setdefault("steps", []).append(
                {"step": state["global_step"] + 1, "loss": loss_value, "lr": lr_used})

    outcome = budget.outcome(state["global_step"], learning_rate=opt.lr, base_learning_rate=opt.base_lr,
                             mixed_precision=accelerator.mixed_precision)
    if accelerator.is_main_process:
        output.write_record()
        results = write_finetune_outputs(accelerator.unwrap_model(model), state["history"], output_dir, command,
                                         plan, splits, outcome)
        tuned = (results or {}).get("fine_tuning")
        if tuned:
            accuracy = describe_accuracy(tuned["top1"], tuned["num_queries"])
            accelerator.print(f"fine-tuning accuracy on the {tuned['split']} split after {tuned['updates']} updates "
                              f"({tuned['epochs']:.4g} epochs): top-1 {accuracy}"
                              + (f", top-5 {tuned['top5']:.2f}%" if tuned.get("top5") is not None else ""))
        accelerator.print(f"classifier saved to {output_dir} (AutoModelForImageClassification.from_pretrained)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if pusher is not None:
            pusher.wait()
        push_run_folder(command.hub, output_dir, "Upload fine-tuned NASiam classifier")
    accelerator.end_training()
    return output_dir


def finetune_eval_results(history: dict, command: FinetuneCommand, splits,
                          outcome: dict | None = None) -> dict | None:
    """``{"fine_tuning": {...}}`` from the last epoch with an evaluation (None when nothing was evaluated): top-1 with
    its standard error and number of queries, and the updates and (fractional) epochs the run did."""
    evaluated = [r for r in history.get("epochs", []) if r.get("eval_top1") is not None]
    if not evaluated:
        return None
    last = evaluated[-1]
    data = command.data
    if data.eval_split:
        split = data.eval_split
    elif data.validation_file or data.validation_dir or splits.name == "ILSVRC/imagenet-1k":
        split = "validation"  # a separate evaluation set, or ImageNet (whose test split has no labels)
    else:
        split = "test"
    updates = last.get("step", (outcome or {}).get("updates"))
    per_epoch = (outcome or {}).get("updates_per_epoch")
    epochs = updates / per_epoch if per_epoch and updates is not None else len(history["epochs"])
    result = {"top1": last["eval_top1"], "top5": last.get("eval_top5"),
              "num_queries": last.get("eval_num_queries"), "top1_stderr": last.get("eval_top1_stderr"),
              "top1_ci95": last.get("eval_top1_ci95"), "dataset_name": splits.name, "split": split,
              "epochs": round(float(epochs), 4), "updates": updates,
              "frozen_backbone": bool(command.model.freeze_backbone),
              "base_model": command.model.model_name_or_path}
    return {"fine_tuning": result}


def write_finetune_outputs(model, history: dict, output_dir: Path, command: FinetuneCommand, plan, splits,
                           outcome: dict | None = None) -> dict | None:
    """The classifier folder: weights and config, image processor, history, eval results, arguments (with what the
    run did), model card (an image-classification card with a Fine-tuning section). Returns the eval results."""
    from .hub import model_name_of, save_run_metadata, write_model_card
    from .processing import save_image_processor

    eval_results = finetune_eval_results(history, command, splits, outcome)
    with staged_files(output_dir) as staged:  # together: the old classifier or the new one, never a mix
        model.save_pretrained(staged)
        save_image_processor(staged, splits)
        atomic_write_json(staged / HISTORY_FILE, history)
        if eval_results is not None:
            atomic_write_json(staged / EVAL_RESULTS_FILE, eval_results)
        record = save_run_metadata(staged, command, command=command.name, resolved=plan.to_dict(), outcome=outcome)
        classifier = {"labels": list(splits.id2label.values()), "num_labels": splits.num_labels,
                      "dataset_name": splits.name, "frozen_backbone": bool(command.model.freeze_backbone)}
        write_model_card(staged, model.config, training_args=read_json(record), eval_results=eval_results,
                         dataset_name=splits.name, base_model=_hub_model_id(command.model.model_name_or_path),
                         model_name=model_name_of(command.run.output_dir, command.hub.hub_model_id),
                         repo_id=command.hub.hub_model_id, classifier=classifier)
    return eval_results


__all__ = [
    "build_finetune_optimizer",
    "evaluate_accuracy",
    "finetune_eval_results",
    "load_classifier",
    "run_finetune",
    "write_finetune_outputs",
]
