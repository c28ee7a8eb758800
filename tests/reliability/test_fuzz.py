"""Property-based fuzzing of both APIs and the stream against one real server.

Random unicode (control and format characters, whitespace-only, empty, far over the byte
limits), many texts, random model names and versions, malformed v2 tensors and length prefixes
(and raw entries beside contents, or more than one per input), and raw or mutated bytes as
request bodies. The property, for every call: the status is one the protos document for it
(never UNKNOWN, INTERNAL or a DEADLINE_EXCEEDED from a stuck server), its message is bounded and
names no Python exception, an answer has the shape the request asked for, ClassifyStream
answers every message; and afterwards the server still serves.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness.reliability import scaled
from harness.server import RunningServer, server_settings
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.inference import grpc_predict_v2_pb2 as ip
from protos.seqserve.v1 import seqserve_pb2 as pb
from service.server.transport.open_inference import OUTPUTS, encode_bytes_tensor

# Modest limits, so that inputs over them are cheap to build and send.
MAX_TEXTS = 16
MAX_TEXT_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 256 * 1024
MAX_RECEIVE = 1024 * 1024
LIMITS = dict(max_texts_per_request=MAX_TEXTS, max_text_bytes=MAX_TEXT_BYTES,
              max_request_bytes=MAX_REQUEST_BYTES, max_receive_message_bytes=MAX_RECEIVE)
MODELS = (LSTM_NAME, TRANSFORMER_NAME)
CALL_TIMEOUT_S = 20  # a call that takes this long is a stuck server, not a slow one

# RESOURCE_EXHAUSTED only for a message over max_receive_message_bytes: the calls here are
# sequential, so neither a queue nor the in-flight limit can fill.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
STREAM_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0]}
EXCEPTION_WORDS = ("DecodeError", "ValueError", "UnicodeDecodeError", "KeyError", "IndexError",
                   "TypeError", "AttributeError", "OverflowError", "struct.error", "Traceback",
                   "Unexpected", "Exception", "<class")
# An error message travels in the grpc-message trailer, percent-encoded (a non-ASCII byte takes
# three); clients refuse trailers over 8 KiB (gRPC's default soft limit), so messages stay far
# below it.
MAX_DETAILS_BYTES = 1024

FUZZ = settings(
    max_examples=int(scaled(150, 3000)), deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- the server and the calls -------------------------------------------------------------

class ErrorLog(logging.Handler):
    """Every ERROR logged while the fuzz runs: an exception that escaped a handler is one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Wire:
    """One channel to the fuzzed server; every call's status is checked and counted."""

    server: RunningServer
    channel: grpc.Channel
    errors: ErrorLog
    codes: Counter[str] = field(default_factory=Counter)  # status codes of calls
    outcomes: Counter[str] = field(default_factory=Counter)  # stream replies: response/error

    def unary(self, path: str, data: bytes, response: type) -> tuple[grpc.StatusCode, object]:
        call = self.channel.unary_unary(path, request_serializer=None,
                                        response_deserializer=response.FromString)
        try:
            answer = call(data, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            self.check(error.code(), error.details() or "", len(data))
            return error.code(), None
        self.check(grpc.StatusCode.OK, "", len(data))
        return grpc.StatusCode.OK, answer

    def check(self, code: grpc.StatusCode, details: str, size: int) -> None:
        self.codes[code.name] += 1
        assert code in DOCUMENTED, f"{code.name}: {details[:500]}"
        assert_plain(details)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert size > MAX_RECEIVE, f"RESOURCE_EXHAUSTED for {size} bytes: {details[:500]}"


def assert_plain(details: str) -> None:
    assert not [w for w in EXCEPTION_WORDS if w in details], details[:500]
    assert len(details.encode()) <= MAX_DETAILS_BYTES, f"{len(details)} chars: {details[:300]}"


@pytest.fixture(scope="module")
def wire(tiny_repository: Path) -> Iterator[Wire]:
    running = RunningServer(server_settings(tiny_repository, **LIMITS))
    running.start()
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with grpc.insecure_channel(running.target) as channel:
            yield Wire(running, channel, errors)
    finally:
        logging.getLogger().removeHandler(errors)
        running.close()


@pytest.fixture
def counted(wire: Wire, figures: dict[str, object]) -> Iterator[Wire]:
    """The wire, with this test's calls counted into its figures; still serving afterwards."""
    codes, outcomes = wire.codes.copy(), wire.outcomes.copy()
    logged = len(wire.errors.records)
    yield wire
    mine = wire.codes - codes
    figures.update({"requests": sum(mine.values()), "codes": dict(sorted(mine.items()))})
    if stream := wire.outcomes - outcomes:
        figures["stream replies"] = dict(sorted(stream.items()))
    assert [r.getMessage()[:300] for r in wire.errors.records[logged:]] == []
    assert_still_serving(wire)


def assert_still_serving(wire: Wire) -> None:
    health = health_pb2_grpc.HealthStub(wire.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    good = pb.ClassifyRequest(model=LSTM_NAME, texts=["a good film", "bad"])
    code, response = wire.unary(CLASSIFY, good.SerializeToString(), pb.ClassifyResponse)
    assert code is grpc.StatusCode.OK and len(response.results) == 2


CLASSIFIER = "/seqserve.v1.Classifier"
INFERENCE = "/inference.GRPCInferenceService"
CLASSIFY = f"{CLASSIFIER}/Classify"
UNARY_METHODS = {
    CLASSIFY: pb.ClassifyResponse,
    f"{CLASSIFIER}/ListModels": pb.ListModelsResponse,
    f"{CLASSIFIER}/GetModel": pb.GetModelResponse,
    f"{INFERENCE}/ServerLive": ip.ServerLiveResponse,
    f"{INFERENCE}/ServerReady": ip.ServerReadyResponse,
    f"{INFERENCE}/ServerMetadata": ip.ServerMetadataResponse,
    f"{INFERENCE}/ModelReady": ip.ModelReadyResponse,
    f"{INFERENCE}/ModelMetadata": ip.ModelMetadataResponse,
    f"{INFERENCE}/ModelInfer": ip.ModelInferResponse,
}


# --- strategies -----------------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",))  # surrogates cannot be sent as UTF-8
CONTROL = st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Mn"))
SPECIAL = st.sampled_from(["", " ", "\t\n\r", "\u00a0", "\u3000\u2003", "\x00", "\u200b",
                           "\ufeff", "\U0001f600", "e\u0301", "good movie", "[CLS]", "[PAD]"])


def repeated(unit: st.SearchStrategy[str], most: int) -> st.SearchStrategy[str]:
    return st.builds(operator.mul, unit, st.integers(1, most))


SHORT_TEXT = st.one_of(st.text(CHARS, max_size=40), st.text(CONTROL, max_size=12), SPECIAL)
# Up to 4 characters repeated 20,000 times: up to 320 KiB, over the 64 KiB per text.
LONG_TEXT = repeated(st.text(CHARS, min_size=1, max_size=4), 20_000)
# One text of 1 to 2 MiB: a message over max_receive_message_bytes, which gRPC itself refuses.
OVERSIZED = st.builds(lambda n: ["é" * n], st.integers(MAX_RECEIVE // 2, MAX_RECEIVE))
TEXTS = st.one_of(st.lists(SHORT_TEXT, max_size=40),
                  st.lists(st.one_of(SHORT_TEXT, LONG_TEXT), max_size=4), OVERSIZED)
PLAIN_TEXTS = st.lists(st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1,
                               max_size=60).filter(lambda t: not t.isspace()),
                       min_size=1, max_size=MAX_TEXTS)
SMALL_NAMES = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(["", "TINY-LSTM", f"{LSTM_NAME} ", f"{LSTM_NAME}\x00", f"{LSTM_NAME}/1",
                     f"../{LSTM_NAME}", "*", "%s%n"]),
    st.text(CHARS, max_size=30),
)
NAMES = st.one_of(SMALL_NAMES, repeated(st.text(CHARS, min_size=1, max_size=3), 100_000))
INT64 = st.integers(-(2**63), 2**63 - 1)
VERSIONS = st.one_of(st.none(), st.sampled_from([1, 2, 0, -1]), INT64)
TOP_K = st.one_of(st.sampled_from([0, 1, 2, 3, -1]), st.integers(-(2**31), 2**31 - 1))
IDS = st.one_of(st.text(CHARS, max_size=20),
                repeated(st.text(CHARS, min_size=1, max_size=4), 2_000))


@st.composite
def classify_requests(draw: st.DrawFn, texts: st.SearchStrategy[list[str]] = TEXTS,
                      names: st.SearchStrategy[str] = NAMES) -> pb.ClassifyRequest:
    if draw(st.booleans()):  # plausible: mostly answered
        request = pb.ClassifyRequest(model=draw(st.sampled_from(MODELS)),
                                     texts=draw(PLAIN_TEXTS), top_k=draw(st.integers(0, 2)))
    else:
        request = pb.ClassifyRequest(model=draw(names), texts=draw(texts), top_k=draw(TOP_K),
                                     id=draw(IDS))
        if (version := draw(VERSIONS)) is not None:
            request.version = version
    return request


# Each well under max_receive_message_bytes, so that a stream of them is never cut short.
SMALL_CLASSIFY = classify_requests(st.lists(SHORT_TEXT, max_size=40), SMALL_NAMES)


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy) -> bytes:
    """A valid message's bytes with a few bytes flipped, cut, inserted or dropped."""
    data = bytearray(draw(messages).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "drop"]))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at < len(data):
            del data[at]
    return bytes(data)


