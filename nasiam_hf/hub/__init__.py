"""What a run publishes: run records, training and search plots, the genotype diagram, the model card and the push
to the Hugging Face Hub. Every file goes through the atomic writers of :mod:`nasiam_hf.fileio`.

JSON files read here (written by the engines):

``search_history.json``::

    {"ops": [op names, in the order of the weights below],
     "genotype": {"projector": [...], "predictor": [...] | null},
     "epochs": [{"epoch": int, "train_loss": float, "val_loss": float, "collapse_std": float,
                 "identity_share": float,
                 "op_weights": {"projector": [[p_op for op in ops] for each layer],
                                "predictor": [[...]] (optional)}}, ...]}

``training_history.json``::

    {"collapse_reference": float (optional, 1/sqrt(projection_dim)),
     "updates_per_epoch": int | null,
     "epochs": [{"epoch": int, "step": int (updates done at its end), "loss": float, "collapse_std": float,
                 "lr": float, "knn_top1": float in percent | null (epochs without a kNN evaluation),
                 "knn_top1_stderr": float, "knn_num_queries": int}, ...],
     "steps": [{"step": int, "loss": float, "lr": float}, ...] (every logging interval),
     "knn_steps": [{"step": int, "knn_top1": float, ...}, ...] (``--knn_every Nsteps``)}

``search_history.json`` also holds ``steps`` (``train_loss``, ``val_loss``, ``lr``), a ``confidence`` per epoch
and the final ``confidence`` (:func:`nasiam_hf.confidence.genotype_confidence`).

``eval_results.json`` (written by the linear evaluation and the fine-tuning; any key may be missing)::

    {"linear_probe": {"top1": float (%), "top5": float (%), "num_queries": int, "top1_stderr": float (points),
                      "top1_ci95": [low, high], "dataset_name": str, "split": str, "epochs": int},
     "knn": {"top1": float (%), "k": int, "temperature": float, "num_queries": int, "top1_stderr": float, ...},
     "fine_tuning": {"top1": float (%), "num_queries": int, "top1_stderr": float, "epochs": float,
                     "updates": int, ...}}
"""

from .card import hub_dataset_id, write_model_card
from .card_rows import model_name_of
from .diagram import plot_genotype
from .metadata import package_versions, redact_secrets, save_run_metadata
from .names import CITATION
from .plots import OP_COLOURS, op_colour, plot_training_history
from .search_plots import plot_search_history
from .push import DEFAULT_IGNORE_PATTERNS, offline_mode, push_folder_to_hub

__all__ = [
    "CITATION",
    "DEFAULT_IGNORE_PATTERNS",
    "OP_COLOURS",
    "hub_dataset_id",
    "model_name_of",
    "offline_mode",
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
