"""The manifest that describes one published model version (``manifest.json``).

Written by the exporter, read by the server; shared here so the serving install, which has no
torch, can validate it. Every artifact's sha256 is recorded so the server can refuse a file that
is not the one that was evaluated.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from service.repo.graph import BATCH_DIM, INPUT_NAMES, OUTPUT_NAME, SEQUENCE_DIM

# 2 added int8 artifacts, optional evaluation and training (imported models), the stored
# evaluation slice and the model's source; 3 each artifact's batch invariance, int8's
# quantization, the graph's fused ops and its compute per token; 4 a distilled model's teacher
# and transfer set. Versions 1 to 3 still load.
SCHEMA_VERSION = 4
MANIFEST_FILE = "manifest.json"
EVALUATION_SLICE_FILE = "evaluation_slice.json"

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")


def _plain_file_name(name: str) -> str:
    """A file named by a manifest must sit in its version directory: no directories, no
    parent references, nothing absolute, so a manifest can never point the server elsewhere."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".")):
        raise ValueError(f"{name!r} is not a plain file name inside the version directory")
    return name


FileName = Annotated[str, AfterValidator(_plain_file_name)]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or does not validate; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    dtype: Literal["int64", "float32", "float16"]
    shape: list[str | int] = Field(description="symbolic dims are strings, e.g. 'batch'")


def contract_inputs() -> list[TensorSpec]:
    """The graph inputs every architecture takes (``service/repo/graph.py``)."""
    return [TensorSpec(name=name, dtype="int64", shape=[BATCH_DIM, SEQUENCE_DIM])
            for name in INPUT_NAMES]


def contract_outputs(num_labels: int) -> list[TensorSpec]:
    return [TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=[BATCH_DIM, num_labels])]


class TokenizerSpec(_Strict):
    file: FileName = "tokenizer.json"
    sha256: str
    max_length: int = Field(gt=0, description="texts longer than this are truncated")
    pad_id: int = 0


class Artifact(_Strict):
    precision: Precision
    file: FileName
    sha256: str
    bytes: int = Field(ge=0)
    opset: int = Field(ge=1)
    passed_gates: bool = Field(description="false: kept for inspection, never served by default")
    fp32_op_types: list[str] = Field(
        default_factory=list,
        description="op types kept in fp32 inside an fp16 artifact (mixed precision), or "
        "left unquantized in an int8 artifact",
    )
    batch_max_abs_diff: float | None = Field(
        default=None, ge=0,
        description="largest change of a probability on the evaluation slice between a text "
        "alone and inside mixed-length batches (the batch-invariance gate); None: not measured "
        "(schema 1-2), so --precision auto does not serve it as int8")
    quantization: str | None = Field(
        default=None, description="how an int8 artifact was quantized, e.g. 'MatMulNBits "
        "8-bit, block 128, int8 activations per row'")
    fused_ops: dict[str, int] = Field(
        default_factory=dict,
        description="fused ONNX Runtime ops in the graph (Attention, SkipLayerNormalization, "
        "...) and how many; empty: the exporter's plain graph")


class PrecisionEvaluation(_Strict):
    accuracy: float
    macro_f1: float


class Evaluation(_Strict):
    dataset: str
    split: str
    examples: int
    fp32: PrecisionEvaluation
    fp16: PrecisionEvaluation | None = None
    fp16_agreement: float | None = Field(
        default=None, description="fraction of texts where fp16 and fp32 predict the same label"
    )
    fp16_max_abs_diff: float | None = None
    int8: PrecisionEvaluation | None = None
    int8_agreement: float | None = Field(
        default=None, description="fraction of texts where int8 and fp32 predict the same label"
    )
    int8_max_abs_diff: float | None = None
    onnx_vs_torch_max_abs_diff: float | None = Field(
        default=None, description="probabilities, parity gate; None: no PyTorch model to compare")
    parity_batch_sizes: list[int] = Field(default_factory=list)


class EvaluationSlice(_Strict):
    """A small fixed sample of the evaluation texts, with labels and the fp32 probabilities
    measured at export, stored in the version directory: a server re-gates lower precisions
    on its own device with it (fp16 on a GPU computes differently from fp16 on a CPU)."""

    file: FileName = EVALUATION_SLICE_FILE
    sha256: str
    examples: int = Field(gt=0)


