"""What a path holds, and the checks of every place that reads one.

:func:`inspect_path` names what is at a path (a NASiam model, a search result, a run still going or failed, a
checkpoint, another tool's model, ...) without loading anything heavy. Each use then has its ``require_*`` check,
which returns the :class:`FolderInfo` when the path fits and otherwise raises a :class:`~nasiam_hf.errors.
FolderKindError` saying what was needed, what was found and what to do. ``NASiamConfig.from_pretrained`` of an
empty folder gives SimSiam defaults, so a folder is never read before its check has passed.

The layout of our run folders is named here once (``checkpoints/step-XXXXXXXX``, ``trainer_state.json``, ...).
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DamagedCheckpointError, FolderKindError, did_you_mean
from .presets import PRESETS

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_MANIFEST = "checkpoint_files.json"
RUN_RECORD_FILE = "run_args.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# History files name the kind of run that wrote them.
HISTORY_FILES = {
    "search_history.json": "search",
    "training_history.json": "pretraining",
    "finetune_history.json": "fine-tuning",
    "linear_probe_history.json": "linear evaluation",
}
RUN_FILES = frozenset({RUN_RECORD_FILE, "training_args.json", "eval_results.json", *HISTORY_FILES})
# The class a checkpoint's config.json names (``architectures``) gives the kind of run too.
RUN_OF_ARCHITECTURE = {
    "NASiamForArchitectureSearch": "search",
    "NASiamForPreTraining": "pretraining",
    "NASiamForImageClassification": "fine-tuning",
}
COMMAND_OF_RUN = {"search": "nasiam-search", "pretraining": "nasiam-pretrain", "fine-tuning": "nasiam-finetune",
                  "linear evaluation": "nasiam-linear-eval"}
_STATE_KEYS = ("epoch", "step_in_epoch", "global_step")
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar", ".onnx", ".h5", ".msgpack", ".pkl", ".npz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class FolderKind(enum.Enum):
    MISSING = "nothing (no such file or folder)"
    FILE = "a file"
    EMPTY = "an empty folder"
    MODEL = "a NASiam model"
    CONFIG_ONLY = "a NASiam config without weights"
    SEARCH_OUTPUT = "the result of a finished search"
    UNFINISHED_RUN = "a run folder without a finished result"
    CHECKPOINT = "a training checkpoint"
    CHECKPOINTS = "a folder of training checkpoints"
    OTHER_MODEL = "a model of another kind"
    OTHER_FILES = "a folder of other files"
    DAMAGED = "a NASiam folder that cannot be read"


@dataclass(frozen=True)
class FolderInfo:
    """What :func:`inspect_path` found. ``what`` is the phrase the messages use ("a NASiam model (simsiam, ...)")."""

    path: Path
    kind: FolderKind
    what: str
    run_kind: str | None = None
    checkpoints: tuple[Path, ...] = ()  # intact ones, oldest first
    damaged: tuple[tuple[Path, str], ...] = ()  # (checkpoint, what is wrong with it)
    problem: str | None = None
    config: dict | None = field(default=None, compare=False, repr=False)

    @property
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


def checkpoint_step(path: Path) -> int:
    """The step of ``checkpoints/step-00000012`` (-1 for a name of another form)."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else -1


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a ``.safetensors`` file (truncated, not safetensors), or None. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > size - 8:
                return f"{path.name} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(f.read(length))
    except OSError as error:
        return f"{path.name} cannot be read ({error.strerror or error})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is corrupted (its header is not valid JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is corrupted (its header is not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} is corrupted (its header has no valid data offsets)"
    if 8 + length + end != size:
        return f"{path.name} is truncated or corrupted ({size} bytes where its header describes {8 + length + end})"
    return None


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a checkpoint; raises ``ValueError`` when it is missing keys or not JSON."""
    path = Path(checkpoint) / TRAINER_STATE_FILE
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or not isinstance(state.get(k), int)]
    if missing:
        raise ValueError(f"{TRAINER_STATE_FILE} has no integer {', '.join(missing)}")
    return state


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What makes a checkpoint folder unusable for a resume, or None when it is intact.

    Checks ``trainer_state.json``, the file list of ``checkpoint_files.json`` (names and sizes, written by the
    checkpointer last) or, for checkpoints without it, that model weights are there, and every safetensors header.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / TRAINER_STATE_FILE).is_file():
        return f"it has no {TRAINER_STATE_FILE} (the save did not finish)"
    try:
        read_trainer_state(checkpoint)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"its {TRAINER_STATE_FILE} is unreadable ({' '.join(str(error).split())})"
    manifest = checkpoint / CHECKPOINT_MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            for name, size in sizes.items():
                if not (checkpoint / name).is_file():
                    return f"{name} is missing"
                if (checkpoint / name).stat().st_size != size:
                    return f"{name} has {(checkpoint / name).stat().st_size} bytes where {size} were written"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its {CHECKPOINT_MANIFEST} is unreadable ({error})"
    elif not any(checkpoint.glob("model*.safetensors")) and not any(checkpoint.glob("pytorch_model*.bin")):
        return "it holds no model weights (model.safetensors)"
    for weights in sorted(checkpoint.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return problem
    return None


def survey_checkpoints(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(intact checkpoints oldest first, [(damaged checkpoint, why)]) under a ``checkpoints/`` folder."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    found = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)
    intact, damaged = [], []
    for path in found:
        problem = checkpoint_problem(path)
        (damaged.append((path, problem)) if problem else intact.append(path))
    return intact, damaged


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` could be a Hub repository id (``name`` or ``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith(".") and ".." not in text


def _read_config(path: Path) -> tuple[dict | None, str | None]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return None, f"its {CONFIG_FILE} is unreadable ({' '.join(str(error).split())[:120]})"
    if not isinstance(config, dict):
        return None, f"its {CONFIG_FILE} is not a JSON object"
    return config, None


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _model_summary(config: dict) -> str:
    parts = [str(config.get(k)) for k in ("framework", "backbone") if config.get(k)]
    architectures = config.get("architectures") or []
    if architectures:
        parts.append(str(architectures[0]))
    return f" ({', '.join(parts)})" if parts else ""


def _run_kind(path: Path, names: set[str]) -> str | None:
    for name, kind in HISTORY_FILES.items():
        if name in names:
            return kind
    intact, damaged = survey_checkpoints(path / CHECKPOINT_DIR)
    for checkpoint in reversed([*intact, *(p for p, _ in damaged)]):
        config, _ = _read_config(checkpoint)
        for architecture in (config or {}).get("architectures") or []:
            if architecture in RUN_OF_ARCHITECTURE:
                return RUN_OF_ARCHITECTURE[architecture]
    return None


def _inspect_checkpoint(path: Path) -> FolderInfo:
    config, _ = _read_config(path)
    run_kind = next((RUN_OF_ARCHITECTURE[a] for a in (config or {}).get("architectures") or []
                     if a in RUN_OF_ARCHITECTURE), None)
    problem = checkpoint_problem(path)
    where = ""
    if problem is None:
        state = read_trainer_state(path)
        where = f", step {state['global_step']}, epoch {state['epoch']}"
    what = f"a checkpoint of a {run_kind or 'training'} run{where}" + (f", damaged: {problem}" if problem else "")
    return FolderInfo(path, FolderKind.CHECKPOINT, what, run_kind=run_kind, problem=problem, config=config,
                      checkpoints=() if problem else (path,), damaged=((path, problem),) if problem else ())


def inspect_path(path: str | os.PathLike) -> FolderInfo:
    """Say what ``path`` holds (see :class:`FolderKind`). Only small files are read (JSON, safetensors headers)."""
    path = Path(path)
    if not os.path.lexists(path):
        return FolderInfo(path, FolderKind.MISSING, "nothing: no such file or folder")
    if not path.is_dir():
        return FolderInfo(path, FolderKind.FILE, f"a file ({path.name})")
    names = set(os.listdir(path))
    visible = sorted(n for n in names if not n.startswith("."))
    if TRAINER_STATE_FILE in names or (path.parent.name == CHECKPOINT_DIR and checkpoint_step(path) >= 0):
        return _inspect_checkpoint(path)
    steps = [path / n for n in visible if checkpoint_step(path / n) >= 0 and (path / n).is_dir()]
    if steps:
        intact, damaged = survey_checkpoints(path)
        what = f"a folder of training checkpoints ({len(intact)} intact" + (f", {len(damaged)} damaged" if damaged
                                                                           else "") + ")"
        return FolderInfo(path, FolderKind.CHECKPOINTS, what, checkpoints=tuple(intact), damaged=tuple(damaged))
    if (path / CONFIG_FILE).is_file():
        return _inspect_config_folder(path, names)
    if names & RUN_FILES or (path / CHECKPOINT_DIR).is_dir():
        intact, damaged = survey_checkpoints(path / CHECKPOINT_DIR)
        run_kind = _run_kind(path, names)
        latest = f", last checkpoint at step {checkpoint_step(intact[-1])}" if intact else ", no checkpoint"
        what = f"a {run_kind or 'training'} run that has not finished (no {CONFIG_FILE} yet{latest})"
        return FolderInfo(path, FolderKind.UNFINISHED_RUN, what, run_kind=run_kind, checkpoints=tuple(intact),
                          damaged=tuple(damaged))
    weights = [n for n in visible if n.lower().endswith(_OTHER_WEIGHTS)]
    if weights:
        return FolderInfo(path, FolderKind.OTHER_MODEL, f"weights without a {CONFIG_FILE} ({_names(weights)}), not a "
                                                        "NASiam folder")
    if not visible:
        return FolderInfo(path, FolderKind.EMPTY, "an empty folder")
    return FolderInfo(path, FolderKind.OTHER_FILES, f"a folder of other files ({_names(visible)})")


def _inspect_config_folder(path: Path, names: set[str]) -> FolderInfo:
    config, problem = _read_config(path)
    if problem:
        return FolderInfo(path, FolderKind.DAMAGED, f"a folder whose {CONFIG_FILE} cannot be read", problem=problem)
    model_type = config.get("model_type")
    intact, damaged = survey_checkpoints(path / CHECKPOINT_DIR)
    run = dict(run_kind=_run_kind(path, names), checkpoints=tuple(intact), damaged=tuple(damaged), config=config)
    if model_type != "nasiam":
        what = (f"a {model_type!r} model (model_type {model_type!r} in {CONFIG_FILE})" if model_type
                else f"a {CONFIG_FILE} without a model_type (another tool's file, e.g. timm's)")
        return FolderInfo(path, FolderKind.OTHER_MODEL, what + ", not a NASiam one", config=config)
    summary = _model_summary(config)
    if WEIGHTS_FILE in names or WEIGHTS_INDEX_FILE in names:
        problem = safetensors_problem(path / WEIGHTS_FILE) if WEIGHTS_FILE in names else None
        if problem:
            return FolderInfo(path, FolderKind.DAMAGED, f"a NASiam model{summary} whose weights cannot be read",
                              problem=problem, **run)
        return FolderInfo(path, FolderKind.MODEL, f"a NASiam model{summary}", **run)
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        return FolderInfo(path, FolderKind.DAMAGED, f"a NASiam model{summary} with pickled weights only",
                          problem="its weights are only in pytorch_model.bin (pickle), which this package never "
                                  "loads; save the model again with save_pretrained (safetensors)", **run)
    if {"genotype.json", "search_history.json"} <= names:
        return FolderInfo(path, FolderKind.SEARCH_OUTPUT, f"the result of a finished search{summary}", **run)
    return FolderInfo(path, FolderKind.CONFIG_ONLY, f"a NASiam config{summary} without weights", **run)


# ---------------------------------------------------------------------------------------------------------------------
# The checks of each use
# ---------------------------------------------------------------------------------------------------------------------
def _resume_hint(info: FolderInfo) -> str:
    command = COMMAND_OF_RUN.get(info.run_kind or "", "the same command")
    return f"`{command} ... --output_dir {info.path} --resume_from_checkpoint latest` (the same flags as before)"


def _export_hint(checkpoint: Path) -> str:
    return f"`nasiam-convert checkpoint {checkpoint} OUTPUT`"


def _advice(info: FolderInfo, use: str) -> str:
    """What to do when ``info`` does not fit ``use`` ("genotype", "model", "checkpoint", "export")."""
    kind, path = info.kind, info.path
    if use == "checkpoint" and kind is not FolderKind.CHECKPOINTS and info.checkpoints:
        return (f"it is a run folder: pass --output_dir {path} --resume_from_checkpoint latest, or one checkpoint "
                f"such as {info.latest_checkpoint}")
    if kind is FolderKind.MISSING:
        return "check the path"
    if kind is FolderKind.FILE:
        if path.name.endswith((".pth.tar", ".pth")):
            return f"convert a checkpoint of the authors' code first: `nasiam-convert official {path} OUTPUT`"
        return "pass the folder that holds it"
    if kind is FolderKind.EMPTY:
        return ("a search or pretraining writes its config.json there only when it finishes" if use in
                ("genotype", "model") else "it holds nothing")
    if kind is FolderKind.UNFINISHED_RUN:
        if not info.checkpoints:
            return ("it has no checkpoint yet: if it is still running, let it finish; if it failed, run it again (the "
                    "folder is free for the corrected run)")
        latest = info.latest_checkpoint
        export = ("the genotype found so far" if info.run_kind == "search" else "the weights of its last checkpoint")
        return f"let it finish, resume it with {_resume_hint(info)}, or export {export} with {_export_hint(latest)}"
    if kind is FolderKind.CHECKPOINT:
        if info.problem:
            return "pick another checkpoint (or --resume_from_checkpoint latest, which skips damaged ones)"
        run = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        resume = (f"`--output_dir {run} --resume_from_checkpoint {path}` (or `latest`)" if run
                  else f"`--resume_from_checkpoint {path}`")
        return f"a checkpoint is for resuming: continue its run with {resume}, or export it as a model with " \
               f"{_export_hint(path)} and pass OUTPUT instead"
    if kind is FolderKind.CHECKPOINTS:
        latest = info.latest_checkpoint
        return (f"pass one checkpoint ({latest or path / 'step-...'}), or resume the run with "
                f"`--output_dir {path.parent} --resume_from_checkpoint latest`")
    if kind is FolderKind.SEARCH_OUTPUT:
        return f"a search result is a genotype, not trained weights: pretrain it first with `nasiam-pretrain " \
               f"--genotype {path} ...` and pass that output_dir"
    if kind is FolderKind.CONFIG_ONLY:
        return "it has no model.safetensors: pass a folder written by save_pretrained or by nasiam-pretrain"
    if kind is FolderKind.MODEL:
        return (f"to train it further, resume its run with {_resume_hint(info)}" if info.checkpoints
                else "a finished model has no training state to resume: start a new run from it instead")
    if kind is FolderKind.OTHER_MODEL:
        return ("this package reads NASiam folders only (model_type 'nasiam'); import a torchvision ResNet with "
                "nasiam_hf.export.import_torchvision, or the authors' checkpoints with `nasiam-convert official`")
    if kind is FolderKind.DAMAGED:
        return f"{info.problem}; save or download it again"
    return "pass a folder written by nasiam_hf"


def _refuse(info: FolderInfo, flag: str, needed: str, use: str, error=FolderKindError) -> None:
    raise error(f"{flag} {str(info.path)!r} must be {needed}, but it is {info.what}: {_advice(info, use)}")


def require_genotype_source(path: str | os.PathLike, flag: str = "--genotype") -> FolderInfo:
    """A folder to take a genotype from: a finished search, a NASiam model or a NASiam config (presets are names and
    are handled before this check)."""
    info = inspect_path(path)
    if info.kind in (FolderKind.SEARCH_OUTPUT, FolderKind.MODEL, FolderKind.CONFIG_ONLY):
        return info
    if info.kind is FolderKind.MISSING:
        raise FolderKindError(f"{flag} {str(path)!r} is neither a folder nor a preset"
                              f"{did_you_mean(path, PRESETS)}; presets: {sorted(PRESETS)}")
    _refuse(info, flag, "a finished search output (config.json + genotype.json) or a NASiam model folder",
            "genotype")


def require_model(path: str | os.PathLike, flag: str = "--model_name_or_path", purpose: str = "this command",
                  allow_hub_id: bool = True) -> FolderInfo:
    """A NASiam model folder (config.json of model_type nasiam + readable safetensors weights), or a Hub id."""
    info = inspect_path(path)
    if info.kind is FolderKind.MODEL:
        return info
    if info.kind is FolderKind.MISSING and allow_hub_id and looks_like_hub_id(str(path)):
        return info  # a Hub repository: the loader fetches it (or says it is not cached)
    _refuse(info, flag, f"a NASiam model folder for {purpose}", "model")


def require_checkpoint(path: str | os.PathLike, flag: str = "--resume_from_checkpoint") -> FolderInfo:
    """An intact checkpoint folder (``.../checkpoints/step-XXXXXXXX``) to resume from."""
    info = inspect_path(path)
    if info.kind is FolderKind.CHECKPOINT and info.problem is None:
        return info
    if info.kind is FolderKind.CHECKPOINT:
        intact, _ = survey_checkpoints(info.path.parent)
        others = f"intact checkpoints there: {[str(p) for p in intact]}" if intact else "no intact checkpoint there"
        raise DamagedCheckpointError(f"{flag} {str(info.path)!r} is damaged: {info.problem}; {others} (or pass "
                                     "'latest', which takes the newest intact one)")
    _refuse(info, flag, "a checkpoint folder (.../checkpoints/step-...)", "checkpoint")


def require_exportable_checkpoint(path: str | os.PathLike, flag: str = "CHECKPOINT") -> FolderInfo:
    """An intact checkpoint that carries its model's config.json (written since the checkpointer stores it)."""
    info = require_checkpoint(path, flag)
    if info.config is None or info.config.get("model_type") != "nasiam":
        raise FolderKindError(f"{flag} {str(info.path)!r} has no NASiam {CONFIG_FILE} (checkpoints written before "
                              "nasiam-hf stored it cannot be exported): resume the run to its end instead, with "
                              f"--output_dir {info.path.parent.parent} --resume_from_checkpoint latest")
    architecture = (info.config.get("architectures") or [None])[0]
    if architecture not in RUN_OF_ARCHITECTURE:
        raise FolderKindError(f"{flag} {str(info.path)!r}: its {CONFIG_FILE} names the model class {architecture!r}; "
                              f"expected one of {sorted(RUN_OF_ARCHITECTURE)}")
    return info


def require_model_output(path: str | os.PathLike, flag: str = "OUTPUT") -> FolderInfo:
    """A folder a model may be written into: new, empty, or holding a NASiam model or search result (replaced)."""
    info = inspect_path(path)
    if info.kind in (FolderKind.MISSING, FolderKind.EMPTY, FolderKind.MODEL, FolderKind.SEARCH_OUTPUT,
                     FolderKind.CONFIG_ONLY):
        return info
    raise FolderKindError(f"{flag} {str(info.path)!r} holds {info.what}; writing a model there would mix them: "
                          "choose a new or empty folder")


__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_MANIFEST",
    "RUN_RECORD_FILE",
    "TRAINER_STATE_FILE",
    "FolderInfo",
    "FolderKind",
    "checkpoint_problem",
    "checkpoint_step",
    "inspect_path",
    "looks_like_hub_id",
    "read_trainer_state",
    "require_checkpoint",
    "require_exportable_checkpoint",
    "require_genotype_source",
    "require_model",
    "require_model_output",
    "safetensors_problem",
    "survey_checkpoints",
]
