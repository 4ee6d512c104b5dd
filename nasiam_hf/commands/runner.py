"""The one entry point of every command: parse the flags first (``--help`` imports no engine, no ``datasets``),
then import and run the engine, and turn errors into one ``error:`` line (exit 2 for bad input, 1 for a failure
during training; the traceback only with ``--debug`` or ``NASIAM_DEBUG=1``)."""

from __future__ import annotations

import importlib
import os
import sys


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("NASIAM_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_command(command_cls, engine: str, argv: list[str] | None = None):
    """Parse ``argv`` into ``command_cls`` and call the engine named ``"module:function"`` with it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        command = command_cls.parse(argv)
        module, function = engine.split(":")
        run = getattr(importlib.import_module(module), function)
        return run(command)
    except Exception as error:
        if debug:
            raise
        from ..trainer import NonFiniteLossError

        if isinstance(error, NonFiniteLossError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        if isinstance(error, ValueError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
