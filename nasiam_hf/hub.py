"""Hub helpers: atomic file writes, run metadata, training and search plots, the genotype diagram, the model card and
the push to the Hugging Face Hub.

Every file written here goes through the atomic helpers of :mod:`nasiam_hf.fileio` (re-exported as
``atomic_write_text`` / ``atomic_write_json``), so an interrupted run never leaves a half-written card, plot or
JSON file behind: the content goes to a temporary file in the same folder, is flushed to disk, then moved over the
destination with ``os.replace``.

Plots use matplotlib's Agg canvas on explicit ``Figure`` objects, never ``pyplot``: importing this module or calling
a plot function does not change the user's matplotlib backend.

JSON files this module reads (written by the training scripts):

``search_history.json``::

    {"ops": [op names, in the order of the weights below],
     "genotype": {"projector": [...], "predictor": [...] | null},
     "epochs": [{"epoch": int, "train_loss": float, "val_loss": float, "collapse_std": float,
                 "identity_share": float,
                 "op_weights": {"projector": [[p_op for op in ops] for each layer],
                                "predictor": [[...]] (optional)}}, ...]}

``training_history.json``::

    {"collapse_reference": float (optional, 1/sqrt(projection_dim)),
     "epochs": [{"epoch": int, "loss": float, "collapse_std": float, "lr": float,
                 "knn_top1": float in percent | null (epochs without a kNN evaluation)}, ...]}

``eval_results.json`` (written by the linear-evaluation script; either key may be missing)::

    {"linear_probe": {"top1": float (%), "top5": float (%), "dataset_name": str, "split": str, "epochs": int},
     "knn": {"top1": float (%), "k": int, "temperature": float, "dataset_name": str, "split": str}}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import enum
import importlib.metadata
import importlib.resources
import io
import json
import math
import os
import platform
import re
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .data import DATASET_ALIASES
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text  # re-exported: one implementation
from .presets import BASELINE_PRESETS, PAPER_PRESETS
from .search_space import has_width_adapter, identity_share

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .configuration_nasiam import NASiamConfig

PAPER_ARXIV_ID = "2302.00059"
PAPER_TITLE = "NASiam: Efficient Representation Learning using Neural Architecture Search for Siamese Networks"
CITATION = """@article{heuillet2023nasiam,
  title={NASiam: Efficient Representation Learning using Neural Architecture Search for Siamese Networks},
  author={Heuillet, Alexandre and Tabia, Hedi and Arioui, Hichem},
  journal={arXiv preprint arXiv:2302.00059},
  year={2023}
}"""

FRAMEWORK_NAMES = {"simsiam": "SimSiam", "simclr": "SimCLR", "mocov2": "MoCo v2", "byol": "BYOL"}
BACKBONE_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50"}
OUTPUT_LAYER_NAMES = {"linear_bn": "Linear + BN(affine=False)", "linear": "Linear"}

DATASET_PRETTY_NAMES = {
    "uoft-cs/cifar10": "CIFAR-10", "uoft-cs/cifar100": "CIFAR-100", "ILSVRC/imagenet-1k": "ImageNet-1k",
}

# One colour per op, shared by the alpha curves and the genotype diagram; unknown ops take the fallback palette.
OP_COLOURS = {
    "max_pool_3x3": "#8c564b",
    "avg_pool_3x3": "#e377c2",
    "identity": "#7f7f7f",
    "linear_relu": "#1f77b4",
    "linear_silu": "#ff7f0e",
    "linear_hardswish": "#2ca02c",
    "linear_elu": "#d62728",
    "linear_mish": "#9467bd",
    "linear_gelu": "#17becf",
}
_FALLBACK_COLOURS = ("#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2")

# Argument names whose values must never be written to disk or to a card (they end up on the Hub).
_SECRET_KEY = re.compile(r"token|password|secret|api_key", re.IGNORECASE)

PACKAGE_DISTRIBUTIONS = {
    "nasiam_hf": "nasiam-hf",
    "torch": "torch",
    "torchvision": "torchvision",
    "transformers": "transformers",
    "huggingface_hub": "huggingface-hub",
    "accelerate": "accelerate",
    "datasets": "datasets",
    "safetensors": "safetensors",
}


# ---------------------------------------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (``None`` when one is missing), and Python's."""
    versions: dict[str, str | None] = {}
    for key, dist in PACKAGE_DISTRIBUTIONS.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    versions["python"] = platform.python_version()
    return versions