def raw_bodies(messages: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(messages))


# Open Inference Protocol
V2_VERSIONS = st.one_of(
    st.just(""), st.sampled_from(["1", "01", "2", "0", "-1", "1.0", " 1", "²", "١", "①",
                                  "9" * 19, "1" * 18]),
    st.text(CHARS, max_size=8), st.text(st.characters(categories=("Nd", "No", "Nl")),
                                        max_size=6),
    repeated(st.sampled_from("0123456789"), 10_000),
)
HUGE = repeated(st.text(CHARS, min_size=1, max_size=2), 20_000)  # 20 KiB to 160 KiB
DATATYPES = st.one_of(st.sampled_from(["BYTES", "BYTES", "FP32", "INT64", "bytes", "STRING", ""]),
                      st.text(CHARS, max_size=8), HUGE)
ELEMENTS = st.lists(st.one_of(SHORT_TEXT.map(str.encode), st.binary(max_size=20)), max_size=20)
PARAMETER = st.one_of(st.booleans(), INT64, st.text(CHARS, max_size=20),
                      st.floats(allow_nan=True), st.integers(0, 2**64 - 1))


def set_parameters(target: object, values: dict[str, object]) -> None:
    for key, value in values.items():
        parameter = target.parameters[key]  # type: ignore[attr-defined]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif value >= 2**63:  # type: ignore[operator]
            parameter.uint64_param = value
        else:
            parameter.int64_param = value


