"""``seqserve export`` and ``seqserve build``: what release pipelines script.

Every command prints one JSON object with ``--json``; exit codes are in
``service/cli/exit_codes.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode
from service.cli.train import default_run_dir, require_training_extra, run_config_from_args
from service.repo.graph import DEFAULT_OPSET
from service.repo.layout import latest_version
from service.repo.manifest import ManifestError

log = logging.getLogger(__name__)

BUILD_DATASET = "rotten-tomatoes"
BUILD_ARCHITECTURES = ("lstm", "transformer", "pretrained")
#: ``build --distilled``: an LSTM student of the fine-tuned model (about 9 minutes on 2 cores).
DISTILLED_NAME, DISTILLED_TEACHER = "sentiment-distilled", "sentiment-pretrained"


@dataclass(frozen=True)
class ExportOptions:
    """What the gate flags of ``export`` and ``build`` ask for; unset gates keep their defaults."""

    parity_tolerance: float | None = None
    fp16_min_agreement: float | None = None
    fp16_max_accuracy_drop: float | None = None
    allow_fp16_failure: bool = False
    opset: int = DEFAULT_OPSET
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOptions:
        return cls(parity_tolerance=args.parity_tolerance,
                   fp16_min_agreement=args.fp16_min_agreement,
                   fp16_max_accuracy_drop=args.fp16_max_accuracy_drop,
                   allow_fp16_failure=args.allow_fp16_failure, opset=args.opset, json=args.json)

    def gates(self) -> Any:
        from export.gates import GateSettings

        values = {"parity_tolerance": self.parity_tolerance,
                  "fp16_min_agreement": self.fp16_min_agreement,
                  "fp16_max_accuracy_drop": self.fp16_max_accuracy_drop}
        return GateSettings(**{k: v for k, v in values.items() if v is not None})


@contextlib.contextmanager
def publishing_failures(*, json_output: bool) -> Iterator[None]:
    """What publishing behind the gates can refuse (``export``, ``build`` and ``import``),
    each as a ``CommandError`` with its exit code; a failed gate's report is printed first
    with ``--json``."""
    from export.datasets import DatasetError
    from export.gates import GateFailure
    from export.publish import VersionExistsError

    try:
        yield
    except GateFailure as failure:
        if json_output:
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


def run_export(run_dir: Path, repository: Path, name: str, options: ExportOptions,
               version: int | None = None) -> dict:
    """Export one run behind the gates; every failure becomes a ``CommandError``."""
    from export.pipeline import export_run

    if not (run_dir / "model.pt").is_file():
        raise CommandError(f"{run_dir}: not a run directory (no model.pt)", ExitCode.DATA_ERROR)
    with publishing_failures(json_output=options.json):
        result = export_run(run_dir, repository, name, version=version, gates=options.gates(),
                            opset=options.opset, allow_fp16_failure=options.allow_fp16_failure)
    return result.to_dict()


def describe_export(report: dict) -> str:
    """One line per published version: parity, accuracy per precision, and each lower
    precision's gate (with what it left in fp32)."""
    evaluation = report["evaluation"]
    if evaluation is None:
        return (f"{report['name']} v{report['version']} ({report['architecture']}): not "
                f"evaluated (--no-eval), {report['export_seconds']:.0f}s → {report['path']}")
    parity = evaluation["onnx_vs_torch_max_abs_diff"]
    gates = []
    for artifact in report["artifacts"]:
        precision = artifact["precision"]
        if precision == "fp32":
            continue
        kept = (f", {'+'.join(artifact['fp32_op_types'])} in fp32"
                if artifact["fp32_op_types"] else "")
        batch = artifact.get("batch_max_abs_diff")
        invariance = f", batch Δ {batch:.0e}" if batch is not None else ""
        gates.append(f"{precision} {evaluation[precision]['accuracy']:.4f} agreement "
                     f"{evaluation[f'{precision}_agreement']:.4f} "
                     f"({'passed' if artifact['passed_gates'] else 'FAILED'}{kept}{invariance})")
    return (f"{report['name']} v{report['version']} ({report['architecture']}): parity "
            f"{'-' if parity is None else f'{parity:.1e}'}, accuracy fp32 "
            f"{evaluation['fp32']['accuracy']:.4f}, " + ", ".join(gates)
            + f", {report['export_seconds']:.0f}s → {report['path']}")


def handle_export(args: argparse.Namespace) -> int:
    require_training_extra()
    report = run_export(args.run_dir, args.repository, args.name, ExportOptions.from_args(args),
                        version=args.version)
    print(json.dumps({"ok": True, **report}) if args.json else describe_export(report))
    return ExitCode.OK


def default_build_config(architecture: str) -> Any:
    """The run config ``seqserve build`` trains ``architecture`` with when no flag changes it."""
    from export.config import default_run_config
    from export.datasets import DatasetSpec

    return default_run_config(architecture, DatasetSpec(source=BUILD_DATASET))


