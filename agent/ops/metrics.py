"""Prometheus metrics (optional): `[metrics] enabled = true` serves GET /metrics on metrics.host:metrics.port.

prometheus-client is imported only here and only when metrics are enabled (the `metrics` extra), so the edge
install stays four packages. Counters the daemon keeps anyway (accepted, rejected by reason, outbox, MQTT
connects) are read at scrape time by a custom collector: nothing on the hot path changes for them. Only the
inference latency and batch size are observed as they happen (a histogram each, fed by the model bundle's
observer hook). `METRICS` names every metric; the Grafana dashboard's test checks its queries against it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

# name -> (type, help). Counters are exposed with the `_total` suffix, histograms with _bucket/_sum/_count.
METRICS: dict[str, tuple[str, str]] = {
    "edgecast_agent_info": ("info", "The agent: agent_id and edgecast version (value 1)."),
    "edgecast_start_time_seconds": ("gauge", "Unix time the agent started."),
    "edgecast_model_info": ("info", "Each running model bundle: model (the configured name), name, version, sha256 (value 1)."),
    "edgecast_model_devices": ("gauge", "Devices with a window, per model."),
    "edgecast_operator_commands": ("counter", "Operator commands (docs/operators.md), by command and result (ok, refused)."),
    "edgecast_alarms": ("gauge", "Operator state: acknowledged alerts, shelves, devices in maintenance (state label)."),
    "edgecast_feedback": ("gauge", "Alerts with operator feedback, by label (true_fault, false_alarm, unknown)."),
    "edgecast_readings_accepted": ("counter", "Readings (samples) accepted into the ingest queue."),
    "edgecast_readings_rejected": ("counter", "Readings rejected, by reason (docs/contracts.md, rejection reasons)."),
    "edgecast_samples_processed": ("counter", "Samples the worker handed to the pipeline."),
    "edgecast_forecasts": ("counter", "Forecasts published (or stored in the outbox)."),
    "edgecast_alert_events": ("counter", "Alert events (new, update, end) published."),
    "edgecast_active_alerts": ("gauge", "Open alerts, by severity."),
    "edgecast_devices": ("gauge", "Devices with a window in the pipeline."),
    "edgecast_ingest_queue_depth": ("gauge", "Samples waiting between the MQTT thread and the worker."),
    "edgecast_ingest_queue_capacity": ("gauge", "Bound of the ingest queue (ingest.queue_size)."),
    "edgecast_backpressure_waits": ("counter", "Messages the MQTT thread had to wait for room in the ingest queue for."),
    "edgecast_backpressure_seconds": ("counter", "Time the MQTT thread spent waiting for room in the ingest queue."),
    "edgecast_inference_seconds": ("histogram", "Wall time of one onnxruntime call (scaling included)."),
    "edgecast_inference_batch_size": ("histogram", "Windows per onnxruntime call."),
    "edgecast_outbox_queued_messages": ("gauge", "Messages waiting in the outbox for the broker's acknowledgement."),
    "edgecast_outbox_queued_bytes": ("gauge", "Payload bytes waiting in the outbox."),
    "edgecast_outbox_sent": ("counter", "Outbox messages acknowledged by the broker."),
    "edgecast_outbox_dropped": ("counter", "Outbox messages dropped undelivered, by cause (overflow_forecast, overflow_alert, expired)."),
    "edgecast_mqtt_connected": ("gauge", "1 while connected to the broker."),
    "edgecast_mqtt_connects": ("counter", "Successful broker connects (the first one included)."),
    "edgecast_mqtt_reconnects": ("counter", "Successful connects after a lost connection."),
    "edgecast_mqtt_disconnects": ("counter", "Lost or closed broker connections."),
    "edgecast_mqtt_connect_failures": ("counter", "Connect attempts that failed (network, TLS, or refused by the broker)."),
    "edgecast_mqtt_dropped_publishes": ("counter", "Publishes the MQTT client refused (QoS 0 while offline or beyond mqtt.max_pending_forecast_mib, or its queue full)."),
    "edgecast_model_swaps": ("counter", "Model bundles swapped in while running (reload or rollout)."),
    "edgecast_model_reload_failures": ("counter", "Reloads or rollouts refused (the old model kept running)."),
    "edgecast_faults": ("counter", "Faults of the agent itself, by reason (outbox_corrupt, model_reload_failed)."),
    "edgecast_worker_errors": ("counter", "Batches on which the worker raised (a bug; see the log)."),
}

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class MetricsUnavailable(RuntimeError):
    """metrics.enabled is set but prometheus-client is not installed."""


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "metrics.enabled = true needs prometheus-client, which is not installed: pip install 'edgecast[metrics]' "
            "(or set metrics.enabled = false)"
        ) from None
    return prometheus_client


def exposed_names() -> set[str]:
    """Every series name a scrape can contain (with the suffixes Prometheus adds)."""
    out = set()
    for name, (kind, _) in METRICS.items():
        if kind == "counter":
            out.add(f"{name}_total")
        elif kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            out.add(name)
    return out


class _AgentCollector:
    """Reads the agent's own counters at scrape time."""

    def __init__(self, agent: "Agent", started_at: float):
        self.agent = agent
        self.started_at = started_at

    def describe(self):
        return []  # collected lazily: the agent's parts do not exist yet when this is registered

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent = self.agent

        def family(name: str, labels: list[str] | None = None):
            kind, text = METRICS[name]
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            return cls(name, text, labels=labels or [])

        def single(name: str, value: float):
            metric = family(name)
            metric.add_metric([], float(value))
            return metric

        stats = agent.stats()
        info = family("edgecast_agent_info", ["agent_id", "version"])
        from agent.transport.payloads import agent_version

        info.add_metric([agent.settings.agent_id, agent_version()], 1.0)
        yield info
        yield single("edgecast_start_time_seconds", self.started_at)
        if "models" in stats:
            model = family("edgecast_model_info", ["model", "name", "version", "sha256"])
            devices = family("edgecast_model_devices", ["model"])
            for entry in stats["models"]:
                model.add_metric([entry["model"], entry["name"], entry["version"], entry["sha256"]], 1.0)
                devices.add_metric([entry["model"]], float(entry["pipeline"].get("devices", 0)))
            yield model
            yield devices
        yield single("edgecast_readings_accepted", stats["accepted"])
        rejected = family("edgecast_readings_rejected", ["reason"])
        for reason, count in sorted(stats["rejected"].items()):
            rejected.add_metric([reason], float(count))
        yield rejected
        yield single("edgecast_samples_processed", stats["processed"])
        yield single("edgecast_forecasts", stats["forecasts"])
        yield single("edgecast_alert_events", stats["alerts"])
        active = family("edgecast_active_alerts", ["severity"])
        for severity, count in sorted(agent.active_alerts_by_severity().items()):
            active.add_metric([severity], float(count))
        yield active
        yield single("edgecast_devices", stats.get("pipeline", {}).get("devices", 0))
        yield single("edgecast_ingest_queue_depth", stats["queue_depth"])
        yield single("edgecast_ingest_queue_capacity", agent.settings.ingest.queue_size)
        yield single("edgecast_backpressure_waits", stats["backpressure"]["waits"])
        yield single("edgecast_backpressure_seconds", stats["backpressure"]["seconds"])
        outbox = stats.get("outbox")
        if outbox is not None:
            yield single("edgecast_outbox_queued_messages", outbox["queued"])
            yield single("edgecast_outbox_queued_bytes", outbox["queued_bytes"])
            yield single("edgecast_outbox_sent", outbox["sent"])
            dropped = family("edgecast_outbox_dropped", ["cause"])
            for cause, count in sorted(outbox["dropped_by_cause"].items()):
                dropped.add_metric([cause], float(count))
            yield dropped
        link = agent.link
        if link is not None:
            yield single("edgecast_mqtt_connected", 1 if link.connected.is_set() else 0)
            yield single("edgecast_mqtt_connects", link.connects)
            yield single("edgecast_mqtt_reconnects", link.reconnects)
            yield single("edgecast_mqtt_disconnects", link.disconnects)
            yield single("edgecast_mqtt_connect_failures", link.connect_failures)
            yield single("edgecast_mqtt_dropped_publishes", link.dropped_publishes)
        yield single("edgecast_model_swaps", stats["model_swaps"])
        yield single("edgecast_model_reload_failures", stats["model_reload_failures"])
        faults = family("edgecast_faults", ["reason"])
        for reason, count in sorted(stats["faults"].items()):
            faults.add_metric([reason], float(count))
        yield faults
        yield single("edgecast_worker_errors", stats["worker_errors"])
        alarms = stats.get("alarms")
        if alarms is not None:
            commands = family("edgecast_operator_commands", ["command", "result"])
            for key, count in sorted(alarms["commands"].items()):
                command, result = key.split(":")
                commands.add_metric([command, result], float(count))
            yield commands
            state = family("edgecast_alarms", ["state"])
            for name in ("acknowledged", "shelved", "in_maintenance"):
                state.add_metric([name], float(alarms[name]))
            yield state
            feedback = family("edgecast_feedback", ["label"])
            for label, count in sorted(alarms["feedback_by_label"].items()):
                feedback.add_metric([label], float(count))
            yield feedback


