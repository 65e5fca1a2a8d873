"""Prometheus metrics: off by default, one setting to turn on, scraped over HTTP from a running daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import PREFIX, REPO, free_port, healthy_rows, publish_rows, wait_until

pytestmark = pytest.mark.mqtt
import prometheus_client  # noqa: E402,F401  (dev extra)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_endpoint_of_a_running_daemon_counts_what_happens(start_daemon, make_probe, model_path):
    """A daemon started with EDGECAST_METRICS__ENABLED=true serves /metrics; the counters move with the traffic."""
    port = free_port()
    daemon = start_daemon(env={"EDGECAST_METRICS__ENABLED": "true", "EDGECAST_METRICS__PORT": str(port)})
    probe = make_probe("#")
    daemon.wait_online(probe)
    before = scrape(port)
    assert value(before, "edgecast_readings_accepted_total") == 0
    assert value(before, "edgecast_mqtt_connected") == 1 and value(before, "edgecast_mqtt_connects_total") == 1
    assert value(before, "edgecast_mqtt_reconnects_total") == 0
    manifest_version = __import__("json").loads((model_path / "manifest.json").read_text())["version"]
    info = [labels for (name, labels) in before if name == "edgecast_model_info"]
    assert info and dict(info[0])["version"] == manifest_version and dict(info[0])["name"] == "pump-lstm"
    assert value(before, "edgecast_readings_rejected_total", reason="malformed_json") == 0
    assert value(before, "edgecast_ingest_queue_capacity") == 10000

    rows = healthy_rows(devices=2, rows=65, seed=4)
    publish_rows(probe, rows)
    probe.publish("sensors/pump-00/telemetry", b"{not json")
    probe.publish("sensors/pump-00/telemetry", {"ts": rows[-1][1] + 60, "values": {"bearing_temp": 1.0}})
    probe.collect(f"{PREFIX}/+/forecast", 2, timeout=30)

    def settled():  # processed is counted before the batch's forecasts, rejections on the network thread: wait for all
        now = scrape(port)
        rejected = sum(value(now, "edgecast_readings_rejected_total", reason=r) for r in ("malformed_json", "missing_feature"))
        done = value(now, "edgecast_samples_processed_total") == len(rows) and rejected >= 2
        return now if done and value(now, "edgecast_inference_batch_size_sum") == value(now, "edgecast_forecasts_total") else None

    after = wait_until(settled, timeout=30, interval=0.2, message="every accepted sample to be processed and published")
    assert value(after, "edgecast_readings_accepted_total") == len(rows)
    assert value(after, "edgecast_readings_rejected_total", reason="malformed_json") == 1
    assert value(after, "edgecast_readings_rejected_total", reason="missing_feature") == 1
    assert value(after, "edgecast_forecasts_total") >= 2
    assert value(after, "edgecast_devices") == 2
    calls = value(after, "edgecast_inference_seconds_count")
    assert calls >= 1 and value(after, "edgecast_inference_seconds_sum") > 0
    assert value(after, "edgecast_inference_batch_size_count") == calls
    assert value(after, "edgecast_ingest_queue_depth") == 0
    assert value(after, "edgecast_active_alerts", severity="warning") == 0
    assert value(after, "edgecast_active_alerts", severity="critical") == 0
    assert value(after, "edgecast_outbox_queued_messages") >= 0 and ("edgecast_outbox_dropped_total", (("cause", "expired"),)) in after
    assert after[("process_resident_memory_bytes", ())] > 10e6


def test_reconnects_are_counted(start_agent, mosquitto):
    """edgecast_mqtt_reconnects_total counts connects after a lost connection (the broker kicked the client)."""
    agent = start_agent(metrics={"enabled": True, "port": 0})
    port = agent.metrics.address[1]
    assert value(scrape(port), "edgecast_mqtt_reconnects_total") == 0
    agent.link._client._sock.close()  # the connection dies under paho's feet, as on a network drop
    wait_until(lambda: agent.link.reconnects == 1 and agent.link.connected.is_set(), timeout=20, message="a reconnect")
    samples = scrape(port)
    assert value(samples, "edgecast_mqtt_reconnects_total") == 1
    assert value(samples, "edgecast_mqtt_disconnects_total") == 1


def test_metrics_are_off_by_default_and_prometheus_client_is_not_imported():
    """Without [metrics] enabled the daemon never imports prometheus-client (the edge install does not have it)."""
    code = (
        "import sys; from agent.config.settings import Settings; from agent.app import Agent; "
        "a = Agent(Settings()); assert a.metrics is None and not Settings().metrics.enabled; "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAST_")}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=env)


def test_a_missing_prometheus_client_is_a_clear_error(monkeypatch, agent_settings):
    """metrics.enabled without prometheus-client installed: the agent refuses to start and says what to install."""
    from agent.app import Agent
    from agent.ops.metrics import MetricsUnavailable

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    agent = Agent(agent_settings(metrics={"enabled": True, "port": 0}))
    with pytest.raises(MetricsUnavailable, match=r"pip install 'edgecast\[metrics\]'"):
        agent.start()
