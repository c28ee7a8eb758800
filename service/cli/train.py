"""``seqserve train``, and the data and training flags that ``build`` shares with it.

torch is imported only inside the handlers, so ``seqserve --help`` works on a serving install.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode

ARCHITECTURE_CHOICES = ["lstm", "transformer", "bow", "pretrained"]


def require_training_extra() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise CommandError(
            "this command needs torch: pip install 'seqserve[train]'", ExitCode.MISSING_EXTRA
        ) from error


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs with JSON values where they parse (numbers, booleans), else strings."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"{flag}: expected KEY=VALUE, got '{pair}'", ExitCode.USAGE)
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", "-d", default="rotten-tomatoes",
                       help="built-in name (see `seqserve data list`) or a CSV/TSV/JSONL file"
                            " (default: rotten-tomatoes)")
    group.add_argument("--text-column", default="text", help="default: text")
    group.add_argument("--label-column", default="label", help="default: label")
    group.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl"],
                       help="file format (default: from the extension)")
    group.add_argument("--validation-fraction", type=float, default=0.1, help="default: 0.1")
    group.add_argument("--test-fraction", type=float, default=0.1,
                       help="default: 0.1 (built-in datasets with their own test split keep it)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults depend on architecture and dataset)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--learning-rate", "--lr", type=float)
    group.add_argument("--patience", type=int, help="early stopping patience in epochs")
    group.add_argument("--max-length", type=int, help="tokens per text; longer texts truncated")
    group.add_argument("--vocab-size", type=int)
    group.add_argument("--device", choices=["auto", "cpu", "cuda"])
    group.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    group.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE",
                       help="model hyperparameter override, e.g. hidden_size=64 (repeatable)")
    group.add_argument("--base", metavar="NAME|DIR",
                       help="-a pretrained: the encoder to fine-tune, a packaged base (minilm-l6) "
                       "or a Hugging Face model directory (default: minilm-l6)")
    group.add_argument("--seed", type=int, default=defaults.SEED,
                       help="default: %(default)s")


def add_distillation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "distillation (train on a teacher's logits; docs/distillation.md)")
    group.add_argument("--teacher", metavar="RUN_DIR|NAME[:VERSION]",
                       help="a run directory, or a model in --teacher-repository")
    group.add_argument("--teacher-repository", type=Path, default=defaults.REPOSITORY,
                       help="where NAME[:VERSION] is looked up (default: ./%(default)s)")
    group.add_argument("--teacher-precision", choices=["fp32", "fp16", "int8"],
                       help="which of a repository teacher's artifacts labels (default: fp32)")
    group.add_argument("--distill-loss", choices=["mse", "kl"],
                       help="mse on logits or kl at --temperature (default: mse)")
    group.add_argument("--temperature", type=float, help="for --distill-loss kl (default: 2)")
    group.add_argument("--alpha", type=float,
                       help="weight of the gold labels' cross-entropy, 0-1 (default: 0)")
    group.add_argument("--augment-copies", type=int,
                       help="augmented copies of each training text (default: 4)")
    group.add_argument("--unlabelled", type=Path, metavar="FILE",
                       help="more texts for the teacher to label (CSV/TSV/JSONL; read with "
                            "--text-column and --format)")


def run_config_from_args(args: argparse.Namespace, architecture: str):
    from pydantic import ValidationError

    from export.config import default_run_config
    from export.datasets import DatasetSpec

    try:
        data = DatasetSpec(
            source=args.dataset, text_column=args.text_column, label_column=args.label_column,
            format=args.format, seed=args.seed, validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
        )
        training = {
            key: value
            for key, value in {
                "epochs": args.epochs, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "patience": args.patience,
                "device": args.device, "threads": args.threads,
            }.items()
            if value is not None
        }
        tokenizer = {
            key: value
            for key, value in {"max_length": args.max_length, "vocab_size": args.vocab_size}.items()
            if value is not None
        }
        model = parse_key_values(args.model_param, "--model-param")
        if getattr(args, "base", None):
            if architecture != "pretrained":
                raise CommandError("--base is for -a pretrained", ExitCode.USAGE)
            model["base"] = args.base
        overrides = distillation_overrides(args)
        return default_run_config(
            architecture, data, training=training, tokenizer=tokenizer, seed=args.seed,
            model=model, **overrides,
        )
    except ValidationError as error:
        raise CommandError.invalid_settings(error) from error


def distillation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{"distillation": {...}}`` when ``--teacher`` is given; the distillation flags without
    it are a usage error rather than silently ignored."""
    flags = {"teacher_precision": getattr(args, "teacher_precision", None),
             "loss": getattr(args, "distill_loss", None),
             "temperature": getattr(args, "temperature", None),
             "alpha": getattr(args, "alpha", None)}
    copies = getattr(args, "augment_copies", None)
    unlabelled = getattr(args, "unlabelled", None)
    teacher = getattr(args, "teacher", None)
    if teacher is None:
        given = {"--teacher-precision": flags["teacher_precision"],
                 "--distill-loss": flags["loss"], "--temperature": flags["temperature"],
                 "--alpha": flags["alpha"], "--augment-copies": copies,
                 "--unlabelled": unlabelled}
        for flag, value in given.items():
            if value is not None:
                raise CommandError(f"{flag} needs --teacher", ExitCode.USAGE)
        return {}
    settings: dict[str, Any] = {"teacher": teacher,
                                "teacher_repository": str(args.teacher_repository),
                                **{k: v for k, v in flags.items() if v is not None}}
    if copies is not None:
        settings["augmentation"] = {"copies": copies}
    if unlabelled is not None:
        settings["unlabelled"] = {"path": str(unlabelled), "text_column": args.text_column,
                                  "format": args.format}
    return {"distillation": settings}


