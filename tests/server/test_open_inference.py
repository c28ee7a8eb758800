"""The Open Inference Protocol: tritonclient against the real server, and the wire details.

tritonclient registers its own copy of the ``inference.*`` protobuf symbols, which protobuf
refuses beside seqserve's in one process, so it runs in a subprocess here.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness.server import RunningServer, reference_probabilities
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.server.transport.open_inference import decode_bytes_tensor, encode_bytes_tensor

TEXTS = ["good movie", "bad plot and dull actor", "a lovely film"]

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, model, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = tc.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready(model),
       "unknown_ready": client.is_model_ready("no-such-model"),
       "server": client.get_server_metadata(as_json=True),
       "metadata": client.get_model_metadata(model, as_json=True)}
data = tc.InferInput("TEXT", [len(texts)], "BYTES")
data.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
result = client.infer(model, [data], request_id="req-1")
out["labels"] = [x.decode() for x in result.as_numpy("LABEL")]
out["scores"] = result.as_numpy("SCORE").tolist()
out["probabilities"] = result.as_numpy("PROBABILITIES").tolist()
out["id"] = result.get_response().id
only = client.infer(model, [data], outputs=[tc.InferRequestedOutput("SCORE")])
out["only"] = [o.name for o in only.get_response().outputs]
for name, inputs in (("no-such-model", [data]), (model, [tc.InferInput("TEXT", [1], "BYTES")])):
    if name == model:
        inputs[0].set_data_from_numpy(np.array([b"   "], dtype=np.object_))
    try:
        client.infer(name, inputs)
    except InferenceServerException as error:
        out.setdefault("errors", []).append([error.status(), error.message()])
print(json.dumps(out))
"""


def test_tritonclient_works_unchanged(shared_server: RunningServer, tiny_repository: Path
                                      ) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, shared_server.target, TRANSFORMER_NAME,
         json.dumps(TEXTS)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]
    assert out["server"]["name"] == "seqserve"
    meta = out["metadata"]
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert [o["name"] for o in meta["outputs"]] == ["LABEL", "SCORE", "PROBABILITIES"]
    expected, labels = reference_probabilities(tiny_repository, TRANSFORMER_NAME, TEXTS)
    assert out["labels"] == [labels[int(row.argmax())] for row in expected]
    assert out["scores"] == pytest.approx(expected.max(axis=1).tolist(), abs=1e-5)
    assert np.allclose(out["probabilities"], expected, atol=1e-5)
    assert out["id"] == "req-1" and out["only"] == ["SCORE"]
    (not_found, bad_text) = out["errors"]
    assert not_found[0] == "StatusCode.NOT_FOUND"
    assert bad_text[0] == "StatusCode.INVALID_ARGUMENT" and "TEXT[0]" in bad_text[1]


def test_bytes_tensor_round_trip() -> None:
    items = [b"", b"caf\xc3\xa9", b"x" * 300]
    assert decode_bytes_tensor(encode_bytes_tensor(items)) == items


