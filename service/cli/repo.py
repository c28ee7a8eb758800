"""``seqserve repo list|show``: what a model repository holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode
from service.repo.layout import model_names, versions
from service.repo.manifest import ManifestError


def handle_repo_list(args: argparse.Namespace) -> int:
    rows = []
    for name in model_names(args.repository):
        for model_version in versions(args.repository, name):
            try:
                manifest = model_version.load_manifest()
            except ManifestError as error:
                rows.append({"name": name, "version": model_version.version,
                             "error": str(error)})
                continue
            ev = manifest.evaluation
            rows.append({
                "name": name, "version": manifest.version,
                "architecture": manifest.architecture, "labels": len(manifest.labels),
                "accuracy_fp32": ev.fp32.accuracy if ev else None,
                "fp16_agreement": ev.fp16_agreement if ev else None,
                "int8_agreement": ev.int8_agreement if ev else None,
                "precisions": [a.precision + ("" if a.passed_gates else "(failed)")
                               for a in manifest.artifacts],
                "created_at": manifest.created_at.isoformat(),
                "teacher": (f"{manifest.distillation.teacher.name}"
                            + (f":{manifest.distillation.teacher.version}"
                               if manifest.distillation.teacher.version is not None else "")
                            if manifest.distillation else None),
            })
    if args.json:
        print(json.dumps({"repository": str(args.repository), "versions": rows}))
        return ExitCode.OK
    if not rows:
        print(f"{args.repository}: no models")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<28} v{row['version']:<4} INVALID: {row['error']}")
            continue
        print(f"{row['name']:<28} v{row['version']:<4} {row['architecture']:<12} "
              f"acc {_figure(row['accuracy_fp32'])}  agreement fp16 "
              f"{_figure(row['fp16_agreement'])} int8 {_figure(row['int8_agreement'])}  "
              f"{','.join(row['precisions'])}  {row['created_at']}"
              + (f"  distilled from {row['teacher']}" if row["teacher"] else ""))
    return ExitCode.OK


def handle_repo_show(args: argparse.Namespace) -> int:
    found = versions(args.repository, args.name)
    if args.version is not None:
        found = [v for v in found if v.version == args.version]
    if not found:
        which = f"{args.name} version {args.version}" if args.version else args.name
        raise CommandError(f"{which} not found in {args.repository}", ExitCode.DATA_ERROR)
    try:
        manifest = found[-1].load_manifest()
    except ManifestError as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from error
    print(manifest.model_dump_json(indent=None if args.json else 2))
    return ExitCode.OK


def add_repo_commands(commands: argparse._SubParsersAction) -> None:
    repo = commands.add_parser("repo", help="show what a model repository holds")
    repo_commands = repo.add_subparsers(dest="repo_command", required=True)
    listing = repo_commands.add_parser("list", help="every version with its key figures")
    listing.add_argument("--repository", type=Path, default=defaults.REPOSITORY)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=handle_repo_list)
    show = repo_commands.add_parser("show", help="one version's manifest")
    show.add_argument("name")
    show.add_argument("--version", type=int, help="default: the newest")
    show.add_argument("--repository", type=Path, default=defaults.REPOSITORY)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=handle_repo_show)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