def default_run_dir(dataset: str, architecture: str) -> Path:
    return defaults.RUNS / f"{Path(dataset).stem}-{architecture}"


def check_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise CommandError(
            f"{run_dir} already holds a run; pass --overwrite or choose --output",
            ExitCode.IO_ERROR,
        )


def handle_train(args: argparse.Namespace) -> int:
    require_training_extra()
    from export.datasets import DatasetError
    from export.pretrained_bases import BaseError
    from export.teacher import TeacherError
    from export.train import train

    config = run_config_from_args(args, args.architecture)
    run_dir = args.output or default_run_dir(args.dataset, args.architecture)
    check_run_dir(run_dir, overwrite=args.overwrite)
    try:
        result = train(config, run_dir, progress=not args.json and sys.stderr.isatty())
    except (DatasetError, BaseError, TeacherError) as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from error
    except ValueError as error:  # e.g. an unknown model hyperparameter
        raise CommandError(str(error), ExitCode.USAGE) from error
    summary = {
        "run_dir": str(run_dir),
        "architecture": config.architecture,
        "dataset": config.data.source,
        "test_accuracy": round(result.test.accuracy, 4),
        "test_macro_f1": round(result.test.macro_f1, 4),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "duration_seconds": round(result.duration_seconds, 1),
    }
    teaching = result_distillation(run_dir)
    if teaching:
        summary["teacher"] = teaching["teacher"]
        summary["transfer_set"] = teaching["transfer_set"]
    if args.json:
        print(json.dumps(summary))
    else:
        taught = (f", distilled from {teaching['teacher']['name']} (test accuracy "
                  f"{teaching['teacher']['test_accuracy']:.4f}) on "
                  f"{teaching['transfer_set']['texts']} texts" if teaching else "")
        print(f"{config.architecture} on {config.data.source}: test accuracy "
              f"{result.test.accuracy:.4f}, macro-F1 {result.test.macro_f1:.4f} "
              f"(best epoch {result.best_epoch}/{result.epochs_run}, "
              f"{result.duration_seconds:.0f}s){taught} → {run_dir}")
    return ExitCode.OK


def result_distillation(run_dir: Path) -> dict | None:
    path = run_dir / "distillation.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def add_train_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a classifier into a run directory",
        description="Train an LSTM, Transformer or bag-of-embeddings classifier from scratch, or "
                    "fine-tune a pretrained encoder (-a pretrained --base). Writes a run"
                    " directory: config.json, tokenizer.json, labels.json, model.pt,"
                    " metrics.json, training_curve.png.",
    )
    parser.add_argument("--architecture", "-a", required=True, choices=ARCHITECTURE_CHOICES)
    parser.add_argument("--output", "-o", type=Path,
                        help="run directory (default: runs/DATASET-ARCHITECTURE)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")
    add_dataset_arguments(parser)
    add_training_arguments(parser)
    add_distillation_arguments(parser)
    parser.set_defaults(handler=handle_train)