def _jsonable(value: Any) -> Any:
    """Fallback for argument values JSON does not know (paths, enums, sets, numpy/torch scalars...)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    if callable(getattr(value, "tolist", None)):  # numpy and torch scalars and arrays
        return value.tolist()
    return repr(value)


def redact_secrets(args: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``args`` with the values of token/password/secret arguments replaced by ``"<redacted>"``."""
    return {
        k: "<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "", False) else v for k, v in args.items()
    }


def save_run_metadata(
    folder: str | os.PathLike,
    args: Mapping[str, Any] | argparse.Namespace,
    filename: str = "training_args.json",
) -> Path:
    """Write every argument of a run, the package versions and the UTC time to ``folder/filename`` (JSON, atomic).

    The file is flat: the arguments at the top level, plus ``package_versions`` and ``timestamp_utc``. Values of
    arguments named like a token, password or secret are redacted, since the folder is meant to be pushed.
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    record = redact_secrets(values)
    record["package_versions"] = package_versions()
    record["timestamp_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = json.loads(json.dumps(record, default=_jsonable))  # paths, enums, tuples... as plain JSON values
    return atomic_write_json(Path(folder) / filename, record)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> "Figure":
    """A figure drawn by the Agg canvas, without pyplot (no global backend switch, no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: "Figure", path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def op_colour(op: str, ops: Sequence[str] = ()) -> str:
    """The colour of an op in every plot of this package."""
    if op in OP_COLOURS:
        return OP_COLOURS[op]
    unknown = [o for o in ops if o not in OP_COLOURS] or [op]
    index = unknown.index(op) if op in unknown else sum(map(ord, op))
    return _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]


