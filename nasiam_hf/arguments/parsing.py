"""Parse a command's flags, and an optional ``--config`` file under them, into its typed bundle.

``HfArgumentParser.parse_yaml_file`` builds the dataclasses straight from ``yaml.safe_load`` (no type conversion,
no check of choices: ``learning_rate: 1e-3`` arrives as a string). Here the file is read, every key is checked
against the command's flags (unknown keys are named), every value is converted and checked like the same value on
the command line, and the result becomes the parser's defaults; the command line is then parsed over it, so a flag
overrides the file.

A run record (the ``training_args.json`` a run writes) is accepted as a config file: what it records that is not
an argument (package versions, timestamps, resolved values) and redacted secrets are dropped, so the record reruns
the run, never with a redacted token.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import os
import re
import sys
from types import MappingProxyType
from typing import Any

from ..errors import UsageError, did_you_mean

REDACTED = "<redacted>"
OWN_METADATA = frozenset({"resume"})  # field metadata of nasiam_hf.arguments that is not for argparse
SEE_HELP = " (see --help)"


def invalid_choice(value: Any, choices) -> str:
    """``invalid choice 'simclrr' (choose from simsiam, simclr, ...); did you mean 'simclr'?``"""
    return (f"invalid choice {value!r} (choose from {', '.join(str(c) for c in choices)})"
            f"{did_you_mean(value, choices)}")


class OneLineErrors:
    """argparse errors as one line: a :class:`UsageError` (``error: ...``, exit status 2, through
    :func:`nasiam_hf.errors.run_entry_point`; a ValueError from Python) instead of the usage and ``SystemExit``;
    a bad choice names the close ones."""

    def error(self, message: str):
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # --output_dir, not --output_dir/--output-dir
        raise UsageError(f"{message}{SEE_HELP}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, invalid_choice(value, action.choices))


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """A plain argparse parser with one-line errors (``nasiam-convert``, the ``--config`` pre-parser)."""


def build_parser(command_cls) -> argparse.ArgumentParser:
    """The ``HfArgumentParser`` of a command: one argument group per dataclass, plus ``--config``."""
    from transformers import HfArgumentParser

    class Parser(OneLineErrors, HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            # argparse receives the field's metadata as keyword arguments: hand it only what it knows
            field = copy.copy(field)
            field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in OWN_METADATA})
            HfArgumentParser._parse_dataclass_field(parser, field)

    # no abbreviations: an unknown or mistyped flag is named (with the close ones), never taken for another
    parser = Parser(list(command_cls.groups().values()), prog=command_cls.name or None,
                    description=command_cls.description, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, metavar="FILE",
                        help="A YAML or JSON file of flag values (flat 'flag_name: value'; a run's "
                             "training_args.json also works); flags on the command line override it.")
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the action that sets it (the positive form of a boolean flag, not its ``--no_`` complement)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or isinstance(action, argparse._StoreFalseAction):
            continue
        found.setdefault(action.dest, action)
    return found


def _convert(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A config-file value converted and checked as argparse would check it on the command line."""
    if value is None:
        return None
    convert = action.type
    try:
        if action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            converted = [convert(str(v)) if convert else v for v in items]
        elif isinstance(value, bool):
            if getattr(convert, "__name__", "") != "string_to_bool":
                raise ValueError("a boolean is not a valid value here; YAML reads yes/no/on/off/true/false as "
                                 "booleans: quote the value, e.g. 'no'")
            converted = value
        elif isinstance(value, (dict, list)):
            if convert is not str:
                raise ValueError("a mapping or list is not a valid value here")
            converted = json.dumps(value)  # JSON-valued flags such as --backbone_kwargs
        else:
            converted = convert(str(value)) if convert is not None else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{where}: {key}: {value!r} is not a valid value ({error})") from None
    choices = action.choices
    if choices is not None:
        for item in converted if isinstance(converted, list) else [converted]:
            if item not in choices:
                raise ValueError(f"{where}: {key}: {item!r} is not one of {list(choices)}"
                                 f"{did_you_mean(item, choices)}")
    return converted


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{dest: value}`` from a YAML/JSON config file or a run record, converted and checked."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"--config {path!r} cannot be read: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(values).__name__}")
    actions = _actions(parser)
    is_record = "package_versions" in values or "timestamp_utc" in values
    if is_record:  # a training_args.json: keep only this command's arguments, never a redacted secret
        values = {k: v for k, v in values.items() if k in actions and v != REDACTED}
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, actions, n=1))
                 else repr(k) for k in unknown]
        raise ValueError(f"--config {path!r}: unknown keys {', '.join(hints)}; --help lists this command's flags")
    return {key: _convert(key, value, actions[key], f"--config {path!r}") for key, value in values.items()}


