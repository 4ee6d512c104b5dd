"""The commands' typed arguments: one frozen dataclass per concern, parsed with transformers' ``HfArgumentParser``.

Every flag lives in exactly one dataclass (:mod:`.data`, :mod:`.model`, :mod:`.run`), and a command is a bundle of
them (:mod:`.commands`: :class:`SearchCommand`, :class:`PretrainCommand`, :class:`LinearEvalCommand`,
:class:`FinetuneCommand`). The objects are frozen: what a run derives from them (recipe values, framework
constants, the image policy) goes into a separate resolved plan (:mod:`nasiam_hf.plans`), never back into the
arguments. From Python, build a bundle directly or from flags (:mod:`.parsing` also reads ``--config`` files):

    from nasiam_hf import run_search
    from nasiam_hf.arguments import SearchCommand
    run_search(SearchCommand.parse(["--dataset_name", "demo", "--output_dir", "runs/x"]))

This package only needs the standard library and ``transformers.HfArgumentParser`` (imported when parsing; it does
not import torch), so ``--help`` imports neither torch nor the model code, ``datasets`` or ``accelerate``. The same
parser checks the keywords of the one-call API (:func:`.parsing.parse_keywords`, :mod:`nasiam_hf.api`). Its errors
are one line (:class:`nasiam_hf.errors.UsageError`) naming the closest choice or flag.

Each field's ``metadata["resume"]`` says whether it may change when a run is resumed in the same ``output_dir``:
``"fixed"`` (default: part of the run's identity), ``"free"`` (runtime options: workers, logging, Hub, tracking) or
``"extend"`` (the run's length: it may change, and the schedule is then recomputed over the new length).
"""

from .commands import COMMANDS, Command, FinetuneCommand, LinearEvalCommand, PretrainCommand, SearchCommand
from .data import DataArguments
from .fields import flag, parse_every
from .model import (
    BackboneArguments, EvalModelArguments, FinetuneModelArguments, KnnArguments, MonitorArguments, ObjectiveArguments,
    PretrainArguments, PretrainBackboneArguments, SearchArguments,
)
from .run import (
    EvalRunArguments, FinetuneOptimizationArguments, FinetuneRunArguments, HubArguments, OptimizationArguments,
    PrecisionArguments, ProbeArguments, RunArguments, SpeedArguments, TrackingArguments,
)

__all__ = [
    "COMMANDS",
    "BackboneArguments",
    "Command",
    "DataArguments",
    "EvalModelArguments",
    "EvalRunArguments",
    "FinetuneRunArguments",
    "FinetuneCommand",
    "FinetuneModelArguments",
    "FinetuneOptimizationArguments",
    "HubArguments",
    "KnnArguments",
    "LinearEvalCommand",
    "MonitorArguments",
    "ObjectiveArguments",
    "OptimizationArguments",
    "PrecisionArguments",
    "PretrainArguments",
    "PretrainBackboneArguments",
    "PretrainCommand",
    "ProbeArguments",
    "RunArguments",
    "SearchArguments",
    "SearchCommand",
    "SpeedArguments",
    "TrackingArguments",
    "flag",
    "parse_every",
]
