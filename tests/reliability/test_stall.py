"""No request can stall the others: 4 MiB texts sent from one process while another process's
calls and this process's health checks keep their latency."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import REPO_ROOT, loadgen
from harness.processes import serve_process
from harness.reliability import scaled
from harness.tiny_models import LSTM_NAME

BIG = 4 << 20  # a 4 MiB text
BIG_TEXTS_PER_S = 2  # one sender, steadily: 8 MiB/s of text
LIMITS = ["--max-text-bytes", str(2 * BIG), "--max-request-bytes", str(2 * BIG),
          "--max-receive-message-bytes", str(2 * BIG)]
_BIG_SENDER = """
import sys, time, grpc
from protos.seqserve.v1 import seqserve_pb2 as pb, seqserve_pb2_grpc as pb_grpc
target, model, seconds, size, pace = (sys.argv[1], sys.argv[2], float(sys.argv[3]),
                                      int(sys.argv[4]), float(sys.argv[5]))
channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 2 * size)])
stub = pb_grpc.ClassifierStub(channel)
text = ("a long document about films " * (size // 28 + 1))[:size]
sent, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    reply = stub.Classify(pb.ClassifyRequest(model=model, texts=[text]), timeout=30)
    assert reply.results[0].truncated
    sent += 1
    time.sleep(max(0.0, start + sent * pace - time.monotonic()))  # a steady pace of big texts
print(sent)
"""


def health_latencies(target: str, seconds: float) -> list[float]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        latencies, start = [], time.monotonic()
        while time.monotonic() - start < seconds:
            began = time.perf_counter()
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            latencies.append(time.perf_counter() - began)
            time.sleep(0.01)  # a probe's pace, not synchronisation
    return latencies


def p99_ms(values: list[float]) -> float:
    return float(np.percentile(values, 99)) * 1000


def phase(target: str, seconds: float) -> tuple[list[float], list[float]]:
    """One caller's classify latencies (another process) and health-check latencies."""
    caller = loadgen.start(target, LSTM_NAME, -1, seconds, 10)
    health: list[float] = []
    checker = threading.Thread(target=lambda: health.extend(health_latencies(target, seconds)))
    checker.start()
    calls = loadgen.collect(caller)
    checker.join()
    assert {call.code for call in calls} == {"OK"}
    return [call.latency for call in calls], health


def test_four_mebibyte_texts_do_not_stall_other_calls(tiny_repository: Path, figures) -> None:
    process, target = serve_process(tiny_repository, "--metrics-port", "0", *LIMITS,
                                    log_level="WARNING")
    seconds = scaled(6, 30)
    try:
        phase(target, 1)  # warm
        idle_calls, idle_health = phase(target, seconds)
        sender = subprocess.Popen([sys.executable, "-c", _BIG_SENDER, target, LSTM_NAME,
                                   str(seconds), str(BIG), str(1 / BIG_TEXTS_PER_S)],
                                  cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, text=True)
        busy_calls, busy_health = phase(target, seconds)
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0
        big_texts = int(out)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    figures.update({
        "4 MiB texts classified": big_texts,
        "classify p99 ms idle/with 4 MiB texts": f"{p99_ms(idle_calls):.2f}/"
                                                 f"{p99_ms(busy_calls):.2f}",
        "health p99 ms idle/with 4 MiB texts": f"{p99_ms(idle_health):.2f}/"
                                               f"{p99_ms(busy_health):.2f}",
        "worst health check ms with 4 MiB texts": f"{max(busy_health) * 1000:.1f}",
    })
    assert big_texts >= 2
    # Within 2x of idle plus 10 ms: the sender and the tokenizer thread take CPU from the loop
    # on 2 shared cores (health p99 1.8 -> 6.1 ms seen), while a 4 MiB text tokenized on the
    # event loop would stall every call for seconds (~2.9 s to encode one here).
    assert p99_ms(busy_calls) <= 2 * p99_ms(idle_calls) + 10
    assert p99_ms(busy_health) <= 2 * p99_ms(idle_health) + 10


def test_texts_over_the_byte_limits_are_refused_naming_the_field(start_server,
                                                                tiny_repository: Path) -> None:
    from harness.server import server_settings

    from service.client import ClientError

    running = start_server(server_settings(tiny_repository, max_text_bytes=1000,
                                           max_request_bytes=1500, max_texts_per_request=8))
    with running.client(timeout=10) as client:
        for texts, message in ((["ok", "é" * 600], "texts[1]: 1200 bytes, more than the limit "
                                                   "of 1000 per text"),
                               (["a" * 900, "b" * 900], "texts: 1800 bytes in all, more than "
                                                        "the limit of 1500 per request")):
            try:
                client.classify(texts, model=LSTM_NAME)
            except ClientError as error:
                assert error.code is grpc.StatusCode.INVALID_ARGUMENT
                assert message in error.details
            else:
                raise AssertionError("not refused")
