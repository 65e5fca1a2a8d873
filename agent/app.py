"""The composition root: build the daemon's parts, start them in order, stop them in reverse.

    start: model bundle -> pipeline -> ingest -> errors reporter -> worker thread -> MQTT link (online)
    stop:  stop input (unsubscribe, close the gate) -> worker drains the queue and publishes what it makes
           -> retained `offline` -> wait for QoS 1 acks (bounded) -> disconnect

paho's network thread only parses and enqueues (`_on_message`); numpy and onnxruntime run on the worker
thread. Periodic jobs wait on a stop event, never sleep.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import payloads
from .config import Settings
from .errors import ErrorReporter
from .events import AlertEvent, Forecast, Rejected, Rejection, Sample
from .mqtt import MqttLink, Retained

log = logging.getLogger(__name__)

QUEUE_FULL_WAIT_S = 0.5  # longest the network thread waits for room in the ingest queue (backpressure)
WORKER_BATCH_MAX = 4096  # samples taken from the queue per Pipeline.process call
WORKER_POLL_S = 0.2
ERRORS_FLUSH_EVERY_S = 1.0
STOP_INPUT_TIMEOUT_S = 2.0
STOP_DRAIN_TIMEOUT_S = 20.0
STOP_ACK_TIMEOUT_S = 5.0


@dataclass
class Counters:
    """What the daemon did so far (read by tests and logged at shutdown); updated under `lock`."""

    accepted: int = 0  # samples put in the ingest queue
    processed: int = 0  # samples handed to the pipeline
    forecasts: int = 0
    alerts: int = 0
    worker_errors: int = 0
    ignored_after_stop: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Agent:
    """The daemon: `start()` returns once the parts run (connecting continues in the background)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self.counters = Counters()
        self.errors = ErrorReporter(None, settings.errors.max_per_minute, clock=clock)
        self.bundle = None
        self.pipeline = None
        self.ingest = None
        self.link: MqttLink | None = None
        self._queue: queue.Queue[Sample] = queue.Queue(maxsize=settings.ingest.queue_size)
        self._accepting = threading.Event()  # the gate between paho's thread and the queue
        self._drain_and_exit = threading.Event()
        self._stop_jobs = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._open_alerts: dict[str, dict[str, AlertEvent]] = {}  # device -> alert id -> latest event (worker only)
        prefix = settings.topics.output_prefix
        self.status_topic = f"{prefix}/agent/{settings.agent_id}/status"
        self.errors_topic = f"{prefix}/agent/{settings.agent_id}/errors"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part in order; raises model.BundleError (or OSError for unreadable files) on bad setup."""
        from .ingest import Ingest
        from .model import load_bundle
        from .pipeline import Pipeline

        settings = self.settings
        self.bundle = load_bundle(settings.model.path, settings.model.intra_op_threads)
        log.info(
            "model %s %s loaded from %s (sha256 %s..., lookback %d, horizon %d, period %ss)",
            self.bundle.name, self.bundle.version, settings.model.path, self.bundle.sha256[:12],
            self.bundle.lookback, self.bundle.horizon, self.bundle.period_s,
        )
        self.pipeline = Pipeline(self.bundle, settings)
        self.ingest = Ingest(settings, list(self.bundle.features))
        self.errors.set_sink(lambda body: self._publish(self.errors_topic, body, qos=0))
        self._spawn("edgecast-worker", self._work)
        self._spawn("edgecast-errors-flush", self._flush_errors_periodically)
        try:
            self.link = MqttLink(
                settings,
                subscriptions=self.ingest.subscriptions(),
                on_message=self._on_message,
                will=Retained(self.status_topic, self._status_payload("offline", reason="connection lost")),
                on_connect_publish=lambda: Retained(self.status_topic, self._status_payload("online")),
                clock=self.clock,
            )
            self._accepting.set()
            self.link.start()
        except BaseException:
            self._accepting.clear()
            self._drain_and_exit.set()
            self._stop_jobs.set()
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
        log.info("input closed: %d samples not processed yet (%d queued)", self._unprocessed(), self._queue.qsize())
        self._drain_and_exit.set()
        worker = self._threads[0]
        worker.join(STOP_DRAIN_TIMEOUT_S)
        if worker.is_alive():
            log.error("the worker did not finish the queue within %.0fs; %d samples lost", STOP_DRAIN_TIMEOUT_S, self._queue.qsize())
        self._stop_jobs.set()
        for thread in self._threads[1:]:
            thread.join(5.0)
        self.errors.flush(force=True)
        link.stop(Retained(self.status_topic, self._status_payload("offline")), STOP_ACK_TIMEOUT_S)
        c = self.counters
        log.info(
            "stopped: %d samples accepted, %d processed, %d forecasts, %d alert events, %d rejected, %d worker errors",
            c.accepted, c.processed, c.forecasts, c.alerts, self.errors.total, c.worker_errors,
        )

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
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline.stats()
        return out

    def _unprocessed(self) -> int:
        with self.counters.lock:
            return self.counters.accepted - self.counters.processed

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- network thread ----------------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, received_at: float) -> None:
        """Parse and enqueue; never blocks longer than QUEUE_FULL_WAIT_S."""
        if not self._accepting.is_set():
            self.counters.add("ignored_after_stop")
            return
        assert self.ingest is not None
        try:
            samples = self.ingest.parse(topic, payload, received_at)
        except Rejected as error:
            self.errors.rejected(error, topic)
            return
        deadline = time.monotonic() + QUEUE_FULL_WAIT_S
        for sample in samples:
            try:
                self._queue.put(sample, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                self.errors.report(
                    "queue_full", f"ingest queue full ({self._queue.maxsize} samples); sample at ts {sample.ts} dropped",
                    topic=topic, device=sample.device,
                )
                continue
            self.counters.add("accepted")

    # -- worker thread -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        """Drain the queue in batches into the pipeline and publish its events, until told to finish."""
        while True:
            try:
                first = self._queue.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                if self._drain_and_exit.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < WORKER_BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:  # a bug on one batch must not end the daemon
                self.counters.add("worker_errors")
                log.exception("worker failed on a batch of %d samples", len(batch))

    def _process(self, batch: list[Sample]) -> None:
        assert self.pipeline is not None and self.bundle is not None
        events = self.pipeline.process(batch, self.clock())
        self.counters.add("processed", len(batch))
        name, version = self.bundle.name, self.bundle.version
        prefix = self.settings.topics.output_prefix
        for event in events:
            if isinstance(event, Forecast):
                self._publish(f"{prefix}/{event.device}/forecast", payloads.forecast(event, name, version), qos=0)
                self.counters.add("forecasts")
            elif isinstance(event, AlertEvent):
                self._publish(f"{prefix}/{event.device}/alert", payloads.alert(event, name, version), qos=1)
                self.counters.add("alerts")
                log.info("alert %s %s on %s: %s, score %.2f", event.alert_id, event.state, event.device, event.severity, event.score)
                # The retained list follows every change, not just the state at the end of a batch.
                open_alerts = self._open_alerts.setdefault(event.device, {})
                if event.state == "end":
                    open_alerts.pop(event.alert_id, None)
                else:
                    open_alerts[event.alert_id] = event
                body = payloads.active_alerts(event.device, event.ts, list(open_alerts.values()))
                if not open_alerts:
                    del self._open_alerts[event.device]
                self._publish(f"{prefix}/{event.device}/alerts/active", body, qos=1, retain=True)
            elif isinstance(event, Rejection):
                self.errors.rejection(event)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _publish(self, topic: str, body: bytes, qos: int, retain: bool = False) -> None:
        link = self.link
        if link is not None:
            link.publish(topic, body, qos=qos, retain=retain)

    def _flush_errors_periodically(self) -> None:
        while not self._stop_jobs.wait(ERRORS_FLUSH_EVERY_S):
            self.errors.flush()

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        bundle = self.bundle
        assert bundle is not None
        return payloads.status(
            state, self.settings.agent_id, payloads.agent_version(), bundle.name, bundle.version, bundle.sha256,
            self.clock(), reason=reason,
        )


def configure_logging(level: str) -> None:
    """Plain lines under systemd (the journal adds time and unit), timestamped lines otherwise; to stderr."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop, 1 when the agent cannot start."""
    from .model import BundleError

    configure_logging(settings.log.level)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    agent = Agent(settings)
    try:
        agent.start()
    except BundleError as error:
        log.error("cannot load the model bundle %s: %s", settings.model.path, error)
        return 1
    except (OSError, ValueError) as error:  # unreadable password/TLS files, bad TLS material
        log.error("cannot start: %s", error)
        return 1
    log.info("edgecast agent %s running as %s", payloads.agent_version(), settings.agent_id)
    while not stop_requested.wait(1.0):  # wake regularly so the main thread can run signal handlers
        pass
    agent.stop()
    return 0