@st.composite
def corrupted(draw: st.DrawFn, raw: bytes) -> bytes:
    """Length-prefixed BYTES data gone wrong: cut short, trailing junk, a length rewritten."""
    data = bytearray(raw)
    action = draw(st.sampled_from(["cut", "append", "length", "flip"]))
    if action == "cut":
        del data[draw(st.integers(0, len(data))):]
    elif action == "append":
        data += draw(st.binary(min_size=1, max_size=9))
    elif action == "length" and len(data) >= 4:
        at = draw(st.integers(0, len(data) - 4))
        data[at:at + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    elif data:
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


# What a plausible request may get wrong in how it carries its data, against KServe v2's rule
# (raw_input_contents: one entry per input; then no input has contents). Mostly nothing.
RAW_DEFECTS = st.sampled_from([None] * 6 + ["second raw", "contents too", "empty contents too"])


def add_raw_defect(request: ip.ModelInferRequest, defect: str | None, items: list[bytes]
                   ) -> None:
    if defect == "second raw":  # the first entry is valid: only strict decoding refuses it
        request.raw_input_contents.append(encode_bytes_tensor(items))
    elif defect == "contents too":
        request.inputs[0].contents.bytes_contents.extend(items)
    elif defect == "empty contents too":
        request.inputs[0].contents.SetInParent()


def breaks_raw_rule(request: ip.ModelInferRequest) -> bool:
    raw = request.raw_input_contents
    return bool(raw) and (len(raw) != len(request.inputs)
                          or any(t.HasField("contents") for t in request.inputs))


@st.composite
def infer_requests(draw: st.DrawFn) -> ip.ModelInferRequest:
    plausible = draw(st.booleans())  # mostly answered: a known model, one TEXT tensor
    request = ip.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS) if plausible else NAMES),
        model_version=draw(st.sampled_from(["", "1"]) if plausible else V2_VERSIONS),
        id=draw(IDS))
    set_parameters(request, draw(st.dictionaries(st.text(CHARS, max_size=10), PARAMETER,
                                                 max_size=3)))
    for index in range(1 if plausible else draw(st.sampled_from([0, 1, 1, 2, 3]))):
        items = (draw(PLAIN_TEXTS.map(lambda texts: [t.encode() for t in texts])) if plausible
                 else draw(ELEMENTS))
        name = "TEXT" if plausible or index else draw(
            st.one_of(st.just("TEXT"), st.text(CHARS, max_size=10), HUGE))
        shape = [len(items)] if plausible else draw(st.one_of(
            st.just([len(items)]), st.just([len(items), 1]),
            st.lists(st.one_of(st.integers(-2, 25), INT64), max_size=5),
            st.builds(operator.mul, st.just([1]), st.integers(0, 50_000)),
        ))
        tensor = request.inputs.add(name=name, shape=shape,
                                    datatype="BYTES" if plausible else draw(DATATYPES))
        set_parameters(tensor, draw(st.dictionaries(st.text(CHARS, max_size=6), PARAMETER,
                                                    max_size=2)))
        encoding = "raw" if plausible else draw(
            st.sampled_from(["raw", "raw", "contents", "both", "twice", "corrupted", "none"]))
        if encoding in ("contents", "both"):
            tensor.contents.bytes_contents.extend(items)
        if encoding in ("raw", "both", "twice"):
            request.raw_input_contents.append(encode_bytes_tensor(items))
        if encoding == "twice":  # one input, two entries
            request.raw_input_contents.append(encode_bytes_tensor(items))
        if plausible:
            add_raw_defect(request, draw(RAW_DEFECTS), items)
        if encoding == "corrupted":
            request.raw_input_contents.append(draw(corrupted(encode_bytes_tensor(items))))
    if not plausible:
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=12), max_size=2)))
    names = st.sampled_from(OUTPUTS) if plausible else st.one_of(
        st.sampled_from(OUTPUTS), st.text(CHARS, max_size=10), HUGE)
    for name in draw(st.lists(names, max_size=4)):
        request.outputs.add(name=name)
    return request


