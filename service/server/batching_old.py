"""Dynamic batching for one model version.

Shape (after TEI's queue and MLServer's adaptive batcher, without their gaps):

* ``submit`` only appends to an inbox and wakes the scheduler. One scheduler task owns the
  pending texts: it alone decides batches and drops dead work, so there are no locks.
* A batch closes when it is full (``max_texts`` texts or ``max_tokens`` padded tokens, the cost
  model: longest row x rows) or when its oldest text has waited ``max_delay``, and at once when
  the model is idle: only while a batch runs is there anything to gain by waiting. So a lone
  request pays no batching delay, and under load batches grow with the arrival rate. All
  timing uses the monotonic clock.
* Texts are grouped by length: starting from the oldest text (so nothing starves), the nearest
  lengths join while the padding each adds stays under ``cost_tokens``, the price of running
  one more batch instead. The LSTM pays for every padded step.
* Exactly one prepared batch waits while another runs: the scheduler takes a slot before it
  closes a batch, and the executor gives the slot back when it starts running one. Texts that
  arrive meanwhile make the next batch larger, which is what adapts batch size to load.
* Inference runs in a worker thread (ORT releases the GIL); results are fanned back to each
  request's future on the event loop. Cancelled requests and passed deadlines are dropped
  before compute, at both stages.
* The queue is bounded in texts; beyond it ``submit`` raises RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from service.repo.probabilities import softmax
from service.repo.tokenization import pad_batch
from service.server.errors import ServingError, unavailable
from service.server.metrics import ModelMetrics

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> logits


@dataclass(eq=False)
class Job:
    """One request's texts for one model; completed when every text has its probabilities."""

    future: asyncio.Future[None]
    probabilities: np.ndarray  # float32 [texts, labels]
    remaining: int
    deadline: float | None  # monotonic seconds
    enqueued_at: float
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    batch_size: int = 0
    batches: int = 0
    last_batch: int = -1


@dataclass(eq=False, slots=True)
class Item:
    job: Job
    index: int  # position of the text in its request
    ids: list[int]

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    seq: int
    items: list[Item]
    input_ids: np.ndarray = field(repr=False)
    attention_mask: np.ndarray = field(repr=False)
    real_tokens: int = 0

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def select_batch(
    pending: list[Item], max_texts: int, max_tokens: int, cost_tokens: int
) -> tuple[list[Item], list[Item]]:
    """Choose the next batch from ``pending`` (oldest first); returns (batch, rest in order).

    The oldest text always goes (it may exceed ``max_tokens`` alone). Others join nearest
    length first if the batch stays within budget and the padding a text adds, to itself or to
    the texts already in, is at most ``cost_tokens``: merging is then cheaper than running it
    in a batch of its own.
    """
    anchor = pending[0].length
    order = sorted(range(1, len(pending)), key=lambda i: abs(pending[i].length - anchor))
    chosen, longest = [0], anchor
    for i in order:
        if len(chosen) >= max_texts:
            break
        rows, length = len(chosen), pending[i].length
        widest = max(longest, length)
        added_padding = (widest - length) + rows * (widest - longest)
        if (rows + 1) * widest <= max_tokens and added_padding <= cost_tokens:
            chosen.append(i)
            longest = widest
    taken = set(chosen)
    return [pending[i] for i in sorted(taken)], [p for i, p in enumerate(pending) if i not in taken]


