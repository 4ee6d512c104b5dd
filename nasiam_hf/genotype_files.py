"""Where ``--genotype`` takes its heads from, checked before anything is built: a preset name, a search output (its
``config.json`` and ``genotype.json`` must agree), a model folder, or a genotype file of its own.

A genotype file is JSON: ``{"projector": [op, ...], "predictor": [op, ...] | null, "framework": "simsiam"}``, the
framework optional (default: ``simsiam`` when there is a predictor; a projector-only genotype must name a framework
without one, such as ``simclr`` or ``mocov2``). A search's ``genotype.json`` is such a file, with its ``confidence``
beside the lists. Every op name is checked against the registry and the whole is built into a
:class:`~nasiam_hf.configuration_nasiam.NASiamConfig` exactly as a preset is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .configuration_nasiam import FRAMEWORK_DEFAULTS, FRAMEWORKS, NASiamConfig, check_preset
from .errors import UsageError
from .folders import FolderKind, require_genotype_source
from .presets import PRESETS
from .search_space import validate_genotype

GENOTYPE_FILE = "genotype.json"
FILE_KEYS = ("projector", "predictor", "framework", "confidence", "decided_rule")
# Config keys recorded by transformers that a derived config must not carry over.
RECORDED_KEYS = ("model_type", "transformers_version", "architectures", "auto_map", "stage_names", "out_features",
                 "out_indices")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{what} {str(path)!r} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{what} {str(path)!r} is not valid JSON: {error}") from None


def _op_list(value: Any, cell: str, where: str) -> list[str]:
    try:
        return validate_genotype(value, None, cell)
    except ValueError as error:
        raise UsageError(f"{where}: {error}") from None


def file_values(path: str | Path) -> dict[str, Any]:
    """Config values of a genotype file (see the module docstring), validated like a preset."""
    path = Path(path)
    where = f"--genotype {str(path)!r}"
    data = _read_json(path, "--genotype")
    if not isinstance(data, dict) or "projector" not in data:
        raise UsageError(f"{where} must hold a JSON object with a 'projector' list of op names (and a 'predictor' "
                         f"list, optionally a 'framework'), got {type(data).__name__}"
                         + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; a genotype file holds {list(FILE_KEYS[:3])} (and a "
                         "search's 'confidence')")
    projector = _op_list(data["projector"], "projector", where)
    predictor = None if data.get("predictor") is None else _op_list(data["predictor"], "predictor", where)
    framework = data.get("framework")
    without = [f for f in FRAMEWORKS if not FRAMEWORK_DEFAULTS[f]["predictor_layers"]]
    if framework is None:
        if predictor is None:
            raise UsageError(f"{where} has no predictor and names no framework: add \"framework\": one of {without} "
                             "(the frameworks without a predictor)")
        framework = "simsiam"
    if framework not in FRAMEWORKS:
        raise UsageError(f"{where}: framework {framework!r} is not one of {list(FRAMEWORKS)}")
    has_predictor = bool(FRAMEWORK_DEFAULTS[framework]["predictor_layers"])
    if has_predictor and predictor is None:
        raise UsageError(f"{where}: {framework} has a predictor, and the file gives no 'predictor' list")
    if not has_predictor and predictor is not None:
        raise UsageError(f"{where}: {framework} has no predictor, but the file gives one ({predictor}); remove it "
                         f"or name a framework with a predictor "
                         f"({', '.join(f for f in FRAMEWORKS if f not in without)})")
    values = {"framework": framework, "projector_layers": len(projector), "projector_genotype": projector}
    if predictor is not None:
        values.update(predictor_layers=len(predictor), predictor_genotype=predictor)
    try:
        NASiamConfig(**values)
    except ValueError as error:
        raise UsageError(f"{where}: {error}") from None
    return values


def check_folder_agrees(folder: Path, config: dict[str, Any]) -> None:
    """A folder's ``genotype.json`` (when it has one) must say what its ``config.json`` says: the config builds
    the heads, so a hand-edited genotype.json would otherwise be ignored without a word."""
    path = folder / GENOTYPE_FILE
    if not path.is_file():
        return
    where = f"--genotype {str(folder)!r}"
    data = _read_json(path, f"{where}: its")
    if not isinstance(data, dict) or "projector" not in data:
        raise UsageError(f"{where}: its {GENOTYPE_FILE} has no 'projector' list, so it cannot be checked against "
                         "its config.json; write it again (nasiam-search writes both) or remove it")
    fix = ("the two files disagree (was one edited by hand?). config.json builds the heads: edit its "
           "projector_genotype / predictor_genotype to match, or put the genotype you want in a file of its own "
           "and pass --genotype my_genotype.json")
    for cell in ("projector", "predictor"):
        wanted = data.get(cell)
        try:
            ops = None if wanted is None else validate_genotype(wanted, None, cell)
        except ValueError as error:
            raise UsageError(f"{where}: its {GENOTYPE_FILE} does not fit its config.json: {error}; {fix}") from None
        have = config.get(f"{cell}_genotype")
        if ops != (list(have) if have is not None else None):
            raise UsageError(f"{where}: its {GENOTYPE_FILE} says {cell} {ops} but its config.json says {have}: "
                             f"{fix}")


def genotype_values(genotype: str) -> dict[str, Any]:
    """Config values of ``--genotype``: a preset, a search output or model folder, or a genotype file."""
    if genotype in PRESETS:
        return check_preset(genotype)
    info = require_genotype_source(genotype)  # a search output or model folder, a .json file; not a run going on
    if info.kind is FolderKind.FILE:
        return file_values(info.path)
    values = NASiamConfig.from_pretrained(genotype).to_dict()
    for key in RECORDED_KEYS:
        values.pop(key, None)
    check_folder_agrees(info.path, values)
    return values


def genotype_source_record(genotype: str) -> dict[str, Any] | None:
    """Where ``--genotype`` came from, for the run record and the card: ``{"genotype", "kind", "confidence"}``
    (the confidence of the search that found it, when the folder or file carries one); None for a preset."""
    if genotype in PRESETS:
        return None
    path = Path(genotype)
    file = path if path.is_file() else path / GENOTYPE_FILE
    data = _read_json(file, "--genotype") if file.is_file() else {}
    kind = "file" if path.is_file() else ("search" if (path / "search_history.json").is_file() else "folder")
    confidence = data.get("confidence") if isinstance(data, dict) else None
    return {"genotype": str(genotype), "kind": kind, "confidence": confidence if isinstance(confidence, dict) else None}


__all__ = ["check_folder_agrees", "file_values", "genotype_source_record", "genotype_values"]