class ModelSource(_Strict):
    """Where the model came from."""

    kind: Literal["trained", "fine-tuned", "distilled", "huggingface", "onnx"]
    base: str | None = Field(default=None, description="pretrained base, for fine-tuned models")
    path: str | None = Field(default=None, description="the imported directory or file")


class TrainingSummary(_Strict):
    dataset: str
    epochs: int
    seed: int
    hyperparameters: dict[str, float | int | str | bool | None]
    duration_seconds: float
    test_accuracy: float
    test_macro_f1: float


class TeacherRecord(_Strict):
    """The model a distilled student learnt from."""

    kind: Literal["run", "repository"]
    name: str
    version: int | None = Field(description="None: a run directory's weights")
    sha256: str = Field(description="of the ONNX artifact (repository) or the weights (run) "
                        "that computed the logits")
    precision: Precision
    architecture: str
    test_accuracy: float = Field(description="on the student's test split")


class TransferSetRecord(_Strict):
    texts: int = Field(ge=1)
    training: int = Field(ge=0, description="training texts, with their gold labels")
    augmented: int = Field(ge=0)
    unlabelled: int = Field(ge=0, description="texts from the user's --unlabelled file")
    dropped_held_out: int = Field(ge=0, description="texts equal to a validation or test text")
    augmentation: str
    unlabelled_file: str | None = None
    labels_from_cache: bool = False


class DistillationRecord(_Strict):
    teacher: TeacherRecord
    loss: Literal["mse", "kl"]
    temperature: float | None = Field(default=None, description="kl only")
    alpha: float = Field(ge=0, le=1, description="weight of the gold labels' cross-entropy")
    transfer_set: TransferSetRecord


class ComputeCost(_Strict):
    """What one token costs the model, read from the fp32 graph at export: the server sizes
    each model's ONNX Runtime thread pool by it."""

    weight_flops_per_token: int = Field(
        ge=0, description="2 x multiply-adds by weights per token (MatMul, Gemm, LSTM, "
        "Attention); activation x activation products, which grow with length, not counted")


class Manifest(_Strict):
    schema_version: Literal[1, 2, 3, 4] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: int = Field(gt=0)
    architecture: str
    labels: list[str] = Field(min_length=2)
    tokenizer: TokenizerSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    artifacts: list[Artifact] = Field(min_length=1)
    evaluation: Evaluation | None = Field(
        description="None: published without evaluation (seqserve import --no-eval)")
    evaluation_slice: EvaluationSlice | None = None
    training: TrainingSummary | None = Field(default=None, description="None: imported")
    source: ModelSource | None = None
    compute: ComputeCost | None = Field(default=None, description="None: schema 1-2")
    distillation: DistillationRecord | None = Field(
        default=None, description="None: not distilled (or schema 1-3)")
    created_at: datetime
    source_commit: str | None = None

    def check_contract(self) -> None:
        """Raises ``ManifestError`` unless inputs and outputs are the graph contract's, with one
        logit per label: the server feeds exactly those names and shapes."""
        expected_in, expected_out = contract_inputs(), contract_outputs(len(self.labels))
        if self.inputs != expected_in:
            raise ManifestError(f"{self.name}/{self.version}: manifest inputs "
                                f"{[i.model_dump() for i in self.inputs]} are not the contract's "
                                f"{[i.model_dump() for i in expected_in]}")
        if self.outputs != expected_out:
            raise ManifestError(f"{self.name}/{self.version}: manifest outputs "
                                f"{[o.model_dump() for o in self.outputs]} are not the contract's "
                                f"{[o.model_dump() for o in expected_out]} ({len(self.labels)} "
                                "labels)")

    def artifact(self, precision: Precision) -> Artifact | None:
        return next((a for a in self.artifacts if a.precision == precision), None)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise ManifestError(f"{path}: no manifest") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            raise ManifestError(
                f"{path}: invalid manifest at '{where}': {first['msg']}"
                f" ({exc.error_count()} error(s))"
            ) from exc

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
