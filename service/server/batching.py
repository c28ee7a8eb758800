"""Dynamic batching for one model version: one owner of the queue, told what to do by messages.

Shape (after TEI's ``queue.rs`` and MLServer's adaptive batcher, without their gaps):

* ``submit`` is the one call a request makes: admission at once (UNAVAILABLE while closing,
  RESOURCE_EXHAUSTED beyond the queue bound or when the queued work would delay it too long:
  ``admission.py``), then its texts go to an inbox and a future comes back that resolves to a
  ``BatchOutcome`` value. Nothing a request holds is written by anyone
  else: the scheduler task alone owns the pending texts and the per-request bookkeeping.
* A batch closes when it is full (``max_texts`` texts or ``max_tokens`` padded tokens, the cost
  model: longest row x rows) or when its oldest text has waited ``max_delay``, and at once when
  the model is idle: only while a batch runs is there anything to gain by waiting. All timing
  uses the monotonic clock.
* Texts are grouped by length: starting from the oldest text (so nothing starves), the nearest
  lengths join while the padding each adds stays under ``cost_tokens``, the price of running
  one more batch instead. The LSTM pays for every padded step.
* Exactly one prepared batch waits while another runs, so the model thread never waits for the
  event loop between batches; texts that arrive meanwhile make the next batch larger, which is
  what adapts batch size to load. The prepared batch is handed over shortly before the running
  one is expected to end (the model's rate is measured, ``admission.ServiceRate``), not as soon
  as its first text has waited ``max_delay``: it could not start earlier anyway, and under load
  it then leaves full instead of with the few texts of the first milliseconds.
* Inference runs in one dedicated thread per model (ORT releases the GIL). The thread drops
  rows whose caller has gone or whose deadline has passed before it computes, re-pads what is
  left, and hands the result back with one ``call_soon_threadsafe``: a batch's futures are all
  resolved in that one loop callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from service.repo.probabilities import softmax
from service.repo.tokenization import pad_batch
from service.server.admission import Demand, QueueAdmission, ServiceRate
from service.server.errors import ServingError, unavailable
from service.server.metrics import ModelMetrics

log = logging.getLogger(__name__)

# The next batch goes to the model thread this long before the running one is expected to
# end: a share of the time its oldest text has waited anyway plus a floor, so that a late
# event loop or a rate estimate a little off never leaves the model idle between batches.
HAND_OVER_LEAD = 0.2
MIN_LEAD_S = 0.001

Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> logits


@dataclass(frozen=True)
class BatchOutcome:
    """What a request gets back: its probabilities, in its own text order, and its timings."""

    probabilities: np.ndarray  # float32 [texts, labels]
    queue_s: float  # from submit until the last batch holding one of its texts started
    inference_s: float  # model time of the batches that held its texts, summed
    batch_size: int  # texts in the largest of those batches (other callers' texts included)
    batches: int  # how many batches its texts were split across


@dataclass(eq=False, slots=True)
class _Request:
    """One submitted request's bookkeeping; touched only on the event loop."""

    future: asyncio.Future[BatchOutcome]
    probabilities: np.ndarray
    remaining: int
    deadline: float | None
    enqueued_at: float
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0
    batches: int = 0


@dataclass(eq=False, slots=True)
class Item:
    request: _Request
    index: int  # position of the text in its request
    ids: list[int]

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(eq=False)
class Batch:
    items: list[Item]
    input_ids: np.ndarray = field(repr=False)
    attention_mask: np.ndarray = field(repr=False)
    expected_end: float | None = None  # monotonic; set once it starts, if the rate is known


@dataclass(eq=False)
class _Done:
    """The model thread's report of one batch, delivered to the loop in one callback."""

    batch: Batch
    ran: list[Item]  # the items computed (the batch's, less those found dead)
    dropped: list[Item]  # found dead by the thread just before computing
    started: float
    seconds: float
    probabilities: np.ndarray | None
    real_tokens: int
    padded_tokens: int
    error: Exception | None = None
    thread_seconds: float = 0.0


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


