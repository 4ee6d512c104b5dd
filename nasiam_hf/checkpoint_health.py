"""Is a checkpoint usable, and is it good? The checks behind ``--resume_from_checkpoint`` and the non-finite stop.

*Usable* (:func:`deep_problem`): beyond the cheap checks of :func:`nasiam_hf.folders.checkpoint_problem` (files
present with their recorded sizes, readable ``trainer_state.json``, safetensors headers), every part is read: each
file's CRC-32 against the one recorded at save time (``checkpoint_files.json``: damage that keeps the size is found
too), the safetensors files opened with ``safetensors.safe_open``, and the pickled parts Accelerate writes
(optimizer, scheduler, RNG states, ...) loaded with ``weights_only=True`` the way Accelerate loads them on resume
(its RNG states are otherwise skipped silently when they fail to load). :func:`usable_checkpoint` is the newest
checkpoint that passes, with the newer ones skipped and why.

*Good* (:func:`last_good`): a checkpoint whose weights are finite and below :data:`WEIGHT_BOUND` in magnitude and
whose recorded loss is finite. The checkpointer records both at save time (``checkpoint_health`` in
``trainer_state.json``: one pass over the weights), so the decision reads a small JSON file; a checkpoint written
before that is read from its weights.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DamagedCheckpointError, without_unsafe_advice
from .folders import (
    CHECKPOINT_MANIFEST, FolderKind, checkpoint_problem, checkpoint_step, inspect_path, read_trainer_state,
    require_checkpoint, survey_checkpoints,
)

HEALTH_KEY = "checkpoint_health"
# Weights (and batch-norm statistics) of healthy networks stay in the order of 1 to 1e3; a run whose weights reach
# 1e6 has diverged even when its loss is still finite (squares of such weights overflow float32 a step later).
WEIGHT_BOUND = 1e6
_CHUNK = 1 << 20
_PICKLED = (".bin", ".pt", ".pkl", ".pth")


def file_crc32(path: str | os.PathLike) -> str:
    """The CRC-32 of a file's bytes, as 8 hex digits (about 2 GB/s: a checkpoint's files cost well under a second)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _short(error: BaseException) -> str:
    return without_unsafe_advice(" ".join(f"{type(error).__name__}: {error}".split()))[:300]


def _load_problem(path: Path) -> str | None:
    """Load one part the way Accelerate's ``load_state`` does; a failure is the part's problem."""
    import warnings

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(os.fspath(path), framework="pt") as f:
                list(f.keys())
        elif path.suffix in _PICKLED:
            from accelerate.utils import load

            with warnings.catch_warnings():  # torch's note on the pickle protocol of Accelerate's RNG file
                warnings.simplefilter("ignore")
                load(os.fspath(path), map_location="cpu")  # weights_only=True with Accelerate's numpy allowances
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as error:  # noqa: BLE001 - whatever the loader raises, this part cannot be loaded
        return f"{path.name} cannot be loaded ({_short(error)})"
    return None


