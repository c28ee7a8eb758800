"""A load generator in its own process (so it does not share the test's event loop or GIL):
``python -m harness.loadgen TARGET MODEL RATE SECONDS DEADLINE [TEXT]`` sends Poisson arrivals
at RATE calls/s for SECONDS (a negative RATE: a closed loop of -RATE callers) and prints one JSON
list of [code, latency_s, sent_at] per call (``sent_at``: wall-clock time, comparable with the
test's). Open-loop latency counts from the intended send time."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import grpc

from protos.seqserve.v1 import seqserve_pb2 as pb
from protos.seqserve.v1 import seqserve_pb2_grpc as pb_grpc

TEXT = "a fine film, warmly acted"


class Call(NamedTuple):
    code: str  # the gRPC status name
    latency: float  # seconds
    sent_at: float  # time.time() when it was (meant to be) sent


async def generate(target: str, model: str, rate: float, seconds: float, deadline: float,
                   text: str) -> list[Call]:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.ClassifierStub(channel)
    await stub.ListModels(pb.ListModelsRequest(), timeout=30)  # connected before timing
    request = pb.ClassifyRequest(model=model, texts=[text])
    results: list[Call] = []
    # perf_counter for latency, with the wall clock it stood at when the run began.
    wall_offset = time.time() - time.perf_counter()

    async def one(at: float) -> None:
        try:
            await stub.Classify(request, timeout=deadline)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        results.append(Call(code, time.perf_counter() - at, at + wall_offset))

    start = time.perf_counter()
    if rate < 0:  # a closed loop of -rate callers

        async def caller() -> None:
            while time.perf_counter() - start < seconds:
                await one(time.perf_counter())

        await asyncio.gather(*(caller() for _ in range(int(-rate))))
    else:
        rng, intended, tasks = random.Random(os.getpid()), start, []
        while intended - start < seconds:
            intended += rng.expovariate(rate)
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(intended)))
        await asyncio.gather(*tasks)
    await channel.close()
    return results


def start(target: str, model: str, rate: float, seconds: float, deadline: float,
          text: str = TEXT) -> subprocess.Popen[str]:
    """The generator as a child process; read its result with ``collect``."""
    tests = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    return subprocess.Popen([sys.executable, "-m", "harness.loadgen", target, model, str(rate),
                             str(seconds), str(deadline), text], stdout=subprocess.PIPE,
                            text=True, env=env)


def collect(process: subprocess.Popen[str], timeout: float = 120) -> list[Call]:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"load generator failed ({process.returncode})"
    return [Call(*row) for row in json.loads(out)]


if __name__ == "__main__":
    target, model, rate, seconds, deadline = sys.argv[1:6]
    text = sys.argv[6] if len(sys.argv) > 6 else TEXT
    print(json.dumps(asyncio.run(generate(target, model, float(rate), float(seconds),
                                          float(deadline), text))))
