"""The ingest queue and the threads that move each batch of readings through its model and out.

paho's network thread only parses and enqueues (`on_message`, `on_messages`), waiting a bounded time for room
when the queue is full (backpressure: paho stops reading, readings wait at the broker). The worker thread puts
each batch into the windows (phase 1), the model thread runs onnxruntime on it (phase 2), and the publisher
thread scores, encodes, sends and stores it (phase 3); the three overlap on successive batches and keep their
order. At a steady trickle a small batch runs whole on the thread that has it (`run_here`, `_runs_inline`):
a hand-off per few readings cost more than the readings. With several models a batch is split by model (a
device belongs to one, so each device's order holds) and each part runs through its model's pipeline.
A verified new bundle is swapped in by the worker between two batches, once the pipeline is empty.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.core.events import Rejected, Sample

if TYPE_CHECKING:
    from agent.core.runtime import ModelRuntime
    from agent.transport.errors import ErrorReporter
    from agent.transport.publisher import Publisher

log = logging.getLogger(__name__)

# Samples taken from the queue per Pipeline.process call, at least (1,024 at stride 1 was no faster and held ~5 MiB
# more at peak); with a stride, two model calls' worth, up to 4,096 (stride 8: 1,024; 512 ran 15-20 % slower).
WORKER_BATCH_MIN = 512
WORKER_POLL_S = 0.2


class SampleQueue(queue.Queue):
    """The ingest queue; it also moves many samples under one lock (a whole read in, a whole batch out), since at
    thousands of samples a second the per-item locking of queue.Queue was a noticeable share of the daemon's work."""

    def __init__(self, maxsize: int = 0):
        super().__init__(maxsize)
        self._filling_to = 0  # while a get_many lingers: the size at which to wake it (not at every put)
        self._first_at = 0.0  # monotonic time the oldest item came (when the queue was last empty)

    def _put(self, item) -> None:
        self._extend((item,))

    def _extend(self, items) -> None:
        if not self.queue:
            self._first_at = time.monotonic()
        self.queue.extend(items)

    def put_all_nowait(self, items: list) -> bool:
        """Put every item, or none when they do not all fit."""
        with self.not_full:
            if self.maxsize > 0 and self._qsize() + len(items) > self.maxsize:
                return False
            self._extend(items)
            self.unfinished_tasks += len(items)
            if self._qsize() >= self._filling_to:
                self.not_empty.notify()
            return True

    def wait_for_items(self, timeout: float) -> bool:
        """Wait at most `timeout` until something is queued; True when something is (nothing is taken)."""
        with self.not_empty:
            if not self._qsize():
                self.not_empty.wait(timeout)
            return self._qsize() > 0

    def get_many(self, limit: int, timeout: float, fill: int = 1, linger: float = 0.0) -> list:
        """Up to `limit` items, waiting at most `timeout` for the first; [] when none came. While there are fewer than
        `fill`, wait for more until the oldest has waited `linger` seconds (a bigger batch for the same per-call cost;
        no item waits longer than that for company, however long the taker was busy elsewhere)."""
        with self.not_empty:
            if not self._qsize():
                self.not_empty.wait(timeout)
            if 0 < self._qsize() < fill and linger > 0:
                deadline = self._first_at + linger
                self._filling_to = fill
                try:
                    while self._qsize() < fill:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self.not_empty.wait(remaining)
                finally:
                    self._filling_to = 0
            taken = [self.queue.popleft() for _ in range(min(limit, self._qsize()))]
            if taken:
                self.not_full.notify(len(taken))
            return taken


