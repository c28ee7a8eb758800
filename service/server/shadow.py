"""Shadow comparison: mirror a fraction of one model's traffic to another and count agreement.

Off the critical path by construction: a request is offered to the mirror only after its own
response is ready, the shadow work runs in its own task, and every failure there is counted,
never raised. Shadow texts may use at most half of the shadow model's queue, so mirrored traffic
cannot push the shadow model's own callers into RESOURCE_EXHAUSTED; beyond that, or beyond
``shadow_max_pending`` mirrored requests in flight, a mirrored request is dropped (counted).

Sampling is deterministic (a credit accumulator, not a random draw): a fraction of 0.25 mirrors
exactly every fourth request, which keeps tests and dashboards easy to read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.server.errors import ServingError
from service.server.metrics import ServingMetrics, ShadowMetrics
from service.server.settings import ShadowRule

log = logging.getLogger(__name__)

# Share of the shadow model's queue that mirrored texts may occupy.
SHADOW_QUEUE_SHARE = 0.5
# Classifies texts with a model through the inference core (so a mirrored request is
# validated, tokenized, truncated, tracked and measured like any other); returns the labels.
ShadowRun = Callable[[str, list[str]], Awaitable[list[str]]]


@dataclass
class _Mirror:
    rule: ShadowRule
    metrics: ShadowMetrics
    credit: float = 0.0
    pending: int = 0


class ShadowMirror:
    def __init__(
        self,
        rules: Sequence[ShadowRule],
        metrics: ServingMetrics,
        max_pending: int,
        run: ShadowRun,
    ) -> None:
        self._run_shadow = run
        self._max_pending = max_pending
        self._mirrors = {
            rule.primary: _Mirror(rule, ShadowMetrics(metrics, rule.primary, rule.shadow))
            for rule in rules
        }
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(self, primary: str, texts: Sequence[str], labels: list[str]) -> None:
        """Called with a primary request's model, texts and answered labels; never raises."""
        mirror = self._mirrors.get(primary)
        if mirror is None:
            return
        mirror.credit += mirror.rule.fraction
        if mirror.credit < 1.0:
            return
        mirror.credit -= 1.0
        if mirror.pending >= self._max_pending:
            mirror.metrics.outcome("dropped")
            return
        mirror.pending += 1
        task = asyncio.create_task(self._run(mirror, list(texts), labels))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, mirror: _Mirror, texts: list[str], primary_labels: list[str]) -> None:
        started = time.monotonic()
        try:
            shadow_labels = await self._run_shadow(mirror.rule.shadow, texts)
        except ServingError as error:
            mirror.metrics.outcome("dropped" if error.reason == "queue_full" else "error")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("shadow %s -> %s failed: %s", mirror.rule.primary, mirror.rule.shadow,
                        error)
            mirror.metrics.outcome("error")
        else:
            agree = sum(a == b for a, b in zip(shadow_labels, primary_labels, strict=True))
            mirror.metrics.compared(agree, len(texts) - agree, time.monotonic() - started)
            mirror.metrics.outcome("ok")
        finally:
            mirror.pending -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
