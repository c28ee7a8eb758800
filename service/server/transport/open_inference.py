"""The Open Inference Protocol (KServe v2, ``inference.GRPCInferenceService``) skin.

Same core, same validation and status codes as seqserve.v1; only the tensor encoding differs:
input "TEXT" BYTES [N] (or [N, 1]) -> outputs "LABEL" BYTES [N], "SCORE" FP32 [N],
"PROBABILITIES" FP32 [N, C]. Outputs are returned in ``raw_output_contents``, the encoding
``tritonclient`` reads (BYTES elements: 4-byte little-endian length, then the bytes).

Caveat: this module registers the standard ``inference.*`` protobuf symbols in the default
descriptor pool, as ``tritonclient.grpc`` does with its own copy; protobuf refuses both in one
process. Servers never import tritonclient; the tests run tritonclient in a subprocess.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc
import numpy as np

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.repo.layout import is_version_number
from service.server.core import ClassifyCall, ClassifyOutcome, InferenceCore
from service.server.errors import ServingError, invalid
from service.server.transport.common import abort, deadline_of, quoted, quoted_all

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"  # Triton's name for ONNX Runtime models
INPUT = "TEXT"
OUTPUTS = ("LABEL", "SCORE", "PROBABILITIES")
_LENGTH = struct.Struct("<I")


def _server_version() -> str:
    try:
        return package_version("seqserve")
    except PackageNotFoundError:
        return "0+unknown"


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid(f"{INPUT}: truncated BYTES element length at byte {offset}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise invalid(f"{INPUT}: BYTES element {len(items)} runs past the end of the data")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


# A version is a positive integer of at most this many ASCII digits (int64 holds 18 safely).
MAX_VERSION_DIGITS = 18


def parse_version(text: str, field: str) -> int | None:
    """'' -> None (the served version); ASCII digits only ('²' and '١' pass isdigit())."""
    if not text:
        return None
    if len(text) > MAX_VERSION_DIGITS or not is_version_number(text):
        raise invalid(f"{field}: {quoted(text)} is not a version number (ASCII digits, at "
                      f"most {MAX_VERSION_DIGITS})")
    return int(text)


def elements_of(request: pb.ModelInferRequest) -> list[bytes]:
    """The input's BYTES elements, from ``raw_input_contents`` or from its ``contents``.

    Called once ``texts_of`` has checked there is exactly one input. Strict, as KServe v2 says
    (raw entries one per input, in input order; then no input carries ``contents``): taking the
    first raw entry of several, or raw over contents, would classify other data than a confused
    client meant to send, and answer OK.
    """
    raw, tensor = request.raw_input_contents, request.inputs[0]
    if not raw:
        return list(tensor.contents.bytes_contents)
    # Presence, not emptiness: an empty contents message beside raw data is still both.
    if tensor.HasField("contents"):
        raise invalid(f"{INPUT}: has contents and raw_input_contents is used too; accepted: "
                      f"the data in raw_input_contents (one entry per input) or in "
                      f"contents.bytes_contents, not both")
    if len(raw) != len(request.inputs):
        raise invalid(f"{INPUT}: raw_input_contents holds {len(raw)} entries for "
                      f"{len(request.inputs)} input; accepted: exactly one entry per input, in "
                      f"input order")
    return decode_bytes_tensor(raw[0])


def texts_of(request: pb.ModelInferRequest) -> list[str]:
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = quoted_all([t.name for t in request.inputs])  # bounded: the caller chose them
        raise invalid(f"inputs: expected exactly one input named {INPUT!r}, got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise invalid(f"{INPUT}: datatype must be BYTES, got {quoted(tensor.datatype)}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise invalid(f"{INPUT}: shape must be [N] or [N, 1], got {quoted_all(shape)}")
    items = elements_of(request)
    if len(items) != shape[0]:
        raise invalid(f"{INPUT}: shape says {shape[0]} elements, data holds {len(items)}")
    texts = []
    for index, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(f"{INPUT}[{index}]: not valid UTF-8 ({exc.reason})") from None
    return texts


def outputs_of(request: pb.ModelInferRequest) -> list[str]:
    wanted = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = [name for name in wanted if name not in OUTPUTS]
    if unknown:
        raise invalid(f"outputs: unknown output(s) {quoted_all(unknown)}; available: "
                      f"{list(OUTPUTS)}")
    return wanted


def infer_response(
    request: pb.ModelInferRequest, wanted: list[str], outcome: ClassifyOutcome
) -> pb.ModelInferResponse:
    results = outcome.results
    count, labels = len(results), len(outcome.model.labels)
    response = pb.ModelInferResponse(
        model_name=outcome.model.name, model_version=str(outcome.model.version), id=request.id)
    for name in wanted:
        if name == "LABEL":
            shape, datatype = [count], "BYTES"
            raw = encode_bytes_tensor([r.label.encode() for r in results])
        elif name == "SCORE":
            shape, datatype = [count], "FP32"
            raw = np.asarray([r.score for r in results], dtype="<f4").tobytes()
        else:
            shape, datatype = [count, labels], "FP32"
            raw = np.stack([r.probabilities for r in results]).astype("<f4").tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            version = parse_version(request.version, "version")
        except ServingError as error:
            await abort(context, error)
        return pb.ModelReadyResponse(ready=self._core.model_ready(request.name, version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="seqserve", version=_server_version(), extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            view = self._core.get_model(request.name, parse_version(request.version, "version"))
        except ServingError as error:
            await abort(context, error)
        served = view.served
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=served.name, versions=[str(served.version)], platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="BYTES", shape=[-1])],
            outputs=[
                tensor(name="LABEL", datatype="BYTES", shape=[-1]),
                tensor(name="SCORE", datatype="FP32", shape=[-1]),
                tensor(name="PROBABILITIES", datatype="FP32", shape=[-1, len(served.labels)]),
            ],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        try:
            wanted = outputs_of(request)
            call = ClassifyCall(
                model=request.model_name, texts=texts_of(request),
                version=parse_version(request.model_version, "model_version"),
                deadline=deadline_of(context), field=INPUT,
            )
        except ServingError as error:
            # Never reached the core: counted here, under the model when it is served.
            self._core.refused(error, request.model_name)
            await abort(context, error)
        try:
            outcome = await self._core.classify(call)
        except ServingError as error:
            await abort(context, error)
        return infer_response(request, wanted, outcome)
