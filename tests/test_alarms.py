"""Operators in the loop: acknowledge, shelve, maintenance and feedback over MQTT, kept across restarts, behind an ACL."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import AGENT_ID, PREFIX, MqttProbe, healthy_rows, publish_rows, run_mosquitto, wait_until

from agent.core.alarms import AlarmBook
from agent.core.events import AlertEvent
from agent.transport import commands

pytestmark = pytest.mark.mqtt
import jsonschema  # noqa: E402  (dev extra)

from agent.schemas import load_schema  # noqa: E402

STATUS = f"{PREFIX}/agent/{AGENT_ID}/status"
TOPIC_SCHEMAS = [
    (f"{PREFIX}/+/command/result", "command_result"), (f"{PREFIX}/+/command", "command"), (f"{PREFIX}/agent/+/status", "status"),
    (f"{PREFIX}/+/forecast", "forecast"), (f"{PREFIX}/+/alert", "alert"), (f"{PREFIX}/+/alerts/active", "alerts_active"),
]


def command(probe: MqttProbe, device: str, name: str, request_id: str, **fields) -> dict:
    """Send a command and return its result (matched by request_id)."""
    body = {"command": name, "by": "alice", "reason": f"test {name}", "request_id": request_id, **fields}
    probe.publish(f"{PREFIX}/{device}/command", body)
    return probe.expect(f"{PREFIX}/{device}/command/result", lambda m: m.json().get("request_id") == request_id, timeout=15).json()


def active(probe: MqttProbe, device: str, predicate, timeout: float = 15) -> dict:
    return probe.expect(f"{PREFIX}/{device}/alerts/active", lambda m: predicate(m.json()), timeout=timeout).json()


def validate_everything(probe: MqttProbe) -> set[str]:
    """Every message seen on the agent's topics matches its schema; returns the schema names exercised."""
    import paho.mqtt.client as paho

    seen = set()
    for message in probe.history:
        name = next((n for pattern, n in TOPIC_SCHEMAS if paho.topic_matches_sub(pattern, message.topic)), None)
        if name is None or not message.payload:
            continue
        body = json.loads(message.payload)
        if name == "command" and body.get("command") == "shelve" and "duration_s" not in body:
            continue  # the malformed command sent on purpose
        errors = list(jsonschema.Draft202012Validator(load_schema(name)).iter_errors(body))
        assert not errors, f"{message.topic} does not match {name}: {errors[0].message}\n{body}"
        seen.add(name)
    return seen


# -- the rules, without a broker ----------------------------------------------------------------------------------


def event(alert_id: str, state: str, device: str = "pump-00") -> AlertEvent:
    return AlertEvent(alert_id, device, state, "warning", 0.7, 4.0, 3.0, 10.0, 5.0, 10.0 if state == "end" else None)


def test_a_shelved_alert_stays_off_the_outputs_but_its_end_goes_out_when_it_was_announced(tmp_path):
    """Shelving hides new/update events; an end is published only for an alert subscribers saw begin."""
    book = AlarmBook(tmp_path, max_shelve_s=3600, max_maintenance_s=86400)
    assert book.admit(event("a", "new"))
    book.shelve("pump-00", None, 600, "alice", "known issue", now=0.0)
    assert not book.admit(event("a", "update")) and not book.admit(event("b", "new"))
    assert book.admit(event("a", "end")), "subscribers saw `a` begin: they must see it end"
    assert not book.admit(event("b", "end")), "`b` was never announced: its end would be news of nothing"
    assert book.shelve("pump-00", None, 7200, "alice", "too long", now=0.0).reason == "too_long"


def test_the_operator_state_survives_a_restart_and_a_corrupt_file_is_set_aside(tmp_path):
    """alarms.json keeps acknowledgements, shelves, maintenance and feedback; an unreadable one is moved aside."""
    book = AlarmBook(tmp_path, 3600, 86400)
    book.admit(event("a", "new"))
    book.acknowledge("pump-00", ["a"], "alice", "seen", now=1.0)
    book.start_maintenance("pump-01", None, "bob", "bearing swap", now=1.0)
    book.give_feedback("pump-00", "a", "false_alarm", "valve work", "alice", now=2.0)
    again = AlarmBook(tmp_path, 3600, 86400)
    again.load()
    assert again.summary() == {"acknowledged": 1, "shelved": 0, "in_maintenance": 1, "feedback": 1}
    (tmp_path / "alarms.json").write_text("{not json")
    broken = AlarmBook(tmp_path, 3600, 86400)
    broken.load()
    assert broken.summary()["feedback"] == 0 and (tmp_path / "alarms.unreadable").exists()