def _set_defaults(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Values from a config file or keywords become the parser's defaults; one given satisfies a required flag."""
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and defaults[action.dest] is not None:
            action.required = False


def _bundle(command_cls, values: dict[str, Any]):
    """The parsed ``{dest: value}`` as the command's bundle: each dataclass checks its values in ``__post_init__``."""
    values = {k: v for k, v in values.items() if k != "config"}
    groups = {}
    for attribute, dtype in command_cls.groups().items():
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        groups[attribute] = dtype(**{k: v for k, v in values.items() if k in names})
    return command_cls(**groups)


def _unrecognized(parser: argparse.ArgumentParser, remaining: list[str]) -> str:
    """``unrecognized arguments: ...`` with the close flag names of each unknown flag."""
    options = [o for o in parser._option_string_actions if o.startswith("--") and "-" not in o[2:]]
    hints = [f"{token}: {hint}" for token in remaining if token.startswith("--")
             if (hint := did_you_mean(token.partition("=")[0], options, prefix=""))]
    return f"unrecognized arguments: {' '.join(remaining)}" + "".join(f"; {hint}" for hint in hints)


def parse_command(command_cls, argv: list[str] | None = None):
    """Flags (``argv``, default ``sys.argv[1:]``) over an optional ``--config`` file -> the command's bundle.

    A bad flag raises :class:`UsageError` with one line (the console scripts print it and exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_cls)
    pre = OneLineArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        _set_defaults(parser, read_config_file(known.config, parser))
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        parser.error(_unrecognized(parser, remaining))
    return _bundle(command_cls, vars(namespace))


# what each argparse type takes from Python, and its name in messages
_KEYWORD_TYPES = {int: ((int,), "an int"), float: ((int, float), "a number"), str: ((str, os.PathLike), "a string")}


def _keyword_value(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A Python value for the flag of ``action``, checked for its type and choices as argparse checks a flag."""
    if value is None:
        if action.default is None:
            return None
        raise UsageError(f"{where}: {key}=None is not allowed; it takes {_expected(action)} (default "
                         f"{action.default!r})")
    if getattr(action.type, "__name__", "") == "string_to_bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key}={value!r} is of type {type(value).__name__}; it takes True or False")
        return value
    if action.choices is not None:
        if not isinstance(value, str) or value not in action.choices:
            raise UsageError(f"{where}: {key}: {invalid_choice(value, action.choices)}")
        return value
    accepted, _ = _KEYWORD_TYPES.get(action.type, ((object,), ""))
    if _takes_json(action) and isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise UsageError(f"{where}: {key}={value!r} is of type {type(value).__name__}; it takes {_expected(action)}")
    if action.type is str:
        return os.fspath(value)
    return action.type(value) if action.type in (int, float) else value


def _takes_json(action: argparse.Action) -> bool:
    """A string flag holding a JSON object (``--backbone_kwargs``): from Python, a dict is welcome too."""
    return action.type is str and "JSON object" in (action.help or "")


def _expected(action: argparse.Action) -> str:
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "True or False"
    if action.choices is not None:
        return "one of " + ", ".join(repr(c) for c in action.choices)
    return _KEYWORD_TYPES.get(action.type, ((), "a value"))[1] + (" or a dict" if _takes_json(action) else "")


def parse_keywords(command_cls, keywords: dict[str, Any], where: str):
    """The command's bundle from Python keywords named like its flags (``output_dir="runs/x"``), checked by the same
    parser and dataclasses as the command line: an unknown keyword is named with the close ones, a value of the
    wrong type names the type the flag takes, a bad choice the allowed ones; the cross-flag checks follow."""
    parser = build_parser(command_cls)
    actions = _actions(parser)
    unknown = sorted(k for k in keywords if k not in actions)
    if unknown:
        hints = [f"{k!r} ({hint[2:]})" if (hint := did_you_mean(k, actions)) else repr(k) for k in unknown]
        raise UsageError(f"{where}: unknown keyword{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; the "
                         f"keywords are the flags of `{command_cls.name} --help`")
    values = {key: _keyword_value(key, value, actions[key], where) for key, value in keywords.items()}
    missing = [a.dest for a in parser._actions if a.required and values.get(a.dest) is None]
    if missing:
        raise UsageError(f"{where}: missing keyword {', '.join(f'{name}=...' for name in missing)}")
    _set_defaults(parser, values)
    return _bundle(command_cls, vars(parser.parse_args([])))


__all__ = ["OneLineArgumentParser", "build_parser", "invalid_choice", "parse_command", "parse_keywords",
           "read_config_file"]
