"""Run records: the arguments of a run, the package versions and the time, with secrets redacted (the folder is
meant to be pushed)."""

from __future__ import annotations

import datetime as _dt
import enum
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json

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
    args: Mapping[str, Any] | Any,
    filename: str = "training_args.json",
    *,
    command: str | None = None,
    resolved: Mapping[str, Any] | None = None,
    starting_point: Mapping[str, Any] | None = None,
    outcome: Mapping[str, Any] | None = None,
    genotype_source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a run record to ``folder/filename`` (JSON, atomic): every argument, what was resolved from them, the
    package versions and the UTC time.

    ``args`` is a command bundle (:class:`nasiam_hf.arguments.Command`) or a mapping. The arguments sit flat at the
    top level, as given, so the record is also a ``--config`` file that reruns the run; ``command``, ``resolved``
    (the run's plan), ``starting_point`` (the backbone's initial weights), ``outcome`` (what the run did: updates
    and epochs done, global batch, learning rates, precision, images; :meth:`nasiam_hf.budget.RunBudget.outcome`),
    ``genotype_source`` (where a pretraining's genotype came from, with the search's confidence),
    ``package_versions`` and ``timestamp_utc`` are dropped when it is read back as one. Values of arguments named
    like a token, password or secret are redacted, since the folder is meant to be pushed.
    """
    values = args.values() if callable(getattr(args, "values", None)) and not isinstance(args, Mapping) else dict(args)
    record = redact_secrets(values)
    if command is not None:
        record["command"] = command
    if resolved is not None:
        record["resolved"] = dict(resolved)
    if starting_point is not None:
        record["starting_point"] = dict(starting_point)
    if outcome is not None:
        record["outcome"] = dict(outcome)
    if genotype_source is not None:
        record["genotype_source"] = dict(genotype_source)
    record["package_versions"] = package_versions()
    record["timestamp_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = json.loads(json.dumps(record, default=_jsonable))  # paths, enums, tuples... as plain JSON values
    return atomic_write_json(Path(folder) / filename, record)
