"""The figures of a model card, each from what the run recorded: the training table from the run's ``outcome``
(updates and epochs done, global batch, learning rates, precision, images), the results with their error and number
of queries, the genotype's confidence, the model's name."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileio import STAGING_DIR
from .metadata import redact_secrets

PRECISION_NAMES = {"no": "fp32 (no mixed precision)", "bf16": "bf16 autocast", "fp16": "fp16 autocast",
                   "fp8": "fp8"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{float(value):.2f}" if _number(value) else "–"


def _g(value: Any) -> str:
    return f"{value:g}" if _number(value) else f"`{value}`"


def model_name_of(output_dir: str | None = None, hub_model_id: str | None = None) -> str | None:
    """The name a card gives the model: the Hub repository's, else the output folder's; never a staging folder's
    (a save stages its files in ``output_dir/.nasiam-publish.tmp``; atomic writes use ``.name.xxxx.tmp``)."""
    if hub_model_id:
        return str(hub_model_id).rstrip("/").split("/")[-1]
    if output_dir:
        path = Path(str(output_dir)).resolve()
        name = path.parent.name if path.name == STAGING_DIR else path.name
        if name and not (name.startswith(".") and name.endswith(".tmp")):
            return name
    return None


# (label, flag names as given, in order of preference) for what the outcome does not hold
_GIVEN_FIELDS = (
    ("Optimizer", ("optimizer", "optim")),
    ("Momentum", ("momentum", "sgd_momentum")),
    ("Learning-rate schedule", ("lr_scheduler_type", "scheduler")),
    ("Augmentation", ("augmentation", "augmentation_policy", "aug")),
    ("Image size", ("image_size", "resolution")),
    ("Training samples (cap)", ("max_train_samples",)),
    ("Seed", ("seed",)),
)


def recipe_rows(training_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The card's training table. From the run's ``outcome`` when the record has one (what ran: updates, epochs
    done, batch, learning rates, precision, images); otherwise from the plan and flags, labelled as planned."""
    if not training_args:
        return []
    args = dict(redact_secrets(training_args))
    plan = (args.get("resolved") or {}).get("optimization") or {}
    outcome = args.get("outcome") or {}
    rows: list[tuple[str, str]] = []
    dataset = args.get("dataset_name") or args.get("train_dir") or args.get("train_file")
    if dataset:
        rows.append(("Dataset", f"`{dataset}`"))
    if plan.get("recipe") or args.get("recipe"):
        rows.append(("Recipe", f"`{plan.get('recipe') or args.get('recipe')}`"))
    if outcome:
        updates, planned = outcome.get("updates"), outcome.get("planned_updates")
        rows.append(("Optimizer updates done", f"{updates}" + (f" (of {planned} planned: stopped early)"
                                                              if planned and planned != updates else "")))
        if _number(outcome.get("epochs")):
            rows.append(("Epochs done", f"{outcome['epochs']:.4g}"
                         + (f" (of {outcome.get('train_images')} training images)"
                            if outcome.get("train_images") else "")))
        rows.append(("Global batch", f"{outcome.get('global_batch')}"))
        if _number(outcome.get("images_seen")):
            rows.append(("Training images seen", f"{outcome['images_seen']}"))
        if _number(outcome.get("learning_rate")):
            rows.append(("Learning rate (effective, peak of the schedule)", f"{outcome['learning_rate']:.4g}"))
        if _number(outcome.get("base_learning_rate")):
            rows.append(("Base learning rate (per 256 images)", f"{outcome['base_learning_rate']:g}"))
        precision = outcome.get("mixed_precision")
        rows.append(("Precision", PRECISION_NAMES.get(precision, f"`{precision}`")))
    else:  # a record without an outcome (older runs, hand-written records): the plan, said to be one
        epochs = plan.get("epochs", args.get("num_train_epochs"))
        steps = plan.get("max_train_steps", args.get("max_train_steps"))
        for label, value in (("Epochs (planned)", epochs), ("Optimizer updates (planned)", steps),
                             ("Global batch (planned)", plan.get("global_batch")),
                             ("Learning rate (planned, effective)", plan.get("lr")),
                             ("Base learning rate (per 256 images)", plan.get("base_lr", args.get("learning_rate")))):
            if value not in (None, ""):
                rows.append((label, _g(value)))
    weight_decay = plan.get("weight_decay", args.get("weight_decay"))
    if weight_decay not in (None, ""):
        rows.append(("Weight decay", _g(weight_decay)))
    for label, keys in _GIVEN_FIELDS:
        for key in keys:
            value = args.get(key)
            if value not in (None, ""):
                rows.append((label, _g(value)))
                break
    return rows


def accuracy_cell(result: Mapping, key: str = "top1") -> str:
    """``"45.00 ± 11.12"``: the figure and, for top-1, its standard error when recorded."""
    if not _number(result.get(key)):
        return "–"
    error = result.get(f"{key}_stderr")
    return _fmt(result[key]) + (f" ± {float(error):.2f}" if _number(error) else "")


def confidence_rows(confidence: Mapping | None) -> dict[str, list[dict]]:
    """Per cell, the per-layer confidence as the card's genotype tables show it."""
    rows = {}
    for cell, layers in (confidence or {}).items():
        if not isinstance(layers, list):
            continue
        rows[cell] = [{"weight": f"{r['weight']:.4f}", "margin": f"{r['margin']:+.4f} over `{r['runner_up']}`",
                       "entropy": f"{r['relative_entropy']:.4f}", "decided": "yes" if r.get("decided") else "**no**"}
                      for r in layers]
    return rows


def last_knn(history: Mapping | None) -> dict | None:
    """The last kNN measurement of a pretraining (per epoch or every N steps, whichever came last), with its
    error and number of queries."""
    if not isinstance(history, Mapping):
        return None
    points = []  # (updates done, order recorded, label, record)
    for row in history.get("epochs") or []:
        if _number(row.get("knn_top1")):
            points.append((row.get("step"), len(points), f"epoch {row.get('epoch')}", row))
    for row in history.get("knn_steps") or []:
        if _number(row.get("knn_top1")):
            points.append((row.get("step"), len(points), f"update {row.get('step')}", row))
    if not points:
        return None
    _, _, when, row = max(points, key=lambda p: (p[0] if _number(p[0]) else -1, p[1]))
    queries = row.get("knn_num_queries")
    return {"when": when, "top1": accuracy_cell({"top1": row["knn_top1"], "top1_stderr": row.get("knn_top1_stderr")}),
            "queries": queries}


__all__ = ["accuracy_cell", "confidence_rows", "last_knn", "model_name_of", "recipe_rows"]
