"""The synthetic fleet: determinism, CSV layout, labels vs schedule, dropouts, fault physics, MQTT publishing."""

from __future__ import annotations

import io
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from training.__main__ import main as training_main
from simulation.synth import (
    COLUMNS,
    FAULT_KINDS,
    FEATURES,
    FaultSpec,
    FleetConfig,
    generate_fleet,
    parse_fault_specs,
    publish_fleet,
    read_csv,
    write_csv,
)


def small_fleet(**overrides):
    cfg = dict(devices=8, hours=48.0, seed=3, faults="auto")
    cfg.update(overrides)
    return generate_fleet(FleetConfig(**cfg))


def test_same_seed_same_fleet_other_seed_differs():
    """A seed fully determines the fleet; another seed gives other data."""
    a, b, c = small_fleet(), small_fleet(), small_fleet(seed=4)
    for column in COLUMNS:
        assert np.array_equal(a.rows[column], b.rows[column]), column
    assert a.schedule == b.schedule
    assert not np.array_equal(a.rows["bearing_temp"][:100], c.rows["bearing_temp"][:100])


def test_csv_columns_order_and_round_trip(tmp_path):
    """The CSV has the contract's columns, rows sorted by ts then device, and reads back unchanged."""
    fleet = small_fleet(devices=3, hours=6.0)
    path = tmp_path / "fleet.csv"
    write_csv(fleet, path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = read_csv(path)
    keys = list(zip(back["ts"].tolist(), back["device"].tolist()))
    assert keys == sorted(keys)
    assert np.array_equal(back["ts"], fleet.rows["ts"])
    for feature in FEATURES:
        assert np.allclose(back[feature], fleet.rows[feature], atol=1e-4)
    assert np.array_equal(back["label"], fleet.rows["label"])


def test_labels_match_schedule_and_all_kinds_present():
    """label/fault are set exactly inside the scheduled intervals; `auto` on 8 pumps covers every kind."""
    fleet = small_fleet()
    rows = fleet.rows
    assert {f["kind"] for f in fleet.schedule} == set(FAULT_KINDS)
    expected = np.zeros(len(rows["ts"]), dtype=np.int64)
    expected_kind = np.full(len(rows["ts"]), "", dtype=object)
    for f in fleet.schedule:
        inside = (rows["device"] == f["device"]) & (rows["ts"] >= f["start_ts"]) & (rows["ts"] < f["end_ts"])
        assert inside.any()
        expected[inside] = 1
        expected_kind[inside] = f["kind"]
    assert np.array_equal(rows["label"], expected)
    assert np.array_equal(rows["fault"], expected_kind)


def test_dropouts_remove_whole_rows():
    """Some rows are missing (device did not send); every present row has all four finite features."""
    fleet = small_fleet(devices=4, hours=72.0, faults="none")
    per_device = 72 * 60
    for device in np.unique(fleet.rows["device"]):
        count = int((fleet.rows["device"] == device).sum())
        assert 0.97 * per_device < count < per_device
    for feature in FEATURES:
        assert np.isfinite(fleet.rows[feature]).all()


def test_healthy_magnitudes_are_realistic():
    """Healthy readings stay in the ranges of a real pump: 35-75 degC, 0.8-4 mm/s, 8-42 A, 1.5-6.8 bar."""
    rows = small_fleet(devices=4, hours=72.0, faults="none").rows
    bounds = {"bearing_temp": (35, 75), "vibration_rms": (0.8, 4), "motor_current": (8, 42), "outlet_pressure": (1.5, 6.8)}
    for feature, (low, high) in bounds.items():
        assert low < rows[feature].min() and rows[feature].max() < high, feature
        assert rows[feature].std() > 0.05 * (high - low), f"{feature} should follow the load"


def test_faults_change_only_their_interval_and_overheating_is_fast():
    """A fault alters only its own device and interval; overheating adds >= 10 degC within 30 minutes."""
    spec = [FaultSpec("overheating", "pump-01", 5.0, 2.0)]
    healthy = generate_fleet(FleetConfig(devices=2, hours=12.0, seed=5, faults="none")).rows
    faulty_fleet = generate_fleet(FleetConfig(devices=2, hours=12.0, seed=5, faults=spec))
    faulty = faulty_fleet.rows
    (item,) = faulty_fleet.schedule
    changed = np.abs(faulty["bearing_temp"] - healthy["bearing_temp"]) > 1e-9
    inside = (faulty["device"] == "pump-01") & (faulty["ts"] >= item["start_ts"]) & (faulty["ts"] < item["end_ts"])
    assert not (changed & ~inside).any()
    after_30_min = inside & (faulty["ts"] >= item["start_ts"] + 30 * 60)
    assert (faulty["bearing_temp"][after_30_min] - healthy["bearing_temp"][after_30_min]).min() >= 10.0


def test_stuck_sensor_repeats_a_value_and_bearing_wear_raises_vibration():
    """stuck_sensor freezes one feature exactly; bearing_wear lifts vibration by the end of its ramp."""
    specs = [FaultSpec("stuck_sensor", "pump-00", 3.0, 2.0), FaultSpec("bearing_wear", "pump-01", 2.0, 10.0)]
    fleet = generate_fleet(FleetConfig(devices=2, hours=12.0, seed=6, faults=specs))
    rows = fleet.rows
    stuck = (rows["device"] == "pump-00") & (rows["label"] == 1)
    assert any(np.unique(rows[f][stuck]).size == 1 for f in FEATURES)
    worn = (rows["device"] == "pump-01") & (rows["label"] == 1)
    vib = rows["vibration_rms"][worn]
    assert vib[-60:].mean() - vib[:60].mean() > 0.8


def test_bad_fault_specs_are_rejected_with_a_clear_error():
    """Malformed specs, unknown kinds and unknown devices raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="KIND:DEVICE"):
        parse_fault_specs("overheating-pump-01")
    with pytest.raises(ValueError, match="fault kind"):
        parse_fault_specs("melting:pump-01@1+2")
    with pytest.raises(ValueError, match="unknown device"):
        generate_fleet(FleetConfig(devices=2, hours=4, faults=parse_fault_specs("spikes:pump-07@1+1")))


def test_cli_writes_csv_and_schedule(tmp_path, capsys):
    """`python -m training synth` writes the CSV and a schedule JSON whose faults appear in the labels."""
    csv_path, schedule_path = tmp_path / "fleet.csv", tmp_path / "faults.json"
    code = training_main(["synth", "--devices", "2", "--hours", "6", "--seed", "1", "--faults",
                          "overheating:pump-01@2+1", "--out", str(csv_path), "--schedule-out", str(schedule_path)])
    assert code == 0
    schedule = json.loads(schedule_path.read_text())
    assert schedule == [{"device": "pump-01", "kind": "overheating", "start_ts": schedule[0]["start_ts"],
                         "end_ts": schedule[0]["start_ts"] + 3600}]
    rows = read_csv(csv_path)
    assert set(rows["fault"][rows["label"] == 1]) == {"overheating"}
    assert training_main(["synth", "--devices", "2", "--hours", "6", "--faults", "nope:pump-01@1+1", "--out",
                          str(tmp_path / "x.csv")]) == 2
    assert "fault kind" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ MQTT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("mosquitto did not start")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.mqtt
@pytest.mark.parametrize("form", ["telemetry", "sensor"])
def test_publish_sends_every_row_with_qos1(broker, form):
    """--publish delivers every non-dropped row (warm-up burst, then paced) in either payload form, and exits 0."""
    import paho.mqtt.client as mqtt

    now = int(time.time()) // 60 * 60
    fleet = generate_fleet(FleetConfig(devices=2, hours=2.0, seed=2, faults="none", start_ts=now - 119 * 60))
    received: queue.Queue = queue.Queue()
    subscribed: queue.Queue = queue.Queue()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe("sensors/+/+", qos=1)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_connect = on_connect
    sub.on_subscribe = lambda *a: subscribed.put(True)
    sub.on_message = lambda c, u, msg: received.put((msg.topic, json.loads(msg.payload)))
    sub.connect_async("127.0.0.1", broker)
    sub.loop_start()
    try:
        subscribed.get(timeout=10)
        began = time.monotonic()
        assert publish_fleet(fleet, "127.0.0.1", broker, speed=1200.0, warmup_rows=100, form=form) == 0
        assert time.monotonic() - began >= 0.8  # the last ~20 rows per device were paced, not dumped
        total = len(fleet.rows["ts"]) * (1 if form == "telemetry" else len(FEATURES))
        got = [received.get(timeout=10) for _ in range(total)]
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert received.empty()
    if form == "telemetry":
        assert {topic for topic, _ in got} == {"sensors/pump-00/telemetry", "sensors/pump-01/telemetry"}
        assert all(set(p["values"]) == set(FEATURES) for _, p in got)
        stamps = [p["ts"] for _, p in got]
    else:
        assert {topic for topic, _ in got} == {f"sensors/pump-0{d}/{f}" for d in (0, 1) for f in FEATURES}
        assert all(isinstance(p["value"], float) for _, p in got)
        stamps = [p["ts"] for topic, p in got if topic.endswith("/bearing_temp")]
    assert sorted(stamps) == sorted(fleet.rows["ts"].tolist())
    assert max(stamps) <= time.time()


def test_synth_command_does_not_import_torch(tmp_path):
    """`python -m training synth` (and the package import) work without torch: it is loaded only by training commands."""
    import sys

    code = ("import sys, training; from training.__main__ import main; "
            f"rc = main(['synth', '--devices', '1', '--hours', '2', '--out', {str(tmp_path / 'f.csv')!r}]); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    repo_root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo_root)
    assert result.returncode == 0, result.stderr


class _Lines(io.TextIOBase):
    """A writable `out` for publish_fleet whose lines go to a queue, so the test can wait for what it says."""

    def __init__(self) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.put(line)
        return len(text)

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"publish_fleet did not say {needle!r} within {timeout}s")
            if needle in line:
                return line


def _publish_in_thread(fleet, broker, out: _Lines, **kwargs) -> queue.Queue:
    """publish_fleet on a thread; its exit code (or the exception it raised) arrives in the returned queue."""
    result: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            result.put(publish_fleet(fleet, broker.host, broker.port, out=out, **kwargs))
        except BaseException as exc:  # the traceback the report was about: the test shows it
            result.put(exc)

    threading.Thread(target=run, name="synth-publish", daemon=True).start()
    return result


def _exit_code(result: queue.Queue, timeout: float) -> int:
    try:
        value = result.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"publish_fleet did not return within {timeout}s")
    if isinstance(value, BaseException):
        raise value
    return value


@pytest.mark.mqtt
def test_publish_reconnects_after_a_broker_outage_and_delivers_every_row(restartable_broker):
    """--publish rides out a broker stop and restart mid-run: it reconnects, goes on, every row arrives, exit 0."""
    from conftest import MqttProbe

    now = int(time.time()) // 60 * 60
    fleet = generate_fleet(FleetConfig(devices=2, hours=2.0, seed=5, faults="none", start_ts=now - 119 * 60))
    # A persistent session: what the broker accepts while this probe is away after the restart waits for it.
    probe = MqttProbe(restartable_broker.broker, "synth-outage-probe", subscribe=None, clean_session=False)
    try:
        probe.subscribe("sensors/+/telemetry", qos=1)
        out = _Lines()
        result = _publish_in_thread(fleet, restartable_broker.broker, out, speed=1200.0, warmup_rows=10,
                                    outage_timeout_s=30.0)
        out.wait_for("in real time", timeout=10)  # the warm-up rows are out, the paced part (~5 s) has begun
        restartable_broker.stop()
        out.wait_for("lost the connection", timeout=10)
        restartable_broker.start()
        out.wait_for("reconnected", timeout=20)
        assert _exit_code(result, timeout=60) == 0
        expected = {(str(d), int(t)) for d, t in zip(fleet.rows["device"], fleet.rows["ts"])}
        got: set[tuple[str, int]] = set()
        deadline = time.monotonic() + 20
        while got != expected and time.monotonic() < deadline:
            msg = probe.expect("sensors/+/telemetry", timeout=max(0.1, deadline - time.monotonic()))
            got.add((msg.topic.split("/")[1], msg.json()["ts"]))  # QoS 1: a resent row may come twice
        assert got == expected, f"{len(expected - got)} rows missing"
    finally:
        probe.close()


@pytest.mark.mqtt
def test_publish_gives_up_with_a_clear_message_when_the_broker_stays_away(restartable_broker, capsys):
    """A broker away for longer than --outage-timeout-s ends --publish with exit 1 and a message saying so, no traceback."""
    now = int(time.time()) // 60 * 60
    fleet = generate_fleet(FleetConfig(devices=1, hours=4.0, seed=6, faults="none", start_ts=now - 239 * 60))
    out = _Lines()
    result = _publish_in_thread(fleet, restartable_broker.broker, out, speed=600.0, warmup_rows=10, outage_timeout_s=1.5)
    out.wait_for("in real time", timeout=10)  # the paced part would take ~23 s
    restartable_broker.stop()
    out.wait_for("lost the connection", timeout=10)
    began = time.monotonic()
    assert _exit_code(result, timeout=20) == 1
    assert time.monotonic() - began < 10
    err = capsys.readouterr().err
    assert f"the broker at 127.0.0.1:{restartable_broker.port} has been unreachable for more than 1.5s; giving up" in err
    assert "Traceback" not in err
