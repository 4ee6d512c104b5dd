"""The Hub model card of a NASiam model, from ``model_cards/template.md``: metadata (model-index from measured results
only), genotype (with the search's confidence), what the run did, results with their error, fine-tuning, usage and
citation. The figures come from :mod:`nasiam_hf.hub.card_rows`."""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..confidence import DECIDED_RULE, confidence_summary
from ..data import DATASET_ALIASES
from ..fileio import atomic_write_text
from ..presets import BASELINE_PRESETS, PAPER_PRESETS
from ..search_space import has_width_adapter, identity_share
from .names import (
    BACKBONE_NAMES, CITATION, DATASET_PRETTY_NAMES, FRAMEWORK_NAMES, OUTPUT_LAYER_NAMES, PAPER_ARXIV_ID, PAPER_TITLE,
)
from .card_rows import accuracy_cell, confidence_rows, last_knn, model_name_of, recipe_rows
from .plots import _fmt, _number

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration_nasiam import NASiamConfig


# the plots a card shows, in this order, when the folder holds them (none is a placeholder)
CURVE_IMAGES = ("loss.png", "knn_accuracy.png", "collapse.png", "alphas.png", "search_loss.png",
                "search_confidence.png", "search_diagnostics.png")
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


_METHODS = (("linear_probe", "Linear probe (frozen backbone)", "linear-probe"),
            ("knn", "kNN classifier (frozen backbone)", "knn"),
            ("fine_tuning", "Fine-tuning", "fine-tuning"))


def _details(key: str, result: Mapping) -> tuple[str, dict | None]:
    """The card's "details" cell and the model-index metric args of one result."""
    if key == "linear_probe":
        args = {k: result[k] for k in ("epochs",) if result.get(k) is not None} or None
        return (f"{result['epochs']} epochs" if result.get("epochs") is not None else ""), args
    if key == "knn":
        args = {k: result[k] for k in ("k", "temperature") if result.get(k) is not None} or None
        return ", ".join(f"{k}={result[k]}" for k in ("k", "temperature") if result.get(k) is not None), args
    args = {k: result[k] for k in ("epochs", "updates") if result.get(k) is not None} or None
    parts = [f"{result['epochs']:.4g} epochs" if _number(result.get("epochs")) else "",
             f"{result['updates']} updates" if result.get("updates") is not None else "",
             "frozen backbone" if result.get("frozen_backbone") else ("backbone trained"
                                                                     if "frozen_backbone" in result else "")]
    return ", ".join(p for p in parts if p), args


def _eval_entries(eval_results: Mapping | None, default_dataset: str | None) -> tuple[list, list[dict]]:
    """EvalResults for the model-index and rows for the card's results table, from measured numbers only, each
    top-1 with its standard error and the number of images it was measured on."""
    from huggingface_hub import EvalResult

    entries, rows = [], []
    for key, method, metric_config in _METHODS:
        result = (eval_results or {}).get(key)
        if not isinstance(result, Mapping) or not _number(result.get("top1")):
            continue
        dataset = result.get("dataset_name") or default_dataset
        split = result.get("split")
        dataset_type = hub_dataset_id(dataset) or _dataset_label(dataset)
        common = dict(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_type,
                      dataset_name=_dataset_label(dataset), dataset_split=split)
        details, args = _details(key, result)
        name = method.split(" (")[0]
        entries.append(EvalResult(metric_type="accuracy", metric_value=float(result["top1"]),
                                  metric_name=f"{name} top-1 accuracy (%)", metric_config=metric_config,
                                  metric_args=args, **common))
        if _number(result.get("top5")):
            entries.append(EvalResult(metric_type="top-5-accuracy", metric_value=float(result["top5"]),
                                      metric_name=f"{name} top-5 accuracy (%)", metric_config=metric_config,
                                      metric_args=args, **common))
        queries = result.get("num_queries", result.get("samples"))
        rows.append({"method": method, "dataset": _dataset_label(dataset), "split": split or "–",
                     "top1": accuracy_cell(result), "top5": _fmt(result.get("top5")),
                     "queries": str(queries) if queries is not None else "–", "details": details or "–"})
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


