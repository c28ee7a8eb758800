"""The GPU check's serve stage: what the server does by default on this machine.

``seqserve serve --device auto --precision auto`` over the bundle's repository, as an operator
would start it: the fp16 re-gate on the device, the fallback chain, placement. Then ``GetModel``
for every model: the device and precision it chose and why, the re-gate's figures, where the
nodes went, and a classification through the real server.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

SERVE_FLAGS = ["--device", "auto", "--precision", "auto"]
TEXTS = ["a fine film, warmly acted", "dull and far too long"]


def stage_serve(repository: Path, timeout_s: float) -> dict[str, Any]:
    from service.bench.child_server import ChildServer
    from service.bench.errors import BenchError
    from service.client import Client, ClientError

    started = time.monotonic()
    # The server's log goes to check.log: its fallback reasons and ORT's warnings (Memcpy
    # nodes added, ...) are part of what this stage is for.
    server = ChildServer(repository, SERVE_FLAGS, log_level="INFO", log_to_terminal=True,
                         startup_timeout_s=max(10.0, timeout_s))
    result: dict[str, Any] = {"flags": SERVE_FLAGS, "models": []}
    try:
        address = server.start()
    except BenchError as error:
        return {**result, "error": str(error), "seconds": round(time.monotonic() - started, 1)}
    result["start_seconds"] = round(time.monotonic() - started, 1)
    try:
        with Client(address, timeout=60) as client:
            for described in client.list_models():
                entry: dict[str, Any] = dataclasses.asdict(client.get_model(described.name))
                try:
                    answer = client.classify(TEXTS, model=described.name)
                    entry["classified"] = [r.label for r in answer.results]
                except ClientError as error:
                    entry["classified"] = f"{error.code.name}: {error.details}"
                result["models"].append(entry)
    finally:
        result["exit_code"] = server.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
