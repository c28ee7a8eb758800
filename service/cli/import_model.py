"""``seqserve import hf DIR`` and ``seqserve import onnx FILE``: publish a model a team already
has, without retraining, behind the same gates as ``seqserve export``.

Exit codes: 0 ok, 2 usage, 3 the model, tokenizer, labels or evaluation file are unusable,
5 a gate failed, 6 I/O (including "version already exists"), 7 needs the train extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode
from service.cli.export import (
    ExportOptions,
    add_gate_arguments,
    describe_export,
    publishing_failures,
)


def add_import_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import", help="publish an existing Hugging Face checkpoint or ONNX file",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="import_kind", required=True, metavar="{hf,onnx}")
    hf = kinds.add_parser("hf", help="a fine-tuned Hugging Face sequence-classification directory",
                          description="Labels come from its config.json's id2label; the model is "
                          "exported to ONNX here and checked against PyTorch.")
    hf.add_argument("directory", type=Path, metavar="DIR")
    _common(hf)
    hf.set_defaults(handler=handle_import_hf)
    onnx = kinds.add_parser("onnx", help="an ONNX file that follows the graph contract",
                            description="Inputs input_ids and attention_mask (int64 [batch, "
                            "sequence]), output logits [batch, labels].")
    onnx.add_argument("file", type=Path, metavar="FILE")
    onnx.add_argument("--tokenizer", type=Path, required=True, metavar="TOKENIZER_JSON",
                      help="the model's tokenizers JSON file")
    onnx.add_argument("--labels", required=True, metavar="A,B,…|FILE",
                      help="labels in class-id order: comma-separated, or a JSON list file")
    onnx.add_argument("--pad-id", type=int,
                      help="the tokenizer's pad id (default: its [PAD]/<pad> token, else 0)")
    onnx.add_argument("--architecture", default="imported",
                      help="the architecture label in metrics and reports (default: imported)")
    _common(onnx)
    onnx.set_defaults(handler=handle_import_onnx)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--repository", type=Path, default=defaults.REPOSITORY,
                        help="default: ./%(default)s")
    parser.add_argument("--version", type=int, help="pin the version (refused if it exists)")
    parser.add_argument("--max-length", type=int,
                        help="tokens per text; longer texts are truncated (default: 256, or "
                        "less when the model's positions allow less)")
    evaluation = parser.add_argument_group("evaluation (the gates run on it)")
    evaluation.add_argument("--eval", type=Path, metavar="FILE",
                            help="labelled texts: CSV, TSV or JSONL")
    evaluation.add_argument("--text-column", default="text", help="default: text")
    evaluation.add_argument("--label-column", default="label", help="default: label")
    evaluation.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl"])
    evaluation.add_argument("--no-eval", action="store_true",
                            help="publish without evaluation (fp32 only; the manifest says so)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_gate_arguments(parser)


def _options(args: argparse.Namespace) -> object:
    from export.importer import EvaluationFile, ImportOptions

    if args.eval is not None and args.no_eval:
        raise CommandError("--eval and --no-eval contradict each other", ExitCode.USAGE)
    if args.eval is None and not args.no_eval:
        raise CommandError("an import is gated on an evaluation file: give --eval FILE (text and "
                           "label columns), or --no-eval to publish it unevaluated",
                           ExitCode.USAGE)
    evaluation = (EvaluationFile(args.eval, args.text_column, args.label_column, args.format)
                  if args.eval is not None else None)
    export = ExportOptions.from_args(args)
    return ImportOptions(evaluation=evaluation, no_eval=args.no_eval, gates=export.gates(),
                         opset=export.opset, allow_fp16_failure=export.allow_fp16_failure,
                         version=args.version)


def _run(args: argparse.Namespace, run: object) -> int:
    from export.importer import ImportRefused

    try:
        with publishing_failures(json_output=args.json):
            result = run()  # type: ignore[operator]
    except ImportRefused as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from None
    report = result.to_dict()
    print(json.dumps({"ok": True, **report}) if args.json else describe_export(report))
    return ExitCode.OK


def handle_import_hf(args: argparse.Namespace) -> int:
    from service.cli.train import require_training_extra

    require_training_extra()
    from export.importer import import_huggingface

    options = _options(args)
    return _run(args, lambda: import_huggingface(args.directory, args.repository, args.name,
                                                 options, max_length=args.max_length))


def handle_import_onnx(args: argparse.Namespace) -> int:
    from service.cli.train import require_training_extra

    require_training_extra()  # onnx and the fp16/int8 tooling come with it
    from export.importer import ImportRefused, import_onnx

    options = _options(args)
    try:
        labels = _labels(args.labels)
    except ImportRefused as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from None
    return _run(args, lambda: import_onnx(
        args.file, args.repository, args.name, options, tokenizer_file=args.tokenizer,
        labels=labels, max_length=args.max_length, pad_id=args.pad_id,
        architecture=args.architecture))


def _labels(value: str) -> list[str]:
    from export.importer import ImportRefused

    path = Path(value)
    if path.is_file():
        try:
            labels = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ImportRefused(f"--labels {path}: {error}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ImportRefused(f"--labels {path}: expected a JSON list of strings")
        return labels
    return [label.strip() for label in value.split(",") if label.strip()]
