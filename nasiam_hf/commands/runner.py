"""The one entry point of every training command: parse the flags first (``--help`` imports no engine, no
``datasets``), then import and run the engine, all under :func:`nasiam_hf.errors.run_entry_point` (one ``error:``
line; exit 2 for bad input, 1 for a failure during training; the traceback with ``--debug`` or ``NASIAM_DEBUG=1``)."""

from __future__ import annotations

import importlib

from ..errors import run_entry_point


def run_command(command_cls, engine: str, argv: list[str] | None = None) -> None:
    """Parse ``argv`` into ``command_cls`` and call the engine named ``"module:function"`` with it.

    Returns None, not the engine's model: console scripts end with ``sys.exit(main())``, which would print an
    object's repr and exit with status 1 (from Python, call the engine, e.g. ``run_pretrain``, for the model)."""

    def main(args: list[str]) -> None:
        command = command_cls.parse(args)
        module, function = engine.split(":")
        getattr(importlib.import_module(module), function)(command)

    run_entry_point(main, argv)
