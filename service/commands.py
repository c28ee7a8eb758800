"""``seqserve serve`` and ``seqserve classify``, registered on the main parser by ``service.cli``.

The ``serve`` flags are derived from ``ServeSettings`` (one source of truth): every field is a
flag, unset flags fall through to ``SEQSERVE_*`` variables and then to the defaults.

Exit codes: 0 ok, 1 the server could not start, 2 usage, 4 the server answered with an error or
could not be reached (one line ``seqserve: error: <grpc code>: <message>`` on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from service.exit_codes import CommandError, ExitCode
from service.settings import ENV_PREFIX, ServeSettings

# Fields whose flag is repeatable and named in the singular.
_REPEATABLE = {"model_versions": ("--model-version", "NAME=N"),
               "shadow": ("--shadow", "PRIMARY=SHADOW:FRACTION")}
# Requests the classify command sends at most per call (the server's default limit).
CLASSIFY_CHUNK = 64


def add_serving_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC",
        description="Serve every model of a repository over gRPC (seqserve.v1 and the Open "
        "Inference Protocol on one port), with Prometheus metrics on another. Every flag can "
        f"also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.")
    _add_settings_flags(serve)
    serve.set_defaults(handler=handle_serve)

    classify = subparsers.add_parser(
        "classify", help="classify texts with a running server",
        description="Print label and score per text. Texts come from the arguments, from "
        "--file (one per line), or from stdin with '-'.")
    classify.add_argument("texts", nargs="*", metavar="TEXT", help="texts; '-' reads stdin")
    classify.add_argument("--file", type=Path, help="file with one text per line ('-': stdin)")
    classify.add_argument("--server", default=_env("SERVER", "localhost:50051"),
                          help="host:port (default: %(default)s; env SEQSERVE_SERVER)")
    classify.add_argument("--model", default=_env("MODEL", None),
                          help="model name (default: the server's only model; env SEQSERVE_MODEL)")
    classify.add_argument("--version", type=int, help="model version (default: the served one)")
    classify.add_argument("--top-k", type=int, default=0, help="also print the K best labels")
    classify.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                          help="per-call deadline (default: %(default)s)")
    classify.add_argument("--json", action="store_true", help="print one JSON document")
    classify.set_defaults(handler=handle_classify)


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in ServeSettings.model_fields.items():
        help_text = f"{info.description} (default: {_default_text(info)})"
        if name in _REPEATABLE:
            flag, metavar = _REPEATABLE[name]
            parser.add_argument(flag, dest=name, action="append", metavar=metavar,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        flag = "--" + name.replace("_", "-")
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


def _plain_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _metavar(name: str, kind: Any) -> str:
    for suffix, metavar in (("_s", "SECONDS"), ("_ms", "MS"), ("_bytes", "BYTES"),
                            ("host", "HOST"), ("port", "PORT")):
        if name.endswith(suffix):
            return metavar
    return {Path: "DIR", int: "N", float: "X"}.get(kind, "VALUE")


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        return "none"
    return str(info.default)


def settings_from_args(args: argparse.Namespace) -> tuple[ServeSettings, set[str]]:
    given = {name: getattr(args, name) for name in ServeSettings.model_fields
             if hasattr(args, name)}
    try:
        return ServeSettings(**given), set(given)
    except ValidationError as error:
        raise CommandError.invalid_settings(error) from None


def handle_serve(args: argparse.Namespace) -> int:
    from service.server import StartupError, serve  # keeps `classify` light to import

    settings, overridden = settings_from_args(args)
    try:
        return asyncio.run(serve(settings, overridden=overridden))
    except StartupError as error:
        raise CommandError(str(error), ExitCode.FAILURE) from None


def read_texts(args: argparse.Namespace) -> list[str]:
    texts: list[str] = []
    for text in args.texts:
        texts += _lines(sys.stdin.read()) if text == "-" else [text]
    if args.file is not None:
        try:
            content = sys.stdin.read() if str(args.file) == "-" else args.file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"--file {args.file}: {error}", ExitCode.USAGE) from None
        texts += _lines(content)
    if not texts:
        raise CommandError("no texts: give them as arguments, with --file, or '-' for stdin",
                           ExitCode.USAGE)
    return texts


def _lines(content: str) -> list[str]:
    # Blank lines separate nothing and would only be refused by the server.
    return [line for line in content.splitlines() if line.strip()]


def handle_classify(args: argparse.Namespace) -> int:
    from service.client import Client, ClientError

    texts = read_texts(args)
    if args.top_k < 0:
        raise CommandError("--top-k must be >= 0", ExitCode.USAGE)
    try:
        with Client(args.server, timeout=args.deadline) as client:
            model = args.model or _only_model(client)
            results = [client.classify(texts[i:i + CLASSIFY_CHUNK], model=model,
                                       version=args.version, top_k=args.top_k)
                       for i in range(0, len(texts), CLASSIFY_CHUNK)]
    except ClientError as error:
        raise CommandError(str(error), ExitCode.SERVER_ERROR) from None
    pairs = [(text, r) for chunk, result in zip(range(0, len(texts), CLASSIFY_CHUNK), results,
                                                 strict=True)
             for text, r in zip(texts[chunk:chunk + CLASSIFY_CHUNK], result.results,
                                strict=True)]
    if args.json:
        first = results[0]
        document = {
            "model": first.model, "version": first.version,
            "architecture": first.architecture, "precision": first.precision,
            "device": first.device,
            "results": [{"text": text, **asdict(r)} for text, r in pairs],
            "timings": [asdict(result.timing) for result in results],
        }
        print(json.dumps(document, indent=2))
        return 0
    for text, r in pairs:
        top = "\t" + " ".join(f"{label}={score:.4f}" for label, score in r.top) if r.top else ""
        flag = " [truncated]" if r.truncated else ""
        print(f"{r.label}\t{r.score:.4f}{top}\t{text}{flag}")
    return 0


def _only_model(client: Any) -> str:
    names = [m.name for m in client.list_models()]
    if len(names) != 1:
        raise CommandError(f"--model is required (the server has: {', '.join(names) or 'none'})",
                           ExitCode.USAGE)
    return names[0]
