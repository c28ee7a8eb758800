"""Admission by queueing delay: refuse a request when its model is overloaded and already has
its next batch waiting.

A bound on requests in flight alone does not keep a promise about latency: 128 requests in
front of a model that serves 350 texts/s wait 0.4 s (Little's law), in front of one that serves
3,000/s only 0.04 s. So each model watches its own load:

* **demand against capacity**: the texts offered to it (accepted or refused), the texts it
  served and the time it computed, over the last second or so (exponentially decayed). A
  closed loop of callers, however many, offers what it is served; a burst meets a model that
  was resting; an overload offers more than a model busy all along serves;
* **the work queued**, counted in the model's own unit, full batches (``max_texts`` texts or
  ``max_tokens`` tokens each).

While demand exceeds capacity and ``queue_batches`` full batches already wait (one: the next
batch is ready), a newcomer would only wait behind them, so it is refused at once
(RESOURCE_EXHAUSTED, reason ``overloaded``, before it is tokenized) and its caller can go to
another replica instead. An accepted request then waits for at most the batch running and its
own, whatever the model's speed. Bursts and steady concurrency queue as before: they are not
overload, and the static bounds (texts per queue, requests in flight) stay as backstops.

The measured service rate also turns the queued work into seconds: while overloaded, a request
whose deadline would pass before the queue ahead of it is worked off is refused at once rather
than expiring in the queue (at other times it queues and, if it must, expires as before), and
``max_queue_delay_s``, when set, bounds the expected wait at any load.

Not an adaptive concurrency limit (Envoy's gradient, Netflix's Vegas): those steer latency
towards the latency at low concurrency, and a batching server is meant to run slower, larger
batches as load grows; they would refuse the concurrency batching lives on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from service.server.errors import ServingError

# Each batch moves the measured rate a tenth of the way towards its own: a few dozen batches of
# history, so the estimate follows a change of text length within a second under load.
NEWEST_BATCH_WEIGHT = 0.1
# Demand and service are compared over about this long: long enough that a burst is not taken
# for an overload, short enough that shedding starts within a second of one.
LOAD_WINDOW_S = 1.0
# Demand this far over capacity is overload (a closed loop offers ~1.0x: what it is served)...
OVERLOAD_RATIO = 1.25
# ...when the model has also been computing at least this share of the window: it then cannot
# serve more, and shedding starts within ~0.7 s of an overload (1 - e^-0.7 = 0.5).
BUSY_SHARE = 0.5


class ServiceRate:
    """Real tokens a model computes per second of its thread's time, over recent batches.

    Kept as exponentially weighted sums of tokens and seconds (not an average of per-batch
    rates), so a long batch counts for its length. Written by the loop only, from each batch's
    report."""

    def __init__(self) -> None:
        self._tokens = 0.0
        self._seconds = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        keep = 1.0 - NEWEST_BATCH_WEIGHT
        self._tokens = self._tokens * keep + tokens
        self._seconds = self._seconds * keep + seconds

    @property
    def tokens_per_second(self) -> float | None:
        if self._seconds <= 0.0 or self._tokens <= 0.0:
            return None  # nothing measured yet: no estimate, so no refusal by time
        return self._tokens / self._seconds

    def seconds_for(self, tokens: int) -> float | None:
        rate = self.tokens_per_second
        return None if rate is None else tokens / rate


class Demand:
    """What is offered to a model, what it serves and how busy it is, over ``LOAD_WINDOW_S``.

    Offered and served texts and the model's busy seconds are exponentially decayed sums; the
    batch running counts as busy for as long as it has run. Written by the loop only."""

    def __init__(self) -> None:
        self._offered = 0.0
        self._served = 0.0
        self._busy = 0.0  # seconds the model computed, decayed
        self._at = 0.0
        self._running_since: float | None = None

    def _decay(self, now: float) -> None:
        if now > self._at:
            keep = math.exp((self._at - now) / LOAD_WINDOW_S)
            self._offered *= keep
            self._served *= keep
            self._busy *= keep
            self._at = now

    def offered(self, texts: int, now: float) -> None:
        self._decay(now)
        self._offered += texts

    def batch_started(self, now: float) -> None:
        self._running_since = now

    def batch_done(self, texts: int, seconds: float, now: float, *, next_started: bool
                   ) -> None:
        self._decay(now)
        self._served += texts
        self._busy += seconds
        self._running_since = now if next_started else None

    def utilization(self, now: float) -> float:
        """The share of the window the model computed (1.0: it never rested). Reads only."""
        keep = math.exp(min(0.0, self._at - now) / LOAD_WINDOW_S)
        running = 0.0 if self._running_since is None else now - self._running_since
        return min(1.0, (self._busy * keep + running) / LOAD_WINDOW_S)

    def exceeds_capacity(self, now: float) -> bool:
        """More offered than served while the model was busy most of the window: a burst at
        an idle model is not that, however large; a model that cannot keep up is. (Offered
        and served decay alike, so their ratio needs no decaying.)"""
        return (self.utilization(now) >= BUSY_SHARE
                and self._offered > OVERLOAD_RATIO * self._served)


@dataclass(frozen=True)
class QueueAdmission:
    """The limits one model's queue admits by; ``check`` raises RESOURCE_EXHAUSTED."""

    max_texts: int  # of a full batch
    max_tokens: int  # of a full batch
    queue_batches: float  # full batches that may wait while overloaded; 0: no such bound
    max_queue_delay_s: float  # expected wait beyond which a request is refused; 0: none

    def check(self, model: str, texts: int, tokens: int, rate: ServiceRate, demand: Demand,
              now: float, seconds_to_deadline: float | None, share: float = 1.0) -> None:
        """Refuse a newcomer to a queue holding ``texts`` texts of ``tokens`` real tokens.

        ``share`` scales the bound for traffic that may use only part of the queue (mirrored
        requests). An empty queue admits anything: the model would start it at once."""
        if texts == 0:
            return
        wait_s = rate.seconds_for(tokens)
        work = f"{texts} texts ({tokens} tokens) already wait"
        if wait_s is not None:
            work += f", ~{wait_s * 1000:.0f} ms of work at its measured rate"
        if wait_s is not None and self.max_queue_delay_s > 0 and \
                wait_s > self.max_queue_delay_s * share:
            raise overloaded(f"model {model}: overloaded: {work}, more than the "
                             f"{self.max_queue_delay_s * share * 1000:.0f} ms "
                             "--max-queue-delay-ms allows; retry with backoff or on another "
                             "replica")
        if not demand.exceeds_capacity(now):
            return  # steady concurrency or a burst: it queues, and a tight deadline expires
        allowed = self.queue_batches * share
        if allowed > 0 and (texts >= allowed * self.max_texts
                            or tokens >= allowed * self.max_tokens):
            raise overloaded(f"model {model}: overloaded: more is offered than it serves and "
                             f"{work} ({allowed:g} full batches: --max-queue-batches); retry "
                             "with backoff or on another replica")
        if wait_s is not None and seconds_to_deadline is not None and \
                wait_s > seconds_to_deadline:
            raise overloaded(f"model {model}: overloaded: more is offered than it serves, "
                             f"{work}, and this call's deadline is in "
                             f"{max(seconds_to_deadline, 0.0) * 1000:.0f} ms; retry on another "
                             "replica or with a longer deadline")


def overloaded(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "overloaded")