def _fmt(value: Any) -> str:
    return f"{float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epoch_series(epochs: Sequence[Mapping], key: str) -> tuple[list, list]:
    """(epoch numbers, values) for the epochs where ``key`` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(epochs):
        value = row.get(key)
        if _number(value):
            xs.append(row.get("epoch", i))
            ys.append(float(value))
    return xs, ys


def _legend_below(ax, lines, labels) -> None:
    ax.legend(lines, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(lines)),
              frameon=False)


def _line_style(n_points: int) -> dict:
    return {"marker": "o", "markersize": 3} if n_points <= 30 else {}


def _check_epochs(history: Mapping, what: str) -> list[Mapping]:
    epochs = history.get("epochs") if isinstance(history, Mapping) else None
    if not epochs:
        raise ValueError(f"{what} has no 'epochs' to plot")
    return list(epochs)


def plot_search_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Plot a search run (the content of ``search_history.json``): ``alphas.png`` and ``search_loss.png``.

    ``alphas.png`` has one panel per layer of each cell, with the softmaxed weight of every op across epochs (one
    colour per op, the same in every panel); ``search_loss.png`` has the train and validation losses and, on a second
    axis, the collapse statistic.
    """
    folder = Path(folder)
    epochs = _check_epochs(history, "search history")
    ops = list(history.get("ops") or [])
    if not ops:
        raise ValueError("search history has no 'ops' list (op names in the order of the weights)")

    cells = []
    for cell in ("projector", "predictor"):
        layers = max((len((row.get("op_weights") or {}).get(cell) or []) for row in epochs), default=0)
        if layers:
            cells.append((cell, layers))
    if not cells:
        raise ValueError("search history has no 'op_weights' to plot")
    columns = max(layers for _, layers in cells)
    fig = _new_figure(2.6 * columns, 2.3 * len(cells) + 0.9)
    axes = fig.subplots(len(cells), columns, squeeze=False, sharey=True)
    uniform = 1.0 / len(ops)
    # zoomed on the range the weights cover (short searches move them little), the uniform level included
    values = [float(w) for row in epochs for cell, _ in cells
              for layer in ((row.get("op_weights") or {}).get(cell) or []) for w in layer] + [uniform]
    margin = 0.1 * (max(values) - min(values)) or 0.01
    bottom, top = max(0.0, min(values) - margin), min(1.0, max(values) + margin)
    for r, (cell, layers) in enumerate(cells):
        for c in range(columns):
            ax = axes[r][c]
            if c >= layers:
                ax.set_axis_off()
                continue
            for k, op in enumerate(ops):
                xs, ys = [], []
                for i, row in enumerate(epochs):
                    weights = (row.get("op_weights") or {}).get(cell) or []
                    if c < len(weights) and k < len(weights[c]):
                        xs.append(row.get("epoch", i))
                        ys.append(float(weights[c][k]))
                ax.plot(xs, ys, color=op_colour(op, ops), label=op, linewidth=1.4, **_line_style(len(xs)))
            ax.axhline(uniform, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(f"{cell} layer {c + 1}", fontsize=9)
            ax.set_ylim(bottom, top)
            ax.tick_params(labelsize=7)
            if r == len(cells) - 1 or c >= cells[r + 1][1]:  # no panel below this one
                ax.set_xlabel("epoch", fontsize=8)
            if c == 0:
                ax.set_ylabel("op weight (softmax)", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=op_colour(op, ops), linewidth=2) for op in ops]
    fig.legend(handles, ops, loc="lower center", ncol=min(len(ops), 7), fontsize=8, frameon=False)
    fig.suptitle("Architecture weights during the search (dotted: uniform)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    written = [_save_png(fig, folder / "alphas.png")]

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, colour in (("train_loss", "train loss (weight step)", "#1f77b4"),
                               ("val_loss", "validation loss (alpha step)", "#ff7f0e")):
        xs, ys = _epoch_series(epochs, key)
        if xs:
            ax.plot(xs, ys, color=colour, label=label, **_line_style(len(xs)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    xs, ys = _epoch_series(epochs, "collapse_std")
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="#2ca02c", linestyle="--", label="collapse std", **_line_style(len(xs)))
        twin.set_ylabel("collapse std (0 = collapsed)")
        twin.set_ylim(0.0, max(ys) * 1.15 if max(ys) > 0 else 1.0)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        _legend_below(ax, lines, labels)
    ax.set_title("Search losses")
    written.append(_save_png(fig, folder / "search_loss.png"))
    return written


def _layer_label(op: str, d_in: int, d_out: int, is_output: bool) -> str:
    notes = []
    if has_width_adapter(op, d_in, d_out):
        notes.append("+ Linear adapter")
    if is_output:
        notes.append("output: no BN")
    text = f"{op}\n{d_in} → {d_out}"
    return text + ("\n" + ", ".join(notes) if notes else "")


def plot_genotype(config: "NASiamConfig", path: str | os.PathLike) -> Path:
    """Draw the discrete heads of ``config`` as vertical chains of boxes (one per layer); write the PNG to ``path``.

    The projector column starts at the backbone and ends at the fixed output layer; the predictor column (SimSiam,
    BYOL) starts at the projector output. Boxes are coloured by op, like the alpha curves.
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    rows: list[tuple[str, list[tuple[str, str]]]] = []
    backbone = BACKBONE_NAMES.get(config.backbone, config.backbone)
    stem = "CIFAR stem" if config.cifar_stem else "ImageNet stem"
    spec = config.head_spec("projector")
    boxes = [(f"{backbone}\n({stem})\n→ {config.hidden_size}", "#d9d9d9")]
    for op, (d_in, d_out, out) in zip(config.genotype("projector"), spec.layer_shapes()):
        boxes.append((_layer_label(op, d_in, d_out, out), op_colour(op, config.search_ops)))
    if spec.output is not None:
        name = OUTPUT_LAYER_NAMES.get(spec.output, spec.output).replace(" + ", "\n+ ")
        boxes.append((f"{name}\n{spec.widths[-1]} → {spec.output_dim}", "#f2f2f2"))
    rows.append(("projector", boxes))
    if config.has_predictor:
        pspec = config.head_spec("predictor")
        boxes = [(f"projection z\n{pspec.widths[0]}", "#f2f2f2")]
        for op, (d_in, d_out, out) in zip(config.genotype("predictor"), pspec.layer_shapes()):
            boxes.append((_layer_label(op, d_in, d_out, out), op_colour(op, config.search_ops)))
        rows.append(("predictor", boxes))

    # Vertical chains, one column per cell; coordinates are in inches (axes spanning the whole figure).
    box_w, box_h, v_gap, h_gap, top = 2.3, 0.62, 0.3, 0.7, 0.95
    tallest = max(len(boxes) for _, boxes in rows)
    width = len(rows) * box_w + (len(rows) + 1) * h_gap
    height = top + tallest * (box_h + v_gap) + 0.1
    fig = _new_figure(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    for c, (name, boxes) in enumerate(rows):
        x = h_gap + c * (box_w + h_gap)
        ax.text(x + box_w / 2, height - top + 0.2, name, ha="center", va="bottom", fontsize=10, fontweight="bold")
        for r, (label, colour) in enumerate(boxes):
            y = height - top - r * (box_h + v_gap) - box_h  # bottom edge of the box
            ax.add_patch(FancyBboxPatch((x, y), box_w, box_h, boxstyle="round,pad=0.02", facecolor=colour,
                                        edgecolor="black", linewidth=0.8, alpha=0.85))
            ax.text(x + box_w / 2, y + box_h / 2, label, ha="center", va="center", fontsize=8)
            if r:
                centre = x + box_w / 2
                ax.add_patch(FancyArrowPatch((centre, y + box_h + v_gap - 0.02), (centre, y + box_h + 0.03),
                                             arrowstyle="-|>", mutation_scale=10, linewidth=0.9))
    framework = FRAMEWORK_NAMES.get(config.framework, config.framework)
    ax.text(width / 2, height - 0.1, f"NASiam-{framework} heads ({backbone})", ha="center", va="top", fontsize=11)
    return _save_png(fig, path)


def plot_training_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Plot a pretraining run (the content of ``training_history.json``).

    Writes ``loss.png`` (loss, learning rate on a second axis), ``knn_accuracy.png`` (kNN top-1 on the epochs that
    have one; a note when none has) and ``collapse.png`` (collapse statistic, with a dashed line at
    ``history["collapse_reference"]`` = 1/sqrt(projection_dim) when given).
    """
    folder = Path(folder)
    epochs = _check_epochs(history, "training history")
    written = []

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "loss")
    ax.plot(xs, ys, color="#1f77b4", label="training loss", **_line_style(len(xs)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    xs, ys = _epoch_series(epochs, "lr")
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="#7f7f7f", linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate")
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    _legend_below(ax, lines, labels)
    ax.set_title("Pretraining loss")
    written.append(_save_png(fig, folder / "loss.png"))

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "knn_top1")
    if xs:
        ax.plot(xs, ys, color="#d62728", label="kNN top-1", **_line_style(len(xs)))
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no kNN evaluation was recorded in this run", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 accuracy (%)")
    ax.set_title("kNN monitor (frozen backbone features)")
    written.append(_save_png(fig, folder / "knn_accuracy.png"))

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "collapse_std")
    ax.plot(xs, ys, color="#2ca02c", label="std of l2-normalised outputs", **_line_style(len(xs)))
    reference = history.get("collapse_reference")
    if _number(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0,
                   label=f"healthy: 1/sqrt(d) = {reference:.4f}")
        ys = ys + [reference]
    ax.set_ylim(0.0, max(ys) * 1.15 if ys and max(ys) > 0 else 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("collapse std (0 = collapsed)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Representation collapse monitor")
    written.append(_save_png(fig, folder / "collapse.png"))
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------
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
    ("Epochs", ("num_train_epochs", "epochs")),
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
    args = redact_secrets(training_args)
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
                                        "search_loss.png") if (folder / name).is_file()],
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