def build_defaults(repository: Path, runs: Path, *, options: ExportOptions,
                   config_for: Callable[[str], Any] = default_build_config,
                   include_bow: bool = False, include_pretrained: bool = True,
                   include_distilled: bool = False, force: bool = False) -> list[dict]:
    """Train (where no run exists) and export the default models, skipping those already in
    ``repository``; one report per model. ``config_for(architecture)`` gives a run's config."""
    from export.train import train

    architectures = [a for a in BUILD_ARCHITECTURES if include_pretrained or a != "pretrained"]
    architectures += ["bow"] if include_bow else []
    if include_distilled and not include_pretrained and latest_version(
            repository, DISTILLED_TEACHER) is None:
        raise CommandError(f"--distilled needs its teacher {DISTILLED_TEACHER}: drop "
                           "--no-pretrained", ExitCode.USAGE)
    architectures += ["distilled"] if include_distilled else []
    built = []
    for architecture in architectures:
        name = f"sentiment-{architecture}"
        existing = latest_version(repository, name)
        if existing is not None and not force:
            log.info("%s: version %d already in %s", name, existing.version, repository)
            built.append({"name": name, "version": existing.version, "skipped": True,
                          "path": str(existing.directory)})
            continue
        run_dir = runs / default_run_dir(BUILD_DATASET, architecture).name
        if not (run_dir / "metrics.json").is_file():
            log.info("training %s on %s → %s", architecture, BUILD_DATASET, run_dir)
            config = (distilled_config(config_for("lstm"), repository)
                      if architecture == "distilled" else config_for(architecture))
            result = train(config, run_dir, progress=not options.json and sys.stderr.isatty())
            log.info("%s: test accuracy %.4f", architecture, result.test.accuracy)
        report = run_export(run_dir, repository, name, options)
        if not options.json:
            print(describe_export(report))
        built.append({**report, "skipped": False})
    return built


def distilled_config(student: Any, repository: Path) -> Any:
    """The LSTM's build config, taught by the repository's fine-tuned model, with the
    distillation defaults ``seqserve train --teacher`` applies."""
    from export.config import RunConfig, default_run_config

    config: RunConfig = default_run_config(
        "lstm", student.data, model=student.model, tokenizer=student.tokenizer.model_dump(),
        training=student.training.model_dump(exclude={"patience"}), seed=student.seed,
        distillation={"teacher": DISTILLED_TEACHER, "teacher_repository": str(repository)})
    return config


def handle_build(args: argparse.Namespace) -> int:
    require_training_extra()
    built = build_defaults(args.repository, args.runs, options=ExportOptions.from_args(args),
                           config_for=lambda arch: run_config_from_args(args, arch),
                           include_bow=args.include_bow,
                           include_pretrained=not args.no_pretrained,
                           include_distilled=args.distilled, force=args.force)
    if args.json:
        print(json.dumps({"ok": True, "repository": str(args.repository), "models": built}))
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
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                       help="ONNX opset (default: %(default)s)")


def add_export_commands(commands: argparse._SubParsersAction) -> None:
    from service.cli.train import add_training_arguments

    export = commands.add_parser("export", help="export a run to ONNX into a model repository")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--repository", type=Path, default=defaults.REPOSITORY,
                        help="default: ./model_repository")
    export.add_argument("--name", required=True, help="model name, e.g. sentiment-lstm")
    export.add_argument("--version", type=int,
                        help="pin the version number (refused if it exists); default: next")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    add_gate_arguments(export)
    export.set_defaults(handler=handle_export)

    build = commands.add_parser(
        "build", help="train (if needed) and export the default LSTM, Transformer and "
        "fine-tuned pretrained models",
        description=f"Trains on {BUILD_DATASET} where no run exists and exports "
                    "sentiment-lstm, sentiment-transformer and sentiment-pretrained (MiniLM-L6 "
                    "fine-tuned; --no-pretrained skips it; sentiment-bow with --include-bow, "
                    "sentiment-distilled with --distilled) into the repository, skipping "
                    "models already there.")
    build.add_argument("--repository", type=Path, default=defaults.REPOSITORY,
                       help="default: ./model_repository")
    build.add_argument("--runs", type=Path, default=defaults.RUNS, help="default: ./runs")
    build.add_argument("--include-bow", action="store_true", help="also the bag-of-embeddings")
    build.add_argument("--no-pretrained", action="store_true",
                       help="skip the fine-tuned pretrained model (its first build takes ~5 "
                       "minutes on 2 cores)")
    build.add_argument("--distilled", action="store_true",
                       help=f"also {DISTILLED_NAME}, an LSTM distilled from "
                       f"{DISTILLED_TEACHER} (about 9 more minutes on 2 cores)")
    build.add_argument("--force", action="store_true", help="export a new version even if present")
    build.add_argument("--json", action="store_true")
    add_gate_arguments(build)
    add_training_arguments(build)
    build.set_defaults(handler=handle_build, dataset=BUILD_DATASET, text_column="text",
                       label_column="label", format="auto", validation_fraction=0.1,
                       test_fraction=0.1)
