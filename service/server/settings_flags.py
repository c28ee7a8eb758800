"""The ``seqserve serve`` flags, derived from ``ServeSettings`` (one source of truth).

Every field is a flag (``max_batch_texts`` -> ``--max-batch-texts``); an unset flag falls
through to its ``SEQSERVE_*`` variable and then to the default. The benchmark parses its
``--serve-args`` with the same parser, so the in-process baseline runs exactly the settings its
server runs.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from service.server.settings import ServeSettings

# Fields whose flag is repeatable and named in the singular.
_REPEATABLE = {"model_versions": ("--model-version", "NAME=N"),
               "shadow": ("--shadow", "PRIMARY=SHADOW:FRACTION")}


def flag_name(field: str) -> str:
    """The command-line flag of a settings field."""
    if field in _REPEATABLE:
        return _REPEATABLE[field][0]
    return "--" + field.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in ServeSettings.model_fields.items():
        help_text = f"{info.description} (default: {_default_text(info)})"
        if name in _REPEATABLE:
            flag, metavar = _REPEATABLE[name]
            parser.add_argument(flag, dest=name, action="append", metavar=metavar,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        flag = flag_name(name)
        kind = _plain_type(info.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(kind),
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                                metavar=_metavar(name, kind), help=help_text)


def settings_from_args(args: argparse.Namespace) -> tuple[ServeSettings, set[str]]:
    """The settings and the names given as flags; raises pydantic's ``ValidationError``."""
    given = {name: getattr(args, name) for name in ServeSettings.model_fields
             if hasattr(args, name)}
    return ServeSettings(**given), set(given)


def _plain_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _metavar(name: str, kind: Any) -> str:
    for suffix, metavar in (("_s", "SECONDS"), ("_ms", "MS"), ("_bytes", "BYTES"),
                            ("_file", "FILE"), ("host", "HOST"), ("port", "PORT")):
        if name.endswith(suffix):
            return metavar
    return {Path: "DIR", int: "N", float: "X"}.get(kind, "VALUE")


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        return "none"
    return str(info.default)
