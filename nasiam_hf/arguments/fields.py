"""The building blocks of the argument dataclasses: a field with its help and resume rule, the choices, the checks."""

from __future__ import annotations

import json
from dataclasses import field
from typing import Any, Literal

FRAMEWORK_CHOICES = Literal["simsiam", "simclr", "mocov2", "byol", "barlowtwins", "vicreg"]
OPTIMIZER_CHOICES = Literal["sgd", "lars"]
SEARCH_METHODS = Literal["darts", "darts-minus", "beta-darts"]
DISCRETIZATIONS = Literal["argmax", "perturbation"]
RECIPE_CHOICES = Literal["cifar", "imagenet"]
FEATURE_NORMS = Literal["batchnorm", "none"]
RESUME_RULES = ("fixed", "free", "extend")


def flag(default: Any, help: str, resume: str = "fixed", **metadata) -> Any:
    """A dataclass field with its ``--help`` text and its resume rule (see the module docstring)."""
    if resume not in RESUME_RULES:  # pragma: no cover - a programming error
        raise ValueError(f"resume rule must be one of {RESUME_RULES}, got {resume!r}")
    return field(default=default, metadata={"help": help, "resume": resume, **metadata})


def _positive(name: str, value: float | int | None, minimum: float = 1, strict: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or (value <= minimum if strict else value < minimum):
        relation = "positive" if strict and minimum == 0 else f"{'greater than' if strict else 'at least'} {minimum:g}"
        raise ValueError(f"--{name} must be {relation}, got {value!r}")


def check_learning_rates(learning_rate: float | None, base_learning_rate: float | None) -> None:
    """Both rates positive, and at most one given: an absolute rate and a base rate would contradict each other."""
    _positive("learning_rate", learning_rate, 0, strict=True)
    _positive("base_learning_rate", base_learning_rate, 0, strict=True)
    if learning_rate is not None and base_learning_rate is not None:
        raise ValueError(f"pass --learning_rate (the rate itself, {learning_rate:g}) or --base_learning_rate (a rate "
                         f"per 256 images, {base_learning_rate:g}, scaled by the global batch), not both")


def _json_object(name: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object such as '{{\"img_size\": 32}}', got {text!r} ({error})")
    if not isinstance(value, dict):
        raise ValueError(f"--{name} must be a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def parse_every(name: str, value: str, allow_epoch_word: bool = False) -> tuple[str, int] | None:
    """``"2"`` -> ("epochs", 2), ``"500steps"`` -> ("steps", 500), ``"epoch"`` -> ("epochs", 1), ``"no"``/"0" -> None.

    The frequency syntax of ``--checkpointing_steps`` and ``--knn_every``.
    """
    text = str(value).strip().lower().replace(" ", "")
    if text in ("no", "0", "off"):
        return None
    if text == "epoch":
        return ("epochs", 1)
    for suffix, unit in (("steps", "steps"), ("step", "steps"), ("epochs", "epochs"), ("epoch", "epochs")):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            count = int(text[: -len(suffix)])
            return (unit, count) if count > 0 else None
    if text.isdigit():
        return ("steps" if not allow_epoch_word else "epochs", int(text))
    raise ValueError(f"--{name} must be a positive integer, 'Nsteps', 'Nepochs', 'epoch' or 'no', got {value!r}")