def test_alerts_seen_are_kept_for_feedback_after_a_restart_and_an_end_clears_the_acknowledgement(tmp_path):
    """An alert the book only saw (no command yet) still takes feedback after a restart; an ended alert is no longer acknowledged."""
    book = AlarmBook(tmp_path, 3600, 86400)
    book.admit(event("a", "new"))
    book.acknowledge("pump-00", ["a"], "alice", "seen", now=1.0)
    book.admit(event("a", "end"))
    assert book.summary()["acknowledged"] == 0
    book.admit(event("b", "new"))
    book.save_if_changed()
    again = AlarmBook(tmp_path, 3600, 86400)
    again.load()
    assert again.give_feedback("pump-00", "b", "true_fault", "", "bob", now=2.0).ok
    assert not again.give_feedback("pump-01", "b", "true_fault", "", "bob", now=2.0).ok, "feedback names the alert's own device"


@pytest.mark.parametrize("body, reason", [
    (b"{nope", "malformed_json"),
    (json.dumps({"command": "shelve", "by": "a", "reason": "r"}).encode(), "invalid_command"),
    (json.dumps({"command": "feedback", "by": "a", "reason": "r", "alert_id": "x", "label": "maybe"}).encode(), "invalid_command"),
    (json.dumps({"command": "acknowledge", "reason": "r"}).encode(), "invalid_command"),
    (json.dumps({"command": "maintenance", "by": "a", "reason": "r", "duration_s": 60, "until": 5}).encode(), "invalid_command"),
    (json.dumps({"command": "reboot", "by": "a", "reason": "r"}).encode(), "invalid_command"),
    (json.dumps({"command": "acknowledge", "by": "a", "reason": "r", "sudo": True}).encode(), "invalid_command"),
])
def test_malformed_commands_are_refused_with_a_reason(body, reason):
    """A command that is not JSON, lacks who/why, mixes fields or names an unknown command is refused, never applied."""
    with pytest.raises(commands.CommandError) as refused:
        commands.parse(f"{PREFIX}/pump-00/command", body, PREFIX)
    assert refused.value.reason == reason


# -- the daemon ----------------------------------------------------------------------------------------------------


