"""Linear evaluation of a saved NASiam model: a linear probe (and the kNN classifier) on frozen backbone features."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .arguments import LinearEvalCommand
from .fileio import atomic_write_json, read_json
from .folders import require_model
from .modeling_nasiam import NASiamModel

EVAL_RESULTS = "eval_results.json"


def load_for_evaluation(model_name_or_path: str) -> NASiamModel:
    """A NASiamModel from a folder or a Hub id, with an error that says what to do when it cannot be found."""
    try:
        return NASiamModel.from_pretrained(model_name_or_path)
    except OSError as error:
        raise ValueError(
            f"cannot load a NASiam model from {model_name_or_path!r}: {error}. Pass a folder written by "
            "training/pretrain.py (it holds config.json and model.safetensors) or a Hub id (needs network, or a "
            "copy in the local cache when HF_HUB_OFFLINE=1)."
        ) from error


def merge_eval_results(folder: Path, results: dict) -> dict:
    """Update ``eval_results.json`` in ``folder`` with ``results`` (other entries, e.g. fine-tuning, are kept)."""
    path = folder / EVAL_RESULTS
    merged = read_json(path) if path.exists() else {}
    merged.update(results)
    atomic_write_json(path, merged)
    return merged


def refresh_model_card(folder: Path, config, eval_results: dict, dataset_name: str | None) -> None:
    """Rewrite the folder's README.md with the new results, keeping its training arguments and history."""
    from .hub import write_model_card

    args = read_json(folder / "training_args.json") if (folder / "training_args.json").exists() else None
    history = read_json(folder / "training_history.json") if (folder / "training_history.json").exists() else None
    write_model_card(folder, config, training_args=args, eval_results=eval_results, history=history,
                     dataset_name=(args or {}).get("dataset_name") or (args or {}).get("train_file") or dataset_name)


def run_linear_eval(command: LinearEvalCommand) -> dict:
    """Linear probe (and kNN) on the frozen backbone features of a saved model; results to ``eval_results.json``."""
    from .data import load_splits, make_loader, view_dataset_for
    from .evaluation import extract_features, knn_accuracy, knn_neighbourhood
    from .linear_probe import (
        LinearProbeConfig, evaluate_classifier, fit_probe_batch, train_linear_probe, train_linear_probe_on_images,
    )
    from .plans import plan_linear_eval
    from .trainer import make_accelerator

    data, run, probe_args, knn_args = command.data, command.run, command.probe, command.knn
    command.data.require_source()
    if data.streaming:
        raise ValueError("--streaming is not supported by the linear evaluation: it extracts the features of the "
                         "whole labelled set; pass the data without --streaming")
    model_path = command.model.model_name_or_path
    output_dir = Path(run.output_dir or model_path)
    if run.output_dir is None and not os.path.isdir(model_path):
        raise ValueError(
            f"--model_name_or_path {model_path!r} is not a local folder: pass --output_dir for the results")
    require_model(model_path, purpose="linear evaluation")
    accelerator = make_accelerator(str(output_dir), run.seed, command.precision, command.tracking)
    model = load_for_evaluation(model_path)
    # evaluate at the resolution the model was trained at, unless told otherwise
    splits = load_splits(data, run.seed, image_size=data.image_size or model.config.image_size,
                         require_labels=True)
    if splits.eval is None:
        raise ValueError(
            f"{splits.name!r} has no evaluation split: pass --validation_file or --validation_dir (or --eval_split)"
        )
    plan = plan_linear_eval(command, splits.policy, model.config.framework)
    encoder = model.backbone.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder = encoder.to(accelerator.device)
    if command.precision.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    # a labelled set smaller than the batch is used whole (few-label evaluation)
    batch = fit_probe_batch(len(splits.train), plan.per_device_batch,
                            1 if data.no_augmentation else accelerator.num_processes)
    # cached features: every process trains the same probe on all of them; images: each process its shard
    global_batch = batch if data.no_augmentation else batch * accelerator.num_processes
    rate = plan.learning_rate(global_batch)
    probe = LinearProbeConfig(epochs=plan.epochs, batch_size=batch, lr=rate.lr, momentum=plan.momentum,
                              weight_decay=plan.weight_decay, feature_norm=plan.feature_norm, seed=run.seed)
    workers, eval_batch = data.dataloader_num_workers, probe_args.per_device_eval_batch_size
    plain_train, plain_eval = accelerator.prepare(
        make_loader(view_dataset_for(splits, "train", "eval"), eval_batch, shuffle=False, num_workers=workers),
        make_loader(view_dataset_for(splits, "eval", "eval"), eval_batch, shuffle=False, num_workers=workers),
    )
    train_features, train_labels = extract_features(encoder, plain_train, accelerator, desc="train features")
    eval_features, eval_labels = extract_features(encoder, plain_eval, accelerator, desc="eval features")
    lr = probe.lr_for(global_batch)
    accelerator.print(
        f"linear probe: {probe.epochs} epochs, global batch {global_batch}, {rate.describe()}, features "
        f"{probe.feature_norm}, recipe {plan.recipe}, " + (
            "cached features (no augmentation)" if data.no_augmentation
            else "light augmentation (features recomputed every epoch)")
    )
    if data.no_augmentation:
        classifier, history = train_linear_probe(train_features, train_labels, splits.num_labels, probe,
                                                 eval_features, eval_labels, accelerator)
    else:
        train_loader = accelerator.prepare(make_loader(
            view_dataset_for(splits, "train", "light", seed=run.seed), batch,
            shuffle=True, seed=run.seed, drop_last=True, num_workers=workers,
        ))
        classifier, history = train_linear_probe_on_images(encoder, train_loader, splits.num_labels, probe,
                                                            accelerator, eval_loader=None)
    linear = evaluate_classifier(classifier, eval_features.to(accelerator.device), eval_labels.to(accelerator.device))
    knn = knn_accuracy(train_features, train_labels, eval_features, eval_labels, splits.num_labels,
                       k=knn_args.knn_k, temperature=knn_args.knn_temperature, warn=False)
    note = knn_neighbourhood(knn_args.knn_k, train_labels)[1]
    if note is not None:
        accelerator.print(f"warning: {note}")
    split = data.eval_split or ("validation" if (data.validation_file or data.validation_dir) else "test")
    results = {
        "linear_probe": {**linear, "dataset_name": splits.name, "split": split, "epochs": probe.epochs,
                         "lr": lr, "base_lr": rate.base_lr, "global_batch": global_batch,
                         "feature_norm": probe.feature_norm, "augmentation": not data.no_augmentation,
                         "recipe": plan.recipe},
        "knn": {**knn, "k_requested": knn_args.knn_k, "temperature": knn_args.knn_temperature,
                "dataset_name": splits.name, "split": split},
    }
    accelerator.print(
        f"linear probe top-1 {linear['top1']:.2f}%" + (f", top-5 {linear['top5']:.2f}%" if "top5" in linear else "")
        + f"; kNN top-1 {knn['top1']:.2f}%"
    )
    if accelerator.is_main_process:
        merged = merge_eval_results(output_dir, results)
        atomic_write_json(output_dir / "linear_probe_history.json", history)
        save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
                  str(output_dir / "linear_probe.safetensors"))
        if (output_dir / "config.json").exists():
            refresh_model_card(output_dir, model.config, merged, splits.name)
        accelerator.print(f"results written to {output_dir / EVAL_RESULTS}")
    accelerator.end_training()
    return results
