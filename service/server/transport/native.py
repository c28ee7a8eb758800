"""The seqserve.v1 gRPC skin: converts messages and maps errors, nothing else.

All request rules live in ``service/server/core.py``; this module is the protobuf boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from protos.seqserve.v1 import seqserve_pb2 as pb
from protos.seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from service.repo.manifest import DistillationRecord, Evaluation, ModelSource
from service.server.core import ClassifyCall, ClassifyOutcome, InferenceCore, ModelView
from service.server.device_gate import DeviceGateResult
from service.server.errors import ServingError
from service.server.transport.common import abort, deadline_of
from service.server.transport.registration import Malformed

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
MICROS = 1_000_000


def to_call(request: pb.ClassifyRequest, deadline: float | None) -> ClassifyCall:
    return ClassifyCall(
        model=request.model,
        # Once: each read of a repeated string field decodes its UTF-8 into a new str.
        texts=list(request.texts),
        version=request.version if request.HasField("version") else None,
        top_k=request.top_k,
        deadline=deadline,
    )


def to_response(outcome: ClassifyOutcome, request_id: str) -> pb.ClassifyResponse:
    served, t = outcome.model, outcome.timing
    return pb.ClassifyResponse(
        model=served.name,
        version=served.version,
        architecture=served.architecture,
        precision=served.precision,
        device=served.device,
        results=[
            pb.TextResult(
                label=r.label, score=r.score, token_count=r.token_count, truncated=r.truncated,
                top=[pb.LabelScore(label=label, score=score) for label, score in r.top],
            )
            for r in outcome.results
        ],
        timing=pb.Timing(
            queue_us=round(t.queue_s * MICROS), tokenize_us=round(t.tokenize_s * MICROS),
            inference_us=round(t.inference_s * MICROS), total_us=round(t.total_s * MICROS),
            batch_size=t.batch_size, batches=t.batches,
        ),
        id=request_id,
    )


def to_evaluation(ev: Evaluation) -> pb.Evaluation:
    evaluation = pb.Evaluation(
        dataset=ev.dataset, split=ev.split, examples=ev.examples,
        fp32_accuracy=ev.fp32.accuracy, fp32_macro_f1=ev.fp32.macro_f1,
    )
    if ev.onnx_vs_torch_max_abs_diff is not None:
        evaluation.onnx_vs_torch_max_abs_diff = ev.onnx_vs_torch_max_abs_diff
    for precision in ("fp16", "int8"):
        figures = getattr(ev, precision)
        if figures is not None:
            setattr(evaluation, f"{precision}_accuracy", figures.accuracy)
            setattr(evaluation, f"{precision}_macro_f1", figures.macro_f1)
        agreement = getattr(ev, f"{precision}_agreement")
        if agreement is not None:
            setattr(evaluation, f"{precision}_agreement", agreement)
    return evaluation


def describe_source(source: ModelSource | None,
                    distillation: DistillationRecord | None = None) -> str:
    if source is None:
        return ""
    if source.kind == "fine-tuned":
        return f"fine-tuned from {source.base}"
    if source.kind == "distilled" and distillation is not None:
        teacher = distillation.teacher
        return (f"distilled from {teacher.name}"
                + (f" v{teacher.version}" if teacher.version is not None else " (a run)"))
    return f"{source.kind} {source.path}" if source.path else source.kind


def to_distillation(record: DistillationRecord) -> pb.Distillation:
    teacher, transfer = record.teacher, record.transfer_set
    return pb.Distillation(
        teacher_name=teacher.name, teacher_version=teacher.version or 0,
        teacher_sha256=teacher.sha256, teacher_kind=teacher.kind,
        teacher_architecture=teacher.architecture, teacher_precision=teacher.precision,
        teacher_test_accuracy=teacher.test_accuracy, loss=record.loss,
        transfer_texts=transfer.texts, transfer_training=transfer.training,
        transfer_augmented=transfer.augmented, transfer_unlabelled=transfer.unlabelled,
        augmentation=transfer.augmentation)


def to_model_info(view: ModelView) -> pb.ModelInfo:
    served = view.served
    manifest = served.loaded.manifest
    state = pb.MODEL_STATE_READY if served.state == "ready" else pb.MODEL_STATE_DRAINING
    info = pb.ModelInfo(
        name=served.name, version=served.version, available_versions=view.available_versions,
        architecture=served.architecture, precision=served.precision, device=served.device,
        providers=served.loaded.session.providers, labels=served.labels,
        max_length=manifest.tokenizer.max_length, state=state,
        load_seconds=served.loaded.load_seconds, created_at=manifest.created_at.isoformat(),
        failed_versions=[pb.FailedVersion(version=v, reason=r)
                         for v, r in sorted(view.failed_versions.items())],
        max_texts_per_request=view.max_texts_per_request,
        source=describe_source(manifest.source, manifest.distillation),
    )
    if manifest.evaluation is not None:
        info.evaluation.CopyFrom(to_evaluation(manifest.evaluation))
    selection = served.loaded.session.selection
    info.device_fallback_reason = selection.fallback_reason
    info.precision_reason = selection.precision_reason
    info.intra_op_threads = selection.threads
    info.intra_op_threads_reason = selection.threads_reason
    artifact = manifest.artifact(served.precision)  # type: ignore[arg-type]
    if artifact is not None:
        info.fused_ops.extend(pb.FusedOp(op_type=op, count=count)
                              for op, count in sorted(artifact.fused_ops.items()))
        if artifact.batch_max_abs_diff is not None and manifest.evaluation is not None:
            info.evaluation.batch_max_abs_diff = artifact.batch_max_abs_diff
    if manifest.distillation is not None:
        info.distillation.CopyFrom(to_distillation(manifest.distillation))
    info.placement.extend(pb.NodePlacement(provider=provider, nodes=count)
                          for provider, count in sorted(selection.placement.nodes.items()))
    info.cpu_compute_nodes.extend(selection.placement.cpu_compute_nodes)
    info.memcpy_nodes = selection.placement.memcpy_nodes
    if selection.gate is not None:
        info.device_gate.CopyFrom(to_device_gate(selection.gate))
    return info


def to_device_gate(gate: DeviceGateResult) -> pb.DeviceGate:
    message = pb.DeviceGate(
        candidate_precision=gate.candidate, chosen_precision=gate.chosen, passed=gate.passed,
        fp32_op_types=gate.fp32_op_types, min_agreement=gate.thresholds.min_agreement,
        max_accuracy_drop=gate.thresholds.max_accuracy_drop, detail=gate.detail)
    if gate.comparison is not None:
        c = gate.comparison
        message.examples, message.agreement = c.examples, c.agreement
        message.fp32_accuracy, message.candidate_accuracy = c.fp32_accuracy, c.candidate_accuracy
        message.max_abs_diff = c.max_abs_diff
    if gate.fp32_vs_export_max_abs_diff is not None:
        message.fp32_vs_export_max_abs_diff = gate.fp32_vs_export_max_abs_diff
    return message


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore) -> None:
        self._core = core
        self._stream_inflight = core.settings.max_stream_inflight

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        try:
            outcome = await self._core.classify(to_call(request, deadline_of(context)))
        except ServingError as error:
            await abort(context, error)
        return to_response(outcome, request.id)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        # Requests are started as they arrive (so they can share batches) and answered in
        # order. A slot is taken before a request starts and given back once its answer is
        # written, so at most max_stream_inflight requests of one stream exist at once.
        slots = asyncio.Semaphore(self._stream_inflight)
        started: asyncio.Queue[asyncio.Task[pb.ClassifyStreamResponse] | None] = asyncio.Queue()
        deadline = deadline_of(context)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    started.put_nowait(asyncio.create_task(self._one(request, deadline)))
            finally:
                started.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await started.get()) is not None:
                response = await task
                yield response
                slots.release()
        finally:
            reader.cancel()
            while not started.empty():
                if (task := started.get_nowait()) is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _one(
        self, request: pb.ClassifyRequest | Malformed, deadline: float | None
    ) -> pb.ClassifyStreamResponse:
        if isinstance(request, Malformed):  # answered alone; the stream goes on
            error = request.error()
            self._core.refused(error)
            return pb.ClassifyStreamResponse(error=pb.StreamError(
                code=error.code.value[0], message=error.message))
        try:
            outcome = await self._core.classify(to_call(request, deadline))
        except ServingError as error:
            return pb.ClassifyStreamResponse(error=pb.StreamError(
                code=error.code.value[0], message=error.message, id=request.id))
        return pb.ClassifyStreamResponse(response=to_response(outcome, request.id))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[to_model_info(v) for v in self._core.list_models()])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        version = request.version if request.HasField("version") else None
        try:
            view = self._core.get_model(request.model, version)
        except ServingError as error:
            await abort(context, error)
        return pb.GetModelResponse(model=to_model_info(view))
