"""``seqserve doctor``: can this node serve on CUDA, and if not, why; and how each model runs.

Reports the ONNX Runtime build and providers, every library the CUDA provider needs (found
where, or missing), the driver, and per model (newest version): the device each precision's
session really lands on, node placement, fp16/int8 agreement with fp32 on this device over the
stored evaluation slice, and a latency sweep (batch 1/8/32 x 16/64/256 tokens, up to the
model's max length). Sessions use the server's options, and ``SEQSERVE_*`` variables apply as
they do to ``seqserve serve``.

Exit codes: 0 the device policy can be honoured (``auto`` always can: it falls back to CPU),
2 usage, 3 the repository does not exist or a model version is unreadable, 8 ``--device cuda``
cannot be honoured (CUDA does not start, or ``seqserve serve --device cuda`` would refuse a
model: a session on CPU, compute ops placed on CPU, a failed run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode

if TYPE_CHECKING:  # the command imports the server side only when it runs
    from service.server.doctor import DoctorReport

DEVICE_NOT_HONOURED = ExitCode.DEVICE_UNAVAILABLE
DEFAULT_RUNS = 5


def add_doctor_command(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="check what this node can run: CUDA libraries, driver, models",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("--repository", type=Path, metavar="DIR",
                        help=f"model repository (default: {defaults.REPOSITORY}; a missing "
                        "default is no error, the node's checks still run)")
    doctor.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="the device policy to check, as `seqserve serve --device` "
                        "(default: %(default)s)")
    doctor.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="only this model (repeatable; default: every model)")
    doctor.add_argument("--runs", type=int, default=DEFAULT_RUNS, metavar="N",
                        help="timed runs per latency cell, after one unmeasured (0: no "
                        "sweep; default: %(default)s)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=handle_doctor)


def handle_doctor(args: argparse.Namespace) -> int:
    from service.server.doctor import run_doctor
    from service.server.doctor_text import render
    from service.server.settings import ServeSettings

    if args.runs < 0:
        raise CommandError("--runs must be >= 0", ExitCode.USAGE)
    repository = args.repository if args.repository is not None else defaults.REPOSITORY
    if args.repository is not None and not repository.is_dir():
        raise CommandError(f"{repository}: no such repository", ExitCode.DATA_ERROR)
    try:
        settings = ServeSettings(repository=repository, device=args.device)
    except ValidationError as error:
        raise CommandError.invalid_settings(error) from None
    report = run_doctor(settings, runs=args.runs, models=args.model)
    code = exit_code(report)
    if args.json:
        print(json.dumps(report.to_dict() | {"exit_code": int(code)}))
    else:
        print(render(report))
    return code


def exit_code(report: DoctorReport) -> int:
    """8 when --device cuda cannot be honoured, 3 when a model version is unreadable, else 0."""
    if report.device_policy == "cuda" and not report.honoured:
        return DEVICE_NOT_HONOURED
    if any(model.error for model in report.models):
        return ExitCode.DATA_ERROR
    return ExitCode.OK