class AgentMetrics:
    """The registry, the two histograms fed as inference happens, and the HTTP endpoint."""

    def __init__(self, agent: "Agent"):
        prometheus = _prometheus()
        self._prometheus = prometheus
        if hasattr(prometheus, "disable_created_metrics"):
            prometheus.disable_created_metrics()  # no *_created series: half the exposition, no use on dashboards
        self.registry = prometheus.CollectorRegistry()
        self.inference_seconds = prometheus.Histogram(
            "edgecast_inference_seconds", METRICS["edgecast_inference_seconds"][1], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = prometheus.Histogram(
            "edgecast_inference_batch_size", METRICS["edgecast_inference_batch_size"][1], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.registry.register(_AgentCollector(agent, time.time()))
        prometheus.ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self._server: Any = None
        self._thread: Any = None
        self.address: tuple[str, int] | None = None

    def observe_inference(self, batch: int, seconds: float) -> None:
        """Called after every model call (on the model thread): cheap, lock-free enough for the hot path."""
        self.inference_seconds.observe(seconds)
        self.batch_size.observe(batch)

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics in a daemon thread; returns the bound (host, port). OSError when the port is taken."""
        server, thread = self._prometheus.start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        self.address = (host, server.server_address[1])
        log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.address[1])
        return self.address

    def render(self) -> bytes:
        """The exposition text a scrape would get (for tests and `check-config`)."""
        return self._prometheus.generate_latest(self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
