"""A command's arguments: a frozen bundle of one dataclass per concern, with ``parse`` for flags and config files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .data import DataArguments
from .model import (
    BackboneArguments, EvalModelArguments, FinetuneModelArguments, KnnArguments, MonitorArguments, ObjectiveArguments,
    PretrainArguments, PretrainBackboneArguments, SearchArguments,
)
from .run import (
    EvalRunArguments, FinetuneOptimizationArguments, FinetuneRunArguments, HubArguments, OptimizationArguments,
    PrecisionArguments, ProbeArguments, RunArguments, SpeedArguments, TrackingArguments,
)


@dataclass(frozen=True)
class Command:
    """A command's arguments, one attribute per concern. ``parse`` reads flags (and ``--config`` files)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __post_init__(self):
        missing = [name for name in self.groups() if getattr(self, name) is None]
        if missing:
            examples = {"run": "RunArguments(output_dir=...)", "model": "...(model_name_or_path=...)"}
            raise ValueError(f"{type(self).__name__} needs " + ", ".join(f"{m}={examples.get(m, '...')}"
                                                                         for m in missing))

    @classmethod
    def groups(cls) -> dict[str, type]:
        """attribute name -> dataclass of each concern, in ``--help`` order."""
        return {f.name: f.type if isinstance(f.type, type) else _resolve(cls, f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, argv: list[str] | None = None):
        """Parse command-line flags (a ``--config`` file first, then the flags over it) into this bundle."""
        from .parsing import parse_command

        return parse_command(cls, argv)

    def values(self) -> dict[str, Any]:
        """Every argument as a flat ``{flag name: value}`` dict (the form of training_args.json and config files)."""
        flat = {}
        for name in self.groups():
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def identity(self) -> tuple[dict[str, Any], set[str], set[str]]:
        """(values, keys that may change on resume, keys that set the run's length) for the output-folder guard."""
        free, extend = set(), set()
        for name in self.groups():
            for f in dataclasses.fields(getattr(self, name)):
                rule = f.metadata.get("resume", "fixed")
                (free if rule == "free" else extend if rule == "extend" else set()).add(f.name)
        return self.values(), free, extend


def _resolve(cls, name: str) -> type:
    import typing

    return typing.get_type_hints(cls)[name]


def _default(factory):
    return field(default_factory=factory)


@dataclass(frozen=True)
class SearchCommand(Command):
    """``nasiam-search``: NASiam's differentiable search of the projector/predictor heads."""

    name: ClassVar[str] = "nasiam-search"
    description: ClassVar[str] = "Search the projector/predictor heads of a siamese learner (NASiam)."

    data: DataArguments = _default(DataArguments)
    search: SearchArguments = _default(SearchArguments)
    model: BackboneArguments = _default(BackboneArguments)
    objective: ObjectiveArguments = _default(ObjectiveArguments)
    optimization: OptimizationArguments = _default(OptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: RunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


@dataclass(frozen=True)
class PretrainCommand(Command):
    """``nasiam-pretrain``: self-supervised pretraining from a genotype, with a kNN monitor."""

    name: ClassVar[str] = "nasiam-pretrain"
    description: ClassVar[str] = (
        "Pretrain a NASiam model (SimSiam, SimCLR, MoCo v2, BYOL, Barlow Twins or VICReg) from a genotype.")

    data: DataArguments = _default(DataArguments)
    pretrain: PretrainArguments = _default(PretrainArguments)
    model: PretrainBackboneArguments = _default(PretrainBackboneArguments)
    objective: ObjectiveArguments = _default(ObjectiveArguments)
    monitor: MonitorArguments = _default(MonitorArguments)
    optimization: OptimizationArguments = _default(OptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: RunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


@dataclass(frozen=True)
class LinearEvalCommand(Command):
    """``nasiam-linear-eval``: a linear probe (and the kNN classifier) on the frozen features of a saved model."""

    name: ClassVar[str] = "nasiam-linear-eval"
    description: ClassVar[str] = "Linear evaluation (and kNN) of a saved NASiam model on labelled data."

    data: DataArguments = _default(DataArguments)
    model: EvalModelArguments = field(default=None)
    probe: ProbeArguments = _default(ProbeArguments)
    knn: KnnArguments = _default(KnnArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    run: EvalRunArguments = _default(EvalRunArguments)
    tracking: TrackingArguments = _default(TrackingArguments)


@dataclass(frozen=True)
class FinetuneCommand(Command):
    """``nasiam-finetune``: classification fine-tuning of a NASiam backbone."""

    name: ClassVar[str] = "nasiam-finetune"
    description: ClassVar[str] = (
        "Fine-tune a NASiam backbone (a pretraining folder or Hub id) for image classification: the whole network, "
        "or only a linear classifier with --freeze_backbone.")

    data: DataArguments = _default(DataArguments)
    model: FinetuneModelArguments = field(default=None)
    optimization: FinetuneOptimizationArguments = _default(FinetuneOptimizationArguments)
    precision: PrecisionArguments = _default(PrecisionArguments)
    speed: SpeedArguments = _default(SpeedArguments)
    run: FinetuneRunArguments = field(default=None)
    tracking: TrackingArguments = _default(TrackingArguments)
    hub: HubArguments = _default(HubArguments)


COMMANDS: dict[str, type[Command]] = {
    cls.name: cls for cls in (SearchCommand, PretrainCommand, LinearEvalCommand, FinetuneCommand)
}


__all__ = ["COMMANDS", "Command", "FinetuneCommand", "LinearEvalCommand", "PretrainCommand", "SearchCommand"]