def _alive(item: Item, now: float) -> bool:
    # Read from the model thread too: done() is one attribute read, safe under the GIL.
    request = item.request
    return not request.future.done() and (request.deadline is None or now < request.deadline)


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
        admission: QueueAdmission | None = None,
    ) -> None:
        self.name = name
        self.num_labels = num_labels
        self.max_queue = max_queue
        self._runner = runner
        self._max_texts, self._max_tokens = max_texts, max_tokens
        self._max_delay, self._cost_tokens = max_delay_s, cost_tokens
        self._metrics = metrics
        self._pad_id = pad_id
        self._admission = admission
        self.rate = ServiceRate()
        self.demand = Demand()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[Item] = deque()
        self._waiter: asyncio.Future[bool] | None = None  # the scheduler, when it waits
        self._pending: list[Item] = []  # owned by the scheduler
        self._in_thread: list[Batch] = []  # handed to the model thread, not yet reported back
        self._depth = 0  # texts submitted and not yet running (or dropped): the queue
        self._depth_tokens = 0  # their real tokens
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._work: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._model_thread, name=f"ort-{name}",
                                        daemon=True)
        self._scheduler: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Texts waiting (submitted, not running yet): what the queue bound counts."""
        return self._depth

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        self._scheduler = asyncio.create_task(self._schedule(), name=f"batcher-{self.name}")

    def submit(self, token_ids: list[list[int]], deadline: float | None, *,
               share: float = 1.0) -> asyncio.Future[BatchOutcome]:
        """Queue every text of one request, or none: raises RESOURCE_EXHAUSTED or UNAVAILABLE.

        ``share`` scales the queue's bounds for this request (mirrored traffic uses part).
        """
        self.check_room(len(token_ids), deadline, share=share)
        assert self._loop is not None, "not started"
        now = time.monotonic()
        request = _Request(self._loop.create_future(),
                           np.zeros((len(token_ids), self.num_labels), dtype=np.float32),
                           len(token_ids), deadline, now)
        items = [Item(request, i, ids) for i, ids in enumerate(token_ids)]
        self._inbox.extend(items)
        self.demand.offered(len(items), now)
        self._set_depth(self._depth + len(items), self._depth_tokens + _tokens(items))
        self._notify()
        return request.future

    def check_room(self, texts: int, deadline: float | None = None, *,
                   share: float = 1.0) -> None:
        """Raises UNAVAILABLE while closing, RESOURCE_EXHAUSTED when ``texts`` more would
        overfill the queue or the work already queued would hold them too long (``share``:
        the part of the bounds this request may use)."""
        if self._closing:
            raise unavailable(f"model {self.name} is being unloaded; retry")
        limit = self.max_queue if share >= 1.0 else int(self.max_queue * share)
        if self._depth + texts > limit:
            self.demand.offered(texts, time.monotonic())
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {self.name}: queue full ({self._depth} texts waiting, limit {limit});"
                " retry later",
                "queue_full",
            )
        if self._admission is not None:
            now = time.monotonic()
            left = None if deadline is None else deadline - now
            try:
                self._admission.check(self.name, self._depth, self._depth_tokens, self.rate,
                                      self.demand, now, left, share)
            except ServingError:
                self.demand.offered(texts, now)  # refused demand is demand all the same
                raise

    async def close(self, timeout: float) -> None:
        """Refuse new work, let queued work finish (up to ``timeout``), then stop."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        self._work.put(None)  # the model thread ends after the batch it runs, if any
        # What is left fails now (the grace is over); a batch still running in the thread
        # finds its callers gone and its result is dropped.
        error = unavailable(f"model {self.name} was unloaded before this request finished")
        leftovers = [*self._inbox, *self._pending,
                     *(item for batch in self._in_thread for item in batch.items)]
        for item in leftovers:
            self._fail(item.request, error)
        self._inbox.clear()
        self._pending.clear()

    # --- the scheduler: owns the pending texts ----------------------------------------------

    async def _schedule(self) -> None:
        while True:
            try:
                await self._schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not strand every request of the model
                log.exception("model %s: batch scheduler failed; restarting it", self.name)
                await asyncio.sleep(0.01)

    async def _schedule_once(self) -> None:
        while True:
            self._take_inbox()
            if not self._pending or len(self._in_thread) >= 2:
                # Nothing to do, or a batch runs with the next one prepared: wait to be told.
                await self._wait(None)
                continue
            if self._in_thread and not self._full():
                # The model is busy: the next batch may gather texts until its oldest text has
                # waited max_delay, or a report wakes us (the model then has room). It cannot
                # start before the running batch ends, so until shortly before that, waiting
                # costs its texts nothing and lets more join it.
                flush_at = self._pending[0].request.enqueued_at + self._max_delay
                running_end = self._in_thread[0].expected_end
                if running_end is not None:
                    flush_at = max(flush_at, running_end - HAND_OVER_LEAD * (
                        running_end - self._pending[0].request.enqueued_at) - MIN_LEAD_S)
                left = flush_at - time.monotonic()
                if left > 0 and await self._wait(left):
                    continue
            self._hand_over()

    def _hand_over(self) -> None:
        now = time.monotonic()
        live = [item for item in self._pending if _alive(item, now)]
        self._drop([item for item in self._pending if not _alive(item, now)], now, queued=True)
        self._pending = live
        if not live:
            return
        chosen, self._pending = select_batch(live, self._max_texts, self._max_tokens,
                                             self._cost_tokens)
        padded = pad_batch([item.ids for item in chosen], pad_id=self._pad_id)
        batch = Batch(chosen, padded.input_ids, padded.attention_mask)
        self._in_thread.append(batch)
        self._idle.clear()
        if len(self._in_thread) == 1:  # the thread is idle: this batch starts now
            self._set_depth(self._depth - len(chosen), self._depth_tokens - _tokens(chosen))
            self._expect_end(batch, now)
            self.demand.batch_started(now)
        self._work.put(batch)

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a message (an arrival or a report); False when ``timeout`` passed first.

        A bare future and a timer handle, not ``wait_for`` on an event: this runs once per
        arrival under load. No message is lost: the scheduler looks at its state before each
        wait, and everything here runs on the one event loop thread."""
        if self._inbox:
            return True
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = (self._loop.call_later(timeout, _resolve, waiter, False)
                 if timeout is not None else None)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _notify(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, True)

    def _take_inbox(self) -> None:
        while self._inbox:
            self._pending.append(self._inbox.popleft())

    def _full(self) -> bool:
        if len(self._pending) >= self._max_texts:
            return True
        return max(item.length for item in self._pending) * len(self._pending) >= \
            self._max_tokens

    # --- the model thread -------------------------------------------------------------------

    def _model_thread(self) -> None:
        assert self._loop is not None
        while (batch := self._work.get()) is not None:
            began = time.monotonic()
            done = self._run(batch)
            # The thread's whole time on the batch, what the queue behind it waits for.
            done.thread_seconds = time.monotonic() - began
            try:
                self._loop.call_soon_threadsafe(self._finish, done)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                return

    def _run(self, batch: Batch) -> _Done:
        started = time.monotonic()
        ran = [item for item in batch.items if _alive(item, started)]
        dropped = [item for item in batch.items if not _alive(item, started)]
        if not ran:
            return _Done(batch, ran, dropped, started, 0.0, None, 0, 0)
        input_ids, mask = batch.input_ids, batch.attention_mask
        if dropped:  # re-pad: a dropped text may have been the longest
            padded = pad_batch([item.ids for item in ran], pad_id=self._pad_id)
            input_ids, mask = padded.input_ids, padded.attention_mask
        real, padded_tokens = int(mask.sum()), int(mask.size)
        try:
            logits = self._runner(input_ids, mask)
            expected = (len(ran), self.num_labels)
            if logits.shape != expected:
                raise ValueError(f"model returned logits of shape {logits.shape}, expected "
                                 f"{expected}")
            probabilities = softmax(logits)
        except Exception as exc:  # ORT errors: fail this batch's requests, keep serving
            log.exception("model %s: inference failed on a batch of %d", self.name, len(ran))
            return _Done(batch, ran, dropped, started, time.monotonic() - started, None, real,
                         padded_tokens, exc)
        return _Done(batch, ran, dropped, started, time.monotonic() - started, probabilities,
                     real, padded_tokens)

    # --- back on the loop: one callback per batch -------------------------------------------

    def _finish(self, done: _Done) -> None:
        self._in_thread.remove(done.batch)
        now = time.monotonic()
        if self._in_thread:  # the prepared batch: the thread has started it
            started = self._in_thread[0].items
            self._set_depth(self._depth - len(started), self._depth_tokens - _tokens(started))
            self._expect_end(self._in_thread[0], now)
        if done.ran:
            self.rate.observe(done.real_tokens, done.thread_seconds)
        self.demand.batch_done(len(done.ran), done.thread_seconds, now,
                               next_started=bool(self._in_thread))
        self._drop(done.dropped, done.started, queued=False)
        if done.error is not None:
            error = ServingError(grpc.StatusCode.INTERNAL,
                                 f"model {self.name}: inference failed: {done.error}", "internal")
            for item in done.ran:
                self._fail(item.request, error)
        elif done.probabilities is not None:
            self._fan_out(done)
        self._update_idle()
        self._notify()  # the model has room: a waiting batch can be prepared now

    def _fan_out(self, done: _Done) -> None:
        size = len(done.ran)
        seen: set[int] = set()
        assert done.probabilities is not None
        for row, item in enumerate(done.ran):
            request = item.request
            if request.future.done():
                continue  # cancelled during compute; its result is simply not needed
            request.probabilities[item.index] = done.probabilities[row]
            if id(request) not in seen:
                seen.add(id(request))
                request.batches += 1
                request.inference_s += done.seconds
                request.batch_size = max(request.batch_size, size)
                request.queue_s = max(request.queue_s, done.started - request.enqueued_at)
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(BatchOutcome(
                    request.probabilities, request.queue_s, request.inference_s,
                    request.batch_size, request.batches))
        if self._metrics is not None:
            self._metrics.batch(size, done.real_tokens, done.padded_tokens, done.seconds)

    # --- helpers ----------------------------------------------------------------------------

    def _drop(self, items: list[Item], now: float, *, queued: bool) -> None:
        """Texts of callers gone or past their deadline: never computed; ``queued`` ones are
        counted out of the queue (a running batch's were already)."""
        if not items:
            return
        for item in items:
            request = item.request
            if not request.future.done():  # so: its deadline passed
                waited_ms = (now - request.enqueued_at) * 1000
                request.future.set_exception(ServingError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline passed after {waited_ms:.1f} ms in the queue of model "
                    f"{self.name}", "deadline_exceeded"))
        if queued:
            self._set_depth(self._depth - len(items), self._depth_tokens - _tokens(items))

    @staticmethod
    def _fail(request: _Request, error: ServingError) -> None:
        if not request.future.done():
            request.future.set_exception(error)

    def _expect_end(self, batch: Batch, started: float) -> None:
        seconds = self.rate.seconds_for(_tokens(batch.items))
        batch.expected_end = None if seconds is None else started + seconds

    def _set_depth(self, depth: int, tokens: int) -> None:
        self._depth, self._depth_tokens = depth, tokens
        if depth:
            self._idle.clear()
        else:
            self._update_idle()
        if self._metrics is not None:
            self._metrics.queue_depth(depth)

    def _update_idle(self) -> None:
        if self._depth == 0 and not self._in_thread:
            self._idle.set()


def _tokens(items: list[Item]) -> int:
    return sum(len(item.ids) for item in items)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
