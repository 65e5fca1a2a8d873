"""The composition root: build the daemon's parts, start them in order, stop them in reverse.

    start: models (load, verify, warm up each bundle; restore their state) -> input router -> outbox (moves a
           corrupt file aside) -> errors reporter -> Home Assistant and rollout parts -> engine (publisher, model
           and worker threads) -> periodic jobs, model watcher, watchdog -> MQTT link (online)
    stop:  stop input (unsubscribe, close the gate) -> the engine drains the queue into the outbox -> models save
           their state -> forwarder delivers what it can (bounded) -> retained `offline` -> wait for QoS 1 acks
           (bounded) -> disconnect; whatever was not acknowledged stays in the outbox for the next start.

Each part has one job and its own module: a ModelRuntime per configured model (agent/core/runtime.py), the
Router from a device to its model (agent/transport/router.py), the Engine's queue and threads
(agent/core/engine.py), one Publisher (agent/transport/publisher.py), the ModelWatcher (agent/ops/watcher.py)
and the StatusReporter (agent/ops/status.py). Optional parts, each off by default: Prometheus metrics
(agent/ops/metrics.py), Home Assistant discovery (agent/ops/hass.py), fleet model rollout over MQTT
(agent/ops/rollout.py) and the Sparkplug B input (agent/transport/sparkplug.py).
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config.models import model_plans
from agent.core.alarms import AlarmBook
from agent.core.engine import Counters, Engine, SampleQueue  # noqa: F401  (SampleQueue: tests and tools import it here)
from agent.core.events import Sample
from agent.core.runtime import ModelRuntime
from agent.ops import affinity
from agent.ops.notify import Notifier
from agent.ops.operators import OperatorDesk
from agent.ops.releases import ReleaseLedger
from agent.ops.status import StatusReporter
from agent.ops.watcher import ModelWatcher
from agent.transport import commands, payloads
from agent.transport.errors import ErrorReporter
from agent.transport.mqtt import MqttLink, Retained
from agent.transport.outbox import Forwarder, Message, Outbox
from agent.transport.publisher import Publisher
from agent.transport.router import Router

if TYPE_CHECKING:  # the pipeline (numpy, onnxruntime) is imported when the agent starts
    from agent.config.settings import Settings  # the daemon runs on a Snapshot of it (agent/config/snapshot.py)

log = logging.getLogger(__name__)

STOP_INPUT_TIMEOUT_S = 2.0
STOP_DRAIN_TIMEOUT_S = 20.0
STOP_ACK_TIMEOUT_S = 5.0
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


class Agent:
    """The daemon: `start()` returns once the parts run (connecting continues in the background)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, notifier: Notifier | None = None):
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier({})
        self.counters = Counters()
        self.errors = ErrorReporter(None, settings.errors.max_per_minute, clock=clock)
        self.releases = ReleaseLedger(settings.state.directory, clock=clock)  # highest signed release accepted (rollback guard)
        self.status = StatusReporter(self)
        self.runtimes = [ModelRuntime(plan, k, self.releases, self.errors, clock, on_change=self.status.publish)
                         for k, plan in enumerate(model_plans(settings))]
        self.status_topic = self.status.topic
        self.errors_topic = f"{settings.topics.output_prefix}/agent/{settings.agent_id}/errors"
        self.metrics = None  # agent.ops.metrics.AgentMetrics when metrics.enabled
        self.hass = None  # agent.ops.hass.HassDiscovery when homeassistant.enabled
        self.sparkplug = None  # agent.transport.sparkplug.SparkplugInput when sparkplug.enabled (network thread only)
        self.router: Router | None = None
        alarms = settings.alarms
        # Operator state (alarms.enabled): acknowledged, shelved, out of service, feedback (agent/core/alarms.py).
        self.alarms = AlarmBook(settings.state.directory, alarms.max_shelve_s, alarms.max_maintenance_s) if alarms.enabled else None
        self.outbox: Outbox | None = None
        self.forwarder: Forwarder | None = None
        self.publisher: Publisher | None = None
        self.engine: Engine | None = None
        self.link: MqttLink | None = None
        self._stop_jobs = threading.Event()
        self._stop_forwarder = threading.Event()
        self.watcher = ModelWatcher(self.runtimes, self._stop_jobs)
        self.operators = OperatorDesk(self)  # operator commands (alarms.enabled)
        self._job_threads: list[threading.Thread] = []
        self._placement: affinity.Placement | None = None  # CPUs of the model thread and of the others (inference.model_cpu)
        self._ended_at_start: list[tuple[ModelRuntime, list]] = []
        self._control: list[str] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part in order; raises model.BundleError (or OSError for unreadable files) on bad setup."""
        self._start_placement()
        self._start_metrics()
        self._start_models()
        self._start_alarms()
        self._start_input()
        self._start_outbox()
        self._start_control()
        self._start_engine()
        try:
            self._start_jobs()
            self._start_link()
        except BaseException:
            self._stop_after_failed_start()
            raise
        self._started = True

    def stop(self) -> None:
        """Stop in reverse order; everything accepted before the input stopped is processed and published."""
        if not self._started:
            return
        self._started = False
        link, engine = self.link, self.engine
        log.info("stopping: %d samples not processed yet", engine.unprocessed())
        if not link.stop_input(STOP_INPUT_TIMEOUT_S):
            log.warning("the broker did not confirm the unsubscribe in %.0fs; stopping input anyway", STOP_INPUT_TIMEOUT_S)
        engine.accepting.clear()
        if not engine.finish(STOP_DRAIN_TIMEOUT_S):
            # Out of time: the samples still queued were dropped (counted exactly); the batches already in the
            # pipeline finished, so every alert they raised reached the outbox before it closes.
            log.error("the worker did not finish the queue within %.0fs: %d accepted samples dropped unprocessed; "
                      "every batch already in the pipeline was processed and published", STOP_DRAIN_TIMEOUT_S,
                      self.counters.dropped_at_stop)
        self._stop_jobs.set()
        for runtime in self.runtimes:
            runtime.save()
        if self.alarms is not None:
            self.alarms.save()
        self.watcher.wake()  # it then sees the stop
        self.errors.flush(force=True)
        if self.forwarder is not None and link.connected.is_set():
            if not self.forwarder.wait_delivered(STOP_ACK_TIMEOUT_S):
                log.warning("outbox: %d messages not delivered before shutdown; they are sent after the next start", self.outbox.count)
        self._stop_forwarder.set()
        for thread in self._job_threads:
            thread.join(5.0)
        link.stop(Retained(self.status_topic, self.status.payload("offline")), STOP_ACK_TIMEOUT_S)
        if self.outbox is not None:
            self.outbox.close()
        if self.metrics is not None:
            self.metrics.stop()
        c = self.counters
        log.info(
            "stopped: %d samples accepted, %d processed, %d forecasts, %d alert events, %d rejected, %d worker errors, "
            "%d dropped at the stop%s",
            c.accepted, c.processed, c.forecasts, c.alerts, self.errors.total, c.worker_errors, c.dropped_at_stop, self.status.outbox_line(),
        )
        log.info("rejected by reason: %s; %d forecasts dropped at the output", json.dumps(self.errors.snapshot(), sort_keys=True),
                 link.dropped_publishes)

    # -- start, part by part ---------------------------------------------------------------------------------------

    def _start_placement(self) -> None:
        settings = self.settings
        partition = (settings.partition.count, settings.partition.index)
        threads = max(runtime.settings.model.intra_op_threads for runtime in self.runtimes)
        self._placement = affinity.placement(settings.inference.model_cpu, affinity.usable_cpus(), partition,
                                             threads)  # ValueError for an unusable CPU, before anything starts

    def _start_metrics(self) -> None:
        if self.settings.metrics.enabled:
            from agent.ops.metrics import AgentMetrics

            self.metrics = AgentMetrics(self)  # MetricsUnavailable without prometheus-client: before anything is opened
            for runtime in self.runtimes:
                runtime.observer = self.metrics.observe_inference

    def _start_models(self) -> None:
        """Each model's bundle loaded, verified and warmed up; the end of alerts open under another model kept for
        the publisher (they go out first)."""
        self._ended_at_start = [(runtime, runtime.load()) for runtime in self.runtimes]

    def _start_alarms(self) -> None:
        """The operator state of the last run (acknowledged, shelved, out of service, feedback) and the command topic."""
        if self.alarms is None:
            return
        self.alarms.load()
        self._control.append(commands.command_topic_filter(self.settings.topics.output_prefix))

    def _start_input(self) -> None:
        settings = self.settings
        if settings.sparkplug.enabled:
            try:
                from agent.transport.sparkplug import SparkplugInput
            except ImportError as exc:
                raise RuntimeError(f"sparkplug.enabled needs protobuf: pip install 'edgecast[sparkplug]' ({exc})") from None
            first = self.runtimes[0]
            self.sparkplug = SparkplugInput(settings.sparkplug, list(first.bundle.features), first.plausible_limits(first.bundle), settings.ingest)
        self.router = Router(self.runtimes, self.errors, self.sparkplug,
                             send_command=lambda topic, body: self.link.publish(topic, body, qos=0) if self.link is not None else None)

    def _start_outbox(self) -> None:
        settings = self.settings
        self.errors.set_sink(lambda body: self.publish(self.errors_topic, body, qos=0))
        if not settings.outbox.enabled:
            self.errors.set_fault_sink(lambda body: self.publish(self.errors_topic, body, qos=1))
            return
        box = settings.outbox
        self.outbox = Outbox(settings.state.directory, box.max_messages, box.max_bytes, box.max_age_s, box.synchronous, clock=self.clock)
        self.errors.set_fault_sink(self._store_fault)
        if self.outbox.moved_aside is not None:
            self.errors.fault(
                "outbox_corrupt",
                f"outbox {self.outbox.path} was unreadable ({self.outbox.corruption}); moved aside to "
                f"{self.outbox.moved_aside.name}; a fresh outbox was started (its undelivered messages are lost)",
            )
        if self.outbox.lost is not None:  # its -wal file was lost: stored messages are missing (agent/transport/outbox.py)
            self.errors.fault("outbox_corrupt", self.outbox.lost)

    def _start_control(self) -> None:
        """The optional MQTT-side parts: Home Assistant discovery, a rollout receiver per model."""
        settings = self.settings
        if settings.homeassistant.enabled:
            from agent.ops.hass import HassDiscovery

            ha = settings.homeassistant
            self.hass = HassDiscovery(
                settings.agent_id, settings.topics.output_prefix, self.status_topic, ha.discovery_prefix, ha.birth_topic,
                payloads.agent_version(), publish=lambda topic, body: self.link.set_retained(Retained(topic, body)),
                commands=settings.alarms.enabled,
            )
            self._control.append(ha.birth_topic)
        if settings.rollout.enabled:
            for runtime in self.runtimes:
                self._control += runtime.make_rollout(
                    subscribe=lambda topic: self.link.add_control_subscription(topic),
                    unsubscribe=lambda topic: self.link.remove_control_subscription(topic),
                    arrived=self.watcher.wake,
                )

    def _start_engine(self) -> None:
        settings = self.settings
        self.publisher = Publisher(settings, self.counters, self.errors, self.runtimes, lambda: self.link, self.outbox,
                                   wake_forwarder=lambda: self.forwarder.wake() if self.forwarder is not None else None, hass=self.hass)
        self.publisher.alarms = self.alarms
        self.engine = Engine(settings, self.runtimes, self.publisher, self.counters, self.errors, self.router.parse,
                             self._ack, self.clock, self._spawn)
        # An explicit model CPU is a promise that the model runs there; auto only keeps the pipeline's threads apart.
        self.engine.inline_allowed = self._placement is None or settings.inference.model_cpu == "auto"
        self.engine.on_swapped = self._model_swapped
        self.engine.start(self._ended_at_start)
        self._ended_at_start = []

    def _start_jobs(self) -> None:
        self._job_threads.append(self._spawn("edgecast-errors-flush", lambda: self.status.periodic_jobs(self._stop_jobs)))

    def _start_link(self) -> None:
        settings, engine = self.settings, self.engine
        self.link = MqttLink(
            settings,
            subscriptions=self.router.subscriptions(),
            on_message=engine.on_message,
            will=Retained(self.status_topic, self.status.payload("offline", reason="connection lost")),
            on_connect_publish=lambda: Retained(self.status_topic, self.status.payload("online")),
            clock=self.clock,
            on_ack=self._on_ack,
            on_connected=self._on_connected,
            control_subscriptions=self._control,
            on_control=self._on_control,
            on_messages=engine.on_messages,
            hold=(settings.inference.batch_wait_ms / 1000.0, engine.batch_fill),  # readings that trickle in reach the worker a few at a time
        )
        if self.hass is not None:
            self.hass.announce_agent()  # kept by the link and published on every connect
        if self.metrics is not None:
            self.metrics.start(settings.metrics.host, settings.metrics.port)
        if self.outbox is not None:
            self.forwarder = Forwarder(self.outbox, self.link, settings.outbox.inflight)
            self._job_threads.append(self._spawn("edgecast-outbox", lambda: self.forwarder.run(self._stop_forwarder)))
        self._job_threads.append(self._spawn("edgecast-model-watch", self.watcher.run))
        if self.notifier.enabled:
            self._job_threads.append(self._spawn("edgecast-watchdog", lambda: self.status.feed_watchdog(self._stop_jobs, self.health)))
        engine.accepting.set()
        self.link.start()
        self._place(self.link.network_thread())
        if self._placement is not None:
            log.info("threads: %s (inference.model_cpu = %s)", self._placement.describe(), settings.inference.model_cpu)

    def _stop_after_failed_start(self) -> None:
        self.engine.accepting.clear()
        self.engine.drain_and_exit.set()
        self._stop_jobs.set()
        self._stop_forwarder.set()
        if self.metrics is not None:
            self.metrics.stop()
        if self.outbox is not None:
            self.outbox.close()

    # -- what the daemon tells ------------------------------------------------------------------------------------

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
        out["queue_depth"] = self.engine.queue.qsize() if self.engine is not None else 0
        out["dropped_publishes"] = self.link.dropped_publishes if self.link is not None else 0
        out["faults"] = dict(self.errors.faults)
        if self.outbox is not None:
            out["outbox"] = self.outbox.stats()
        with c.lock:
            out["backpressure"] = {"waits": c.backpressure_waits, "seconds": round(c.backpressure_s, 3)}
        out["model_swaps"] = sum(runtime.swaps for runtime in self.runtimes)
        out["model_reload_failures"] = sum(runtime.failures for runtime in self.runtimes)
        loaded = [runtime for runtime in self.runtimes if runtime.bundle is not None]
        if loaded:
            out["model"] = loaded[0].bundle.describe()
            out["models"] = [{**runtime.describe(), "pipeline": runtime.pipeline.stats()} for runtime in loaded]
            out["pipeline"] = loaded[0].pipeline.stats() if len(loaded) == 1 else _sum_stats([r.pipeline.stats() for r in loaded])
        if self.sparkplug is not None:
            out["sparkplug"] = self.sparkplug.stats()
        if self.alarms is not None:
            out["alarms"] = {**self.alarms.summary(), "commands": self.alarms.commands_counted(),
                             "feedback_by_label": self.alarms.feedback_by_label(), "suppressed": self.alarms.counts["suppressed"]}
        return out

    def health(self) -> tuple[bool, str]:
        """(healthy, why): the worker and the forwarder loops are turning and paho's network thread runs."""
        limit = self.settings.health.max_stall_s
        now = time.monotonic()
        engine = self.engine
        if now - engine.worker_beat > limit:
            return False, f"worker stalled for {now - engine.worker_beat:.0f}s (or waiting for the model and publisher threads)"
        started = engine.batch_here_since
        if started and now - started > limit:
            return False, f"a batch on the MQTT network thread has run for {now - started:.0f}s"
        if self.forwarder is not None and now - self.forwarder.beat > limit:
            return False, f"outbox forwarder stalled for {now - self.forwarder.beat:.0f}s"
        if self.link is not None and not self.link.loop_alive():
            return False, "the MQTT network thread is not running"
        return True, "ok"

    def request_reload(self) -> None:
        """Load every model's folder again (SIGHUP); the watcher thread does the work."""
        self.watcher.request_reload()

    def active_alerts_by_severity(self) -> dict[str, int]:
        """Open alerts per severity, over every model (a snapshot the publisher replaces after every alert event)."""
        return dict(self.publisher.active_by_severity) if self.publisher is not None else {"warning": 0, "critical": 0}

    def runtime(self, name: str) -> ModelRuntime:
        """The model called `name` ([[models]] name; "default" for the single [model])."""
        for runtime in self.runtimes:
            if runtime.name == name:
                return runtime
        raise KeyError(f"no model {name!r}; the models are {[r.name for r in self.runtimes]}")

    def runtime_for(self, device: str) -> ModelRuntime | None:
        """The model that serves `device` (its patterns name it; the settings allow at most one), or None."""
        return next((runtime for runtime in self.runtimes if runtime.plan.serves(device)), None)

    # The first (with one model: the only) model's parts, as the daemon had them before there were several.
    bundle = property(lambda self: self.runtimes[0].bundle)
    pipeline = property(lambda self: self.runtimes[0].pipeline)
    ingest = property(lambda self: self.runtimes[0].ingest)
    model_dir = property(lambda self: self.runtimes[0].model_dir)
    learned_path = property(lambda self: self.runtimes[0].learned_path)
    open_alerts_path = property(lambda self: self.runtimes[0].open_alerts_path)

    # -- callbacks --------------------------------------------------------------------------------------------

    def _model_swapped(self, runtime: ModelRuntime) -> None:
        """Worker thread, after a swap: the new plausible ranges for Sparkplug, and the status that names the bundle."""
        if self.sparkplug is not None and runtime.index == 0:
            self.sparkplug.set_limits(runtime.plausible_limits(runtime.bundle))
        self.status.publish()

    def _on_control(self, topic: str, payload: bytes) -> None:
        """paho's thread: Home Assistant's birth message or a model rollout message."""
        if self.hass is not None and topic == self.settings.homeassistant.birth_topic:
            self.hass.on_birth(payload)
            return
        if self.alarms is not None and commands.device_of(topic, self.settings.topics.output_prefix) is not None:
            self.operators.on_command(topic, payload)
            return
        for runtime in self.runtimes:
            if runtime.rollout is not None and runtime.rollout.handles(topic):
                runtime.rollout.on_message(topic, payload)
                return

    def _on_connected(self) -> None:
        if self.forwarder is not None:
            self.forwarder.wake()  # deliver what waited while offline
        if self.sparkplug is not None and self.link is not None and self.link.connects > 1:
            # Deaths and data may have passed while we were away: every Sparkplug device's window starts over, and
            # the next message of each edge node (no birth known any more) asks it to rebirth.
            gaps = [Sample(device, self.clock(), None, self.clock()) for device in self.sparkplug.connection_lost()]
            if gaps:
                self.engine.enqueue("spBv1.0/", gaps)

    def _store_fault(self, body: bytes) -> None:
        self.outbox.put_many([Message("fault", self.errors_topic, body)])
        if self.forwarder is not None:
            self.forwarder.wake()

    def _on_ack(self, mid: int) -> None:
        if self.forwarder is not None:
            self.forwarder.on_ack(mid)

    def _ack(self, mids: list[int]) -> None:
        if mids and self.link is not None:
            self.link.ack_many(mids)

    def publish(self, topic: str, body: bytes, qos: int, retain: bool = False) -> None:
        link = self.link
        if link is not None:
            link.publish(topic, body, qos=qos, retain=retain)

    def _place(self, thread: threading.Thread | None, model: bool = False) -> None:
        """Put a thread of the daemon on its CPUs: the model thread alone on one, the others on the rest."""
        placement = self._placement
        if placement is None or thread is None:
            return
        cpus = frozenset({placement.model_cpu}) if model else placement.others
        if not affinity.pin(thread, cpus):
            log.warning("could not place thread %s on CPU %s", thread.name, sorted(cpus))

    def _spawn(self, name: str, target: Callable[[], None], model: bool = False) -> threading.Thread:
        def run() -> None:
            affinity.name_os_thread(name)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._place(thread, model)
        return thread


def _sum_stats(parts: list[dict]) -> dict:
    """The models' pipeline counters added up (numbers summed, nested counters summed key by key)."""
    total: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                inner = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        inner[k] = inner.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


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
    running = ", ".join(f"{r.name}: {r.bundle.name} {r.bundle.version}" for r in agent.runtimes)
    models = f"model {agent.bundle.name} {agent.bundle.version}" if len(agent.runtimes) == 1 else f"models {running}"
    notifier.notify("READY=1", f"STATUS=started; {models}; connecting to the broker")
    while not stop_requested.wait(1.0):  # wake regularly so the main thread can run signal handlers
        pass
    notifier.notify("STOPPING=1", "STATUS=stopping: draining the queue and the outbox")
    agent.stop()
    notifier.close()
    return 0
