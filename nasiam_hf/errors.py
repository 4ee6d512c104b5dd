"""The errors of the package and the one wrapper every console command runs under.

Two kinds of failure reach the user, and the exit status tells them apart:

* :class:`UsageError` (a ``ValueError``): bad input found before or outside training (a flag, a path, a folder of
  the wrong kind, a damaged checkpoint). Exit status 2.
* :class:`TrainingError` (a ``RuntimeError``): the run started and then failed (a non-finite loss, a bad image met
  while training, a failed push). Exit status 1.

:func:`run_entry_point` turns these, and the common errors of the libraries underneath (missing files, a file where
a folder should be, damaged safetensors, a model that cannot be loaded), into one line ``error: ...`` on stderr.
The traceback is printed only with ``--debug`` on the command line or ``NASIAM_DEBUG=1`` in the environment.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NASIAM_DEBUG"
USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input: the message names the value, file or flag and what is allowed. Exit status 2."""

    exit_code = USAGE_EXIT


class TrainingError(RuntimeError):
    """A failure after training started. Exit status 1."""

    exit_code = FAILURE_EXIT


class FolderKindError(UsageError):
    """A path holds something other than what its use needs (see :mod:`nasiam_hf.folders`)."""


class DamagedCheckpointError(UsageError):
    """A checkpoint that was named explicitly is incomplete or unreadable."""


class OutputDirError(UsageError):
    """The output folder cannot be used as asked (another run or other files there, contradictory flags)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class PushError(TrainingError):
    """Uploading to the Hub failed; the model is saved locally."""


def did_you_mean(value: object, choices, prefix: str = "; ") -> str:
    """``"; did you mean 'simclr'?"`` for the choice closest to ``value`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1, cutoff=0.6)
    return f"{prefix}did you mean {close[0]!r}?" if close else ""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether the traceback should be shown: ``--debug`` in ``argv`` or ``NASIAM_DEBUG`` set to a true value."""
    argv = sys.argv[1:] if argv is None else argv
    flag = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in argv or flag in {"1", "true", "yes", "on"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _path_of(error: OSError) -> str | None:
    return os.fspath(error.filename) if getattr(error, "filename", None) is not None else None


def describe_error(error: BaseException) -> tuple[str, int]:
    """The one-line message and the exit status for ``error``."""
    from safetensors import SafetensorError

    if isinstance(error, KeyboardInterrupt):
        return "interrupted", INTERRUPT_EXIT
    code = getattr(error, "exit_code", None)
    if isinstance(error, (UsageError, TrainingError)) and code is not None:
        return _one_line(error), code
    if isinstance(error, SafetensorError):
        return (f"a .safetensors file cannot be read, it is truncated or corrupted ({_one_line(error)}); "
                "save or download it again", USAGE_EXIT)
    if isinstance(error, OSError):
        path = _path_of(error)
        if path is None:  # messages of transformers / datasets / our own code, which name the path themselves
            failure = error.errno in (errno.ENOSPC, errno.EDQUOT)
            return _one_line(error), FAILURE_EXIT if failure else USAGE_EXIT
        if isinstance(error, FileNotFoundError):
            return f"{path!r} does not exist: check the path", USAGE_EXIT
        if isinstance(error, IsADirectoryError):
            return f"{path!r} is a folder where a file was expected: give a file path", USAGE_EXIT
        if isinstance(error, NotADirectoryError):
            return (f"{path!r}: a file is in the way where a folder was expected (an --output_dir must be a folder "
                    "or a new path): choose another path", USAGE_EXIT)
        if isinstance(error, PermissionError):
            return f"permission denied for {path!r}: choose a path you can write to, or fix its permissions", USAGE_EXIT
        if isinstance(error, FileExistsError):
            return f"{path!r} already exists: remove it or choose another path", USAGE_EXIT
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left for {path!r}: free some space or choose another --output_dir", FAILURE_EXIT
        return f"{path!r}: {error.strerror or _one_line(error)}", USAGE_EXIT
    if isinstance(error, ValueError):
        return _one_line(error), USAGE_EXIT
    if type(error).__name__ == "OutOfMemoryError":
        return (f"out of memory ({_one_line(error)[:200]}): lower --per_device_train_batch_size", FAILURE_EXIT)
    if isinstance(error, RuntimeError):
        return _one_line(error), FAILURE_EXIT
    return (f"unexpected {type(error).__name__}: {_one_line(error)} (run again with {DEBUG_FLAG} or {DEBUG_ENV}=1 "
            "for the traceback)", FAILURE_EXIT)


def run_entry_point(main: Callable[[list[str]], T], argv: Sequence[str] | None = None) -> T:
    """Run ``main(argv)`` (a command: parse, then run); any error ends the process with one ``error: ...`` line.

    Exit status 2 for bad input, 1 for a failure during the run, 130 for Ctrl-C outside the training loop (inside
    it, the engines turn Ctrl-C into a checkpoint and exit 0). ``SystemExit`` (argparse's own errors, ``--help``)
    passes through unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        message, code = describe_error(error)
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)


__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "DamagedCheckpointError",
    "FolderKindError",
    "NonFiniteLossError",
    "OutputDirError",
    "PushError",
    "TrainingError",
    "UsageError",
    "debug_requested",
    "describe_error",
    "did_you_mean",
    "run_entry_point",
]