def deep_problem(checkpoint: str | os.PathLike) -> str | None:
    """What makes a checkpoint unusable, reading every part (see the module docstring), or None."""
    checkpoint = Path(checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        return problem
    try:
        manifest = json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    recorded = manifest.get("crc32") if isinstance(manifest, dict) else None
    for name, crc in (recorded or {}).items():
        found = file_crc32(checkpoint / name)
        if found != crc:
            return (f"{name} is damaged: its bytes differ from those written (CRC-32 {found} where {crc} was "
                    "recorded)")
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            problem = _load_problem(path)
            if problem:
                return problem
    return None


def usable_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint under ``root`` that :func:`deep_problem` passes or None, [(newer checkpoint skipped,
    why)])."""
    intact, damaged = survey_checkpoints(root)
    skipped = list(damaged)
    chosen = None
    for path in reversed(intact):
        problem = deep_problem(path)
        if problem is None:
            chosen = path
            break
        skipped.append((path, problem))
    newer = [(p, why) for p, why in skipped if chosen is None or checkpoint_step(p) > checkpoint_step(chosen)]
    return chosen, sorted(newer, key=lambda item: checkpoint_step(item[0]), reverse=True)


def require_usable_checkpoint(path: str | os.PathLike, flag: str = "--resume_from_checkpoint") -> Path:
    """A checkpoint named explicitly: it must pass :func:`deep_problem` (:class:`DamagedCheckpointError` naming the
    damaged file and the checkpoints beside it that do)."""
    info = inspect_path(path)
    if info.kind is not FolderKind.CHECKPOINT:
        require_checkpoint(path, flag)  # says what the path is instead, and what to pass
    problem = deep_problem(info.path)
    if problem is None:
        return info.path
    usable, _ = usable_checkpoint(info.path.parent)
    others = f"the newest usable one there is {usable}" if usable else "no usable checkpoint there"
    raise DamagedCheckpointError(f"{flag} {str(info.path)!r} is damaged: {problem}; {others} (or pass 'latest', "
                                 "which takes the newest usable one)")


# ---------------------------------------------------------------------------------------------------------------------
# Good checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def weights_health(model, loss: float | None = None) -> dict:
    """What :func:`last_good` needs of a checkpoint, measured on ``model`` at save time: whether every float weight
    and buffer is finite, the largest magnitude and where it is, and the loss (when given). One pass, one sync."""
    import torch

    floats = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point() and t.numel()]
    if not floats:
        return {"weights_finite": True, "max_abs_weight": 0.0, "largest": None, "loss": loss}
    with torch.no_grad():
        peaks = torch.stack([t.detach().abs().amax().float() for _, t in floats]).cpu().tolist()  # one sync
    finite = all(math.isfinite(p) for p in peaks)
    where = max(range(len(peaks)), key=lambda i: peaks[i] if math.isfinite(peaks[i]) else math.inf)
    return {"weights_finite": finite, "max_abs_weight": peaks[where] if finite else None, "largest": floats[where][0],
            "loss": None if loss is None else float(loss)}


def _health_of(checkpoint: Path) -> dict | None:
    try:
        health = read_trainer_state(checkpoint).get(HEALTH_KEY)
    except (OSError, ValueError):
        return None
    if isinstance(health, dict):
        return health
    weights = checkpoint / "model.safetensors"  # written before health was recorded: measure the weights
    if not weights.is_file():
        return None
    from safetensors.torch import load_file

    class _Weights:
        def state_dict(self):
            return load_file(os.fspath(weights))

    return weights_health(_Weights())


def health_problem(health: dict | None) -> str | None:
    """Why a checkpoint with this health record is not good, or None when it is."""
    if health is None:
        return "its weights cannot be read"
    loss = health.get("loss")
    if not health.get("weights_finite"):
        return f"non-finite weights (in {health.get('largest')})"
    peak = health.get("max_abs_weight")
    if not isinstance(peak, (int, float)):
        return "no record of its weights' magnitude"
    if peak >= WEIGHT_BOUND:
        return f"weights up to {peak:.3g} (in {health.get('largest')}), above {WEIGHT_BOUND:.0e}"
    if loss is not None and not math.isfinite(loss):
        return f"a non-finite loss ({loss})"
    return None


@dataclass(frozen=True)
class GoodCheckpoint:
    path: Path
    step: int
    health: dict
    skipped: tuple[tuple[Path, str], ...] = ()  # newer checkpoints that are not good, and why


def last_good(root: str | os.PathLike) -> GoodCheckpoint | None:
    """The newest checkpoint under ``root`` whose weights are finite and below :data:`WEIGHT_BOUND` and whose
    recorded loss is finite (:class:`GoodCheckpoint`, naming the newer ones that are not), else None."""
    return _survey_good(Path(root))[0]


def _survey_good(root: Path) -> tuple[GoodCheckpoint | None, list[tuple[Path, str]]]:
    intact, damaged = survey_checkpoints(root)
    bad = list(damaged)
    for path in reversed(intact):
        health = _health_of(path)
        problem = health_problem(health)
        if problem is None:
            newer = tuple((p, w) for p, w in bad if checkpoint_step(p) > checkpoint_step(path))
            return GoodCheckpoint(path, checkpoint_step(path), health, newer), bad
        bad.append((path, problem))
    return None, bad


def describe_last_good(root: str | os.PathLike) -> str:
    """The clause of a stop message that names the last good checkpoint under ``root``, or says that none is."""
    good, bad = _survey_good(Path(root))
    if good is not None:
        loss = good.health.get("loss")
        facts = [f"step {good.step}", f"weights finite, up to {good.health['max_abs_weight']:.3g}"]
        facts += [f"loss {loss:.4g}"] if loss is not None else []
        text = f"the last good checkpoint is {good.path} ({', '.join(facts)})"
        if good.skipped:
            text += "; newer ones are not: " + ", ".join(f"{p.name} ({why})" for p, why in good.skipped[:3])
        return text
    if not bad:
        return "no checkpoint had been written yet: restart with --overwrite_output_dir"
    shown = ", ".join(f"{p.name}: {why}" for p, why in sorted(bad, key=lambda b: -checkpoint_step(b[0]))[:3])
    return f"no checkpoint is known good ({shown}): restart with --overwrite_output_dir"


__all__ = ["HEALTH_KEY", "WEIGHT_BOUND", "GoodCheckpoint", "deep_problem", "describe_last_good", "file_crc32",
           "health_problem", "last_good", "require_usable_checkpoint", "usable_checkpoint", "weights_health"]