# --- seqserve.v1 ----------------------------------------------------------------------------

@FUZZ
@given(request=classify_requests())
def test_classify_fields(counted: Wire, request: pb.ClassifyRequest) -> None:
    code, answer = counted.unary(CLASSIFY, request.SerializeToString(), pb.ClassifyResponse)
    if code is grpc.StatusCode.OK:
        assert answer.model == request.model and len(answer.results) == len(request.texts)
        assert all(len(result.top) == request.top_k for result in answer.results)


@FUZZ
@given(data=raw_bodies(SMALL_CLASSIFY))
def test_classify_bytes(counted: Wire, data: bytes) -> None:
    counted.unary(CLASSIFY, data, pb.ClassifyResponse)


@FUZZ
@given(name=NAMES, version=VERSIONS)
def test_get_model(counted: Wire, name: str, version: int | None) -> None:
    request = pb.GetModelRequest(model=name, version=version)
    code, answer = counted.unary(f"{CLASSIFIER}/GetModel", request.SerializeToString(),
                                 pb.GetModelResponse)
    if code is grpc.StatusCode.OK:
        assert answer.model.name == name and name in MODELS


@FUZZ
@given(items=st.lists(st.one_of(SMALL_CLASSIFY, raw_bodies(SMALL_CLASSIFY)), max_size=12))
def test_stream_answers_every_message(counted: Wire, items: list[object]) -> None:
    sent, ids = [], []
    for index, item in enumerate(items):
        if isinstance(item, pb.ClassifyRequest):
            ids.append(f"s{index}")
            message = pb.ClassifyRequest()
            message.CopyFrom(item)  # a copy: hypothesis may hand the same object again
            message.id = ids[-1]
            item = message.SerializeToString()
        else:
            ids.append(None)  # raw bytes: an id only if they happen to decode
        sent.append(item)
    stream = counted.channel.stream_stream(
        f"{CLASSIFIER}/ClassifyStream", request_serializer=None,
        response_deserializer=pb.ClassifyStreamResponse.FromString)
    call = stream(iter(sent), timeout=CALL_TIMEOUT_S)
    replies = list(call)
    counted.check(call.code(), call.details() or "", max(map(len, sent), default=0))
    assert call.code() is grpc.StatusCode.OK
    assert len(replies) == len(sent)
    for reply, wanted in zip(replies, ids, strict=True):
        outcome = reply.WhichOneof("outcome")
        counted.outcomes[outcome or "none"] += 1
        assert outcome in ("response", "error")
        if outcome == "error":
            assert reply.error.code in STREAM_ERRORS, reply.error
            assert_plain(reply.error.message)
        if wanted is not None:
            assert getattr(reply, outcome).id == wanted


