"""The Hub model card of a NASiam model, from ``model_cards/template.md``: metadata (model-index from measured results
only), genotype, recipe, results, usage and citation."""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import DATASET_ALIASES
from ..fileio import atomic_write_text
from ..presets import BASELINE_PRESETS, PAPER_PRESETS
from ..search_space import has_width_adapter, identity_share
from .metadata import redact_secrets
from .names import (
    BACKBONE_NAMES, CITATION, DATASET_PRETTY_NAMES, FRAMEWORK_NAMES, OUTPUT_LAYER_NAMES, PAPER_ARXIV_ID, PAPER_TITLE,
)
from .plots import _epoch_series, _fmt, _number

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration_nasiam import NASiamConfig


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl", ".arrow", ".zip", ".tar", ".gz", ".npz")


def hub_dataset_id(name: str | None) -> str | None:
    """The Hub dataset id behind a dataset name, or ``None`` for local data.

    Known short names map to their ids (``cifar10`` -> ``uoft-cs/cifar10``); otherwise only a namespaced
    ``owner/name`` that is not an existing local path and has no data-file suffix counts as a Hub id.
    """
    if not name:
        return None
    name = str(name).strip()
    if name.lower() in DATASET_ALIASES:
        return DATASET_ALIASES[name.lower()]
    if _HUB_ID.match(name) and not name.lower().endswith(_LOCAL_SUFFIXES) and not Path(name).exists():
        return name
    return None


def _dataset_label(name: str | None) -> str:
    hub_id = hub_dataset_id(name)
    if hub_id is not None:
        return DATASET_PRETTY_NAMES.get(hub_id, hub_id)
    return Path(str(name)).name if name else "unknown"


def _template_text(template_path: str | os.PathLike | None) -> str:
    if template_path is not None:
        return Path(template_path).read_text(encoding="utf-8")
    try:  # installed wheel: the top-level model_cards/ folder is packaged as nasiam_hf.model_cards
        resource = importlib.resources.files("nasiam_hf.model_cards") / "template.md"
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    return (Path(__file__).resolve().parents[1] / "model_cards" / "template.md").read_text(encoding="utf-8")


def _matching_preset(config: "NASiamConfig") -> tuple[str, str] | None:
    """(``"paper"`` | ``"baseline"``, preset name) when the config's heads are those of a preset."""
    for kind, table in (("paper", PAPER_PRESETS), ("baseline", BASELINE_PRESETS)):
        for name, preset in table.items():
            if preset["framework"] != config.framework:
                continue
            if preset.get("projector_genotype") != config.genotype("projector"):
                continue
            if config.has_predictor and preset.get("predictor_genotype") != config.genotype("predictor"):
                continue
            if kind == "paper" and preset.get("backbone") != config.backbone:
                continue
            if preset.get("projector_hidden_size", config.projector_hidden_size) != config.projector_hidden_size:
                continue
            return kind, name
    return None


def _genotype_rows(config: "NASiamConfig", cell: str) -> list[dict[str, str]]:
    spec = config.head_spec(cell)
    rows = []
    for i, (op, (d_in, d_out, out)) in enumerate(zip(config.genotype(cell), spec.layer_shapes()), start=1):
        notes = []
        if has_width_adapter(op, d_in, d_out):
            notes.append("Linear width adapter first")
        if out:
            notes.append("output layer: no BN, no activation")
        rows.append({"layer": str(i), "op": op, "width": f"{d_in} → {d_out}", "note": "; ".join(notes)})
    if spec.output is not None:
        rows.append({"layer": "out", "op": OUTPUT_LAYER_NAMES.get(spec.output, spec.output),
                     "width": f"{spec.widths[-1]} → {spec.output_dim}", "note": "fixed, not searched"})
    return rows


