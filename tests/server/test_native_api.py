"""seqserve.v1 against a real server: results, batching, validation, streaming, descriptions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness.server import RunningServer, reference_probabilities, server_settings
from harness.tiny_models import LSTM_NAME, MAX_LENGTH, TRANSFORMER_NAME, corpus

from service.client import ClientError, request

TEXTS = ["good movie", "the plot was very boring and too long but the music was fun",
         "bad", "a really lovely film with a brilliant actor", "dull"]


@pytest.mark.parametrize("model", [LSTM_NAME, TRANSFORMER_NAME])
def test_results_equal_in_process_onnx_runtime(shared_server: RunningServer,
                                               tiny_repository: Path, model: str) -> None:
    expected, labels = reference_probabilities(tiny_repository, model, TEXTS)
    with shared_server.client() as client:
        answer = client.classify(TEXTS, model=model, top_k=len(labels))
    assert (answer.model, answer.version, answer.device, answer.precision) == (
        model, 1, "cpu", "fp32")
    assert answer.architecture == ("lstm" if model == LSTM_NAME else "transformer")
    for row, result in zip(expected, answer.results, strict=True):
        assert result.label == labels[int(row.argmax())]
        assert result.score == pytest.approx(float(row.max()), abs=1e-5)
        served = dict(result.top)
        assert [served[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-5)
        assert [s for _, s in result.top] == sorted((s for _, s in result.top), reverse=True)
        assert 1 <= result.token_count <= MAX_LENGTH[model]
    timing = answer.timing
    assert timing.total_us >= timing.inference_us > 0 and timing.batches >= 1


@pytest.mark.parametrize("model", [LSTM_NAME, TRANSFORMER_NAME])
def test_a_text_served_alone_is_bit_identical_to_in_process_onnx_runtime(
        shared_server: RunningServer, tiny_repository: Path, model: str) -> None:
    # One call at a time, so each text runs as a batch of one, exactly as in-process: the
    # same ids and the same graph must give the same float32 bits (batched with others, the
    # padding changes the order of the sums, hence the 1e-5 above).
    expected, labels = reference_probabilities(tiny_repository, model, TEXTS)
    with shared_server.client() as client:
        for text, row in zip(TEXTS, expected.astype(np.float32), strict=True):
            answer = client.classify([text], model=model, top_k=len(labels))
            assert answer.timing.batch_size == 1
            served = dict(answer.results[0].top)
            assert np.array_equal(np.array([served[label] for label in labels], np.float32),
                                  row)


def test_concurrent_callers_are_batched_and_get_their_own_results(
        shared_server: RunningServer, tiny_repository: Path) -> None:
    texts = corpus(64, seed=7)
    expected, labels = reference_probabilities(tiny_repository, LSTM_NAME, texts)
    with shared_server.client(timeout=30) as client:
        # 32 callers in flight at once, two texts each, all sent before any answer is read.
        pending = [client.classify_async(texts[2 * i:2 * i + 2], model=LSTM_NAME)
                   for i in range(32)]
        answers = [p.result(timeout=30) for p in pending]
    for i, answer in enumerate(answers):
        for j, result in enumerate(answer.results):
            row = expected[2 * i + j]
            assert result.label == labels[int(row.argmax())]
            assert result.score == pytest.approx(float(row.max()), abs=1e-5)
    assert max(a.timing.batch_size for a in answers) > 1


def test_texts_of_one_request_are_split_across_batches_and_reassembled(
        start_server, tiny_repository: Path) -> None:
    running = start_server(server_settings(tiny_repository, max_batch_texts=4))
    texts = corpus(30, seed=3)
    expected, labels = reference_probabilities(tiny_repository, TRANSFORMER_NAME, texts)
    with running.client() as client:
        answer = client.classify(texts, model=TRANSFORMER_NAME)
    assert answer.timing.batches >= 8 and answer.timing.batch_size <= 4
    assert [r.label for r in answer.results] == [labels[int(r.argmax())] for r in expected]


@pytest.mark.parametrize(("kwargs", "code", "fragment"), [
    ({"texts": [], "model": LSTM_NAME}, "INVALID_ARGUMENT", "texts"),
    ({"texts": ["ok"] * 65, "model": LSTM_NAME}, "INVALID_ARGUMENT", "limit of 64"),
    ({"texts": ["a", "b", "c", "  \t"], "model": LSTM_NAME}, "INVALID_ARGUMENT", "texts[3]"),
    ({"texts": ["a", ""], "model": LSTM_NAME}, "INVALID_ARGUMENT", "texts[1]"),
    ({"texts": ["a"], "model": ""}, "INVALID_ARGUMENT", "model"),
    ({"texts": ["a"], "model": "nope"}, "NOT_FOUND", "'nope'"),
    ({"texts": ["a"], "model": LSTM_NAME, "version": 7}, "NOT_FOUND", "version 7"),
    ({"texts": ["a"], "model": LSTM_NAME, "version": 0}, "INVALID_ARGUMENT", "version"),
    ({"texts": ["a"], "model": LSTM_NAME, "top_k": -1}, "INVALID_ARGUMENT", "top_k"),
    ({"texts": ["a"], "model": LSTM_NAME, "top_k": 3}, "INVALID_ARGUMENT", "top_k"),
])
def test_bad_requests_get_a_status_naming_the_field(shared_server: RunningServer, kwargs: dict,
                                                    code: str, fragment: str) -> None:
    with shared_server.client() as client, pytest.raises(ClientError) as caught:
        client.classify(**kwargs)
    assert caught.value.code.name == code
    assert fragment in caught.value.details


def test_oversized_message_is_refused_by_grpc(shared_server: RunningServer) -> None:
    with shared_server.client() as client, pytest.raises(ClientError) as caught:
        client.classify(["good " * 60_000], model=LSTM_NAME)  # ~300 KB > the 256 KiB limit
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_long_texts_are_truncated_and_flagged(shared_server: RunningServer) -> None:
    with shared_server.client() as client:
        answer = client.classify(["good " * 200, "good"], model=LSTM_NAME)
    long, short = answer.results
    assert long.truncated and long.token_count == MAX_LENGTH[LSTM_NAME]
    assert not short.truncated


def test_long_texts_are_rejected_when_configured(start_server, tiny_repository: Path) -> None:
    running = start_server(server_settings(tiny_repository, truncation="reject"))
    with running.client() as client:
        with pytest.raises(ClientError) as caught:
            client.classify(["fine", "good " * 200], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "texts[1]" in caught.value.details
        assert not client.classify(["fine"], model=LSTM_NAME).results[0].truncated


def test_one_bad_request_never_fails_the_good_ones_beside_it(
        shared_server: RunningServer) -> None:
    with shared_server.client(timeout=30) as client:
        good = [client.classify_async(["good film", "bad plot"], model=LSTM_NAME)
                for _ in range(8)]
        bad = [client.classify_async(["fine", " "], model=LSTM_NAME) for _ in range(8)]
        assert all(len(p.result(30).results) == 2 for p in good)
        for p in bad:
            with pytest.raises(ClientError):
                p.result(30)


def test_stream_answers_each_request_in_order(shared_server: RunningServer) -> None:
    texts = corpus(40, seed=11)
    requests = [request(texts[i:i + 1 + i % 3], LSTM_NAME, request_id=f"r{i}")
                for i in range(20)]
    requests[7] = request(["x", ""], LSTM_NAME, request_id="r7")  # fails alone
    with shared_server.client(timeout=30) as client:
        items = list(client.classify_stream(iter(requests)))
        single = [client.classify(r.texts, model=LSTM_NAME) for r in requests[:3]]
    assert len(items) == 20
    for i, item in enumerate(items):
        if i == 7:
            assert item.result is None and item.error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "texts[1]" in item.error.details
            continue
        assert item.error is None and item.result.id == f"r{i}"
        assert len(item.result.results) == len(requests[i].texts)
    for item, alone in zip(items[:3], single, strict=True):
        assert [r.label for r in item.result.results] == [r.label for r in alone.results]


def test_list_and_get_model_describe_what_is_served(shared_server: RunningServer) -> None:
    with shared_server.client() as client:
        models = client.list_models()
        lstm = client.get_model(LSTM_NAME)
        with pytest.raises(ClientError) as caught:
            client.get_model(LSTM_NAME, version=2)
    assert [m.name for m in models] == [LSTM_NAME, TRANSFORMER_NAME]
    assert lstm.version == 1 and lstm.available_versions == [1] and lstm.state == (
        "MODEL_STATE_READY")
    assert (lstm.architecture, lstm.device, lstm.precision) == ("lstm", "cpu", "fp32")
    assert lstm.providers == ["CPUExecutionProvider"]
    assert lstm.labels == ["negative", "positive"] and lstm.max_length == MAX_LENGTH[LSTM_NAME]
    assert lstm.evaluation["dataset"].endswith(f"{LSTM_NAME}.csv") and lstm.load_seconds > 0
    # The manifest's gate figures travel through GetModel.
    assert lstm.evaluation["fp16_agreement"] >= 0.995
    assert lstm.evaluation["onnx_vs_torch_max_abs_diff"] <= 1e-4
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(shared_server: RunningServer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with shared_server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("seqserve.v1.Classifier") == "SERVING"
        assert client.health("inference.GRPCInferenceService") == "SERVING"
    with grpc.insecure_channel(shared_server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"seqserve.v1.Classifier", "inference.GRPCInferenceService",
            "grpc.health.v1.Health"} <= services


def test_many_threads_share_one_client(shared_server: RunningServer) -> None:
    texts = corpus(16, seed=21)
    with shared_server.client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda text: client.classify([text], model=LSTM_NAME), texts))
    expected, labels = reference_probabilities(shared_server.server.settings.repository,
                                               LSTM_NAME, texts)
    for answer, row in zip(answers, expected, strict=True):
        # Each thread got the answer to its own text, whichever batch it rode in.
        assert answer.results[0].label == labels[int(row.argmax())]
        assert answer.results[0].score == pytest.approx(float(row.max()), abs=1e-5)