@pytest.mark.training
def test_a_device_goes_through_alert_acknowledge_shelve_maintenance_service_and_feedback(start_agent, subscriber, agent_settings, tmp_path,
                                                                                        capsys):
    """The whole operator cycle against mosquitto: every state published as the contract says, and kept across a restart."""
    from agent.__main__ import main as agent_main
    from agent.app import Agent

    # Readings on fixed timestamps, in the past (later phases need room): with rows ending at the time of the run,
    # at some hours pump-01's synthetic overheating alert ended before its shelf ran out and was never announced.
    # Readings that old need a longer ingest.max_age_s.
    agent = start_agent(homeassistant={"enabled": True}, ingest={"max_age_s": 10 * 365 * 86400.0})
    past = 1_796_054_400
    rows = healthy_rows(devices=1, rows=150, seed=8, faults="overheating:pump-00@1.5+10", end_ts=past)  # open to the end
    publish_rows(subscriber, rows)
    alert = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30).json()
    alert_id = alert["alert_id"]

    # Acknowledge: an update event says who, and so does the active list (while the alert is open).
    assert command(subscriber, "pump-00", "acknowledge", "r1", alert_id=alert_id)["ok"]
    acked = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: "acknowledged" in m.json(), timeout=10).json()
    assert acked["alert_id"] == alert_id and acked["acknowledged"]["by"] == "alice" and acked["state"] == "update"
    listed = active(subscriber, "pump-00", lambda body: any("acknowledged" in a for a in body["alerts"]))
    assert listed["alerts"][0]["acknowledged"]["by"] == "alice"
    assert command(subscriber, "pump-00", "acknowledge", "r1b", alert_id="pump-00-1-nope")["reason"] == "not_open"

    # Shelve a device for 3 s: its new alert stays off the alert topic, and is announced when the shelf runs out.
    assert command(subscriber, "pump-01", "shelve", "r2", duration_s=3)["ok"]
    active(subscriber, "pump-01", lambda body: "shelved_until" in body)
    hot = healthy_rows(devices=2, rows=150, seed=11, faults="overheating:pump-01@1.5+10", end_ts=rows[-1][1])
    publish_rows(subscriber, [row for row in hot if row[0] == "pump-01"])
    wait_until(lambda: "pump-01" in agent.runtimes[0].open_alerts, timeout=30, message="pump-01's alert open (shelved)")
    assert not [m for m in subscriber.history if m.topic == f"{PREFIX}/pump-01/alert"], "a shelved alert was published"
    announced = subscriber.expect(f"{PREFIX}/pump-01/alert", timeout=15).json()
    assert announced["state"] == "new" and "shelved_until" not in announced
    active(subscriber, "pump-01", lambda body: "shelved_until" not in body and body["alerts"])

    # Maintenance: the open alert ends, forecasts say maintenance, a fault raises nothing.
    assert command(subscriber, "pump-01", "maintenance", "r3")["ok"]
    ended = subscriber.expect(f"{PREFIX}/pump-01/alert", lambda m: m.json()["state"] == "end", timeout=10).json()
    assert ended["alert_id"] == announced["alert_id"]
    active(subscriber, "pump-01", lambda body: body.get("maintenance", {}).get("by") == "alice" and body["alerts"] == [])
    later = hot[-1][1]
    more = healthy_rows(devices=2, rows=70, seed=12, faults="overheating:pump-01@0+2", end_ts=later + 70 * 60)
    publish_rows(subscriber, [row for row in more if row[0] == "pump-01"])
    marked = subscriber.expect(f"{PREFIX}/pump-01/forecast", lambda m: m.json().get("maintenance") is True, timeout=20).json()
    assert marked["device"] == "pump-01"
    subscriber.quiet(f"{PREFIX}/pump-01/forecast", 1.0)
    assert not [m for m in subscriber.history if m.topic == f"{PREFIX}/pump-01/alert" and m.json()["ts"] > ended["ts"]]

    # Back in service: the window starts over (no forecast until a full window came again).
    assert command(subscriber, "pump-01", "end_maintenance", "r4")["ok"]
    active(subscriber, "pump-01", lambda body: "maintenance" not in body)
    seen = len([m for m in subscriber.history if m.topic == f"{PREFIX}/pump-01/forecast"])
    after = healthy_rows(devices=2, rows=70, seed=13, end_ts=later + 140 * 60)
    publish_rows(subscriber, [row for row in after if row[0] == "pump-01"][:30])
    subscriber.quiet(f"{PREFIX}/pump-01/forecast", 1.0)
    assert len([m for m in subscriber.history if m.topic == f"{PREFIX}/pump-01/forecast"]) == seen, "forecast from an old window"
    publish_rows(subscriber, [row for row in after if row[0] == "pump-01"][30:])
    fresh = subscriber.expect(f"{PREFIX}/pump-01/forecast", lambda m: m.json()["ts"] > later + 70 * 60, timeout=20).json()
    assert "maintenance" not in fresh

    # Feedback: on a known alert it is recorded; on an unknown one it is refused; a bad command is refused.
    assert command(subscriber, "pump-00", "feedback", "r5", alert_id=alert_id, label="true_fault", comment="spiky bearing")["ok"]
    assert command(subscriber, "pump-01", "feedback", "r6", alert_id=announced["alert_id"], label="false_alarm")["ok"]
    assert command(subscriber, "pump-00", "feedback", "r7", alert_id="pump-00-0-000000", label="unknown")["reason"] == "unknown_alert"
    assert command(subscriber, "pump-00", "shelve", "r8")["reason"] == "invalid_command"
    status = subscriber.expect(STATUS, lambda m: m.json().get("alarms", {}).get("feedback") == 2, timeout=10).json()
    assert status["alarms"]["in_maintenance"] == 0

    # Home Assistant: an acknowledge button and a maintenance switch per device, sending these commands.
    button = subscriber.expect(f"homeassistant/button/+/pump-00_acknowledge/config", timeout=10).json()
    assert json.loads(button["payload_press"])["command"] == "acknowledge" and button["command_topic"] == f"{PREFIX}/pump-00/command"
    switch = subscriber.expect(f"homeassistant/switch/+/pump-01_maintenance/config", timeout=10).json()
    assert json.loads(switch["payload_on"])["command"] == "maintenance"

    assert {"command", "command_result", "alert", "alerts_active", "forecast", "status"} <= validate_everything(subscriber)

    # A restart keeps everything: a new maintenance period and the feedback are there for the next process.
    assert command(subscriber, "pump-00", "maintenance", "r9", duration_s=3600)["ok"]
    agent.stop()
    subscriber.drain()  # only what the restarted agent says counts below
    restarted = Agent(agent_settings())
    restarted.start()
    try:
        assert restarted.wait_connected(10)
        assert restarted.alarms.in_maintenance("pump-00") and restarted.alarms.summary()["feedback"] == 2
        status = subscriber.expect(STATUS, lambda m: m.json().get("alarms", {}).get("in_maintenance") == 1, timeout=10).json()
        assert status["alarms"]["feedback"] == 2
    finally:
        restarted.stop()

    # The feedback leaves as labelled time ranges for retraining.
    out = tmp_path / "feedback.csv"
    assert agent_main(["export-feedback", "--state", str(agent.settings.state.directory), "--out", str(out)]) == 0
    labelled = list(csv.DictReader(out.open()))
    assert {(r["device"], r["label"], r["alert_id"]) for r in labelled} == {
        ("pump-00", "true_fault", alert_id), ("pump-01", "false_alarm", announced["alert_id"])}
    assert all(r["start"] <= r["end"] for r in labelled)
    assert next(r for r in labelled if r["label"] == "true_fault")["comment"] == "spiky bearing"

    # ... and a model is fitted with them as labels: the true fault stays out of training.
    from training.__main__ import main as training_main

    history = tmp_path / "pump-00.csv"
    features = list(rows[0][2])
    before = healthy_rows(devices=1, rows=450, seed=30, end_ts=rows[0][1] - 60)  # the weeks before, as a history export has
    history.write_text("ts,device," + ",".join(features) + "\n"
                       + "".join(f"{ts},{device}," + ",".join(str(v[f]) for f in features) + "\n" for device, ts, v in before + rows))
    code = training_main(["fit", "--data", str(history), "--out", str(tmp_path / "refit"), "--features", ",".join(features),
                          "--targets", "bearing_temp", "--lookback", "12", "--horizon", "3", "--feedback", str(out),
                          "--epochs", "1", "--hidden-size", "8", "--num-layers", "1", "--min-steps", "10"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "1 true_fault range(s) ->" in summary and " 0 rows kept out" not in summary


def test_the_broker_acl_keeps_clients_without_rights_from_commanding(tmp_path, agent_settings):
    """With docs/operators.md's ACL, a viewer's command never reaches the agent; an operator's does."""
    from agent.app import Agent

    passwd = tmp_path / "passwd"
    for user, secret in (("edge", "edge-pw"), ("operator", "op-pw"), ("viewer", "view-pw")):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == "edge" else []), str(passwd), user, secret], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(operators_acl())
    (tmp_path / "edge-pass").write_text("edge-pw")
    with run_mosquitto(tmp_path / "acl-broker", f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n") as broker:
        settings = agent_settings(mqtt={"port": broker.port, "username": "edge", "password_file": str(tmp_path / "edge-pass"),
                                        "plaintext_password": "loopback"})
        agent = Agent(settings)
        agent.start()
        try:
            assert agent.wait_connected(10)
            viewer = MqttProbe(broker, "viewer", subscribe=f"{PREFIX}/#", username="viewer", password="view-pw")
            operator = MqttProbe(broker, "operator", subscribe=f"{PREFIX}/#", username="operator", password="op-pw")
            viewer.publish(f"{PREFIX}/pump-00/command", {"command": "maintenance", "by": "mallory", "reason": "silence it", "request_id": "v1"})
            assert viewer.quiet(f"{PREFIX}/pump-00/command/result", 1.5) == []
            assert not agent.alarms.in_maintenance("pump-00")
            assert command(operator, "pump-00", "maintenance", "o1")["ok"]
            assert agent.alarms.in_maintenance("pump-00")
        finally:
            agent.stop()


def operators_acl() -> str:
    """The ACL documented in docs/operators.md (the test reads it from there, so the documentation is what is tested)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operators.md").read_text()
    block = text.split("```acl", 1)[1].split("```", 1)[0]
    return block.strip() + "\n"