@FUZZ
@given(path=st.sampled_from(sorted(UNARY_METHODS)), data=st.binary(max_size=300))
def test_every_method_takes_garbage(counted: Wire, path: str, data: bytes) -> None:
    counted.unary(path, data, UNARY_METHODS[path])


# --- Open Inference Protocol ----------------------------------------------------------------

@FUZZ
@given(request=infer_requests())
def test_model_infer_tensors(counted: Wire, request: ip.ModelInferRequest) -> None:
    data = request.SerializeToString()
    code, answer = counted.unary(f"{INFERENCE}/ModelInfer", data, ip.ModelInferResponse)
    if breaks_raw_rule(ip.ModelInferRequest.FromString(data)):  # as the server parsed it
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), code
    if code is grpc.StatusCode.OK:
        count = request.inputs[0].shape[0]
        assert answer.model_name == request.model_name and answer.id == request.id
        assert len(answer.outputs) == len(answer.raw_output_contents) >= 1
        assert all(output.shape[0] == count for output in answer.outputs)


@FUZZ
@given(data=raw_bodies(infer_requests()))
def test_model_infer_bytes(counted: Wire, data: bytes) -> None:
    counted.unary(f"{INFERENCE}/ModelInfer", data, ip.ModelInferResponse)


@FUZZ
@given(name=NAMES, version=V2_VERSIONS, ready=st.booleans())
def test_model_ready_and_metadata(counted: Wire, name: str, version: str, ready: bool) -> None:
    if ready:
        code, answer = counted.unary(
            f"{INFERENCE}/ModelReady",
            ip.ModelReadyRequest(name=name, version=version).SerializeToString(),
            ip.ModelReadyResponse)
        served = code is grpc.StatusCode.OK and answer.ready
    else:
        code, answer = counted.unary(
            f"{INFERENCE}/ModelMetadata",
            ip.ModelMetadataRequest(name=name, version=version).SerializeToString(),
            ip.ModelMetadataResponse)
        served = code is grpc.StatusCode.OK
        if served:
            assert answer.name == name and list(answer.versions) == ["1"]
    if served:  # the one version loaded, named in ASCII digits ('١' is not 1)
        assert name in MODELS
        assert not version or (version.isascii() and version.isdigit() and int(version) == 1)


def test_the_server_still_serves_after_the_fuzz(wire: Wire, figures: dict[str, object]) -> None:
    assert_still_serving(wire)
    request = ip.ModelInferRequest(model_name=TRANSFORMER_NAME)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_tensor([b"a lovely film"]))
    code, _ = wire.unary(f"{INFERENCE}/ModelInfer", request.SerializeToString(),
                         ip.ModelInferResponse)
    assert code is grpc.StatusCode.OK
    figures.update({"requests": sum(wire.codes.values()),
                    "codes": dict(sorted(wire.codes.items())),
                    "stream replies": dict(sorted(wire.outcomes.items()))})
