"""Which asyncio event loop the server runs on.

The server's own Python work per call (gRPC callbacks, the handler, batching) runs on one event
loop; uvloop's libuv-based loop does that scheduling in C. ``auto`` takes it when installed
(it is a serving dependency on Linux and macOS) and falls back to asyncio's loop elsewhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str) -> LoopFactory:
    """A factory for the chosen loop; raises ``RuntimeError`` for uvloop when it is missing."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return asyncio.new_event_loop
    if not uvloop_available():
        raise RuntimeError("event_loop=uvloop but uvloop is not installed (pip install uvloop)")
    import uvloop

    return uvloop.new_event_loop


def run(coroutine_factory: Callable[[], object], choice: str) -> object:
    """Run ``coroutine_factory()`` to completion on a new loop of the chosen kind."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coroutine_factory())  # type: ignore[arg-type]