class Batcher:
    def __init__(
        self,
        name: str,
        runner: Runner,
        num_labels: int,
        *,
        max_texts: int,
        max_tokens: int,
        max_delay_s: float,
        cost_tokens: int,
        max_queue: int,
        metrics: ModelMetrics | None = None,
        pad_id: int = 0,
    ) -> None:
        self.name = name
        self.num_labels = num_labels
        self.max_queue = max_queue
        self._runner = runner
        self._max_texts, self._max_tokens = max_texts, max_tokens
        self._max_delay, self._cost_tokens = max_delay_s, cost_tokens
        self._metrics = metrics
        self._pad_id = pad_id
        self._inbox: deque[Item] = deque()
        self._arrived = asyncio.Event()
        self._slot = asyncio.Semaphore(1)  # prepared-but-not-running batches: at most one
        self._ready: asyncio.Queue[Batch] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._depth = 0  # texts submitted and not yet running (or dropped)
        self._running = False
        self._closing = False
        self._seq = 0
        self._pending: list[Item] = []  # owned by the scheduler task (kept here across restarts)
        self._current: list[Item] = []  # the batch running now
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._guard(self._schedule), name=f"batcher-{self.name}"),
            asyncio.create_task(self._guard(self._execute), name=f"executor-{self.name}"),
        ]

    def new_job(self, texts: int, deadline: float | None) -> Job:
        future = asyncio.get_running_loop().create_future()
        probabilities = np.zeros((texts, self.num_labels), dtype=np.float32)
        return Job(future, probabilities, texts, deadline, time.monotonic())

    def submit(self, job: Job, token_ids: list[list[int]], *, limit: int | None = None) -> None:
        """Queue every text of ``job``, or none: raises RESOURCE_EXHAUSTED or UNAVAILABLE."""
        if self._closing:
            raise unavailable(f"model {self.name} is being unloaded; retry")
        limit = self.max_queue if limit is None else limit
        if self._depth + len(token_ids) > limit:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {self.name}: queue full ({self._depth} texts waiting, limit {limit});"
                " retry later",
                "queue_full",
            )
        job.enqueued_at = time.monotonic()
        self._inbox.extend(Item(job, i, ids) for i, ids in enumerate(token_ids))
        self._set_depth(self._depth + len(token_ids))
        self._arrived.set()

    async def close(self, timeout: float) -> None:
        """Refuse new work, let queued work finish (up to ``timeout``), then stop."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        # Collected before cancelling: the stages forget their items as they unwind.
        leftovers = [*self._inbox, *self._pending, *self._current]
        while not self._ready.empty():
            leftovers += self._ready.get_nowait().items
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        error = unavailable(f"model {self.name} was unloaded before this request finished")
        for item in leftovers:
            if not item.job.future.done():
                item.job.future.set_exception(error)
        self._pool.shutdown(wait=False)

    # --- the two stages -----------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            if not self._pending:
                await self._wait_for_arrivals(None)
            self._take_inbox()
            if not self._pending:
                continue
            flush_at = self._pending[0].job.enqueued_at + self._max_delay
            # Waiting only pays while the model is busy: texts arriving during a run join the
            # next batch anyway. An idle model starts at once, so a lone request pays no delay.
            while self._busy() and not self._full(self._pending):
                left = flush_at - time.monotonic()
                if left <= 0 or not await self._wait_for_arrivals(left):
                    break
                self._take_inbox()
            await self._slot.acquire()
            try:
                self._take_inbox()  # what came while the previous batch was waiting
                self._pending = self._drop_dead(self._pending)
                if not self._pending:
                    self._slot.release()
                    continue
                chosen, rest = select_batch(
                    self._pending, self._max_texts, self._max_tokens, self._cost_tokens)
                batch = self._prepare(chosen)
            except BaseException:
                # Give the slot back (and keep every text pending) so a restarted scheduler,
                # or close(), is not left waiting on a slot nobody will release.
                self._slot.release()
                raise
            self._pending = rest
            self._ready.put_nowait(batch)

    async def _execute(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._ready.get()
            self._slot.release()  # the scheduler may prepare the next batch while this runs
            live = self._drop_dead(batch.items)
            if not live:
                self._update_idle()
                continue
            # Running before the depth drops, so the batcher never looks idle in between.
            self._running, self._current = True, live
            self._set_depth(self._depth - len(live))
            if len(live) != len(batch.items):
                batch = self._prepare(live)  # re-pad: a dropped text may have been the longest
            started = time.monotonic()
            for item in live:
                item.job.queue_seconds = max(item.job.queue_seconds, started - item.job.enqueued_at)
            try:
                probabilities, seconds = await loop.run_in_executor(
                    self._pool, self._compute, batch.input_ids, batch.attention_mask)
                # Inside the try: a model whose output does not fit (wrong label count or rows)
                # must fail these requests with INTERNAL, not leave them waiting forever.
                self._fan_out(batch, probabilities, seconds)
            except Exception as exc:
                log.exception("model %s: inference failed on a batch of %d", self.name, len(live))
                error = ServingError(grpc.StatusCode.INTERNAL,
                                     f"model {self.name}: inference failed: {exc}", "internal")
                for item in live:
                    if not item.job.future.done():
                        item.job.future.set_exception(error)
            finally:
                self._running, self._current = False, []
                self._update_idle()
                # A scheduler waiting out the batching delay for a busy model can start now.
                self._arrived.set()

    def _compute(self, input_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.monotonic()
        logits = self._runner(input_ids, mask)
        seconds = time.monotonic() - started
        expected = (input_ids.shape[0], self.num_labels)
        if logits.shape != expected:
            raise ValueError(f"model returned logits of shape {logits.shape}, expected {expected}")
        return softmax(logits), seconds

    def _fan_out(self, batch: Batch, probabilities: np.ndarray, seconds: float) -> None:
        size = len(batch.items)
        for row, item in enumerate(batch.items):
            job = item.job
            if job.future.done():
                continue  # cancelled during compute; its result is simply not needed
            job.probabilities[item.index] = probabilities[row]
            if job.last_batch != batch.seq:
                job.last_batch = batch.seq
                job.batches += 1
                job.inference_seconds += seconds
                job.batch_size = max(job.batch_size, size)
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(None)
        if self._metrics is not None:
            self._metrics.batch(size, batch.real_tokens, batch.padded_tokens, seconds)

    # --- helpers ------------------------------------------------------------------------

    async def _guard(self, stage: Callable[[], object]) -> None:
        """Keep a stage alive: an unexpected error is logged, and the stage restarts."""
        while True:
            try:
                await stage()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model %s: batching stage crashed; restarting it", self.name)
                await asyncio.sleep(0.01)

    async def _wait_for_arrivals(self, timeout: float | None) -> bool:
        if self._inbox:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _take_inbox(self) -> None:
        while self._inbox:
            self._pending.append(self._inbox.popleft())

    def _busy(self) -> bool:
        return self._running or not self._ready.empty()

    def _full(self, pending: list[Item]) -> bool:
        if len(pending) >= self._max_texts:
            return True
        return max(item.length for item in pending) * len(pending) >= self._max_tokens

    def _drop_dead(self, items: list[Item]) -> list[Item]:
        now = time.monotonic()
        live = []
        for item in items:
            job = item.job
            if not job.future.done() and job.deadline is not None and now >= job.deadline:
                waited_ms = (now - job.enqueued_at) * 1000
                job.future.set_exception(ServingError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline passed after {waited_ms:.1f} ms in the queue of model {self.name}",
                    "deadline_exceeded"))
            if job.future.done():
                continue  # cancelled, expired, or failed through a sibling text
            live.append(item)
        if len(live) != len(items):
            self._set_depth(self._depth - (len(items) - len(live)))
        return live

    def _prepare(self, items: list[Item]) -> Batch:
        self._seq += 1
        padded = pad_batch([item.ids for item in items], pad_id=self._pad_id)
        return Batch(self._seq, items, padded.input_ids, padded.attention_mask,
                     int(padded.lengths.sum()))

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if depth:
            self._idle.clear()
        else:
            self._update_idle()
        if self._metrics is not None:
            self._metrics.queue_depth(depth)

    def _update_idle(self) -> None:
        if self._depth == 0 and not self._running:
            self._idle.set()
