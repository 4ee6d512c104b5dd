"""Training plots (the search's are in :mod:`nasiam_hf.hub.search_plots`). matplotlib's Agg canvas on explicit
``Figure`` objects, never ``pyplot``: importing this module or plotting does not change the user's matplotlib
backend. Every PNG is written atomically.

Each ``*_figures(history)`` function returns the figures (name -> ``Figure``) drawn from a history's own numbers, so
a test can read back the data a plot shows; ``plot_*`` saves them. A plot is drawn only when there is something to
show: no placeholder. A run of under two epochs is plotted against updates, from the per-update (or per logging
interval) records of ``history["steps"]``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

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

def _new_figure(width: float, height: float, layout: str | None = None) -> "Figure":
    """A figure drawn by the Agg canvas, without pyplot (no global backend switch, no figure registry).
    ``layout="constrained"`` lays it out when it is saved (building it then draws nothing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout=layout)
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
    """(epoch numbers from 1, values) for the epochs where ``key`` holds a finite number: a value recorded at the end
    of epoch 0 is plotted at 1, the epochs done, so per-step measurements (``step / updates_per_epoch``) line up."""
    xs, ys = [], []
    for i, row in enumerate(epochs):
        value = row.get(key)
        if _number(value):
            xs.append(row.get("epoch", i) + 1)
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


def _x_axis(ax, label: str) -> None:
    """Label the x axis; updates and epochs are whole numbers, so are their ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def short_run(history: Mapping) -> bool:
    """Whether a run is plotted against updates: under two epochs done, with per-step records to plot."""
    steps = history.get("steps") or []
    if not steps:
        return False
    per_epoch = history.get("updates_per_epoch")
    last = max((row.get("step") or 0) for row in steps)
    if _number(per_epoch) and per_epoch > 0:
        return last / per_epoch < 2
    return len(history.get("epochs") or []) < 2


def _step_series(rows: Sequence[Mapping], key: str) -> tuple[list, list]:
    """(update numbers, values) of the per-step records where ``key`` holds a finite number."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if _number(value) and _number(row.get("step")):
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def knn_series(history: Mapping, against_updates: bool) -> tuple[list, list, list]:
    """Every kNN measurement of a pretraining (per epoch, and every N steps), in order, against updates or epochs
    (a step's epoch is ``step / updates_per_epoch``; an epoch's update is the ``step`` it ended at): (x, top-1,
    standard error or nan)."""
    per_epoch = history.get("updates_per_epoch")
    points = {}
    for i, row in enumerate(history.get("epochs") or []):
        if _number(row.get("knn_top1")):
            x = row.get("step") if against_updates else row.get("epoch", i) + 1
            if _number(x):
                points[x] = row
    for row in history.get("knn_steps") or []:
        if _number(row.get("knn_top1")) and _number(row.get("step")):
            if against_updates:
                points[row["step"]] = row
            elif _number(per_epoch) and per_epoch > 0:
                points[row["step"] / per_epoch] = row
    xs = sorted(points)  # one value per x (an epoch's end may also be a step's)
    errors = [points[x].get("knn_top1_stderr") for x in xs]
    return (xs, [float(points[x]["knn_top1"]) for x in xs],
            [float(e) if _number(e) else float("nan") for e in errors])


def training_figures(history: Mapping) -> dict[str, "Figure"]:
    """The figures of a pretraining (the content of ``training_history.json``):

    * ``loss.png``: the training loss, and the learning rate on an axis of its own (right);
    * ``knn_accuracy.png``: every kNN measurement (per epoch and every N steps), only when there is one;
    * ``collapse.png``: the collapse statistic, with a dashed line at ``history["collapse_reference"]`` =
      1/sqrt(projection_dim) when given.

    Under two epochs (:func:`short_run`) the x axis is the update, from ``history["steps"]``.
    """
    epochs = _check_epochs(history, "training history")
    by_update = short_run(history)
    rows = history.get("steps") or [] if by_update else epochs
    series = _step_series if by_update else _epoch_series
    xlabel = "update" if by_update else "epoch"
    figures = {}

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = series(rows, "loss")
    ax.plot(xs, ys, color="#1f77b4", label="training loss", **_line_style(len(xs)))
    _x_axis(ax, xlabel)
    ax.set_ylabel("loss", color="#1f77b4")
    lines, labels = ax.get_legend_handles_labels()
    xs, ys = series(rows, "lr")
    if xs:
        twin = ax.twinx()  # the rate has its own scale: on the loss's axis it would sit flat at 0
        twin.plot(xs, ys, color="#ff7f0e", linestyle="--", label="learning rate", **_line_style(len(xs)))
        twin.set_ylabel("learning rate", color="#ff7f0e")
        twin.set_ylim(0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    _legend_below(ax, lines, labels)
    ax.set_title("Pretraining loss" + (" (per update)" if by_update else ""))
    figures["loss.png"] = fig

    xs, ys, errors = knn_series(history, by_update)
    if xs:
        fig = _new_figure(6.4, 4.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(xs, ys, color="#d62728", label="kNN top-1", **_line_style(len(xs)))
        if any(e == e for e in errors):  # the binomial standard error of each measurement, where recorded
            ax.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="#d62728", alpha=0.5, capsize=3,
                        label="± standard error")
        ax.legend(fontsize=8, loc="lower right")
        _x_axis(ax, xlabel)
        ax.set_ylabel("kNN top-1 accuracy (%)")
        ax.set_title("kNN monitor (frozen backbone features)")
        figures["knn_accuracy.png"] = fig

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = series(rows, "collapse_std")
    ax.plot(xs, ys, color="#2ca02c", label="std of l2-normalised outputs", **_line_style(len(xs)))
    reference = history.get("collapse_reference")
    if _number(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0,
                   label=f"healthy: 1/sqrt(d) = {reference:.4f}")
        ys = ys + [reference]
    ax.set_ylim(0.0, max(ys) * 1.15 if ys and max(ys) > 0 else 1.0)
    _x_axis(ax, xlabel)
    ax.set_ylabel("collapse std (0 = collapsed)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Representation collapse monitor")
    figures["collapse.png"] = fig
    return figures


def save_figures(figures: Mapping[str, "Figure"], folder: str | os.PathLike) -> list[Path]:
    """Write each figure as ``folder/name``, atomically; returns the paths in order."""
    return [_save_png(fig, Path(folder) / name) for name, fig in figures.items()]


def plot_training_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Write the figures of :func:`training_figures` into ``folder``; returns their paths."""
    return save_figures(training_figures(history), folder)
