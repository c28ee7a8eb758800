"""The load generator's clients: seqserve.v1, or the Open Inference Protocol (KServe v2).

The same cells, texts and statistics measure either of seqserve's two skins, or any other
server that speaks the Open Inference Protocol over gRPC (Triton, MLServer, KServe runtimes):
the v2 client sends the texts as one BYTES tensor (``--v2-input``, default ``TEXT``) and reads
the label output back. Only seqserve's native API reports server-side timings and token counts;
for v2 those figures are absent (None), not zero.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal, Protocol

import grpc

from service.client import (
    AsyncClient,
    Classification,
    ClassifyResult,
    ClientError,
    ModelDescription,
)

Kind = Literal["native", "v2"]
PROTOCOLS: tuple[Kind, ...] = ("native", "v2")
_LENGTH = struct.Struct("<I")
# Responses of 64 texts with probabilities fit easily; the default 4 MiB is enough for sends.
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


class BenchClient(Protocol):
    async def classify(self, texts: Sequence[str], *, model: str) -> ClassifyResult: ...
    async def close(self) -> None: ...


class OipClient:
    """A minimal asyncio Open Inference Protocol client: ModelInfer and ModelMetadata."""

    def __init__(self, target: str, *, timeout: float, input_name: str = "TEXT",
                 label_output: str = "LABEL") -> None:
        # Imported here: the inference.* protobuf symbols are only needed when v2 is measured.
        from protos.inference import grpc_predict_v2_pb2 as pb
        from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

        self._pb = pb
        self.timeout = timeout
        self.input_name, self.label_output = input_name, label_output
        self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def classify(self, texts: Sequence[str], *, model: str) -> ClassifyResult:
        pb = self._pb
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=self.input_name, datatype="BYTES", shape=[len(texts)])
        request.raw_input_contents.append(b"".join(
            _LENGTH.pack(len(data)) + data for data in (text.encode() for text in texts)))
        request.outputs.add(name=self.label_output)
        try:
            response = await self._stub.ModelInfer(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        labels = _decode_bytes(response.raw_output_contents[0]) if response.raw_output_contents \
            else [b.decode() for b in response.outputs[0].contents.bytes_contents]
        version = int(response.model_version) if response.model_version.isdigit() else 0
        return ClassifyResult(
            model=response.model_name, version=version, architecture="", precision="",
            device="", results=[Classification(label, 0.0, [], 0, False) for label in labels],
            timing=None)

    async def describe(self, names: Sequence[str]) -> list[ModelDescription]:
        described = []
        for name in names:
            try:
                metadata = await self._stub.ModelMetadata(
                    self._pb.ModelMetadataRequest(name=name), timeout=self.timeout)
            except grpc.RpcError as error:
                raise ClientError.from_rpc(error) from None
            versions = [int(v) for v in metadata.versions if v.isdigit()]
            described.append(ModelDescription(
                name=metadata.name, version=max(versions, default=0), architecture=name,
                precision="?", device="?", labels=[], max_length=0, state="READY"))
        return described

    async def close(self) -> None:
        await self._channel.close()


def _decode_bytes(raw: bytes) -> list[str]:
    items, offset = [], 0
    while offset < len(raw):
        (size,) = _LENGTH.unpack_from(raw, offset)
        items.append(raw[offset + 4:offset + 4 + size].decode("utf-8", "replace"))
        offset += 4 + size
    return items


def open_client(protocol: Kind, target: str, *, timeout: float, v2_input: str = "TEXT"
                ) -> BenchClient:
    if protocol == "v2":
        return OipClient(target, timeout=timeout, input_name=v2_input)
    return AsyncClient(target, timeout=timeout)
