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
