from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_DRAINING: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_DRAINING: ModelState

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "texts", "top_k", "id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., id: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class TextResult(_message.Message):
    __slots__ = ("label", "score", "top", "token_count", "truncated")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    token_count: int
    truncated: bool
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., token_count: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_us", "tokenize_us", "inference_us", "total_us", "batch_size", "batches")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    tokenize_us: int
    inference_us: int
    total_us: int
    batch_size: int
    batches: int
    def __init__(self, queue_us: _Optional[int] = ..., tokenize_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "architecture", "precision", "device", "results", "timing", "id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    architecture: str
    precision: str
    device: str
    results: _containers.RepeatedCompositeFieldContainer[TextResult]
    timing: Timing
    id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., architecture: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TextResult, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    id: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ClassifyResponse
    error: StreamError
    def __init__(self, response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("dataset", "split", "examples", "fp32_accuracy", "fp32_macro_f1", "fp16_accuracy", "fp16_macro_f1", "fp16_agreement", "onnx_vs_torch_max_abs_diff", "int8_accuracy", "int8_macro_f1", "int8_agreement", "batch_max_abs_diff")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FP32_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FP32_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    FP16_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FP16_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    FP16_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    ONNX_VS_TORCH_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    INT8_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    INT8_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    INT8_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    split: str
    examples: int
    fp32_accuracy: float
    fp32_macro_f1: float
    fp16_accuracy: float
    fp16_macro_f1: float
    fp16_agreement: float
    onnx_vs_torch_max_abs_diff: float
    int8_accuracy: float
    int8_macro_f1: float
    int8_agreement: float
    batch_max_abs_diff: float
    def __init__(self, dataset: _Optional[str] = ..., split: _Optional[str] = ..., examples: _Optional[int] = ..., fp32_accuracy: _Optional[float] = ..., fp32_macro_f1: _Optional[float] = ..., fp16_accuracy: _Optional[float] = ..., fp16_macro_f1: _Optional[float] = ..., fp16_agreement: _Optional[float] = ..., onnx_vs_torch_max_abs_diff: _Optional[float] = ..., int8_accuracy: _Optional[float] = ..., int8_macro_f1: _Optional[float] = ..., int8_agreement: _Optional[float] = ..., batch_max_abs_diff: _Optional[float] = ...) -> None: ...

class FailedVersion(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "available_versions", "architecture", "precision", "device", "providers", "labels", "max_length", "state", "evaluation", "load_seconds", "created_at", "failed_versions", "max_texts_per_request", "source", "device_fallback_reason", "device_gate", "placement", "cpu_compute_nodes", "precision_reason", "intra_op_threads", "intra_op_threads_reason", "fused_ops", "distillation", "memcpy_nodes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_GATE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CPU_COMPUTE_NODES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_REASON_FIELD_NUMBER: _ClassVar[int]
    FUSED_OPS_FIELD_NUMBER: _ClassVar[int]
    DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    MEMCPY_NODES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    architecture: str
    precision: str
    device: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    state: ModelState
    evaluation: Evaluation
    load_seconds: float
    created_at: str
    failed_versions: _containers.RepeatedCompositeFieldContainer[FailedVersion]
    max_texts_per_request: int
    source: str
    device_fallback_reason: str
    device_gate: DeviceGate
    placement: _containers.RepeatedCompositeFieldContainer[NodePlacement]
    cpu_compute_nodes: _containers.RepeatedScalarFieldContainer[str]
    precision_reason: str
    intra_op_threads: int
    intra_op_threads_reason: str
    fused_ops: _containers.RepeatedCompositeFieldContainer[FusedOp]
    distillation: Distillation
    memcpy_nodes: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., available_versions: _Optional[_Iterable[int]] = ..., architecture: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., load_seconds: _Optional[float] = ..., created_at: _Optional[str] = ..., failed_versions: _Optional[_Iterable[_Union[FailedVersion, _Mapping]]] = ..., max_texts_per_request: _Optional[int] = ..., source: _Optional[str] = ..., device_fallback_reason: _Optional[str] = ..., device_gate: _Optional[_Union[DeviceGate, _Mapping]] = ..., placement: _Optional[_Iterable[_Union[NodePlacement, _Mapping]]] = ..., cpu_compute_nodes: _Optional[_Iterable[str]] = ..., precision_reason: _Optional[str] = ..., intra_op_threads: _Optional[int] = ..., intra_op_threads_reason: _Optional[str] = ..., fused_ops: _Optional[_Iterable[_Union[FusedOp, _Mapping]]] = ..., distillation: _Optional[_Union[Distillation, _Mapping]] = ..., memcpy_nodes: _Optional[int] = ...) -> None: ...

class Distillation(_message.Message):
    __slots__ = ("teacher_name", "teacher_version", "teacher_sha256", "teacher_kind", "teacher_architecture", "teacher_precision", "teacher_test_accuracy", "loss", "transfer_texts", "transfer_training", "transfer_augmented", "transfer_unlabelled", "augmentation")
    TEACHER_NAME_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEACHER_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEACHER_KIND_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TEACHER_PRECISION_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TEXTS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TRAINING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_AUGMENTED_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_UNLABELLED_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    teacher_name: str
    teacher_version: int
    teacher_sha256: str
    teacher_kind: str
    teacher_architecture: str
    teacher_precision: str
    teacher_test_accuracy: float
    loss: str
    transfer_texts: int
    transfer_training: int
    transfer_augmented: int
    transfer_unlabelled: int
    augmentation: str
    def __init__(self, teacher_name: _Optional[str] = ..., teacher_version: _Optional[int] = ..., teacher_sha256: _Optional[str] = ..., teacher_kind: _Optional[str] = ..., teacher_architecture: _Optional[str] = ..., teacher_precision: _Optional[str] = ..., teacher_test_accuracy: _Optional[float] = ..., loss: _Optional[str] = ..., transfer_texts: _Optional[int] = ..., transfer_training: _Optional[int] = ..., transfer_augmented: _Optional[int] = ..., transfer_unlabelled: _Optional[int] = ..., augmentation: _Optional[str] = ...) -> None: ...

class FusedOp(_message.Message):
    __slots__ = ("op_type", "count")
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    op_type: str
    count: int
    def __init__(self, op_type: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class NodePlacement(_message.Message):
    __slots__ = ("provider", "nodes")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    provider: str
    nodes: int
    def __init__(self, provider: _Optional[str] = ..., nodes: _Optional[int] = ...) -> None: ...

class DeviceGate(_message.Message):
    __slots__ = ("candidate_precision", "chosen_precision", "passed", "examples", "agreement", "fp32_accuracy", "candidate_accuracy", "max_abs_diff", "fp32_vs_export_max_abs_diff", "fp32_op_types", "min_agreement", "max_accuracy_drop", "detail")
    CANDIDATE_PRECISION_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_PRECISION_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    FP32_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    FP32_VS_EXPORT_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    FP32_OP_TYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    candidate_precision: str
    chosen_precision: str
    passed: bool
    examples: int
    agreement: float
    fp32_accuracy: float
    candidate_accuracy: float
    max_abs_diff: float
    fp32_vs_export_max_abs_diff: float
    fp32_op_types: _containers.RepeatedScalarFieldContainer[str]
    min_agreement: float
    max_accuracy_drop: float
    detail: str
    def __init__(self, candidate_precision: _Optional[str] = ..., chosen_precision: _Optional[str] = ..., passed: _Optional[bool] = ..., examples: _Optional[int] = ..., agreement: _Optional[float] = ..., fp32_accuracy: _Optional[float] = ..., candidate_accuracy: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., fp32_vs_export_max_abs_diff: _Optional[float] = ..., fp32_op_types: _Optional[_Iterable[str]] = ..., min_agreement: _Optional[float] = ..., max_accuracy_drop: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...
