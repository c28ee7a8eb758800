"""Steady closed-loop load that other code can watch while it runs, for the scale-out phases.

``load.closed_loop`` measures a cell and returns when it is done. The replica phases need more:
load that keeps running while the caller publishes a model version or kills a replica, a way to
wait for a condition on the calls answered so far (``wait_for``), and every call's start and end
time, to tell which calls were in flight at a given instant. Bounded in calls and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.client import AsyncClient, ClientError


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic()
    ended: float
    code: str  # "OK" or the gRPC status code's name
    version: int = 0  # the model version that answered; 0 for a failed call

    @property
    def ok(self) -> bool:
        return self.code == "OK"


class SteadyLoad:
    """``callers`` callers on one client, each sending its next call when the last returns."""

    def __init__(self, client: AsyncClient, model: str, texts: list[str], *, callers: int,
                 max_calls: int, max_seconds: float) -> None:
        self.client, self.model, self.texts = client, model, texts
        self.callers, self.max_calls, self.max_seconds = callers, max_calls, max_seconds
        self.calls: list[Call] = []
        self.in_flight = 0
        self.succeeded = 0
        self._by_version: dict[int, int] = {}
        self._issued = 0
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()

    def answered_by(self, version: int) -> int:
        return self._by_version.get(version, 0)

    async def _caller(self, offset: int, stop_at: float) -> None:
        while not self._stop.is_set() and self._issued < self.max_calls:
            if time.monotonic() >= stop_at:
                self._stop.set()
                break
            text = self.texts[(self._issued + offset) % len(self.texts)]
            self._issued += 1
            self.in_flight += 1
            started = time.monotonic()
            try:
                result = await self.client.classify([text], model=self.model)
                call = Call(started, time.monotonic(), "OK", result.version)
            except ClientError as error:
                call = Call(started, time.monotonic(), error.code.name)
            self.in_flight -= 1
            self.calls.append(call)
            if call.ok:
                self.succeeded += 1
                self._by_version[call.version] = self._by_version.get(call.version, 0) + 1
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:  # wake waiters: no more calls will come
            self._changed.notify_all()

    def _tasks(self) -> list[asyncio.Task[None]]:
        stop_at = time.monotonic() + self.max_seconds
        return [asyncio.create_task(self._caller(i, stop_at)) for i in range(self.callers)]

    async def run(self) -> list[Call]:
        """Until ``max_calls`` have been sent or ``max_seconds`` passed; every call."""
        await asyncio.gather(*self._tasks())
        return self.calls

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SteadyLoad]:
        """The load runs inside the block and stops (calls in flight finish) when it exits."""
        tasks = self._tasks()
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` holds after some call ended; TimeoutError if the load stopped
        first (its bounds ran out) without it holding."""
        async with self._changed:
            while not condition():
                stopped = self._stop.is_set() or self._issued >= self.max_calls
                if stopped and self.in_flight == 0:
                    raise TimeoutError("the load stopped before the condition held")
                await self._changed.wait()
