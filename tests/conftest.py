"""Shared fixtures and helpers for tests that talk MQTT to a real broker.

Fixtures
    mosquitto        a private mosquitto on a free port -> Broker(host, port)
    subscriber       an MqttProbe on that broker, subscribed to '#' before the test starts
    make_probe       factory for more probes: make_probe(subscribe="#") -> MqttProbe
    model_path       the shipped bundle exported_models/pump-lstm (skips the test when it is missing)
    agent_settings   factory: agent_settings(**overrides) -> Settings pointing at the private broker
    start_agent      factory: start_agent(**overrides) -> Agent running in this process (stopped at teardown)
    start_daemon     factory: start_daemon(env=None, config=None, args=None) -> Daemon (`python -m agent run`)

Helpers (import from conftest): healthy_rows(devices, rows, seed, faults=...) synthetic-fleet rows ending now;
publish_rows(probe, rows, form="telemetry"|"sensor"); wait_until(cond, timeout); agent_env(broker, model);
Msg, MqttProbe (expect / collect / quiet / drain / publish / subscribe), Daemon (wait_online, signal, wait,
log, memory_kib), free_port(); constants PREFIX, AGENT_ID, FEATURES, REPO, SHIPPED_MODEL.
Waits poll queues with timeouts; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the source tree's `agent` and `training` without an editable install
    sys.path.insert(0, str(REPO))
PYTHON = sys.executable
MOSQUITTO = "/usr/sbin/mosquitto"
SHIPPED_MODEL = REPO / "exported_models" / "pump-lstm"
FEATURES = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]
PREFIX = "edgecast"
AGENT_ID = "test-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    ready = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        ready.wait(interval)  # an Event wait, not a bare sleep: nothing sets it, it only paces the polling


# -- broker --------------------------------------------------------------------------------------------------


class Broker(NamedTuple):
    host: str
    port: int


@contextlib.contextmanager
def run_mosquitto(workdir: Path, extra_conf: str = ""):
    """Start /usr/sbin/mosquitto with a config written here (anonymous unless `extra_conf` says otherwise)."""
    if not Path(MOSQUITTO).exists():
        pytest.fail(f"{MOSQUITTO} not installed: the MQTT tests need a real broker (apt-get install mosquitto)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    log_file = workdir / "mosquitto.log"
    base = "allow_anonymous true\n" if "allow_anonymous" not in extra_conf else ""
    if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot read files under tmp_path
        base += "user root\n"
    conf.write_text(f"listener {port} 127.0.0.1\n{base}persistence false\nlog_dest stderr\n{extra_conf}")
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)

    def accepts() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log_file.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(accepts, timeout=10, message=f"mosquitto to listen on {port}")
        yield Broker("127.0.0.1", port)
        died = proc.poll()
        if died is not None:
            pytest.fail(f"mosquitto died during the test (exit {died}):\n{log_file.read_text(errors='replace')}")
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RestartableBroker:
    """mosquitto on a fixed port that a test kills (SIGKILL) and starts again on the same port.

    Persistence saves after every change (autosave_interval 1, on changes), so a probe's persistent session
    (clean_session=False) and its subscriptions survive even a SIGKILL: messages published while the probe is
    away after the restart wait for it at the broker.
    """

    def __init__(self, workdir: Path, extra_conf: str = ""):
        if not Path(MOSQUITTO).exists():
            pytest.fail(f"{MOSQUITTO} not installed: the MQTT tests need a real broker (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.host, self.port = "127.0.0.1", free_port()
        self.db = workdir / "mosquitto.db"
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}persistence true\n"
            f"persistence_location {workdir}/\npersistence_file mosquitto.db\nautosave_interval 1\n"
            f"autosave_on_changes true\nlog_dest stderr\n{extra_conf}"
        )
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def broker(self) -> Broker:
        return Broker(self.host, self.port)

    def start(self) -> float:
        """Start and wait until it accepts connections; returns time.monotonic() at that moment."""
        log = open(self.workdir / f"mosquitto-{self.starts}.log", "wb")
        self.starts += 1
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def accepts() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepts, timeout=10, interval=0.01, message=f"mosquitto to listen on {self.port}")
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved beyond what autosave wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def clean_edgecast_environment(monkeypatch):
    """The test starts without EDGECAST_* variables from the caller's environment."""
    for name in list(os.environ):
        if name.upper().startswith("EDGECAST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restartable_broker(tmp_path: Path):
    """A RestartableBroker, started; stopped at teardown."""
    rb = RestartableBroker(tmp_path / "restartable-broker")
    rb.start()
    yield rb
    rb.stop()


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A private mosquitto (anonymous, no persistence) on a free port; yields Broker(host, port).

    Fails the test with mosquitto's log if the broker died during the test.
    """
    with run_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


# -- probe: a test-side MQTT client --------------------------------------------------------------------------


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float  # time.time() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class MqttProbe:
    """A paho client whose callbacks only put messages in a queue; the test reads them with timeouts.

    `history` keeps every message; `expect` returns the first not-yet-taken message matching a topic filter
    and predicate, so two expectations never fight over one message. Exceptions in callbacks are recorded
    and fail the test at teardown.
    """

    def __init__(self, broker: Broker, client_id: str, subscribe: str | Iterable[str] | None = "#",
                 username: str | None = None, password: str | None = None, clean_session: bool = True):
        self.broker = broker
        self.inbox: queue.Queue[Msg] = queue.Queue()
        self.history: list[Msg] = []
        self._taken: set[int] = set()
        self.callback_errors: list[BaseException] = []
        self._subacks: queue.Queue[int] = queue.Queue()
        self._connected = threading.Event()
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                             clean_session=clean_session)
        client.reconnect_delay_set(0.1, 1)  # tests that restart the broker want the probe back quickly
        client.on_connect = self._guard(self._on_connect)
        client.on_message = self._guard(self._on_message)
        client.on_subscribe = self._guard(self._on_subscribe)
        self.client = client
        if username is not None:
            client.username_pw_set(username, password)
        client.connect_async(broker.host, broker.port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(10):
            pytest.fail(f"probe {client_id} could not connect to {broker}")
        if subscribe:
            self.subscribe(subscribe)

    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except BaseException as error:  # paho would log it and carry on; the test must fail instead
                self.callback_errors.append(error)

        return guarded

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        assert not reason_code.is_failure, f"probe connect refused: {reason_code}"
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        assert not any(rc.is_failure for rc in reason_code_list), reason_code_list
        self._subacks.put(mid)

    def _on_message(self, client, userdata, message) -> None:
        self.inbox.put(Msg(message.topic, bytes(message.payload), bool(message.retain), message.qos, time.time()))

    def subscribe(self, filters: str | Iterable[str], qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK, so nothing published afterwards is missed."""
        filters = [filters] if isinstance(filters, str) else list(filters)
        rc, mid = self.client.subscribe([(f, qos) for f in filters])
        assert rc == paho.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + 10
        while True:
            try:
                if self._subacks.get(timeout=max(0.01, deadline - time.monotonic())) == mid:
                    return
            except queue.Empty:
                pytest.fail(f"no SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes | str | dict | list | float | int, qos: int = 1, retain: bool = False, wait: bool = True):
        """Publish (dicts and lists as JSON); with QoS 1 and `wait`, returns once the broker acknowledged."""
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        elif isinstance(payload, (int, float)):
            payload = repr(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS, paho.error_string(info.rc)
        if wait:
            info.wait_for_publish(10)
            assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def _pull(self, timeout: float) -> Msg | None:
        try:
            msg = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        self.history.append(msg)
        return msg

    def drain(self) -> list[Msg]:
        """Move everything that arrived so far into `history`, mark it taken, and return it."""
        out = []
        while (msg := self._pull(0)) is not None:
            out.append(msg)
        self._taken.update(range(len(self.history)))
        return out

    def expect(self, topic_filter: str, predicate: Callable[[Msg], bool] | None = None, timeout: float = 10.0) -> Msg:
        """The first message not yet taken whose topic matches `topic_filter` and `predicate`; fails on timeout."""

        def matches(msg: Msg) -> bool:
            return paho.topic_matches_sub(topic_filter, msg.topic) and (predicate is None or predicate(msg))

        for i, msg in enumerate(self.history):
            if i not in self._taken and matches(msg):
                self._taken.add(i)
                return msg
        deadline = time.monotonic() + timeout
        while True:
            msg = self._pull(deadline - time.monotonic())
            if msg is None:
                seen = sorted({m.topic for m in self.history})[:20]
                pytest.fail(f"no message on {topic_filter} matching the predicate within {timeout}s; topics seen: {seen}")
            if matches(msg):
                self._taken.add(len(self.history) - 1)
                return msg

    def collect(self, topic_filter: str, count: int, predicate: Callable[[Msg], bool] | None = None, timeout: float = 20.0) -> list[Msg]:
        """`count` matching messages in arrival order (fails with how many arrived if fewer come in time)."""
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(count):
            remaining = deadline - time.monotonic()
            try:
                out.append(self.expect(topic_filter, predicate, timeout=max(0.0, remaining)))
            except pytest.fail.Exception:
                pytest.fail(f"only {len(out)} of {count} messages on {topic_filter} within {timeout}s")
        return out

    def quiet(self, topic_filter: str, duration: float) -> list[Msg]:
        """Every matching message (taken or not) that arrives within the next `duration` seconds."""
        deadline = time.monotonic() + duration
        start = len(self.history)
        while (remaining := deadline - time.monotonic()) > 0:
            self._pull(remaining)
        return [m for m in self.history[start:] if paho.topic_matches_sub(topic_filter, m.topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_probe(mosquitto: Broker):
    """Factory for test-side MQTT clients on the private broker: make_probe(subscribe="#") -> MqttProbe."""
    probes: list[MqttProbe] = []

    def make(subscribe: str | Iterable[str] | None = "#", client_id: str | None = None) -> MqttProbe:
        probe = MqttProbe(mosquitto, client_id or f"probe-{len(probes)}-{os.getpid()}", subscribe)
        probes.append(probe)
        return probe

    yield make
    errors = [e for p in probes for e in p.callback_errors]
    for probe in probes:
        probe.close()
    assert not errors, f"exceptions in MQTT callbacks: {errors!r}"


@pytest.fixture
def subscriber(make_probe) -> MqttProbe:
    """An MqttProbe subscribed to '#' (SUBACK received) on the private broker; it also publishes."""
    return make_probe("#", client_id="subscriber")


# -- data ----------------------------------------------------------------------------------------------------


def healthy_rows(devices: int = 1, rows: int = 70, seed: int = 0, end_ts: int | None = None, period_s: int = 60,
                 faults: str | list = "none") -> list[tuple[str, int, dict[str, float]]]:
    """Synthetic-fleet rows [(device, ts, values)] in time order, no dropouts, ending near now.

    Healthy unless `faults` is given: a list of simulation.synth.FaultSpec, or a spec string such as
    "overheating:pump-00@1.5+1" (hours from the first row).
    """
    from simulation.synth import FleetConfig, generate_fleet, parse_fault_specs

    if isinstance(faults, str) and faults not in ("none", "auto"):
        faults = parse_fault_specs(faults)

    end = int(end_ts if end_ts is not None else time.time()) // period_s * period_s
    start = end - (rows - 1) * period_s
    fleet = generate_fleet(
        FleetConfig(devices=devices, hours=rows * period_s / 3600.0, seed=seed, period_s=period_s, start_ts=start,
                    faults=faults, dropout_rate=0.0, dropout_burst_rate=0.0)
    )
    r = fleet.rows
    return [
        (str(r["device"][i]), int(r["ts"][i]), {f: float(r[f][i]) for f in FEATURES})
        for i in range(len(r["ts"]))
    ]


def publish_rows(probe: MqttProbe, rows: Iterable[tuple[str, int, dict[str, float]]], form: str = "telemetry", qos: int = 1) -> int:
    """Publish rows as `sensors/{device}/telemetry` or per-sensor `sensors/{device}/{sensor}`; waits for every ack."""
    infos = []
    for device, ts, values in rows:
        if form == "telemetry":
            infos.append(probe.publish(f"sensors/{device}/telemetry", {"ts": ts, "values": values}, qos=qos, wait=False))
        elif form == "sensor":
            for sensor, value in values.items():
                infos.append(probe.publish(f"sensors/{device}/{sensor}", {"ts": ts, "value": value}, qos=qos, wait=False))
        else:
            raise ValueError(form)
    if qos:
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()
    return len(infos)


# -- the agent -----------------------------------------------------------------------------------------------


@pytest.fixture
def model_path() -> Path:
    """The shipped model bundle; the test is skipped (with the reason) when it has not been exported yet."""
    if not (SHIPPED_MODEL / "manifest.json").is_file():
        pytest.skip(f"shipped model bundle missing: {SHIPPED_MODEL}")
    return SHIPPED_MODEL


def agent_env(broker: Broker, model: Path, agent_id: str = AGENT_ID, **extra: str) -> dict[str, str]:
    """EDGECAST_* variables for a daemon on `broker` (strips any EDGECAST_* inherited from the test run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAST_")}
    env.update(
        EDGECAST_AGENT_ID=agent_id,
        EDGECAST_MQTT__HOST=broker.host,
        EDGECAST_MQTT__PORT=str(broker.port),
        EDGECAST_MQTT__RECONNECT_MIN_S="0.2",
        EDGECAST_MQTT__RECONNECT_MAX_S="2",
        EDGECAST_MODEL__PATH=str(model),
        PYTHONUNBUFFERED="1",
    )
    env.pop("JOURNAL_STREAM", None)
    env.update(extra)
    return env


@pytest.fixture
def agent_settings(mosquitto: Broker, model_path: Path, tmp_path: Path):
    """Factory: agent_settings(**overrides) -> Settings for the private broker and the shipped model.

    Overrides are nested dicts or section objects, e.g. agent_settings(errors={"max_per_minute": 5}).
    """
    from agent.config.settings import Settings

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "agent_id": AGENT_ID,
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
            "model": {"path": str(model_path)},
            "state": {"directory": str(tmp_path / "agent-state")},  # the outbox: never the repository's ./state
        }
        if "models" in overrides:  # several models instead of the one [model]
            del base["model"]
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("EDGECAST_")}
        try:
            return Settings(**base)
        finally:
            os.environ.update(saved)

    return make


@pytest.fixture
def start_agent(agent_settings):
    """Factory: start_agent(**overrides) -> agent.app.Agent running in this process, connected and subscribed.

    Fast (no interpreter start); stopped (cleanly, in reverse order) at teardown.
    """
    from agent.app import Agent

    agents = []

    def start(**overrides: Any) -> Agent:
        agent = Agent(agent_settings(**overrides))
        agent.start()
        agents.append(agent)
        assert agent.wait_connected(10), "the agent did not connect and subscribe within 10s"
        return agent

    yield start
    for agent in reversed(agents):
        agent.stop()
        assert agent.counters.worker_errors == 0, "the worker raised; see the captured log"


class Daemon:
    """`python -m agent run` as a subprocess; stderr goes to a file (`log()`) so it never blocks on a pipe."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([PYTHON, "-m", "agent", "run", *args], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_online(self, probe: MqttProbe, agent_id: str = AGENT_ID, timeout: float = 30.0) -> Msg:
        """The retained/live `online` status of this agent (fails early with the log if the process exits)."""
        topic = f"{PREFIX}/agent/{agent_id}/status"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return probe.expect(topic, lambda m: m.json().get("state") == "online", timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except pytest.fail.Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"no online status within {timeout}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout}s:\n{self.log()}")

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (KiB) from /proc/PID/status."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def start_daemon(mosquitto: Broker, model_path: Path, tmp_path: Path):
    """Factory: start_daemon(env=None, config=None, args=None) -> Daemon running `python -m agent run`.

    `env` adds/overrides EDGECAST_* variables (the broker, agent id and shipped model are set already);
    `config` is TOML text written to a file and passed with --config. Killed at teardown if still running.
    """
    daemons: list[Daemon] = []

    def start(env: dict[str, str] | None = None, config: str | None = None, args: list[str] | None = None) -> Daemon:
        argv = list(args or [])
        if config is not None:
            path = tmp_path / f"agent-{len(daemons)}.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        env = {"EDGECAST_STATE__DIRECTORY": str(tmp_path / "daemon-state"), **(env or {})}
        daemon = Daemon(agent_env(mosquitto, model_path, **env), argv, tmp_path / f"daemon-{len(daemons)}.log")
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()
