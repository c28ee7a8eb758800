"""``seqserve classify``: a client of a running server.

Texts come from the arguments, from ``--file`` (one per line) or from stdin (``-``); they are
sent in requests of at most the server's own per-request limit, which the server reports in
``GetModel``.

A secured server: ``--tls-ca`` (TLS, trusting that CA; ``--tls`` alone trusts gRPC's default
roots), ``--tls-cert``/``--tls-key`` (mutual TLS), and a bearer token from ``--token-file`` or
the environment (``SEQSERVE_TOKEN``), never needed on the command line where ``ps`` shows it.

Exit codes: 0 ok, 2 usage (bad flags, unreadable files), 4 the server answered with an error or
could not be reached, UNAUTHENTICATED and UNAVAILABLE included (one line
``seqserve: error: <grpc code>: <message>`` on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode
from service.server.settings import ENV_PREFIX, ServeSettings

if TYPE_CHECKING:  # the client is imported only when the command runs
    from service.channel_security import ChannelSecurity
    from service.client import ClientError


def add_classify_command(subparsers: argparse._SubParsersAction) -> None:
    classify = subparsers.add_parser(
        "classify", help="classify texts with a running server",
        description="Print label and score per text. Texts come from the arguments, from "
        "--file (one per line), or from stdin with '-'.")
    classify.add_argument("texts", nargs="*", metavar="TEXT", help="texts; '-' reads stdin")
    classify.add_argument("--file", type=Path, help="file with one text per line ('-': stdin)")
    classify.add_argument("--server", default=_env("SERVER", defaults.SERVER),
                          help="host:port (default: %(default)s; env SEQSERVE_SERVER)")
    classify.add_argument("--model", default=_env("MODEL", None),
                          help="model name (default: the server's only model; env SEQSERVE_MODEL)")
    classify.add_argument("--version", type=int, help="model version (default: the served one)")
    classify.add_argument("--top-k", type=int, default=0, help="also print the K best labels")
    classify.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                          help="per-call deadline (default: %(default)s)")
    classify.add_argument("--json", action="store_true", help="print one JSON document")
    security = classify.add_argument_group(
        "security", "TLS, mutual TLS and a bearer token, for a server started with tls_* or "
        "auth_* settings")
    security.add_argument("--tls", action="store_true",
                          help="connect with TLS, trusting gRPC's default roots (implied by "
                          "--tls-ca, --tls-cert and --tls-key)")
    security.add_argument("--tls-ca", type=Path, metavar="FILE",
                          help="CA certificates (PEM) the server's certificate must chain to")
    security.add_argument("--tls-cert", type=Path, metavar="FILE",
                          help="client certificate (PEM) for mutual TLS; needs --tls-key")
    security.add_argument("--tls-key", type=Path, metavar="FILE",
                          help="the private key of --tls-cert (PEM)")
    security.add_argument("--tls-server-name", metavar="NAME",
                          help="the name the server's certificate must carry, when it is not "
                          "the host of --server")
    security.add_argument("--token-file", type=Path, metavar="FILE",
                          help="file holding the bearer token (its first line that is not blank "
                          "or a # comment); default: env SEQSERVE_TOKEN")
    security.add_argument("--token", metavar="TOKEN",
                          help="the bearer token itself; shows in ps and shell history: prefer "
                          "--token-file or SEQSERVE_TOKEN")
    classify.set_defaults(handler=handle_classify)


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


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


def channel_security(args: argparse.Namespace) -> ChannelSecurity | None:
    """The TLS and token flags as a ``ChannelSecurity``; None: plaintext without a token."""
    from service.channel_security import ChannelSecurity, ChannelSecurityError

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together: give both or neither",
                           ExitCode.USAGE)
    if args.token_file is not None and args.token is not None:
        raise CommandError("--token-file and --token: give one of them", ExitCode.USAGE)
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                       ("--tls-key", args.tls_key), ("--token-file", args.token_file)):
        if path is not None and not path.is_file():
            problem = "no such file" if not path.exists() else "not a file"
            raise CommandError(f"{flag} {path}: {problem}", ExitCode.USAGE)
    token = args.token
    if token is None and args.token_file is None:
        token = os.environ.get(f"{ENV_PREFIX}TOKEN") or None
    try:
        security = ChannelSecurity.from_files(
            ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key, token=token,
            token_file=args.token_file, server_name=args.tls_server_name, tls=args.tls)
    except ChannelSecurityError as error:
        raise CommandError(str(error), ExitCode.USAGE) from None
    return security if security.tls or security.token is not None else None


def _server_error(error: ClientError, security: ChannelSecurity | None) -> CommandError:
    """The server's refusal in one line, with a hint when a missing flag is the likely cause."""
    import grpc

    message = " ".join(str(error).split())  # gRPC's connection errors may span lines
    if error.code == grpc.StatusCode.UNAVAILABLE and (security is None or not security.tls):
        message += " (if the server uses TLS: --tls-ca FILE, or --tls)"
    elif error.code == grpc.StatusCode.UNAUTHENTICATED and (
            security is None or security.token is None):
        message += " (a token: --token-file FILE or env SEQSERVE_TOKEN)"
    return CommandError(message, ExitCode.SERVER_ERROR)


def _lines(content: str) -> list[str]:
    # Blank lines separate nothing and would only be refused by the server.
    return [line for line in content.splitlines() if line.strip()]


def chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def handle_classify(args: argparse.Namespace) -> int:
    from service.client import Client, ClientError

    texts = read_texts(args)
    if args.top_k < 0:
        raise CommandError("--top-k must be >= 0", ExitCode.USAGE)
    security = channel_security(args)
    try:
        with Client(args.server, timeout=args.deadline, security=security) as client:
            model = args.model or _only_model(client)
            # A server too old to report its limit runs with the default one.
            limit = (client.get_model(model, args.version).max_texts_per_request
                     or ServeSettings.model_fields["max_texts_per_request"].default)
            parts = chunks(texts, limit)
            results = [client.classify(part, model=model, version=args.version,
                                       top_k=args.top_k) for part in parts]
    except ClientError as error:
        raise _server_error(error, security) from None
    pairs = [(text, r) for part, result in zip(parts, results, strict=True)
             for text, r in zip(part, result.results, strict=True)]
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
