"""Client input that does not decode: hand-built wire bytes against a real server.

Every path that decodes client input answers INVALID_ARGUMENT (never UNKNOWN from a protobuf
``DecodeError`` inside gRPC), a bad message inside ClassifyStream is answered alone and the
stream goes on, v2 version strings are ASCII digits only, and NOT_FOUND neither echoes a
megabyte of name nor lists the server's models. Requests travel as raw bytes
(``request_serializer=None``) so that the client's protobuf cannot refuse to send them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness.server import RunningServer, server_settings
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from protos.inference import grpc_predict_v2_pb2 as ip
from protos.seqserve.v1 import seqserve_pb2 as pb
from service.server.transport.open_inference import encode_bytes_tensor

CLASSIFIER = "/seqserve.v1.Classifier"
INFERENCE = "/inference.GRPCInferenceService"
# What a status message must never show: Python's exception names and gRPC's wording for an
# exception that escaped a handler ("Unexpected <class '...DecodeError'>").
EXCEPTION_WORDS = ("DecodeError", "ValueError", "UnicodeDecodeError", "Traceback",
                   "Unexpected", "Exception", "<class")
NAME_MB = "m" * 1_000_000
MAX_DETAILS = 200


@pytest.fixture(scope="module")
def server(tiny_repository: Path) -> Iterator[RunningServer]:
    # Room for a megabyte of model name (the shared server takes 256 KiB messages).
    running = RunningServer(server_settings(tiny_repository,
                                            max_receive_message_bytes=2 * 1024 * 1024))
    running.start()
    yield running
    running.close()


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


# --- protobuf wire format, by hand ---------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field ``number`` with wire type 2 (string, bytes, message), holding ``payload``."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


INVALID_UTF8 = b"caf\xc3"  # a truncated two-byte sequence
MODEL, TEXTS, ID = (pb.ClassifyRequest.DESCRIPTOR.fields_by_name[n].number
                    for n in ("model", "texts", "id"))


def classify_bytes(model: bytes = LSTM_NAME.encode(), texts: tuple[bytes, ...] = (b"good",),
                   request_id: bytes = b"") -> bytes:
    return (length_delimited(MODEL, model)
            + b"".join(length_delimited(TEXTS, text) for text in texts)
            + (length_delimited(ID, request_id) if request_id else b""))


def unary(channel: grpc.Channel, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=None,
                               response_deserializer=response.FromString)


def refused(call: grpc.UnaryUnaryMultiCallable, data: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(data, timeout=10)
    return caught.value


def assert_plain(details: str) -> None:
    """A message for people: no Python exception names, bounded."""
    assert not [word for word in EXCEPTION_WORDS if word in details], details
    assert len(details) < MAX_DETAILS, len(details)


def test_the_hand_built_bytes_are_what_the_generated_code_sends() -> None:
    sent = pb.ClassifyRequest(model=LSTM_NAME, texts=["good", "bad"], id="r1")
    built = classify_bytes(texts=(b"good", b"bad"), request_id=b"r1")
    assert pb.ClassifyRequest.FromString(built) == sent


@pytest.mark.parametrize("data", [
    classify_bytes(model=INVALID_UTF8),
    classify_bytes(texts=(b"good", INVALID_UTF8)),
    classify_bytes(request_id=b"\xff\xfe"),
], ids=["model", "texts[1]", "id"])
def test_invalid_utf8_in_a_classify_request_is_invalid_argument(channel: grpc.Channel,
                                                                data: bytes) -> None:
    error = refused(unary(channel, f"{CLASSIFIER}/Classify", pb.ClassifyResponse), data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "not a valid seqserve.v1.ClassifyRequest" in error.details()
    assert "UTF-8" in error.details()
    assert_plain(error.details())


def test_the_same_request_with_valid_utf8_is_classified(channel: grpc.Channel) -> None:
    answer = unary(channel, f"{CLASSIFIER}/Classify", pb.ClassifyResponse)(
        classify_bytes(texts=(b"good", "café".encode())), timeout=10)
    assert answer.model == LSTM_NAME and len(answer.results) == 2


@pytest.mark.parametrize(("method", "request_type", "response_type", "data"), [
    ("Classify", "seqserve.v1.ClassifyRequest", pb.ClassifyResponse, b"\xff\xff\xff\xff"),
    ("GetModel", "seqserve.v1.GetModelRequest", pb.GetModelResponse,
     length_delimited(1, b"\x80tiny")),
    ("ModelInfer", "inference.ModelInferRequest", ip.ModelInferResponse,
     b"\x0a\xff\xff\xff\xff\x0f garbage"),
    ("ModelInfer", "inference.ModelInferRequest", ip.ModelInferResponse,
     length_delimited(1, INVALID_UTF8)),  # model_name
    ("ModelReady", "inference.ModelReadyRequest", ip.ModelReadyResponse,
     length_delimited(2, b"\xc0\xaf")),  # version, an overlong encoding of "/"
    ("ModelMetadata", "inference.ModelMetadataRequest", ip.ModelMetadataResponse,
     b"\x12\x05ab"),  # a length past the end
])
def test_undecodable_messages_are_invalid_argument(channel: grpc.Channel, method: str,
                                                   request_type: str, response_type: type,
                                                   data: bytes) -> None:
    service = CLASSIFIER if request_type.startswith("seqserve") else INFERENCE
    error = refused(unary(channel, f"{service}/{method}", response_type), data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"not a valid {request_type}" in error.details()
    assert_plain(error.details())


def test_a_malformed_stream_message_is_answered_alone_and_the_stream_goes_on(
        channel: grpc.Channel) -> None:
    stream = channel.stream_stream(f"{CLASSIFIER}/ClassifyStream", request_serializer=None,
                                   response_deserializer=pb.ClassifyStreamResponse.FromString)
    call = stream(iter([classify_bytes(request_id=b"first"),
                        classify_bytes(texts=(INVALID_UTF8,), request_id=b"second"),
                        classify_bytes(texts=(b"bad", b"fine"), request_id=b"third")]),
                  timeout=20)
    replies = list(call)
    assert call.code() is grpc.StatusCode.OK
    assert [reply.WhichOneof("outcome") for reply in replies] == ["response", "error",
                                                                   "response"]
    first, middle, last = replies
    assert first.response.id == "first" and len(first.response.results) == 1
    assert last.response.id == "third" and len(last.response.results) == 2
    assert middle.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid seqserve.v1.ClassifyRequest" in middle.error.message
    assert_plain(middle.error.message)


# --- Open Inference Protocol version strings ----------------------------------------------

BAD_VERSIONS = ["²", "①", "١", "1.0", " 1", "1 ", "-1", "+1", "0x1", "1_0", "5" * 5000]


def infer(version: str, model: str = LSTM_NAME, raw: bytes | None = None,
          shape: int = 1) -> ip.ModelInferRequest:
    request = ip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[shape])
    request.raw_input_contents.append(encode_bytes_tensor([b"good"]) if raw is None else raw)
    return request


V2_METHODS = {
    "ModelInfer": (lambda v: infer(v), ip.ModelInferResponse, "model_version"),
    "ModelReady": (lambda v: ip.ModelReadyRequest(name=LSTM_NAME, version=v),
                   ip.ModelReadyResponse, "version"),
    "ModelMetadata": (lambda v: ip.ModelMetadataRequest(name=LSTM_NAME, version=v),
                      ip.ModelMetadataResponse, "version"),
}


def v2_call(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    _, response, _ = V2_METHODS[method]
    return channel.unary_unary(f"{INFERENCE}/{method}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response.FromString)


@pytest.mark.parametrize("method", sorted(V2_METHODS))
@pytest.mark.parametrize("version", BAD_VERSIONS,
                         ids=lambda v: v if len(v) < 10 else f"{len(v)}-digits")
def test_v2_versions_are_ascii_digits_only(channel: grpc.Channel, method: str,
                                           version: str) -> None:
    build, _, field = V2_METHODS[method]
    with pytest.raises(grpc.RpcError) as caught:
        v2_call(channel, method)(build(version), timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(f"{field}: ") and "not a version number" in error.details()
    assert_plain(error.details())


@pytest.mark.parametrize("method", sorted(V2_METHODS))
def test_v2_version_1_is_the_served_version(channel: grpc.Channel, method: str) -> None:
    build, _, _ = V2_METHODS[method]
    answer = v2_call(channel, method)(build("1"), timeout=10)
    if method == "ModelInfer":
        assert answer.model_version == "1" and list(answer.outputs[0].shape) == [1]
    elif method == "ModelReady":
        assert answer.ready is True
    else:
        assert list(answer.versions) == ["1"]


# --- NOT_FOUND ----------------------------------------------------------------------------

NOT_FOUND_CALLS = {
    "Classify": (f"{CLASSIFIER}/Classify", pb.ClassifyResponse,
                 pb.ClassifyRequest(model=NAME_MB, texts=["good"])),
    "GetModel": (f"{CLASSIFIER}/GetModel", pb.GetModelResponse,
                 pb.GetModelRequest(model=NAME_MB)),
    "ModelInfer": (f"{INFERENCE}/ModelInfer", ip.ModelInferResponse, infer("", NAME_MB)),
    "ModelMetadata": (f"{INFERENCE}/ModelMetadata", ip.ModelMetadataResponse,
                      ip.ModelMetadataRequest(name=NAME_MB)),
}


@pytest.mark.parametrize("method", sorted(NOT_FOUND_CALLS))
def test_not_found_for_a_megabyte_name_is_short_and_lists_no_models(channel: grpc.Channel,
                                                                    method: str) -> None:
    path, response, message = NOT_FOUND_CALLS[method]
    data = message.SerializeToString()
    assert len(data) > 1_000_000
    error = refused(unary(channel, path, response), data)
    assert error.code() is grpc.StatusCode.NOT_FOUND, (error.code(), error.details()[:300])
    assert error.details().startswith("model 'mmmm") and "not loaded" in error.details()
    assert LSTM_NAME not in error.details() and TRANSFORMER_NAME not in error.details()
    assert_plain(error.details())


def test_model_ready_for_a_megabyte_name_is_false(channel: grpc.Channel) -> None:
    answer = v2_call(channel, "ModelReady")(ip.ModelReadyRequest(name=NAME_MB), timeout=10)
    assert answer.ready is False


# --- raw_input_contents: BYTES elements behind 4-byte little-endian lengths ----------------

def length(size: int) -> bytes:
    return struct.pack("<I", size)


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"\x05\x00", "truncated BYTES element length at byte 0"),
    (length(4) + b"good" + b"\x01\x00", "truncated BYTES element length at byte 8"),
    (length(100) + b"abc", "BYTES element 0 runs past the end"),
    (length(4) + b"good" + length(2**32 - 1) + b"xy", "BYTES element 1 runs past the end"),
    (length(4) + b"good" + length(0), "shape says 1 elements, data holds 2"),
    (length(4) + b"go", "BYTES element 0 runs past the end"),
], ids=["truncated-length", "trailing-bytes", "length-past-end", "huge-length",
        "trailing-element", "short-payload"])
def test_a_bad_length_prefix_is_invalid_argument_naming_the_input(channel: grpc.Channel,
                                                                  raw: bytes,
                                                                  fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        v2_call(channel, "ModelInfer")(infer("", raw=raw), timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith("TEXT: ") and fragment in error.details()
    assert_plain(error.details())


def test_a_good_length_prefix_is_classified(channel: grpc.Channel) -> None:
    raw = length(4) + b"good" + length(0) + length(3) + b"bad"
    with pytest.raises(grpc.RpcError) as caught:  # the empty element is refused by the core
        v2_call(channel, "ModelInfer")(infer("", raw=raw, shape=3), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "TEXT[1]: empty" in caught.value.details()
    raw = length(4) + b"good" + length(3) + b"bad"
    answer = v2_call(channel, "ModelInfer")(infer("", raw=raw, shape=2), timeout=10)
    assert list(answer.outputs[0].shape) == [2]