def _classifier_summary(classifier: Mapping[str, Any] | None) -> dict | None:
    """The Fine-tuning section's facts: labels, data, how it was trained."""
    if not classifier:
        return None
    labels = list(classifier.get("labels") or [])
    shown = ", ".join(map(str, labels[:10])) + (", ..." if len(labels) > 10 else "")
    how = ("frozen backbone, linear classifier trained" if classifier.get("frozen_backbone")
           else "backbone and linear classifier trained together")
    return {"num_labels": classifier.get("num_labels", len(labels)), "labels": shown,
            "dataset": classifier.get("dataset_name") or "the labelled data", "how": how}


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
    model_name: str | None = None,
    classifier: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``folder/README.md``: the Hub model card of a NASiam model, from ``model_cards/template.md``.

    Metadata: ``library_name``, tags, the training dataset when it is a Hub dataset, license, pipeline tag and a
    ``model-index`` built only from ``eval_results``, named ``model_name`` (default: the Hub id's or the run's output
    folder's name from ``training_args``, never a staging folder's). The body describes the model, its genotype
    (table, with the search's per-layer confidence when the run record has it, and the ``genotype.png`` diagram when
    the folder has one), the training table from what the run did (``training_args["outcome"]``), the plots the
    folder holds, measured results only (``eval_results``, each with its error and number of queries, and the last
    kNN accuracy of ``history``), the fine-tuning of a ``classifier`` (``{"labels", "num_labels", "dataset_name",
    "frozen_backbone"}``: an image-classification card), how to load it, and the citation.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    training_args = dict(training_args or {})
    dataset_name = dataset_name or training_args.get("dataset_name") or training_args.get("train_dir")
    framework = FRAMEWORK_NAMES.get(config.framework, config.framework)
    backbone = BACKBONE_NAMES.get(config.backbone, config.backbone)
    repo_id = repo_id or training_args.get("hub_model_id")
    model_name = (model_name or model_name_of(training_args.get("output_dir"), repo_id)
                  or model_name_of(str(folder)) or f"nasiam-{config.framework}-{config.backbone}")

    eval_entries, result_rows = _eval_entries(eval_results, dataset_name)
    dataset_ids = [hub_dataset_id(dataset_name)]
    for result in (eval_results or {}).values():
        if isinstance(result, Mapping):
            dataset_ids.append(hub_dataset_id(result.get("dataset_name")))
    dataset_ids = list(dict.fromkeys(d for d in dataset_ids if d))

    task = "image-classification" if classifier else "image-feature-extraction"
    card_data = ModelCardData(
        # "transformers", not "nasiam-hf": the folder is a standard transformers checkpoint (config.json with an
        # auto_map and the modeling code next to it), loadable with AutoModel after `import nasiam_hf` or with
        # trust_remote_code=True; the Hub knows that library (code snippet, download counts), not ours.
        library_name="transformers",
        license=license,
        tags=["self-supervised-learning", "nasiam", config.framework, "neural-architecture-search", task,
              config.backbone, f"arxiv:{PAPER_ARXIV_ID}"],
        datasets=dataset_ids or None,
        metrics=["accuracy"],
        pipeline_tag=task,
        base_model=base_model,
        model_name=model_name if eval_entries else None,
        eval_results=eval_entries or None,
    )

    projector_spec = config.head_spec("projector")
    preset = _matching_preset(config)
    source = training_args.get("genotype_source") or {}
    confidence = source.get("confidence") if isinstance(source, Mapping) else None
    confidence = confidence_rows(confidence) if confidence else {}
    decided = confidence_summary(source.get("confidence")) if confidence else None
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
        genotype_source=source.get("genotype") if isinstance(source, Mapping) else None,
        identity_share=(f"{100 * identity_share(config.genotype('projector'), projector_spec.widths):.0f}"
                        if any(a == b for a, b in zip(projector_spec.widths, projector_spec.widths[1:])) else None),
        projector_rows=_with_confidence(_genotype_rows(config, "projector"), confidence.get("projector")),
        predictor_rows=(_with_confidence(_genotype_rows(config, "predictor"), confidence.get("predictor"))
                        if config.has_predictor else []),
        confidence=bool(confidence),
        decided=decided,
        decided_rule=DECIDED_RULE,
        genotype_image=(folder / "genotype.png").is_file(),
        curve_images=[name for name in CURVE_IMAGES if (folder / name).is_file()],
        dataset_label=_dataset_label(dataset_name) if dataset_name else None,
        recipe_rows=recipe_rows(training_args),
        args_file=bool(training_args) or (folder / "training_args.json").is_file(),
        result_rows=result_rows,
        last_knn=last_knn(history),
        classifier=_classifier_summary(classifier),
        has_processor=(folder / "preprocessor_config.json").is_file(),
        repo=repo_id or "path/to/this/folder",
        citation=CITATION,
        paper_title=PAPER_TITLE,
        arxiv_id=PAPER_ARXIV_ID,
    )
    path = folder / "README.md"
    atomic_write_text(path, str(card))
    return path


def _with_confidence(rows: list[dict[str, str]], confidence: list[dict] | None) -> list[dict[str, str]]:
    """The genotype rows with the search's confidence of each searched layer (the fixed output row has none)."""
    if not confidence:
        return rows
    return [{**row, **(confidence[i] if row["layer"].isdigit() and i < len(confidence) else
                       {"weight": "", "margin": "", "entropy": "", "decided": ""})}
            for i, row in enumerate(rows)]
