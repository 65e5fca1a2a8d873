"""The composition root: build the daemon's parts, start them in order, stop them in reverse.

    start: model bundle (sha256, signature, warm-up) -> pipeline -> ingest -> outbox (moves a corrupt file
           aside) -> errors reporter -> worker, forwarder, model watcher, watchdog threads -> MQTT link (online)
    stop:  stop input (unsubscribe, close the gate) -> worker drains the queue into the outbox -> forwarder
           delivers what it can (bounded) -> retained `offline` -> wait for QoS 1 acks (bounded) -> disconnect;
           whatever was not acknowledged stays in the outbox for the next start.

paho's network thread only parses and enqueues (`_on_message`), waiting a bounded time for room when the
queue is full (backpressure: paho stops reading, readings wait at the broker); the worker thread puts each batch
into the windows, the model thread runs onnxruntime on it, and the publisher thread scores, encodes, sends and
writes the outbox (the three overlap on successive batches; order is kept). Alerts (and, by configuration, forecasts) are written to the
outbox in one transaction per batch and leave it only when the broker acknowledged them. A new model bundle
(SIGHUP or a change in the model folder) is loaded and verified beside the running one on the watcher thread and
swapped in by the worker between two batches (once the publisher is idle); per-device windows restart with the new
pipeline. Periodic jobs wait on a stop event, never sleep.

Optional parts, each off by default: Prometheus metrics (agent/ops/metrics.py), Home Assistant discovery
(agent/ops/hass.py) and fleet model rollout over MQTT (agent/ops/rollout.py: a published bundle is verified on the
watcher thread and swapped in exactly like a reload; it is kept in state.directory/models and preferred at
the next start).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import logging
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.ops import affinity

from agent.transport import payloads
from agent.transport.errors import ErrorReporter
from agent.core.events import AlertEvent, Forecast, Rejected, Rejection, Sample
from agent.transport.mqtt import MqttLink, Retained
from agent.ops.notify import Notifier
from agent.transport.outbox import Forwarder, Message, Outbox
from agent.ops.releases import ReleaseLedger

if TYPE_CHECKING:  # the pipeline (numpy, onnxruntime) is imported when the agent starts
    from agent.config.settings import Settings  # the daemon runs on a Snapshot of it (agent/config/snapshot.py)
    from agent.core.pipeline import Pipeline, Prepared

log = logging.getLogger(__name__)

WORKER_BATCH_MAX = 1024  # samples taken from the queue per Pipeline.process call (more: no faster, more memory)
WORKER_POLL_S = 0.2
ERRORS_FLUSH_EVERY_S = 1.0
OPEN_ALERTS_FILE = "open-alerts.json"  # in state.directory: alerts open at the last stop, resumed at the next start
LEARNED_FILE = "learned-normal.json"  # in state.directory: each device's learned normal (detect.learning_hours)
STOP_INPUT_TIMEOUT_S = 2.0
STOP_DRAIN_TIMEOUT_S = 20.0
STOP_ACK_TIMEOUT_S = 5.0
STATS_LOG_EVERY_S = 60.0
STATUS_EVERY_S = 5.0  # sd_notify STATUS= refresh when no watchdog is configured
# A reading reaches its forecast through four threads (network, worker, model, publisher); a thread that wants the GIL
# waits up to one switch interval while another runs Python. The model thread wants it back after every 64-window
# call (~3 ms of compute): at 0.2 ms it waits less than at 1 ms (docs/benchmarks.md: +5% throughput), CPython's 5 ms
# would cost far more.
GIL_SWITCH_INTERVAL_S = 0.0002
# glibc gives each thread that allocates under contention a heap of its own (up to 8 per core), and each keeps
# freed memory of its own: two for the daemon's threads hold ~4 MiB less with 10,000 devices, at the same
# throughput (docs/benchmarks.md). Its mmap threshold stays dynamic: fixed at 128-512 KiB, the scoring temporaries
# of each call were mapped and faulted in anew (-1 to -5 MiB, but ~5% fewer readings/s).
MALLOC_ARENAS = 2


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
    model_swaps: int = 0
    model_reload_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Agent:
    """The daemon: `start()` returns once the parts run (connecting continues in the background)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, notifier: Notifier | None = None):
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier({})
        self.outbox: Outbox | None = None
        self.forwarder: Forwarder | None = None
        self._pending_bundle = None  # a verified bundle waiting for the worker to swap it in
        self._reload_requested = threading.Event()  # wakes the model watcher (SIGHUP, a rollout, stop)
        self._sighup = threading.Event()
        self._rollouts: queue.Queue[tuple[dict, bytes]] = queue.Queue()  # complete transfers for the watcher
        self.model_dir = Path(settings.model.path)  # where the running bundle came from (a rollout changes it)
        self.models_dir = Path(settings.state.directory) / "models"  # rolled-out bundles
        self.releases = ReleaseLedger(settings.state.directory, clock=clock)  # highest signed release accepted (rollback guard)
        self.metrics = None  # agent.metrics.AgentMetrics when metrics.enabled
        self.hass = None  # agent.hass.HassDiscovery when homeassistant.enabled
        self.rollout = None  # agent.rollout.RolloutReceiver when rollout.enabled
        self.sparkplug = None  # agent.sparkplug.SparkplugInput when sparkplug.enabled (network thread only)
        self._active_by_severity: dict[str, int] = {"warning": 0, "critical": 0}
        self._reload_outcome: dict | None = None
        self._worker_beat = time.monotonic()
        self._full_wait_s = min(settings.ingest.full_wait_s, settings.mqtt.keepalive_s / 2)
        self.counters = Counters()
        self.errors = ErrorReporter(None, settings.errors.max_per_minute, clock=clock)
        self.bundle = None
        self.pipeline = None
        self.ingest = None
        self.link: MqttLink | None = None
        self._queue: SampleQueue = SampleQueue(maxsize=settings.ingest.queue_size)
        # The link holds a small read (up to batch_wait_ms) for company until one model call's samples are there.
        self._batch_fill = min(WORKER_BATCH_MAX, settings.inference.max_batch * settings.inference.stride, settings.ingest.queue_size)
        self._batch_wait_s = settings.inference.batch_wait_ms / 1000.0
        self._inline_allowed = True  # off when inference.model_cpu names the model thread's CPU
        # Held by whoever takes samples from the queue and runs their phase 1 (the worker) or a whole batch (the
        # network thread, _run_here), so that batches start in the order their samples arrived.
        self._pipeline_lock = threading.Lock()
        self._batch_here_since = 0.0  # monotonic start of a batch running on the network thread (0: none)
        # Worker -> model thread: (pipeline, a batch after its phase 1, samples, bundle, clock), or None to stop.
        # One waiting at most: the worker updates the windows of the next batch while the model runs.
        self._inference: queue.Queue[tuple[Pipeline, Prepared, int, object, float] | None] = queue.Queue(maxsize=1)
        # Model thread -> publisher: (the pipeline's function that finishes a batch, samples, bundle), or None.
        # Two batches at most: the model runs on the next batch while the publisher scores, encodes and sends.
        self._outgoing: queue.Queue[tuple[Callable[[], list], int, object] | None] = queue.Queue(maxsize=2)
        self._accepting = threading.Event()  # the gate between paho's thread and the queue
        self._drain_and_exit = threading.Event()
        self._abandon = threading.Event()  # a stop out of time: drop what is still queued
        self._acks_deferred = settings.mqtt.at_least_once  # readings acknowledged to the broker once processed
        self._stop_jobs = threading.Event()
        self._stop_forwarder = threading.Event()
        self._threads: list[threading.Thread] = []
        self._placement: affinity.Placement | None = None  # CPUs of the model thread and of the others (inference.model_cpu)
        self._started = False
        self._open_alerts: dict[str, dict[str, AlertEvent]] = {}  # device -> alert id -> latest event (worker only)
        prefix = settings.topics.output_prefix
        self.status_topic = f"{prefix}/agent/{settings.agent_id}/status"
        self.errors_topic = f"{prefix}/agent/{settings.agent_id}/errors"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part in order; raises model.BundleError (or OSError for unreadable files) on bad setup."""
        from agent.transport.ingest import Ingest
        from agent.core.model import load_configured_bundle
        from agent.core.pipeline import Pipeline

        settings = self.settings
        partition = (settings.partition.count, settings.partition.index)
        self._placement = affinity.placement(settings.inference.model_cpu, affinity.usable_cpus(), partition,
                                             settings.model.intra_op_threads)  # ValueError for an unusable CPU, before anything starts
        # An explicit model CPU is a promise that the model runs there; auto only keeps the pipeline's threads apart.
        self._inline_allowed = self._placement is None or settings.inference.model_cpu == "auto"
        self.bundle = self._rolled_out_bundle() or self.releases.admit(load_configured_bundle(settings.model))
        self.releases.record(self.bundle)
        self.model_dir = Path(self.bundle.path)
        log.info(
            "model %s %s loaded from %s (sha256 %s..., %s, lookback %d, horizon %d, period %ss)",
            self.bundle.name, self.bundle.version, self.model_dir, self.bundle.sha256[:12],
            "signature verified" if self.bundle.signed else "unsigned", self.bundle.lookback, self.bundle.horizon, self.bundle.period_s,
        )
        if settings.metrics.enabled:
            from agent.ops.metrics import AgentMetrics

            self.metrics = AgentMetrics(self)  # MetricsUnavailable without prometheus-client: before anything is opened
            self.bundle.observer = self.metrics.observe_inference
        self.pipeline = Pipeline(self.bundle, settings)
        self._restore_learned()
        ended_at_start = self._restore_open_alerts()
        self.ingest = Ingest(settings, list(self.bundle.features), self._plausible_limits(self.bundle))
        # A reading of a device that cannot get a row is rejected before the queue (counted once, never accepted).
        self.ingest.device_gate = lambda device, now: self.pipeline.admits(device, now)
        self.ingest.device_limit_detail = lambda: self.pipeline.device_limit_detail()
        if settings.sparkplug.enabled:
            try:
                from agent.transport.sparkplug import SparkplugInput
            except ImportError as exc:
                raise RuntimeError(f"sparkplug.enabled needs protobuf: pip install 'edgecast[sparkplug]' ({exc})") from None
            self.sparkplug = SparkplugInput(settings.sparkplug, list(self.bundle.features), self._plausible_limits(self.bundle), settings.ingest)
        self.errors.set_sink(lambda body: self._publish(self.errors_topic, body, qos=0))
        if settings.outbox.enabled:
            box = settings.outbox
            self.outbox = Outbox(settings.state.directory, box.max_messages, box.max_bytes, box.max_age_s, box.synchronous, clock=self.clock)
            self.errors.set_fault_sink(lambda body: self._store([Message("fault", self.errors_topic, body)]))
            if self.outbox.moved_aside is not None:
                self.errors.fault(
                    "outbox_corrupt",
                    f"outbox {self.outbox.path} was unreadable ({self.outbox.corruption}); moved aside to "
                    f"{self.outbox.moved_aside.name}; a fresh outbox was started (its undelivered messages are lost)",
                )
            if self.outbox.lost is not None:  # its -wal file was lost: stored messages are missing (agent/transport/outbox.py)
                self.errors.fault("outbox_corrupt", self.outbox.lost)
        else:
            self.errors.set_fault_sink(lambda body: self._publish(self.errors_topic, body, qos=1))
        control = self._make_control_parts()
        self._publisher = self._spawn("edgecast-publisher", self._publish_loop)
        if ended_at_start:  # alerts of another model, open at the last stop: their end goes out like any event
            self._outgoing.put((lambda: ended_at_start, 0, self.bundle, []))
        self._model_thread = self._spawn("edgecast-model", self._infer_loop, model=True)
        self._worker = self._spawn("edgecast-worker", self._work)
        self._spawn("edgecast-errors-flush", self._periodic_jobs)
        try:
            self.link = MqttLink(
                settings,
                subscriptions=self.ingest.subscriptions() + (self.sparkplug.subscriptions() if self.sparkplug is not None else []),
                on_message=self._on_message,
                will=Retained(self.status_topic, self._status_payload("offline", reason="connection lost")),
                on_connect_publish=lambda: Retained(self.status_topic, self._status_payload("online")),
                clock=self.clock,
                on_ack=self._on_ack,
                on_connected=self._on_connected,
                control_subscriptions=control,
                on_control=self._on_control,
                on_messages=self._on_messages,
                hold=(self._batch_wait_s, self._batch_fill),  # readings that trickle in reach the worker a few at a time
            )
            if self.hass is not None:
                self.hass.announce_agent()  # kept by the link and published on every connect
            if self.metrics is not None:
                self.metrics.start(settings.metrics.host, settings.metrics.port)
            if self.outbox is not None:
                self.forwarder = Forwarder(self.outbox, self.link, settings.outbox.inflight)
                self._spawn("edgecast-outbox", lambda: self.forwarder.run(self._stop_forwarder))
            self._spawn("edgecast-model-watch", self._watch_model)
            if self.notifier.enabled:
                self._spawn("edgecast-watchdog", self._feed_watchdog)
            self._accepting.set()
            self.link.start()
            self._place(self.link.network_thread())
            if self._placement is not None:
                log.info("threads: %s (inference.model_cpu = %s)", self._placement.describe(), settings.inference.model_cpu)
        except BaseException:
            self._accepting.clear()
            self._drain_and_exit.set()
            self._stop_jobs.set()
            self._stop_forwarder.set()
            if self.metrics is not None:
                self.metrics.stop()
            if self.outbox is not None:
                self.outbox.close()
            raise
        self._started = True

    def stop(self) -> None:
        """Stop in reverse order; everything accepted before the input stopped is processed and published."""
        if not self._started:
            return
        self._started = False
        link = self.link
        assert link is not None
        log.info("stopping: %d samples not processed yet", self._unprocessed())
        if not link.stop_input(STOP_INPUT_TIMEOUT_S):
            log.warning("the broker did not confirm the unsubscribe in %.0fs; stopping input anyway", STOP_INPUT_TIMEOUT_S)
        self._accepting.clear()
        # A batch the network thread was running ends first (bounded: one stuck there must not hold up the stop).
        if self._pipeline_lock.acquire(timeout=STOP_DRAIN_TIMEOUT_S):
            self._pipeline_lock.release()
        log.info("input closed: %d samples not processed yet (%d queued)", self._unprocessed(), self._queue.qsize())
        self._drain_and_exit.set()
        worker = self._worker
        worker.join(STOP_DRAIN_TIMEOUT_S)
        if worker.is_alive():
            # Out of time: the samples still queued are dropped (counted exactly); the batches already in the
            # pipeline finish, so every alert they raise reaches the outbox before it closes.
            self._abandon.set()
            worker.join()
            log.error("the worker did not finish the queue within %.0fs: %d accepted samples dropped unprocessed; "
                      "every batch already in the pipeline was processed and published", STOP_DRAIN_TIMEOUT_S,
                      self.counters.dropped_at_stop)
        self._stop_jobs.set()
        self._save_learned()
        self._save_open_alerts()
        self._reload_requested.set()  # wakes the model watcher, which then sees the stop
        self.errors.flush(force=True)
        if self.forwarder is not None and link.connected.is_set():
            if not self.forwarder.wait_delivered(STOP_ACK_TIMEOUT_S):
                log.warning("outbox: %d messages not delivered before shutdown; they are sent after the next start", self.outbox.count)
        self._stop_forwarder.set()
        for thread in self._threads[3:]:  # after the publisher, the model thread and the worker
            thread.join(5.0)
        link.stop(Retained(self.status_topic, self._status_payload("offline")), STOP_ACK_TIMEOUT_S)
        if self.outbox is not None:
            self.outbox.close()
        if self.metrics is not None:
            self.metrics.stop()
        c = self.counters
        log.info(
            "stopped: %d samples accepted, %d processed, %d forecasts, %d alert events, %d rejected, %d worker errors, "
            "%d dropped at the stop%s",
            c.accepted, c.processed, c.forecasts, c.alerts, self.errors.total, c.worker_errors, c.dropped_at_stop, self._outbox_line(),
        )
        log.info("rejected by reason: %s; %d forecasts dropped at the output", json.dumps(self.errors.snapshot(), sort_keys=True),
                 link.dropped_publishes)

    def wait_connected(self, timeout: float) -> bool:
        return self.link is not None and self.link.wait_connected(timeout)

    def stats(self) -> dict:
        """Counters for tests and logs: accepted, rejected by reason, forecasts, alerts, queue depth."""
        c = self.counters
        with c.lock:
            out = {
                "accepted": c.accepted,
                "processed": c.processed,
                "forecasts": c.forecasts,
                "alerts": c.alerts,
                "worker_errors": c.worker_errors,
                "ignored_after_stop": c.ignored_after_stop,
            }
        out["rejected"] = self.errors.snapshot()
        out["errors_published"] = self.errors.published
        out["queue_depth"] = self._queue.qsize()
        out["dropped_publishes"] = self.link.dropped_publishes if self.link is not None else 0
        out["faults"] = dict(self.errors.faults)
        if self.outbox is not None:
            out["outbox"] = self.outbox.stats()
        with c.lock:
            out["backpressure"] = {"waits": c.backpressure_waits, "seconds": round(c.backpressure_s, 3)}
            out["model_swaps"] = c.model_swaps
            out["model_reload_failures"] = c.model_reload_failures
        if self.bundle is not None:
            out["model"] = self.bundle.describe()
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline.stats()
        if self.sparkplug is not None:
            out["sparkplug"] = self.sparkplug.stats()
        return out

    def health(self) -> tuple[bool, str]:
        """(healthy, why): the worker and the forwarder loops are turning and paho's network thread runs."""
        limit = self.settings.health.max_stall_s
        now = time.monotonic()
        if now - self._worker_beat > limit:
            return False, f"worker stalled for {now - self._worker_beat:.0f}s (or waiting for the model and publisher threads)"
        started = self._batch_here_since
        if started and now - started > limit:
            return False, f"a batch on the MQTT network thread has run for {now - started:.0f}s"
        if self.forwarder is not None and now - self.forwarder.beat > limit:
            return False, f"outbox forwarder stalled for {now - self.forwarder.beat:.0f}s"
        if self.link is not None and not self.link.loop_alive():
            return False, "the MQTT network thread is not running"
        return True, "ok"

    def request_reload(self) -> None:
        """Load the model folder again (SIGHUP); the watcher thread does the work."""
        self._sighup.set()
        self._reload_requested.set()

    def active_alerts_by_severity(self) -> dict[str, int]:
        """Open alerts per severity (a snapshot the worker replaces after every alert event)."""
        return dict(self._active_by_severity)

    # -- optional parts: Home Assistant discovery, model rollout -------------------------------------------------

    def _make_control_parts(self) -> list[str]:
        """Build the optional MQTT-side parts; returns the control topics they subscribe to."""
        settings = self.settings
        topics: list[str] = []
        if settings.homeassistant.enabled:
            from agent.ops.hass import HassDiscovery

            ha = settings.homeassistant
            self.hass = HassDiscovery(
                settings.agent_id, settings.topics.output_prefix, self.status_topic, ha.discovery_prefix, ha.birth_topic,
                payloads.agent_version(), publish=lambda topic, body: self.link.set_retained(Retained(topic, body)),
            )
            topics.append(ha.birth_topic)
        if settings.rollout.enabled:
            from agent.ops.rollout import RolloutReceiver

            ro = settings.rollout
            self.rollout = RolloutReceiver(
                ro.topic, ro.max_bundle_bytes, ro.transfer_timeout_s,
                subscribe=lambda topic: self.link.add_control_subscription(topic),
                unsubscribe=lambda topic: self.link.remove_control_subscription(topic),
                running=lambda: (self.bundle.version, self.bundle.sha256, self.bundle.release),
                on_complete=self._rollout_arrived,
                on_failure=lambda detail: self._reload_failed("rollout", detail),
            )
            topics += self.rollout.subscriptions()
        return topics

    def _on_control(self, topic: str, payload: bytes) -> None:
        """paho's thread: Home Assistant's birth message or a model rollout message."""
        if self.hass is not None and topic == self.settings.homeassistant.birth_topic:
            self.hass.on_birth(payload)
        elif self.rollout is not None and self.rollout.handles(topic):
            self.rollout.on_message(topic, payload)

    def _rollout_arrived(self, descriptor: dict, archive: bytes) -> None:
        self._rollouts.put((descriptor, archive))  # unpacking and verifying happen on the watcher thread
        self._reload_requested.set()

    def _apply_rollout(self, descriptor: dict, archive: bytes) -> None:
        """Watcher thread: check the archive, unpack it into state.directory/models, load it as a reload would."""
        from agent.ops.rollout import RolloutError, unpack_bundle

        transfer = descriptor["transfer_id"]
        trigger = f"rollout {descriptor['name']} {descriptor['version']} (transfer {transfer})"
        actual = hashlib.sha256(archive).hexdigest()
        if actual != descriptor["archive_sha256"]:
            self._reload_failed(trigger, f"archive sha256 is {actual}, the descriptor says {descriptor['archive_sha256']}: corrupted or tampered in transit")
            return
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{descriptor['name']}-{descriptor['version']}")
        folder = self.models_dir / f"{safe}-{transfer}"
        incoming = self.models_dir / f".incoming-{transfer}"
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(incoming, ignore_errors=True)
            unpack_bundle(archive, incoming)
            if folder.exists() and folder.resolve() != self.model_dir.resolve():
                shutil.rmtree(folder)
            if not folder.exists():
                incoming.rename(folder)
        except (RolloutError, OSError) as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            self._reload_failed(trigger, str(exc))
            return
        shutil.rmtree(incoming, ignore_errors=True)
        if not self._reload(trigger, folder=folder, signature_required=True):
            if folder.resolve() != self.model_dir.resolve():
                shutil.rmtree(folder, ignore_errors=True)

    def _rolled_out_bundle(self):
        """At start, with rollout enabled: the last rolled-out bundle (state.directory/models/active), if it verifies."""
        from agent.core.model import BundleError, load_configured_bundle

        if not self.settings.rollout.enabled:
            return None
        marker = self.models_dir / "active"
        try:
            name = marker.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        folder = self.models_dir / name
        try:
            bundle = self.releases.admit(load_configured_bundle(self.settings.model.model_copy(update={"path": folder, "require_signature": True})))
        except (BundleError, OSError) as exc:
            log.warning("rollout: the last rolled-out bundle %s is unusable (%s); starting with %s", folder, exc, self.settings.model.path)
            return None
        log.info("rollout: starting with the last rolled-out bundle %s (instead of %s)", folder, self.settings.model.path)
        return bundle

    def _remember_rolled_out(self, folder: Path, previous: Path) -> None:
        """Mark `folder` as the active rolled-out bundle; keep it and the previous one, remove older ones."""
        try:
            marker = self.models_dir / "active"
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(folder.name + "\n", encoding="utf-8")
            tmp.replace(marker)
            keep = {folder.resolve(), previous.resolve()}
            for old in self.models_dir.iterdir():
                if old.is_dir() and old.resolve() not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            log.warning("rollout: cannot record the active bundle in %s: %s", self.models_dir, exc)

    def _place(self, thread: threading.Thread | None, model: bool = False) -> None:
        """Put a thread of the daemon on its CPUs: the model thread alone on one, the others on the rest."""
        placement = self._placement
        if placement is None or thread is None:
            return
        cpus = frozenset({placement.model_cpu}) if model else placement.others
        if not affinity.pin(thread, cpus):
            log.warning("could not place thread %s on CPU %s", thread.name, sorted(cpus))

    def _unprocessed(self) -> int:
        with self.counters.lock:
            return self.counters.accepted - self.counters.processed

    def _spawn(self, name: str, target: Callable[[], None], model: bool = False) -> threading.Thread:
        def run() -> None:
            affinity.name_os_thread(name)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        self._place(thread, model)
        return thread

    # -- network thread ----------------------------------------------------------------------------------------

    def _ack(self, mids: list[int]) -> None:
        if mids and self.link is not None:
            self.link.ack_many(mids)

    def _on_message(self, topic: str, payload: bytes, received_at: float, mid: int = 0) -> None:
        """Parse and enqueue; when the queue is full, wait (bounded by ingest.full_wait_s) for room.

        While this waits paho reads nothing more from the socket, so QoS 1 readings stay queued at the broker
        (and in TCP buffers) instead of piling up in memory here; only after the bound is a sample dropped,
        counted and reported as queue_full.
        """
        if not self._accepting.is_set():
            self.counters.add("ignored_after_stop")
            return
        assert self.ingest is not None
        try:
            samples = self._parse(topic, payload, received_at)
        except Rejected as error:
            self.errors.rejected(error, topic)
            self._ack([mid])  # refused for good: a redelivery would be refused again
            return
        if mid:
            if not samples:
                self._ack([mid])
            else:
                samples[-1].ack = mid  # acknowledged once its last sample is processed
        self._enqueue(topic, samples)

    def _on_messages(self, messages: list[tuple[str, bytes]], received_at: float, mids: list[int] | None = None) -> None:
        """`_on_message` for the messages of one read: parsed one by one, queued together when they all fit."""
        if not self._accepting.is_set():
            self.counters.add("ignored_after_stop", len(messages))
            return
        assert self.ingest is not None
        parse = self.ingest.parse if self.sparkplug is None else self._parse
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
        if everything and self._run_here(everything):
            return
        if self._queue.put_all_nowait(everything):
            self.counters.add("accepted", len(everything))
            return
        for topic, samples in parsed:  # not enough room: message by message, waiting as `_on_message` does
            self._enqueue(topic, samples)

    def _parse(self, topic: str, payload: bytes, received_at: float) -> list[Sample]:
        """Samples of one message: Sparkplug B topics to the Sparkplug input, the rest to the JSON ingest."""
        if self.sparkplug is None or not topic.startswith("spBv1.0/"):
            return self.ingest.parse(topic, payload, received_at)
        return self._sparkplug_samples(topic, payload, received_at)

    def _sparkplug_samples(self, topic: str, payload: bytes, received_at: float) -> list[Sample]:
        """One Sparkplug B message: its rejections reported (as JSON input's are), its rebirth requests sent, its
        gaps as window restarts (in order, before its readings), its readings for the devices this process serves."""
        result = self.sparkplug.handle(topic, payload, received_at)
        for reason, device, detail in result.rejections:
            self.errors.report(reason, detail, topic=topic, device=device)
        if result.commands and self.link is not None:
            for command_topic, body in result.commands:
                self.link.publish(command_topic, body, qos=0)
        samples = [Sample(device, received_at, None, received_at) for device in result.gaps]
        partition = self.ingest.partition
        for sample in result.samples:
            if partition.active and not partition.owns(sample.device):
                continue
            if self.ingest.device_gate is not None and not self.ingest.device_gate(sample.device, received_at):
                self.errors.report("device_limit", self.ingest.device_limit_detail(), topic=topic, device=sample.device)
                continue
            samples.append(sample)
        return samples

    def _enqueue(self, topic: str, samples: list[Sample]) -> None:
        started = time.monotonic()
        deadline = started + self._full_wait_s
        waited = False
        for sample in samples:
            try:
                try:
                    self._queue.put_nowait(sample)
                except queue.Full:
                    waited = True
                    self._queue.put(sample, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                self.errors.report(
                    "queue_full", f"ingest queue full ({self._queue.maxsize} samples); sample at ts {sample.ts} dropped",
                    topic=topic, device=sample.device,
                )
                self._ack([sample.ack])  # reported as lost; unacknowledged it would hold a broker in-flight slot for good
                continue
            self.counters.add("accepted")
        if waited:
            with self.counters.lock:
                self.counters.backpressure_waits += 1
                self.counters.backpressure_s += time.monotonic() - started

    # -- worker thread -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        """Drain the queue in batches into the pipeline and hand its events to the publisher, until told to
        finish; then wait until the publisher has handed on everything."""
        try:
            self._work_until_drained()
        finally:
            self._inference.put(None)
            self._model_thread.join()
            self._publisher.join()

    def _work_until_drained(self) -> None:
        while True:
            self._worker_beat = time.monotonic()
            if self._abandon.is_set():
                self._drop_queued()
                return
            if self._pending_bundle is not None:
                with self._pipeline_lock:  # no batch runs on the network thread meanwhile
                    self._inference.join()  # the model thread has handed on every batch of the running model,
                    self._outgoing.join()  # and the publisher, which owns the open-alert lists, is idle
                    self._swap_bundle()
            if not self._queue.wait_for_items(WORKER_POLL_S):
                if self._drain_and_exit.is_set():
                    return
                continue
            # Taken under the lock: a batch the network thread runs itself never overtakes one taken here.
            with self._pipeline_lock:
                batch = self._queue.get_many(WORKER_BATCH_MAX, 0.0)  # the link held them for company already
                if not batch:
                    continue
                try:
                    self._process(batch)
                except Exception:  # a bug on one batch must not end the daemon
                    self.counters.add("worker_errors")
                    log.exception("worker failed on a batch of %d samples", len(batch))

    def _run_here(self, samples: list[Sample]) -> bool:
        """On the network thread: run a read's samples through the whole pipeline now, when nothing else is queued or
        running (True), instead of queueing them for the worker (False). At a steady trickle of readings this is the
        common case, and the batch then costs no thread hand-off at all: the worker's wake-up and the GIL passing
        back and forth between the two threads were a large share of the CPU per reading."""
        if len(samples) > self._batch_fill or not self._inline_allowed or not self._pipeline_lock.acquire(blocking=False):
            return False
        try:
            if (self._queue.qsize() or self._pending_bundle is not None or not self._accepting.is_set()
                    or self._inference.unfinished_tasks or self._outgoing.unfinished_tasks):
                return False
            self.counters.add("accepted", len(samples))
            self._batch_here_since = time.monotonic()  # health(): a batch stuck here holds up paho's thread
            try:
                self._process(samples)
            except Exception:  # a bug on one batch must not end the daemon (nor paho's network thread)
                self.counters.add("worker_errors")
                log.exception("worker failed on a batch of %d samples", len(samples))
            finally:
                self._batch_here_since = 0.0
            return True
        finally:
            self._pipeline_lock.release()

    def _drop_queued(self) -> None:
        """At a stop out of time: empty the ingest queue unprocessed, counting every sample."""
        while True:
            batch = self._queue.get_many(WORKER_BATCH_MAX, 0.0)
            if not batch:
                return
            self.counters.add("dropped_at_stop", len(batch))

    def _process(self, batch: list[Sample]) -> None:
        assert self.pipeline is not None and self.bundle is not None
        acks = [s.ack for s in batch if s.ack] if self._acks_deferred else []  # acknowledged once published
        item = (self.pipeline, self.pipeline.prepare(batch), len(batch), self.bundle, self.clock(), acks)
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
        return (samples <= self._batch_fill and self._inline_allowed and self._inference.unfinished_tasks == 0
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
        pipeline, prepared, samples, bundle, now, acks = item
        try:
            forecasts = pipeline.infer(prepared)
        except Exception:  # a bug on one batch must not end the daemon
            self.counters.add("worker_errors")
            log.exception("the model failed on a batch of %d samples", samples)
            self._ack(acks)  # redelivering a batch that breaks the model would only break it again
            return None
        return functools.partial(pipeline.finish, prepared, forecasts, now), samples, bundle, acks

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
        finish, samples, bundle, acks = item
        try:
            events = finish()
            self.counters.add("processed", samples)
            self._publish_events(events, bundle)
        except Exception:  # a bug on one batch must not end the daemon
            self.counters.add("worker_errors")
            log.exception("publisher failed on the events of a batch of %d samples", samples)
        finally:
            self._ack(acks)  # processed and its alerts stored (or published): the broker may forget them

    def _publish_events(self, events: list, bundle=None) -> None:
        """Publish (or store) a batch's events in order; `bundle` is the model that made them (the running one)."""
        bundle = bundle or self.bundle
        assert bundle is not None
        name, version = bundle.name, bundle.version
        prefix = self.settings.topics.output_prefix
        durable_forecasts = self.outbox is not None and self.settings.outbox.forecasts
        stored: list[Message] = []  # one outbox transaction per batch
        active: list[Retained] = []
        bodies = iter(self._encode_forecasts([e for e in events if isinstance(e, Forecast)], name, version,
                                             getattr(bundle, "intervals", None)))  # encoded together
        published: list[tuple[str, bytes]] = []  # QoS 0 forecasts, written together (before an alert, or after the loop)
        forecasts_sent = 0
        for event in events:
            if isinstance(event, Forecast):
                if self.hass is not None and self.hass.device_seen(event.device, list(event.values), f"{name} {version}"):
                    if event.device not in self._open_alerts:  # the alert entity needs a state from the start
                        active.append(Retained(f"{prefix}/{event.device}/alerts/active", payloads.active_alerts(event.device, event.ts, [])))
                topic, body = f"{prefix}/{event.device}/forecast", next(bodies)
                if body is None:
                    continue  # could not be encoded: logged and counted; the other devices' events go on
                if durable_forecasts:
                    stored.append(Message("forecast", topic, body, event.device))
                else:
                    published.append((topic, body))
            elif isinstance(event, AlertEvent):
                try:
                    topic, body = f"{prefix}/{event.device}/alert", payloads.alert(event, name, version)
                except (ValueError, TypeError, OverflowError):
                    self.counters.add("encode_errors")
                    log.exception("alert %s %s on %s could not be encoded; the batch's other events go on",
                                  event.alert_id, event.state, event.device)
                    continue
                if self.outbox is not None:
                    stored.append(Message("alert", topic, body, event.device))
                else:
                    if published and self.link is not None:  # the forecasts before it leave before it
                        self.link.publish_many(published)
                        forecasts_sent += len(published)
                        published = []
                    self._publish(topic, body, qos=1)
                self.counters.add("alerts")
                log.info(
                    "alert %s %s on %s: %s, score %.2f", event.alert_id, event.state, event.device, event.severity, event.score,
                    extra={"event": "alert", "alert_id": event.alert_id, "state": event.state, "device": event.device, "severity": event.severity},
                )
                # The retained list follows every change, not just the state at the end of a batch.
                open_alerts = self._open_alerts.setdefault(event.device, {})
                if event.state == "end":
                    open_alerts.pop(event.alert_id, None)
                else:
                    open_alerts[event.alert_id] = event
                body = payloads.active_alerts(event.device, event.ts, list(open_alerts.values()))
                if not open_alerts:
                    del self._open_alerts[event.device]
                active.append(Retained(f"{prefix}/{event.device}/alerts/active", body))
                counts = {"warning": 0, "critical": 0}
                for alerts in self._open_alerts.values():
                    for open_event in alerts.values():
                        counts[open_event.severity] = counts.get(open_event.severity, 0) + 1
                self._active_by_severity = counts
            elif isinstance(event, Rejection):
                self.errors.rejection(event)
        if published and self.link is not None:
            self.link.publish_many(published)
        forecasts = forecasts_sent + len(published) + sum(1 for m in stored if m.kind == "forecast")
        if forecasts:
            self.counters.add("forecasts", forecasts)
        if stored:
            self._store(stored)
        for message in active:  # after the alerts are safe on disk; republished on every connect
            if self.link is not None:
                self.link.set_retained(message)

    def _encode_forecasts(self, forecasts: list[Forecast], name: str, version: str, intervals=None) -> list[bytes | None]:
        """The batch's forecast payloads; when the batch fails to encode, one by one, None for each that fails, so
        that one device's unencodable forecast never takes the other devices' events down with it."""
        try:
            return payloads.forecasts(forecasts, name, version, intervals)
        except (ValueError, TypeError, OverflowError):
            bodies: list[bytes | None] = []
            for fc in forecasts:
                try:
                    bodies.append(payloads.forecast(fc, name, version, intervals))
                except (ValueError, TypeError, OverflowError):
                    self.counters.add("encode_errors")
                    log.error("forecast of %s at %s could not be encoded (non-finite values?); dropped", fc.device, fc.ts)
                    bodies.append(None)
            return bodies

    def _store(self, messages: list[Message]) -> None:
        assert self.outbox is not None
        self.outbox.put_many(messages)
        if self.forwarder is not None:
            self.forwarder.wake()

    # -- model hot reload ------------------------------------------------------------------------------------

    def _bundle_fingerprint(self) -> tuple:
        from agent.core.signing import SIGNATURE_FILE

        folder = self.model_dir
        out = []
        for name in ("manifest.json", "model.onnx", SIGNATURE_FILE):
            try:
                st = (folder / name).stat()  # follows a symlinked folder: swapping the link is a change too
                out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((name, None))
        return tuple(out)

    def _watch_model(self) -> None:
        """Reload on SIGHUP, or when the model folder's files changed and then stayed the same for one poll;
        apply rolled-out bundles as they arrive."""
        poll = self.settings.model.reload_poll_s
        seen, seen_dir = self._bundle_fingerprint(), self.model_dir
        candidate = None
        while not self._stop_jobs.is_set():
            requested = self._reload_requested.wait(poll if poll > 0 else 1.0)
            if self._stop_jobs.is_set():
                return
            if requested:
                self._reload_requested.clear()
                latest = None
                while True:  # only the newest complete transfer matters
                    try:
                        latest = self._rollouts.get_nowait()
                    except queue.Empty:
                        break
                if latest is not None:
                    self._apply_rollout(*latest)
                if self._sighup.is_set():
                    self._sighup.clear()
                    self._reload("SIGHUP")
                seen, seen_dir, candidate = self._bundle_fingerprint(), self.model_dir, None
                continue
            if poll <= 0:
                continue
            if self.model_dir != seen_dir:  # a rollout swapped folders: watch the new one from now on
                seen, seen_dir, candidate = self._bundle_fingerprint(), self.model_dir, None
                continue
            current = self._bundle_fingerprint()
            if current == seen:
                candidate = None
            elif current == candidate:  # changed, then stable for a poll: the copy is complete
                seen, candidate = current, None
                self._reload("model folder changed")
            else:
                candidate = current

    def _reload(self, trigger: str, folder: Path | None = None, signature_required: bool = False) -> bool:
        """Load and verify a bundle beside the running one (the running folder unless `folder`); True when it
        will be swapped in, False when refused (reported) or unchanged."""
        from agent.core.model import BundleError, load_configured_bundle

        running = self.bundle
        assert running is not None
        folder = self.model_dir if folder is None else folder
        log.info("reloading the model bundle from %s (%s)", folder, trigger)
        config = self.settings.model.model_copy(update={"path": folder})
        if signature_required:
            config = config.model_copy(update={"require_signature": True})
        try:
            bundle = self.releases.admit(load_configured_bundle(config))  # checksum, signature, shapes, warm-up, release
            if list(bundle.features) != list(running.features):
                raise BundleError(f"the new bundle's features {bundle.features} differ from the running model's {running.features}")
        except (BundleError, OSError) as exc:
            self._reload_failed(trigger, str(exc))
            return False
        except Exception as exc:  # anything else must not end the watcher either
            log.exception("unexpected error loading the new bundle")
            self._reload_failed(trigger, f"{type(exc).__name__}: {exc}")
            return False
        if bundle.sha256 == running.sha256 and bundle.manifest == running.manifest:
            log.info("model bundle unchanged (sha256 %s...); keeping the running one", bundle.sha256[:12])
            return False
        if self.metrics is not None:
            bundle.observer = self.metrics.observe_inference
        self._pending_bundle = bundle  # the worker swaps it in between two batches
        return True

    def _reload_failed(self, trigger: str, detail: str) -> None:
        running = self.bundle
        self.counters.add("model_reload_failures")
        self._reload_outcome = {"state": "failed", "trigger": trigger, "detail": detail[:300], "ts": round(self.clock())}
        self.errors.fault("model_reload_failed", f"{detail}; still running {running.name} {running.version} ({running.sha256[:12]}...)")
        self._publish_status()

    def _swap_bundle(self) -> None:
        """On the worker thread: a new pipeline for the verified bundle; open alerts of the old one end now."""
        from agent.core.pipeline import Pipeline

        bundle, self._pending_bundle = self._pending_bundle, None
        old = self.bundle
        try:
            pipeline = Pipeline(bundle, self.settings)
        except Exception as exc:
            self._reload_failed("swap", f"cannot build a pipeline for the new bundle: {exc}")
            return
        now = self.clock()
        ended = [
            dataclasses.replace(event, state="end", ts=now, ended_at=now)
            for alerts in self._open_alerts.values() for event in alerts.values()
        ]
        if ended:
            log.info("model swap: ending %d open alerts of the old model", len(ended))
            self._publish_events(ended)
        if pipeline.learning.enabled:
            pipeline.load_learned(self.pipeline.learned())  # a device's normal belongs to the machine, not the model
        self.pipeline, self.bundle = pipeline, bundle
        self.releases.record(bundle)
        self.ingest.set_limits(self._plausible_limits(bundle))
        if self.sparkplug is not None:
            self.sparkplug.set_limits(self._plausible_limits(bundle))
        previous_dir, self.model_dir = self.model_dir, Path(bundle.path)
        if self.rollout is not None:
            self.rollout.model_changed()
            if self.model_dir.parent.resolve() == self.models_dir.resolve():
                self._remember_rolled_out(self.model_dir, previous_dir)
        self.counters.add("model_swaps")
        self._reload_outcome = {"state": "ok", "version": bundle.version, "sha256": bundle.sha256, "ts": round(now)}
        if bundle.release is not None:
            self._reload_outcome["release"] = bundle.release
        log.info(
            "model swapped: %s %s (%s...) -> %s %s (%s...); per-device windows restart (forecasts resume after %d samples)",
            old.name, old.version, old.sha256[:12], bundle.name, bundle.version, bundle.sha256[:12], bundle.lookback,
        )
        self._publish_status()

    # -- helpers -----------------------------------------------------------------------------------------------

    @property
    def open_alerts_path(self) -> Path:
        return Path(self.settings.state.directory) / OPEN_ALERTS_FILE

    def _restore_open_alerts(self) -> list[AlertEvent]:
        """At start: the alerts open at the last stop resume (same model: the detector decides their end as if
        there had been no restart) or end now (another model); returns those end events."""
        path = self.open_alerts_path
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("open alerts of the last run in %s unreadable (%s); they are not resumed", path, exc)
            return []
        resumed, ended = self.pipeline.restore_open_alerts(data, self.clock())
        for event in resumed:
            self._open_alerts.setdefault(event.device, {})[event.alert_id] = event
        if resumed or ended:
            log.info("open alerts of the last run: %d resumed, %d ended (the model changed)", len(resumed), len(ended))
        return ended

    def _save_open_alerts(self) -> None:
        """At stop, after the last batch: the open alerts and their detector state (atomically)."""
        if self.pipeline is None:
            return
        path = self.open_alerts_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.pipeline.open_alerts_state()), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the open alerts to %s: %s; they will not resume after a restart", path, exc)

    def _plausible_limits(self, bundle) -> dict[str, tuple[float, float]]:
        from agent.transport.ingest import plausible_limits

        return plausible_limits(list(bundle.features), bundle.offset, bundle.scale, self.settings.ingest)

    @property
    def learned_path(self) -> Path:
        return Path(self.settings.state.directory) / LEARNED_FILE

    def _restore_learned(self) -> None:
        """At start, with a learning period: what the devices learned before the last stop."""
        if not self.pipeline.learning.enabled or not self.learned_path.is_file():
            return
        try:
            data = json.loads(self.learned_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("learned device normals in %s unreadable (%s): every device learns again", self.learned_path, exc)
            return
        log.info("learned device normals: %d device(s) restored from %s", self.pipeline.load_learned(data), self.learned_path)

    def _save_learned(self) -> None:
        """Write the devices' learned normals (atomically: a crash mid-write keeps the previous file)."""
        pipeline = self.pipeline
        if pipeline is None or not pipeline.learning.enabled:
            return
        path = self.learned_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")  # the periodic job and stop() may both write
            tmp.write_text(json.dumps(pipeline.learned()), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the learned device normals to %s: %s", path, exc)

    def _publish(self, topic: str, body: bytes, qos: int, retain: bool = False) -> None:
        link = self.link
        if link is not None:
            link.publish(topic, body, qos=qos, retain=retain)

    def _on_ack(self, mid: int) -> None:
        if self.forwarder is not None:
            self.forwarder.on_ack(mid)

    def _on_connected(self) -> None:
        if self.forwarder is not None:
            self.forwarder.wake()  # deliver what waited while offline
        if self.sparkplug is not None and self.link is not None and self.link.connects > 1:
            # Deaths and data may have passed while we were away: every Sparkplug device's window starts over, and
            # the next message of each edge node (no birth known any more) asks it to rebirth.
            gaps = [Sample(device, self.clock(), None, self.clock()) for device in self.sparkplug.connection_lost()]
            if gaps:
                self._enqueue("spBv1.0/", gaps)

    def _publish_status(self) -> None:
        link = self.link
        if link is not None and link.connected.is_set():
            link.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)

    def _outbox_line(self) -> str:
        if self.outbox is None:
            return ""
        o = self.outbox.stats()
        return f"; outbox: {o['queued']} queued, {o['sent']} sent, {o['dropped']} dropped"

    def _periodic_jobs(self) -> None:
        """Flush suppressed error reports; log the counters once a minute when they changed."""
        next_log = time.monotonic() + STATS_LOG_EVERY_S
        last_line = ""
        while not self._stop_jobs.wait(ERRORS_FLUSH_EVERY_S):
            self.errors.flush()
            if self.pipeline is not None and self.pipeline.learning.changed:
                self._save_learned()
            if self.rollout is not None:
                self.rollout.check_timeout()
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + STATS_LOG_EVERY_S
                c = self.counters
                line = (
                    f"{c.accepted} samples accepted, {c.processed} processed, {self.errors.total} rejected, "
                    f"{c.backpressure_waits} backpressure waits{self._outbox_line()}"
                )
                if line != last_line:
                    log.info("stats: %s", line)
                    last_line = line

    def _feed_watchdog(self) -> None:
        """WATCHDOG=1 only after a real liveness check; STATUS= says what the agent is doing."""
        interval = self.notifier.watchdog_s or STATUS_EVERY_S
        reported_unhealthy = False
        while not self._stop_jobs.wait(interval):
            healthy, why = self.health()
            if healthy:
                reported_unhealthy = False
                connected = self.link is not None and self.link.connected.is_set()
                fields = [f"STATUS={self._status_line(connected)}"]
                if self.notifier.watchdog_s:
                    fields.insert(0, "WATCHDOG=1")
                self.notifier.notify(*fields)
            else:
                if not reported_unhealthy:
                    log.error("unhealthy: %s; not feeding the systemd watchdog", why)
                    reported_unhealthy = True
                self.notifier.notify(f"STATUS=unhealthy: {why}")

    def _status_line(self, connected: bool) -> str:
        c = self.counters
        state = "connected" if connected else "broker unreachable, reconnecting"
        queued = self.outbox.count if self.outbox is not None else 0
        return f"{state}; {c.processed} samples processed, queue {self._queue.qsize()}, outbox {queued}"

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        bundle = self.bundle
        assert bundle is not None
        extra: dict = {}
        if state == "online":
            if self.outbox is not None:
                o = self.outbox.stats()
                extra["outbox"] = {"queued": o["queued"], "sent": o["sent"], "dropped": o["dropped"]}
            if self._reload_outcome is not None:
                extra["model_reload"] = self._reload_outcome
        return payloads.status(
            state, self.settings.agent_id, payloads.agent_version(), bundle.name, bundle.version, bundle.sha256,
            self.clock(), reason=reason, extra=extra,
        )


def configure_logging(level: str, fmt: str = "text") -> None:
    """Text (default) or JSON lines on stderr; no timestamps under systemd (agent/ops/logs.py)."""
    from agent.ops.logs import configure_logging as configure

    configure(level, fmt)


def tune_malloc() -> bool:
    """Limit glibc's malloc to MALLOC_ARENAS heaps (before the threads start); False where malloc is not glibc's."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl, macOS: nothing to tune
        return False
    m_arena_max = -8  # <malloc.h>
    return bool(mallopt(m_arena_max, MALLOC_ARENAS))


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop, 1 when the agent cannot start."""
    from agent.core.model import BundleError

    configure_logging(settings.log.level, settings.log.format)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    tune_malloc()
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    notifier = Notifier()
    agent = Agent(settings, notifier=notifier)

    def request_reload(signum: int, frame: object) -> None:
        log.info("received SIGHUP; reloading the model bundle")
        agent.request_reload()

    signal.signal(signal.SIGHUP, request_reload)
    try:
        agent.start()
    except BundleError as error:
        log.error("cannot load the model bundle %s: %s", settings.model.path, error)
        notifier.notify(f"STATUS=cannot load the model bundle: {error}")
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # unreadable password/TLS files, bad TLS material,
        # plaintext password, metrics port taken or prometheus-client missing (MetricsUnavailable)
        log.error("cannot start: %s", error)
        notifier.notify(f"STATUS=cannot start: {error}")
        return 1
    # Everything made so far (modules, pydantic's schemas, the model, the settings) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it with every thread stopped (15-40 ms each,
    # a whole slot's forecasts in the latency tail: docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    log.info("edgecast agent %s running as %s", payloads.agent_version(), settings.agent_id)
    notifier.notify("READY=1", f"STATUS=started; model {agent.bundle.name} {agent.bundle.version}; connecting to the broker")
    while not stop_requested.wait(1.0):  # wake regularly so the main thread can run signal handlers
        pass
    notifier.notify("STOPPING=1", "STATUS=stopping: draining the queue and the outbox")
    agent.stop()
    notifier.close()
    return 0
