"""``seqserve export``, ``seqserve build`` and ``seqserve repo``: what release pipelines script.

Every command prints one JSON object with ``--json``; exit codes are in service/exit_codes.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from export.train_cli import default_run_dir, require_training_extra, run_config_from_args
from service.exit_codes import CommandError, ExitCode
from service.manifest import ManifestError
from service.repository import latest_version, model_names, versions

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = Path("model_repository")
BUILD_DATASET = "rotten-tomatoes"
BUILD_ARCHITECTURES = ("lstm", "transformer")


def gate_settings_from_args(args: argparse.Namespace):
    from export.gates import GateSettings

    values = {
        "parity_tolerance": args.parity_tolerance,
        "fp16_min_agreement": args.fp16_min_agreement,
        "fp16_max_accuracy_drop": args.fp16_max_accuracy_drop,
    }
    return GateSettings(**{k: v for k, v in values.items() if v is not None})


def run_export(run_dir: Path, repository: Path, name: str, args: argparse.Namespace,
               version: int | None = None) -> dict:
    from export.datasets import DatasetError
    from export.gates import GateFailure
    from export.pipeline import export_run
    from export.publish import VersionExistsError

    if not (run_dir / "model.pt").is_file():
        raise CommandError(f"{run_dir}: not a run directory (no model.pt)", ExitCode.DATA_ERROR)
    try:
        result = export_run(run_dir, repository, name, version=version,
                            gates=gate_settings_from_args(args), opset=args.opset,
                            allow_fp16_failure=args.allow_fp16_failure)
    except GateFailure as failure:
        if args.json:
            print(json.dumps({"ok": False, "error": str(failure), **failure.report},
                             default=str))
        raise CommandError(str(failure), ExitCode.GATE_FAILED) from failure
    except VersionExistsError as error:
        raise CommandError(str(error), ExitCode.IO_ERROR) from error
    except (DatasetError, ManifestError) as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from error
    except PermissionError as error:
        raise CommandError(f"cannot write {error.filename}: permission denied",
                           ExitCode.IO_ERROR) from error
    return result.to_dict()


def describe_export(report: dict) -> str:
    evaluation = report["evaluation"]
    fp16 = next(a for a in report["artifacts"] if a["precision"] == "fp16")
    kept = f", {'+'.join(fp16['fp32_op_types'])} kept in fp32" if fp16["fp32_op_types"] else ""
    return (f"{report['name']} v{report['version']} ({report['architecture']}): parity "
            f"{evaluation['onnx_vs_torch_max_abs_diff']:.1e}, accuracy fp32 "
            f"{evaluation['fp32']['accuracy']:.4f} / fp16 {evaluation['fp16']['accuracy']:.4f}, "
            f"fp16 agreement {evaluation['fp16_agreement']:.4f} "
            f"({'passed' if fp16['passed_gates'] else 'FAILED'}{kept}), "
            f"{report['export_seconds']:.0f}s → {report['path']}")


def handle_export(args: argparse.Namespace) -> int:
    require_training_extra()
    report = run_export(args.run_dir, args.repository, args.name, args, version=args.version)
    print(json.dumps({"ok": True, **report}) if args.json else describe_export(report))
    return ExitCode.OK


def handle_build(args: argparse.Namespace) -> int:
    """Train (where no run exists) and export the default pair, skipping what is already built."""
    require_training_extra()
    from export.train import train

    architectures = list(BUILD_ARCHITECTURES) + (["bow"] if args.include_bow else [])
    built = []
    for architecture in architectures:
        name = f"sentiment-{architecture}"
        existing = latest_version(args.repository, name)
        if existing is not None and not args.force:
            log.info("%s: version %d already in %s", name, existing.version, args.repository)
            built.append({"name": name, "version": existing.version, "skipped": True,
                          "path": str(existing.directory)})
            continue
        run_dir = args.runs / default_run_dir(BUILD_DATASET, architecture).name
        if not (run_dir / "metrics.json").is_file():
            config = run_config_from_args(args, architecture)
            log.info("training %s on %s → %s", architecture, BUILD_DATASET, run_dir)
            result = train(config, run_dir, progress=not args.json and sys.stderr.isatty())
            log.info("%s: test accuracy %.4f", architecture, result.test.accuracy)
        report = run_export(run_dir, args.repository, name, args)
        if not args.json:
            print(describe_export(report))
        built.append({**report, "skipped": False})
    if args.json:
        print(json.dumps({"ok": True, "repository": str(args.repository), "models": built}))
    return ExitCode.OK


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
            rows.append({
                "name": name, "version": manifest.version,
                "architecture": manifest.architecture, "labels": len(manifest.labels),
                "accuracy_fp32": manifest.evaluation.fp32.accuracy,
                "fp16_agreement": manifest.evaluation.fp16_agreement,
                "precisions": [a.precision + ("" if a.passed_gates else "(failed)")
                               for a in manifest.artifacts],
                "created_at": manifest.created_at.isoformat(),
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
        agreement = row["fp16_agreement"]
        print(f"{row['name']:<28} v{row['version']:<4} {row['architecture']:<12} "
              f"acc {row['accuracy_fp32']:.4f}  fp16 agreement "
              f"{'-' if agreement is None else f'{agreement:.4f}'}  "
              f"{','.join(row['precisions'])}  {row['created_at']}")
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


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gates")
    group.add_argument("--parity-tolerance", type=float,
                       help="max abs probability difference ONNX vs PyTorch (default: 1e-4)")
    group.add_argument("--fp16-min-agreement", type=float,
                       help="fp16 vs fp32 prediction agreement (default: 0.995)")
    group.add_argument("--fp16-max-accuracy-drop", type=float,
                       help="fraction of accuracy fp16 may lose (default: 0.005)")
    group.add_argument("--allow-fp16-failure", action="store_true",
                       help="publish anyway when fp16 fails its gate (marked failed, not served)")
    group.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")


def add_export_commands(commands: argparse._SubParsersAction) -> None:
    from export.train_cli import add_training_arguments

    export = commands.add_parser("export", help="export a run to ONNX into a model repository")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="default: ./model_repository")
    export.add_argument("--name", required=True, help="model name, e.g. sentiment-lstm")
    export.add_argument("--version", type=int,
                        help="pin the version number (refused if it exists); default: next")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    add_gate_arguments(export)
    export.set_defaults(handler=handle_export)

    build = commands.add_parser(
        "build", help="train (if needed) and export the default LSTM + Transformer pair",
        description=f"Trains on {BUILD_DATASET} where no run exists and exports "
                    "sentiment-lstm and sentiment-transformer (and sentiment-bow with "
                    "--include-bow) into the repository, skipping models already there.")
    build.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                       help="default: ./model_repository")
    build.add_argument("--runs", type=Path, default=Path("runs"), help="default: ./runs")
    build.add_argument("--include-bow", action="store_true", help="also the bag-of-embeddings")
    build.add_argument("--force", action="store_true", help="export a new version even if present")
    build.add_argument("--json", action="store_true")
    add_gate_arguments(build)
    add_training_arguments(build)
    build.set_defaults(handler=handle_build, dataset=BUILD_DATASET, text_column="text",
                       label_column="label", format="auto", validation_fraction=0.1,
                       test_fraction=0.1)

    repo = commands.add_parser("repo", help="show what a model repository holds")
    repo_commands = repo.add_subparsers(dest="repo_command", required=True)
    listing = repo_commands.add_parser("list", help="every version with its key figures")
    listing.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=handle_repo_list)
    show = repo_commands.add_parser("show", help="one version's manifest")
    show.add_argument("name")
    show.add_argument("--version", type=int, help="default: the newest")
    show.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=handle_repo_show)
