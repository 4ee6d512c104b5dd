"""The genotype diagram: the discrete heads of a config as vertical chains of boxes, coloured like the alpha curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..search_space import has_width_adapter
from .plots import _new_figure, _save_png, op_colour
from .names import BACKBONE_NAMES, FRAMEWORK_NAMES, OUTPUT_LAYER_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration_nasiam import NASiamConfig


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
    stem = (("CIFAR stem" if config.cifar_stem else "ImageNet stem") if config.backbone_kind == "torchvision"
            else config.backbone_kind)
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
