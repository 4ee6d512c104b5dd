"""One call per command, the flags' names as keywords:

    import nasiam_hf

    result = nasiam_hf.pretrain(train_dir="photos", genotype="simclr-baseline", output_dir="runs/m",
                                num_train_epochs=2)
    result.output_dir, result.model, result.metrics

The keywords go through the command's own parser and argument dataclasses, so they are checked exactly as the
command line checks the flags: an unknown keyword is named with the closest flag, a value of the wrong type names
the type the flag takes, a bad choice the allowed ones, and the cross-flag checks follow. Errors are
:class:`~nasiam_hf.errors.UsageError` (a ``ValueError``). Every call returns a :class:`RunResult`.

The engines behind them (``run_search(SearchCommand(...))`` and the others) stay available for those who build the
typed argument bundles themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arguments import FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand
from .arguments.embed import EmbedCommand
from .arguments.parsing import parse_keywords


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: its output folder, the trained model (``None`` for linear evaluation, which trains only a
    probe, saved as ``linear_probe.safetensors``), and the metrics the run recorded there.

    ``metrics`` is the last epoch of the run's history file (losses, the collapse statistic, kNN top-1 where it was
    measured, ...), with the results each command writes beside it: ``genotype`` for a search (``genotype.json``),
    ``fine_tuning`` for a fine-tuning and ``linear_probe`` / ``knn`` for a linear evaluation
    (``eval_results.json``)."""

    output_dir: Path
    model: Any | None
    metrics: dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _last_epoch(path: Path) -> dict[str, Any]:
    """The last record of a history file: ``{"epochs": [...]}``, or a plain list of epochs."""
    history = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    epochs = history.get("epochs", []) if isinstance(history, dict) else history
    return dict(epochs[-1]) if epochs else {}


def search(**flags: Any) -> RunResult:
    """``nasiam-search`` with ``flags`` as keywords (``output_dir`` is required). The model is the trained supernet
    (:class:`~nasiam_hf.NASiamForArchitectureSearch`); ``output_dir`` holds the genotype for
    ``pretrain(genotype=...)``."""
    from .search import run_search

    command = parse_keywords(SearchCommand, flags, "nasiam_hf.search()")
    model = run_search(command)
    output_dir = Path(command.run.output_dir)
    metrics = _last_epoch(output_dir / "search_history.json")
    metrics["genotype"] = _read(output_dir / "genotype.json")
    return RunResult(output_dir, model, metrics)


def pretrain(**flags: Any) -> RunResult:
    """``nasiam-pretrain`` with ``flags`` as keywords (``output_dir`` is required). The model is the pretrained
    :class:`~nasiam_hf.NASiamForPreTraining`; ``output_dir`` is a model folder (``AutoModel.from_pretrained``)."""
    from .pretrain import run_pretrain

    command = parse_keywords(PretrainCommand, flags, "nasiam_hf.pretrain()")
    model = run_pretrain(command)
    output_dir = Path(command.run.output_dir)
    return RunResult(output_dir, model, _last_epoch(output_dir / "training_history.json"))


def linear_eval(**flags: Any) -> RunResult:
    """``nasiam-linear-eval`` with ``flags`` as keywords (``model_name_or_path`` is required; ``output_dir``
    defaults to the model folder). No model is returned: the frozen backbone is the one evaluated."""
    from .linear_eval import run_linear_eval

    command = parse_keywords(LinearEvalCommand, flags, "nasiam_hf.linear_eval()")
    results = run_linear_eval(command)
    output_dir = Path(command.run.output_dir or command.model.model_name_or_path)
    return RunResult(output_dir, None, {**_last_epoch(output_dir / "linear_probe_history.json"), **results})


def finetune(**flags: Any) -> RunResult:
    """``nasiam-finetune`` with ``flags`` as keywords (``model_name_or_path`` and ``output_dir`` are required). The
    model is the fine-tuned :class:`~nasiam_hf.NASiamForImageClassification`, loaded from the folder it was saved
    to."""
    from .finetune import run_finetune
    from .modeling_nasiam import NASiamForImageClassification

    command = parse_keywords(FinetuneCommand, flags, "nasiam_hf.finetune()")
    output_dir = Path(run_finetune(command))
    model = NASiamForImageClassification.from_pretrained(output_dir) if (output_dir / "config.json").is_file() \
        else None
    metrics = {**_last_epoch(output_dir / "finetune_history.json"), **_read(output_dir / "eval_results.json")}
    return RunResult(output_dir, model, metrics)


def embed(**flags: Any) -> RunResult:
    """``nasiam-embed`` with ``flags`` as keywords (``model_name_or_path``, ``output_dir`` and a data source are
    required). No model is returned; ``output_dir`` holds the parquet shards (``datasets.load_dataset("parquet",
    data_files=...)``) and the metrics are ``embed_info.json``'s totals (rows, dimension, bad images, images/s)."""
    from .embed import INFO_FILE, run_embed

    command = parse_keywords(EmbedCommand, flags, "nasiam_hf.embed()")
    output_dir = Path(run_embed(command))
    metrics = {k: v for k, v in _read(output_dir / INFO_FILE).items() if k != "identity"}
    return RunResult(output_dir, None, metrics)


__all__ = ["RunResult", "embed", "finetune", "linear_eval", "pretrain", "search"]