@pytest.fixture
def stub(shared_server: RunningServer):
    with grpc.insecure_channel(shared_server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(texts: list[bytes], shape: list[int] | None = None, raw: bool = True,
             datatype: str = "BYTES", **kwargs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=LSTM_NAME, **kwargs)
    tensor = request.inputs.add(name="TEXT", datatype=datatype,
                                shape=shape if shape is not None else [len(texts)])
    if raw:
        request.raw_input_contents.append(encode_bytes_tensor(texts))
    else:
        tensor.contents.bytes_contents.extend(texts)
    return request


def test_typed_contents_and_n_by_1_shapes_are_accepted(stub) -> None:
    typed = stub.ModelInfer(_request([b"good", b"bad"], shape=[2, 1], raw=False))
    assert [o.name for o in typed.outputs] == ["LABEL", "SCORE", "PROBABILITIES"]
    assert list(typed.outputs[2].shape) == [2, 2] and typed.model_version == "1"
    raw = stub.ModelInfer(_request([b"good", b"bad"]))
    assert raw.raw_output_contents[1] == typed.raw_output_contents[1]


@pytest.mark.parametrize(("request_", "code", "fragment"), [
    (_request([b"a"], datatype="FP32"), "INVALID_ARGUMENT", "BYTES"),
    (_request([b"a", b"b"], shape=[3]), "INVALID_ARGUMENT", "shape says 3"),
    (_request([b"\xff"]), "INVALID_ARGUMENT", "TEXT[0]"),
    (_request([b"a"], model_version="x"), "INVALID_ARGUMENT", "model_version"),
    (_request([b"a"], model_version="9"), "NOT_FOUND", "version 9"),
    (_request([]), "INVALID_ARGUMENT", "TEXT"),
])
def test_malformed_infer_requests_name_the_problem(stub, request_, code: str,
                                                   fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_)
    assert caught.value.code().name == code and fragment in caught.value.details()


def test_unknown_output_is_refused(stub) -> None:
    request = _request([b"good"])
    request.outputs.add(name="LOGITS")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "LOGITS" in caught.value.details()


# --- strict decoding: raw_input_contents is one entry per input, and then no contents -----

def _two_raw_entries() -> pb.ModelInferRequest:
    request = _request([b"good"])  # a valid first entry: only the second one is wrong
    request.raw_input_contents.append(encode_bytes_tensor([b"bad"]))
    return request


def _three_raw_entries() -> pb.ModelInferRequest:
    request = _two_raw_entries()
    request.raw_input_contents.append(b"")
    return request


def _raw_and_contents() -> pb.ModelInferRequest:
    request = _request([b"good"])
    request.inputs[0].contents.bytes_contents.append(b"good")  # the same text: still both
    return request


def _raw_and_empty_contents() -> pb.ModelInferRequest:
    request = _request([b"good"])
    request.inputs[0].contents.SetInParent()  # present on the wire, though it holds nothing
    return request


MIXED = "TEXT: has contents and raw_input_contents is used too"
STRICT_REFUSALS = {
    "two-raw-entries": (_two_raw_entries, "TEXT: raw_input_contents holds 2 entries for 1 input"),
    "three-raw-entries": (_three_raw_entries,
                          "TEXT: raw_input_contents holds 3 entries for 1 input"),
    "raw-and-contents": (_raw_and_contents, MIXED),
    "raw-and-empty-contents": (_raw_and_empty_contents, MIXED),
}


@pytest.mark.parametrize("case", sorted(STRICT_REFUSALS))
def test_raw_input_contents_are_one_entry_per_input_and_never_beside_contents(
        stub, case: str) -> None:
    build, fragment = STRICT_REFUSALS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(build())
    details = caught.value.details()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (caught.value.code(), details)
    assert details.startswith(fragment) and "accepted: " in details, details


LSTM_LABELS = {"model": LSTM_NAME, "version": "1", "architecture": "lstm", "precision": "fp32",
               "device": "cpu"}
UNRESOLVED = dict.fromkeys(LSTM_LABELS, "")


def _skin_refusals(server: RunningServer, labels: dict[str, str]) -> tuple[float, float]:
    """Refusals the skin counts before the core, under ``labels``."""
    registry = server.server.metrics.registry
    return tuple(registry.get_sample_value(name, {**labels, **extra}) or 0.0 for name, extra
                 in (("seqserve_rejections_total", {"reason": "invalid_argument"}),
                     ("seqserve_requests_total", {"code": "INVALID_ARGUMENT"})))


def test_strict_refusals_are_counted_under_the_model_they_name(
        stub, shared_server: RunningServer) -> None:
    before = _skin_refusals(shared_server, LSTM_LABELS)
    unresolved_before = _skin_refusals(shared_server, UNRESOLVED)
    for build, _ in STRICT_REFUSALS.values():
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(build())
    count = len(STRICT_REFUSALS)
    # Under the served model's labels, where its dashboards and alerts look.
    assert _skin_refusals(shared_server, LSTM_LABELS) == (before[0] + count, before[1] + count)
    # A name no model is served under is counted under empty labels, never as a label value.
    unknown = _two_raw_entries()
    unknown.model_name = "no-such-model"
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(unknown)
    assert _skin_refusals(shared_server, UNRESOLVED) == (unresolved_before[0] + 1,
                                                         unresolved_before[1] + 1)


def test_one_raw_entry_or_contents_alone_still_answer_alike(stub) -> None:
    texts = [b"good movie", b"bad plot"]
    raw = stub.ModelInfer(_request(texts))
    typed = stub.ModelInfer(_request(texts, raw=False))
    assert [o.name for o in raw.outputs] == [o.name for o in typed.outputs] == list(
        ("LABEL", "SCORE", "PROBABILITIES"))
    assert decode_bytes_tensor(raw.raw_output_contents[0]) == decode_bytes_tensor(
        typed.raw_output_contents[0])
    assert np.allclose(np.frombuffer(raw.raw_output_contents[2], "<f4"),
                       np.frombuffer(typed.raw_output_contents[2], "<f4"), atol=1e-6)


def message_fields(descriptor: Any) -> dict[str, Any]:
    """Field name -> [number, type], nested messages (not map entries) recursively."""
    out: dict[str, Any] = {f.name: [f.number, f.type] for f in descriptor.fields}
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            out[nested.name] = message_fields(nested)
    return out


# tritonclient registers the same protobuf names as our module, so it runs in another process.
TRITON_DESCRIPTOR_SCRIPT = f"""
import json
from typing import Any
from tritonclient.grpc import service_pb2 as s
names = ["ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
         "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest",
         "ServerMetadataResponse", "ModelMetadataRequest", "ModelMetadataResponse",
         "ModelInferRequest", "ModelInferResponse", "InferParameter", "InferTensorContents"]
{inspect.getsource(message_fields)}
print(json.dumps({{n: message_fields(s.DESCRIPTOR.message_types_by_name[n]) for n in names}}))
"""


def test_our_protocol_messages_match_tritons_field_for_field() -> None:
    completed = subprocess.run([sys.executable, "-c", TRITON_DESCRIPTOR_SCRIPT],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    theirs = json.loads(completed.stdout)

    ours = {name: message_fields(pb.DESCRIPTOR.message_types_by_name[name]) for name in theirs}
    assert ours == theirs
    assert pb.DESCRIPTOR.package == "inference"