@dataclass
class Counters:
    """What the daemon did so far (read by tests and logged at shutdown); updated under `lock`."""

    accepted: int = 0  # samples put in the ingest queue
    processed: int = 0  # samples through the pipeline (their events are published next)
    forecasts: int = 0
    alerts: int = 0
    worker_errors: int = 0
    encode_errors: int = 0  # events that could not be encoded (dropped alone, the batch's others published)
    dropped_at_stop: int = 0  # accepted samples left unprocessed when a stop ran out of time (STOP_DRAIN_TIMEOUT_S)
    ignored_after_stop: int = 0
    backpressure_waits: int = 0  # messages the network thread had to wait for room for
    backpressure_s: float = 0.0  # total time it waited (not reading the socket meanwhile)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Engine:
    """Queue -> worker (phase 1) -> model thread (phase 2) -> publisher thread (phase 3), for every model."""

    def __init__(self, settings, runtimes: list[ModelRuntime], publisher: Publisher, counters: Counters,
                 errors: ErrorReporter, parse: Callable[[str, bytes, float], list[Sample]],
                 ack: Callable[[list[int]], None], clock: Callable[[], float], spawn: Callable[..., threading.Thread]):
        self.runtimes = runtimes
        self.publisher = publisher
        self.counters = counters
        self.errors = errors
        self.parse = parse  # (topic, payload, now) -> samples tagged with their model; raises Rejected
        self._ack = ack  # acknowledge packet ids to the broker (mqtt.at_least_once)
        self.clock = clock
        self._spawn = spawn
        self.on_swapped: Callable[[ModelRuntime], None] = lambda runtime: None  # after a bundle was swapped in
        self._between: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # work for the idle pipeline
        self.queue = SampleQueue(maxsize=settings.ingest.queue_size)
        self._full_wait_s = min(settings.ingest.full_wait_s, settings.mqtt.keepalive_s / 2)
        # The link holds a small read (up to batch_wait_ms) for company until one model call's samples are there.
        smallest = min(r.settings.inference.max_batch * r.settings.inference.stride for r in runtimes)
        self.worker_batch = min(4096, max(WORKER_BATCH_MIN, *(2 * r.settings.inference.max_batch * r.settings.inference.stride for r in runtimes)))
        self.batch_fill = min(self.worker_batch, smallest, settings.ingest.queue_size)
        self.inline_allowed = True  # off when inference.model_cpu names the model thread's CPU
        self._acks_deferred = settings.mqtt.at_least_once  # readings acknowledged to the broker once processed
        # Held by whoever takes samples from the queue and runs their phase 1 (the worker) or a whole batch (the
        # network thread, run_here), so that batches start in the order their samples arrived.
        self.pipeline_lock = threading.Lock()
        self.batch_here_since = 0.0  # monotonic start of a batch running on the network thread (0: none)
        self.worker_beat = time.monotonic()
        # Worker -> model thread: (runtime, pipeline, a batch after its phase 1, samples, bundle, clock, acks), or None.
        # One waiting at most: the worker updates the windows of the next batch while the model runs.
        self._inference: queue.Queue[tuple | None] = queue.Queue(maxsize=1)
        # Model thread -> publisher: (the pipeline's function that finishes a batch, samples, runtime, bundle, acks), or
        # None. Two batches at most: the model runs on the next batch while the publisher scores, encodes and sends.
        self._outgoing: queue.Queue[tuple | None] = queue.Queue(maxsize=2)
        self.accepting = threading.Event()  # the gate between paho's thread and the queue
        self.drain_and_exit = threading.Event()
        self.abandon = threading.Event()  # a stop out of time: drop what is still queued
        self.worker: threading.Thread | None = None
        self.model_thread: threading.Thread | None = None
        self.publisher_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, ended_at_start: list[tuple[ModelRuntime, list]]) -> None:
        """Start the publisher, model and worker threads; `ended_at_start`: alerts of another model, open at the
        last stop, whose end goes out first like any event."""
        self.publisher_thread = self._spawn("edgecast-publisher", self._publish_loop)
        for runtime, ended in ended_at_start:
            if ended:
                self._outgoing.put((lambda ended=ended: ended, 0, runtime, runtime.bundle, []))
        self.model_thread = self._spawn("edgecast-model", self._infer_loop, model=True)
        self.worker = self._spawn("edgecast-worker", self._work)

    def unprocessed(self) -> int:
        with self.counters.lock:
            return self.counters.accepted - self.counters.processed

    def finish(self, timeout: float) -> bool:
        """At stop, input closed: process everything queued; False when it took longer than `timeout` (what was still
        queued then is dropped and counted, the batches already in the pipeline finish)."""
        if self.pipeline_lock.acquire(timeout=timeout):  # a batch the network thread was running ends first
            self.pipeline_lock.release()
        log.info("input closed: %d samples not processed yet (%d queued)", self.unprocessed(), self.queue.qsize())
        self.drain_and_exit.set()
        self.worker.join(timeout)
        if not self.worker.is_alive():
            return True
        self.abandon.set()
        self.worker.join()
        return False

    # -- network thread ----------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, received_at: float, mid: int = 0) -> None:
        """Parse and enqueue; when the queue is full, wait (bounded by ingest.full_wait_s) for room.

        While this waits paho reads nothing more from the socket, so QoS 1 readings stay queued at the broker
        (and in TCP buffers) instead of piling up in memory here; only after the bound is a sample dropped,
        counted and reported as queue_full.
        """
        if not self.accepting.is_set():
            self.counters.add("ignored_after_stop")
            return
        try:
            samples = self.parse(topic, payload, received_at)
        except Rejected as error:
            self.errors.rejected(error, topic)
            self._ack([mid])  # refused for good: a redelivery would be refused again
            return
        if mid:
            if not samples:
                self._ack([mid])
            else:
                samples[-1].ack = mid  # acknowledged once its last sample is processed
        self.enqueue(topic, samples)

    def on_messages(self, messages: list[tuple[str, bytes]], received_at: float, mids: list[int] | None = None) -> None:
        """`on_message` for the messages of one read: parsed one by one, queued together when they all fit."""
        if not self.accepting.is_set():
            self.counters.add("ignored_after_stop", len(messages))
            return
        parse = self.parse
        parsed: list[tuple[str, list[Sample]]] = []
        everything: list[Sample] = []
        refused: list[int] = []  # packet ids to acknowledge at once (mqtt.at_least_once)
        for k, (topic, payload) in enumerate(messages):
            try:
                samples = parse(topic, payload, received_at)
            except Rejected as error:
                self.errors.rejected(error, topic)
                if mids is not None:
                    refused.append(mids[k])
                continue
            if mids is not None and mids[k]:
                if samples:
                    samples[-1].ack = mids[k]
                else:
                    refused.append(mids[k])
            parsed.append((topic, samples))
            everything += samples
        self._ack(refused)
        if everything and self.run_here(everything):
            return
        if self.queue.put_all_nowait(everything):
            self.counters.add("accepted", len(everything))
            return
        for topic, samples in parsed:  # not enough room: message by message, waiting as `on_message` does
            self.enqueue(topic, samples)

    def enqueue(self, topic: str, samples: list[Sample]) -> None:
        started = time.monotonic()
        deadline = started + self._full_wait_s
        waited = False
        for sample in samples:
            try:
                try:
                    self.queue.put_nowait(sample)
                except queue.Full:
                    waited = True
                    self.queue.put(sample, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                self.errors.report(
                    "queue_full", f"ingest queue full ({self.queue.maxsize} samples); sample at ts {sample.ts} dropped",
                    topic=topic, device=sample.device,
                )
                self._ack([sample.ack])  # reported as lost; unacknowledged it would hold a broker in-flight slot for good
                continue
            self.counters.add("accepted")
        if waited:
            with self.counters.lock:
                self.counters.backpressure_waits += 1
                self.counters.backpressure_s += time.monotonic() - started

    def run_here(self, samples: list[Sample]) -> bool:
        """On the network thread: run a read's samples through the whole pipeline now, when nothing else is queued or
        running (True), instead of queueing them for the worker (False). At a steady trickle of readings this is the
        common case, and the batch then costs no thread hand-off at all: the worker's wake-up and the GIL passing
        back and forth between the two threads were a large share of the CPU per reading."""
        if len(samples) > self.batch_fill or not self.inline_allowed or not self.pipeline_lock.acquire(blocking=False):
            return False
        try:
            if (self.queue.qsize() or self._idle_work_waiting() or not self.accepting.is_set()
                    or self._inference.unfinished_tasks or self._outgoing.unfinished_tasks):
                return False
            self.counters.add("accepted", len(samples))
            self.batch_here_since = time.monotonic()  # health(): a batch stuck here holds up paho's thread
            try:
                self._process(samples)
            except Exception:  # a bug on one batch must not end the daemon (nor paho's network thread)
                self.counters.add("worker_errors")
                log.exception("worker failed on a batch of %d samples", len(samples))
            finally:
                self.batch_here_since = 0.0
            return True
        finally:
            self.pipeline_lock.release()

    # -- worker thread -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        """Drain the queue in batches into the pipeline and hand its events to the publisher, until told to
        finish; then wait until the publisher has handed on everything."""
        try:
            self._work_until_drained()
        finally:
            self._inference.put(None)
            self.model_thread.join()
            self.publisher_thread.join()

    def _work_until_drained(self) -> None:
        while True:
            self.worker_beat = time.monotonic()
            if self.abandon.is_set():
                self._drop_queued()
                return
            if self._idle_work_waiting():
                with self.pipeline_lock:  # no batch runs on the network thread meanwhile
                    self._inference.join()  # the model thread has handed on every batch of the running model,
                    self._outgoing.join()  # and the publisher, which owns the open-alert lists, is idle
                    self._swap_pending()
                    self._run_between()
            if not self.queue.wait_for_items(WORKER_POLL_S):
                if self.drain_and_exit.is_set() and not self._idle_work_waiting():
                    return
                continue
            # Taken under the lock: a batch the network thread runs itself never overtakes one taken here.
            with self.pipeline_lock:
                batch = self.queue.get_many(self.worker_batch, 0.0)  # the link held them for company already
                if not batch:
                    continue
                try:
                    self._process(batch)
                except Exception:  # a bug on one batch must not end the daemon
                    self.counters.add("worker_errors")
                    log.exception("worker failed on a batch of %d samples", len(batch))

    def call_between_batches(self, work: Callable[[], None]) -> None:
        """Run `work` on the worker with the pipeline idle (nothing in the model or publisher threads, no batch on the
        network thread): what changes a device's state or the open alerts (operator commands) runs there, in order."""
        self._between.put(work)

    def _idle_work_waiting(self) -> bool:
        return not self._between.empty() or any(runtime.pending is not None for runtime in self.runtimes)

    def _run_between(self) -> None:
        while True:
            try:
                work = self._between.get_nowait()
            except queue.Empty:
                return
            try:
                work()
            except Exception:  # a bug in one command must not end the worker
                self.counters.add("worker_errors")
                log.exception("work between batches failed")

    def _swap_pending(self) -> None:
        """Every model with a verified bundle waiting gets it; the end of its open alerts goes out first."""
        for runtime in self.runtimes:
            if runtime.pending is None:
                continue
            ended = runtime.swap()
            if ended is None:
                continue  # refused (reported): the running bundle stays
            if ended:
                self.publisher.publish(ended, runtime)
            self.on_swapped(runtime)

    def _drop_queued(self) -> None:
        """At a stop out of time: empty the ingest queue unprocessed, counting every sample."""
        while True:
            batch = self.queue.get_many(self.worker_batch, 0.0)
            if not batch:
                return
            self.counters.add("dropped_at_stop", len(batch))

    def _process(self, batch: list[Sample]) -> None:
        runtimes = self.runtimes
        if len(runtimes) == 1:
            self._process_model(runtimes[0], batch)
            return
        parts: dict[int, list[Sample]] = {}
        for sample in batch:
            parts.setdefault(sample.model, []).append(sample)
        for index, samples in parts.items():
            self._process_model(runtimes[index], samples)

    def _process_model(self, runtime: ModelRuntime, batch: list[Sample]) -> None:
        acks = [s.ack for s in batch if s.ack] if self._acks_deferred else []  # acknowledged once published
        pipeline = runtime.pipeline
        item = (runtime, pipeline, pipeline.prepare(batch), len(batch), runtime.bundle, self.clock(), acks)
        if self._runs_inline(len(batch)):
            finished = self._infer(item)
            if finished is not None:
                self._publish_batch(finished)
            return
        self._inference.put(item)

    def _runs_inline(self, samples: int) -> bool:
        """A batch of at most one model call's samples, with nothing of an earlier batch still in flight, is run to
        the end on the worker itself: at a steady trickle of readings every hand-off to the model and publisher
        threads was a wake-up that cost more CPU than the batch's own work. A backlog still takes the three-thread
        pipeline (its batches are larger), which overlaps the model with the Python of the next and last batch."""
        # The model thread puts on _outgoing before it marks its item done: with both counts at 0 nothing is in
        # flight, and only this thread can put something in flight again.
        return (samples <= self.batch_fill and self.inline_allowed and self._inference.unfinished_tasks == 0
                and self._outgoing.unfinished_tasks == 0)

    # -- model thread ----------------------------------------------------------------------------------------

    def _infer_loop(self) -> None:
        """Run the model on each prepared batch, in order, and hand it to the publisher; onnxruntime releases
        the GIL, so this thread keeps one core on the model while the others' Python runs on the other."""
        while True:
            item = self._inference.get()
            try:
                if item is None:
                    self._outgoing.put(None)
                    return
                finished = self._infer(item)
                if finished is not None:
                    self._outgoing.put(finished)
            finally:
                self._inference.task_done()

    def _infer(self, item: tuple) -> tuple | None:
        """Phase 2 of one batch: what the publisher needs to finish it, or None when the model failed on it."""
        runtime, pipeline, prepared, samples, bundle, now, acks = item
        try:
            forecasts = pipeline.infer(prepared)
        except Exception:  # a bug on one batch must not end the daemon
            self.counters.add("worker_errors")
            log.exception("the model failed on a batch of %d samples", samples)
            self._ack(acks)  # redelivering a batch that breaks the model would only break it again
            return None
        return functools.partial(pipeline.finish, prepared, forecasts, now), samples, runtime, bundle, acks

    # -- publisher thread ------------------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        """Score (the pipeline's last phase), encode and send (or store) each batch's events in order, while the
        worker runs the model on the next batch."""
        while True:
            item = self._outgoing.get()
            try:
                if item is None:
                    return
                self._publish_batch(item)
            finally:
                self._outgoing.task_done()

    def _publish_batch(self, item: tuple) -> None:
        """Phase 3 of one batch (scores, alert state), then its events out."""
        finish, samples, runtime, bundle, acks = item
        try:
            events = finish()
            self.counters.add("processed", samples)
            self.publisher.publish(events, runtime, bundle)
        except Exception:  # a bug on one batch must not end the daemon
            self.counters.add("worker_errors")
            log.exception("publisher failed on the events of a batch of %d samples", samples)
        finally:
            self._ack(acks)  # processed and its alerts stored (or published): the broker may forget them