# ---------------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints, temporary files, and the staging folders of nasiam_hf.fileio (".<name>.XXXX.tmp/").
DEFAULT_IGNORE_PATTERNS = ("checkpoints/*", "checkpoint-*/*", "*.tmp", "*.tmp/*")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the Hub could not be reached", across the HTTP stacks huggingface_hub has used."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror, socket.timeout]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue
        errors.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return tuple(errors)


def offline_mode(*env_vars: str) -> bool:
    """Whether Hugging Face offline mode is on: huggingface_hub's ``HF_HUB_OFFLINE``, or ``HF_HUB_OFFLINE`` and
    ``env_vars`` in the environment now (the libraries read them only when imported)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", *env_vars))
    return bool(constants.HF_HUB_OFFLINE) or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _uses_proxy(scheme: str) -> bool:
    return any(os.environ.get(v) for v in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"))


def _check_reachable(endpoint: str, timeout: float) -> None:
    """Resolve and connect to the endpoint with a short timeout (the Hub client itself waits without a limit).

    Skipped when a proxy is configured, since the direct route may then be closed on purpose.
    """
    url = urlparse(endpoint)
    scheme = url.scheme or "https"
    if _uses_proxy(scheme) or not url.hostname:
        return
    port = url.port or (443 if scheme == "https" else 80)
    with socket.create_connection((url.hostname, port), timeout=timeout):
        pass


def _upload_hint(folder: Path, repo_id: str, ignore_patterns: Iterable[str]) -> str:
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in ignore_patterns)
    where = shlex.quote(str(folder))
    return (
        f"The model is saved locally at {folder}. Push it later, with network access, using\n"
        f"    hf upload {repo_id} {where} . {excludes}".rstrip()
        + f"\n(or `huggingface-cli upload {repo_id} {where} .` with an older huggingface_hub)."
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload NASiam model",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
    connect_timeout: float = 5.0,
) -> str:
    """Create ``repo_id`` on the Hub if needed and upload ``folder`` to it; return the commit URL.

    ``ignore_patterns`` (paths relative to ``folder``) keep training checkpoints and temporary files out.
    ``endpoint`` defaults to ``HF_ENDPOINT``. Without network (``HF_HUB_OFFLINE=1``, no DNS, refused connection) it
    fails at once with a ``RuntimeError`` naming the local folder and the command to push later; authentication
    errors (401/403) raise a ``RuntimeError`` that points to ``hf auth login`` / ``--hub_token``.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder}: no such folder")
    patterns = list(ignore_patterns or ())
    hint = _upload_hint(folder, repo_id, patterns)
    if offline_mode("TRANSFORMERS_OFFLINE"):
        raise RuntimeError(
            f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1; unset it to push).\n{hint}"
        )
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        _check_reachable(endpoint, connect_timeout)
        api = HfApi(endpoint=endpoint, token=token)
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=list(patterns)
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise RuntimeError(
                f"The Hub refused the push to {repo_id!r} (HTTP {status}): log in with `hf auth login` or pass a "
                f"token with write access (`--hub_token` in the training scripts, token= here).\n{hint}"
            ) from error
        raise RuntimeError(f"Pushing to {repo_id!r} failed: {error}\n{hint}") from error
    except _network_errors() as error:
        raise RuntimeError(
            f"Cannot reach the Hub at {endpoint} ({type(error).__name__}: {error}).\n{hint}"
        ) from error
    return str(getattr(info, "commit_url", None) or repo_url)


__all__ = [
    "CITATION",
    "DEFAULT_IGNORE_PATTERNS",
    "OP_COLOURS",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "hub_dataset_id",
    "op_colour",
    "package_versions",
    "plot_genotype",
    "plot_search_history",
    "plot_training_history",
    "push_folder_to_hub",
    "redact_secrets",
    "save_run_metadata",
    "write_model_card",
]