# (label, argument names the scripts may use, in order of preference)
_RECIPE_FIELDS = (
    ("Dataset", ("dataset_name", "train_dir")),
    ("Recipe", ("recipe",)),
    ("Epochs", ("num_train_epochs", "epochs")),
    ("Optimizer updates", ("max_train_steps",)),
    ("Batch size per device", ("per_device_train_batch_size", "batch_size")),
    ("Total batch size", ("total_batch_size", "global_batch_size")),
    ("Learning rate", ("learning_rate", "lr")),
    ("Optimizer", ("optimizer", "optim")),
    ("Momentum", ("momentum", "sgd_momentum")),
    ("Weight decay", ("weight_decay",)),
    ("Learning-rate schedule", ("lr_scheduler_type", "scheduler")),
    ("Warm-up epochs", ("num_warmup_epochs", "warmup_epochs")),
    ("Augmentation", ("augmentation", "augmentation_policy", "aug")),
    ("Image size", ("image_size", "resolution")),
    ("Training samples (cap)", ("max_train_samples",)),
    ("Mixed precision", ("mixed_precision",)),
    ("Seed", ("seed",)),
)


def _recipe_rows(training_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not training_args:
        return []
    args = dict(redact_secrets(training_args))
    resolved = (training_args.get("resolved") or {}).get("optimization") or {}
    used = {"num_train_epochs": "epochs", "max_train_steps": "max_train_steps",
            "per_device_train_batch_size": "per_device_batch", "total_batch_size": "global_batch",
            "learning_rate": "base_lr", "weight_decay": "weight_decay", "recipe": "recipe"}
    for key, plan_key in used.items():
        if resolved.get(plan_key) is not None:  # what the run used, recipe values included, over the flags as given
            args[key] = resolved[plan_key]
    rows = []
    for label, keys in _RECIPE_FIELDS:
        for key in keys:
            value = args.get(key)
            if value not in (None, ""):
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                rows.append((label, f"{value:g}" if number else f"`{value}`"))
                break
    return rows


def _eval_entries(eval_results: Mapping | None, default_dataset: str | None) -> tuple[list, list[dict]]:
    """EvalResults for the model-index and rows for the card's results table, from measured numbers only."""
    from huggingface_hub import EvalResult

    entries, rows = [], []
    methods = (("linear_probe", "Linear probe (frozen backbone)"), ("knn", "kNN classifier (frozen backbone)"))
    for key, method in methods:
        result = (eval_results or {}).get(key)
        if not isinstance(result, Mapping) or not _number(result.get("top1")):
            continue
        dataset = result.get("dataset_name") or default_dataset
        split = result.get("split")
        dataset_type = hub_dataset_id(dataset) or _dataset_label(dataset)
        common = dict(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_type,
                      dataset_name=_dataset_label(dataset), dataset_split=split)
        if key == "linear_probe":
            args = {k: result[k] for k in ("epochs",) if result.get(k) is not None} or None
            details = f"{result['epochs']} epochs" if result.get("epochs") is not None else ""
            metric_config = "linear-probe"
        else:
            args = {k: result[k] for k in ("k", "temperature") if result.get(k) is not None} or None
            details = ", ".join(f"{k}={result[k]}" for k in ("k", "temperature") if result.get(k) is not None)
            metric_config = "knn"
        entries.append(EvalResult(metric_type="accuracy", metric_value=float(result["top1"]),
                                  metric_name=f"{method.split(' (')[0]} top-1 accuracy (%)",
                                  metric_config=metric_config, metric_args=args, **common))
        if _number(result.get("top5")):
            entries.append(EvalResult(metric_type="top-5-accuracy", metric_value=float(result["top5"]),
                                      metric_name=f"{method.split(' (')[0]} top-5 accuracy (%)",
                                      metric_config=metric_config, metric_args=args, **common))
        rows.append({"method": method, "dataset": _dataset_label(dataset), "split": split or "–",
                     "top1": _fmt(result["top1"]), "top5": _fmt(result.get("top5")), "details": details or "–"})
    return entries, rows


def _starting_point(training_args: Mapping[str, Any] | None) -> str | None:
    """The backbone's initial weights as the run record has them (``--backbone_weights``), else None (random)."""
    start = (training_args or {}).get("starting_point")
    if not isinstance(start, Mapping):
        return None
    new = start.get("new") or []
    return (f"`--backbone_weights {start.get('spec')}` ({start.get('source')}; {start.get('num_loaded')} tensors "
            f"loaded" + (f", {len(new)} new: {', '.join(new[:4])}{', ...' if len(new) > 4 else ''}" if new else "")
            + ")")


def _last_knn(history: Mapping | None) -> dict | None:
    if not isinstance(history, Mapping):
        return None
    xs, ys = _epoch_series(history.get("epochs") or [], "knn_top1")
    return {"epoch": xs[-1], "top1": _fmt(ys[-1])} if xs else None


def write_model_card(
    folder: str | os.PathLike,
    config: "NASiamConfig",
    *,
    training_args: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    history: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``folder/README.md``: the Hub model card of a NASiam model, from ``model_cards/template.md``.

    Metadata: ``library_name``, tags, the training dataset when it is a Hub dataset, license, pipeline tag and a
    ``model-index`` built only from ``eval_results``. The body describes the model, its genotype (table, and the
    ``genotype.png`` diagram when the folder has one), the training recipe from ``training_args``, measured results
    only (``eval_results`` and the last kNN accuracy of ``history``), how to load it, and the citation.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    training_args = dict(training_args or {})
    dataset_name = dataset_name or training_args.get("dataset_name") or training_args.get("train_dir")
    framework = FRAMEWORK_NAMES.get(config.framework, config.framework)
    backbone = BACKBONE_NAMES.get(config.backbone, config.backbone)
    model_name = repo_id.split("/")[-1] if repo_id else f"nasiam-{config.framework}-{config.backbone}"

    eval_entries, result_rows = _eval_entries(eval_results, dataset_name)
    dataset_ids = [hub_dataset_id(dataset_name)]
    for result in (eval_results or {}).values():
        if isinstance(result, Mapping):
            dataset_ids.append(hub_dataset_id(result.get("dataset_name")))
    dataset_ids = list(dict.fromkeys(d for d in dataset_ids if d))

    card_data = ModelCardData(
        # "transformers", not "nasiam-hf": the folder is a standard transformers checkpoint (config.json with an
        # auto_map and the modeling code next to it), loadable with AutoModel after `import nasiam_hf` or with
        # trust_remote_code=True; the Hub knows that library (code snippet, download counts), not ours.
        library_name="transformers",
        license=license,
        tags=["self-supervised-learning", "nasiam", config.framework, "neural-architecture-search",
              "image-feature-extraction", config.backbone, f"arxiv:{PAPER_ARXIV_ID}"],
        datasets=dataset_ids or None,
        metrics=["accuracy"],
        pipeline_tag="image-feature-extraction",
        base_model=base_model,
        model_name=model_name if eval_entries else None,
        eval_results=eval_entries or None,
    )

    projector_spec = config.head_spec("projector")
    preset = _matching_preset(config)
    card = ModelCard.from_template(
        card_data,
        template_str=_template_text(template_path),
        title=f"NASiam-{framework} {backbone}" + (f" ({repo_id})" if repo_id else ""),
        framework_name=framework,
        backbone_name=backbone,
        backbone_kind=config.backbone_kind,
        backbone_requires=list(getattr(config, "backbone_requires", None) or []),
        starting_point=_starting_point(training_args),
        cifar_stem=config.cifar_stem,
        image_size=config.image_size,
        hidden_size=config.hidden_size,
        projection_dim=config.projection_dim,
        search_space=", ".join(f"`{op}`" for op in config.search_ops),
        has_predictor=config.has_predictor,
        preset_kind=preset[0] if preset else None,
        preset_name=preset[1] if preset else None,
        searched=config.projector_genotype is not None,
        identity_share=(f"{100 * identity_share(config.genotype('projector'), projector_spec.widths):.0f}"
                        if any(a == b for a, b in zip(projector_spec.widths, projector_spec.widths[1:])) else None),
        projector_rows=_genotype_rows(config, "projector"),
        predictor_rows=_genotype_rows(config, "predictor") if config.has_predictor else [],
        genotype_image=(folder / "genotype.png").is_file(),
        curve_images=[name for name in ("loss.png", "knn_accuracy.png", "collapse.png", "alphas.png",
                                        "search_loss.png", "search_diagnostics.png") if (folder / name).is_file()],
        dataset_label=_dataset_label(dataset_name) if dataset_name else None,
        recipe_rows=_recipe_rows(training_args),
        args_file=bool(training_args) or (folder / "training_args.json").is_file(),
        result_rows=result_rows,
        last_knn=_last_knn(history),
        has_processor=(folder / "preprocessor_config.json").is_file(),
        repo=repo_id or "path/to/this/folder",
        citation=CITATION,
        paper_title=PAPER_TITLE,
        arxiv_id=PAPER_ARXIV_ID,
    )
    path = folder / "README.md"
    atomic_write_text(path, str(card))
    return path
