"""``seqserve import``: publish a model a team already has, behind the same gates as an export.

Two kinds of model come in:

- a fine-tuned Hugging Face sequence-classification directory (``config.json`` with
  ``id2label``, weights, a fast ``tokenizer.json``): exported to ONNX here with the same dynamo
  exporter as a trained run, so the parity gate compares ONNX Runtime with the PyTorch model;
- an ONNX file that already follows the graph contract (``input_ids`` + ``attention_mask`` ->
  ``logits``), with its ``tokenizer.json`` and labels: there is no PyTorch model to compare with,
  so parity is not measured.

Both are gated on an evaluation file the user gives (fp32 accuracy, fp16 and int8 against
fp32). Without one an import is refused unless ``no_eval`` is set: then only the fp32 artifact
is published and the manifest says the model was not evaluated.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.dataset_io import DatasetError, read_examples
from export.gates import GateFailure, GateSettings
from export.gating import (
    FP32_FILE,
    EvaluationSet,
    GateReport,
    TorchLogits,
    artifact,
    gate_artifacts,
    graph_compute,
)
from export.onnx_eval import cpu_session
from export.pipeline import ExportResult, source_commit
from export.publish import discard, publish, staging_directory
from service.repo.graph import DEFAULT_OPSET, GraphContractError, check_signature, run_logits
from service.repo.manifest import (
    MANIFEST_FILE,
    Manifest,
    ModelSource,
    TokenizerSpec,
    contract_inputs,
    contract_outputs,
    sha256_file,
)
from service.repo.probabilities import softmax
from service.repo.tokenization import TextTokenizer, pad_batch

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 256
# Parity of an import published without evaluation is still checked, on these sentences.
PARITY_SENTENCES = [
    "A gripping, beautifully acted film that stays with you long after the credits.",
    "Tedious, overlong and utterly predictable.",
    "The quarterly report shows revenue up four percent, driven by services.",
    "ok",
    "Is the library open on Sundays, and can I return books at the front desk there?",
    "Battery life is poor but the screen is the best I have used on any phone so far, honestly.",
    "no",
]


class ImportRefused(ValueError):
    """The model cannot be imported as given; the message is one line."""


@dataclass(frozen=True)
class EvaluationFile:
    """Labelled texts to gate an import on (CSV, TSV or JSONL, any column names)."""

    path: Path
    text_column: str = "text"
    label_column: str = "label"
    format: str = "auto"


@dataclass(frozen=True)
class ImportOptions:
    evaluation: EvaluationFile | None
    no_eval: bool = False
    gates: GateSettings | None = None
    opset: int = DEFAULT_OPSET
    allow_fp16_failure: bool = False
    version: int | None = None

    def check(self) -> None:
        if self.evaluation is None and not self.no_eval:
            raise ImportRefused("an import is gated on an evaluation file: give --eval FILE (text "
                                "and label columns), or --no-eval to publish it unevaluated")


# --- Hugging Face checkpoints -----------------------------------------------------------------


def classification_labels(directory: Path) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's config and its labels in class-id order (from ``id2label``)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ImportRefused(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ImportRefused(f"{config_path}: {error}") from None
    architectures = config.get("architectures") or []
    id2label = config.get("id2label") or {}
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ImportRefused(f"{directory}: not a sequence-classification checkpoint "
                            f"(architectures {architectures or 'missing'}; fine-tune one with "
                            "`seqserve train -a pretrained --base DIR`)")
    try:
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise ImportRefused(f"{config_path}: id2label is not numbered 0..{len(id2label) - 1}: "
                            f"{sorted(id2label)}") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ImportRefused(f"{config_path}: id2label needs two or more distinct labels, got "
                            f"{labels}")
    if not (directory / TOKENIZER_FILE).is_file():
        raise ImportRefused(f"{directory}: no {TOKENIZER_FILE} (a fast tokenizer is needed: "
                            "save it with tokenizer.save_pretrained)")
    return config, labels


def import_huggingface(directory: Path, repository: Path, name: str, options: ImportOptions, *,
                       max_length: int | None = None) -> ExportResult:
    import torch

    from export.fine_tune import usable_max_length
    from export.fused_export import fuse_staged_graph
    from export.onnx_export import export_onnx_in_subprocess
    from models.pretrained import PretrainedClassifier, PretrainedConfig, _transformers

    options.check()
    started = time.monotonic()
    config, labels = classification_labels(directory)
    pad_id = int(config.get("pad_token_id") or 0)
    length = usable_max_length(config, max_length or DEFAULT_MAX_LENGTH)
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE, length, pad_id)
    model = _transformers().AutoModelForSequenceClassification.from_pretrained(
        str(directory), attn_implementation="eager")
    wrapped = PretrainedClassifier(PretrainedConfig(
        vocab_size=int(config["vocab_size"]), num_labels=len(labels), pad_id=pad_id,
        base=str(directory.resolve()), encoder=config), model).eval()

    @torch.no_grad()
    def torch_logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return wrapped(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

    check_label_count(torch_logits, tokenizer, labels)
    staging = staging_directory(repository, name)
    try:
        with tempfile.TemporaryDirectory(dir=staging) as scratch:
            weights = Path(scratch) / "model.pt"
            torch.save(wrapped.state_dict(), weights)
            model_config = {"vocab_size": wrapped.config.vocab_size, "num_labels": len(labels),
                            "pad_id": pad_id, "base": wrapped.config.base, "encoder": config}
            export_onnx_in_subprocess("pretrained", model_config, weights, staging / FP32_FILE,
                                      opset=options.opset)
            plain = fuse_staged_graph(staging, FP32_FILE, model_config, weights)
        shutil.copyfile(directory / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        source = ModelSource(kind="huggingface", path=str(directory.resolve()))
        return _gate_and_publish(staging, repository, name, "pretrained", labels, tokenizer,
                                 source, options, torch_logits, started, fp16_source=plain)
    except BaseException:
        discard(staging)
        raise


# --- ONNX files -------------------------------------------------------------------------------


def import_onnx(path: Path, repository: Path, name: str, options: ImportOptions, *,
                tokenizer_file: Path, labels: list[str], max_length: int | None = None,
                pad_id: int | None = None, architecture: str = "imported") -> ExportResult:
    options.check()
    started = time.monotonic()
    if not path.is_file():
        raise ImportRefused(f"{path}: no such ONNX file")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ImportRefused(f"--labels: two or more distinct labels are needed, got {labels}")
    tokenizer = load_tokenizer(tokenizer_file, max_length or DEFAULT_MAX_LENGTH, pad_id)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # onnx raises its own types for unreadable and invalid models
        raise ImportRefused(f"{path}: not a valid ONNX model "
                            f"({str(error).splitlines()[0]})") from None
    staging = staging_directory(repository, name)
    try:
        onnx.save(model, str(staging / FP32_FILE))  # one self-contained file in the version
        session = cpu_session(staging / FP32_FILE)
        try:
            check_signature(session)
        except GraphContractError as error:
            raise ImportRefused(f"{path}: {error} (the contract: input_ids and attention_mask, "
                                "int64 [batch, sequence] -> logits [batch, labels])") from None
        check_label_count(lambda ids, mask: run_logits(session, ids, mask), tokenizer, labels)
        shutil.copyfile(tokenizer_file, staging / TOKENIZER_FILE)
        source = ModelSource(kind="onnx", path=str(path.resolve()))
        return _gate_and_publish(staging, repository, name, architecture, labels, tokenizer,
                                 source, options, None, started)
    except BaseException:
        discard(staging)
        raise


# --- shared -----------------------------------------------------------------------------------


def load_tokenizer(path: Path, max_length: int, pad_id: int | None) -> TextTokenizer:
    """The model's tokenizer; with no pad id given, its own pad token's (or 0)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ImportRefused(f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a plain Exception for unreadable files
        raise ImportRefused(f"{path}: not a tokenizers JSON file ({error})") from None
    if pad_id is None:
        found = [tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>")]
        pad_id = next((i for i in found if i is not None), 0)
    try:
        return TextTokenizer(tokenizer, max_length, pad_id)
    except ValueError as error:
        raise ImportRefused(f"{path}: {error}") from None


def check_label_count(logits_fn: TorchLogits, tokenizer: TextTokenizer, labels: list[str]) -> None:
    batch = tokenizer.encode_batch(PARITY_SENTENCES[:2])
    logits = logits_fn(batch.input_ids, batch.attention_mask)
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ImportRefused(f"the labels do not match the logits: the model gives "
                            f"{logits.shape[-1]} logits per text, {len(labels)} labels given "
                            f"({', '.join(labels)})")


def evaluation_set(spec: EvaluationFile, tokenizer: TextTokenizer,
                   labels: list[str]) -> EvaluationSet:
    try:
        examples = read_examples(spec.path, fmt=spec.format,  # type: ignore[arg-type]
                                 text_column=spec.text_column, label_column=spec.label_column)
    except DatasetError as error:
        raise ImportRefused(f"--eval: {error}") from None
    unknown = sorted(set(examples.labels) - set(labels))
    if unknown:
        raise ImportRefused(f"--eval {spec.path}: labels {unknown} are not the model's "
                            f"({', '.join(labels)})")
    if not examples.texts:
        raise ImportRefused(f"--eval {spec.path}: no labelled texts")
    ids, _ = tokenizer.token_ids(examples.texts)
    y_true = np.asarray([labels.index(label) for label in examples.labels], dtype=np.int64)
    return EvaluationSet(str(spec.path), "evaluation", examples.texts, ids, y_true,
                         tokenizer.pad_id, tokenizer.max_length)


def _gate_and_publish(staging: Path, repository: Path, name: str, architecture: str,
                      labels: list[str], tokenizer: TextTokenizer, source: ModelSource,
                      options: ImportOptions, torch_logits: TorchLogits | None,
                      started: float, *, fp16_source: Path | None = None) -> ExportResult:
    gates = options.gates or GateSettings()
    if options.evaluation is not None:
        report = gate_artifacts(staging, evaluation_set(options.evaluation, tokenizer, labels),
                                labels, gates=gates, opset=options.opset,
                                torch_logits=torch_logits,
                                allow_fp16_failure=options.allow_fp16_failure,
                                fp16_source=fp16_source)
    else:
        report = _unevaluated(staging, tokenizer, gates, options.opset, torch_logits)
    if fp16_source is not None:
        fp16_source.unlink(missing_ok=True)
    commit = source_commit()

    def write_manifest(directory: Path, number: int) -> None:
        Manifest(
            name=name, version=number, architecture=architecture, labels=labels,
            tokenizer=TokenizerSpec(sha256=sha256_file(directory / TOKENIZER_FILE),
                                    max_length=tokenizer.max_length, pad_id=tokenizer.pad_id),
            inputs=contract_inputs(), outputs=contract_outputs(len(labels)),
            artifacts=report.artifacts, evaluation=report.evaluation,
            evaluation_slice=report.evaluation_slice, training=None, source=source,
            compute=report.compute, created_at=datetime.now(UTC), source_commit=commit,
        ).write(directory / MANIFEST_FILE)

    number, target = publish(staging, repository, name, version=options.version,
                             finalize=write_manifest)
    manifest = Manifest.load(target / MANIFEST_FILE)
    log.info("imported %s as %s version %d at %s", source.path, name, number, target)
    return ExportResult(manifest, target, report.figures.get("parity_worst_case", ""),
                        report.figures.get("fp16_attempts", []),
                        report.figures.get("int8_attempts", []), time.monotonic() - started)


def _unevaluated(staging: Path, tokenizer: TextTokenizer, gates: GateSettings, opset: int,
                 torch_logits: TorchLogits | None) -> GateReport:
    """fp32 only, not evaluated; the export is still checked against PyTorch when there is one."""
    figures: dict = {}
    if torch_logits is not None:
        session = cpu_session(staging / FP32_FILE)
        batch = pad_batch(tokenizer.token_ids(PARITY_SENTENCES)[0], pad_id=tokenizer.pad_id)
        expected = torch_logits(batch.input_ids, batch.attention_mask)
        actual = run_logits(session, batch.input_ids, batch.attention_mask)
        diff = float(np.abs(softmax(expected) - softmax(actual)).max())
        figures["parity_max_abs_diff"] = diff
        if not diff <= gates.parity_tolerance:
            raise GateFailure(f"parity gate failed: ONNX Runtime vs PyTorch max abs difference "
                              f"{diff:.2e} > {gates.parity_tolerance:.0e}", figures)
    return GateReport(None, [artifact("fp32", staging / FP32_FILE, opset, passed=True)], figures,
                      compute=graph_compute(staging / FP32_FILE))
