"""`python -m training demo`: the whole edgecast loop on one machine, in about two minutes, with one command.

    broker (mosquitto, or embedded amqtt)    <──  simulator (4 pumps, one overheats, one wears a bearing)
         │                                                    sensors/{device}/telemetry
         ▼
    edge daemon (`python -m agent run`, shipped model)  ──►  edgecast/{device}/forecast, .../alert, status
         │
         ▼
    this process: a live view of forecasts and alerts, then a summary (detections, time to detect,
    false alerts, the daemon's peak memory). Exit code 0 when every injected fault was detected and no
    healthy pump alerted.

`--machines pumps,fans` adds simulated ventilation fans (simulation/fans.py; fan-01's impeller goes out of
balance) on the same broker and runs ONE daemon with two models (`[[models]]`: pump-lstm for pump-*, fan-lstm for
fan-*); the live view and the summary show each machine type apart.

Every subprocess is stopped on the way out, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

AGENT_ID = "demo-gateway"
WARMUP_ROWS = 70  # rows per device sent back to back first: the model's 60-row window fills at once
TAIL_BUDGET_S = 8.0  # wall seconds kept after the simulator for the last forecasts, the daemon's stop, the summary
SIM_START_BUDGET_S = 2.0  # the simulator's own start-up (imports, generating the fleet)
STATUS_WAIT_S = 60.0


# ------------------------------------------------------------------------------------------------ output


class Style:
    """ANSI colours and Unicode symbols only where the terminal can show them."""

    def __init__(self, stream):
        self.tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        self.color = self.tty and "NO_COLOR" not in os.environ
        encoding = (getattr(stream, "encoding", None) or "ascii").lower()
        self.unicode = "utf" in encoding
        self.arrow = "→" if self.unicode else "->"
        self.degree = "°C" if self.unicode else "degC"
        self.rule = "─" if self.unicode else "-"

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("1;31", text)

    def yellow(self, text: str) -> str:
        return self._wrap("1;33", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def severity(self, severity: str, text: str | None = None) -> str:
        text = text if text is not None else severity.upper()
        return self.red(text) if severity == "critical" else self.yellow(text)


def sim_clock(seconds: float) -> str:
    """Simulated time since the first sample, as t+HH:MM."""
    minutes = int(seconds // 60)
    return f"t+{minutes // 60:02d}:{minutes % 60:02d}"


# ------------------------------------------------------------------------------------------------ state


@dataclass
class DeviceView:
    name: str
    forecasts: int = 0
    last_ts: float | None = None
    observed: dict[str, float] = field(default_factory=dict)
    forecast: dict[str, list[float]] = field(default_factory=dict)
    completeness: float | None = None
    period_s: float = 60.0
    open_alert: dict | None = None
    first_sample_wall_after: dict[float, float] = field(default_factory=dict)  # onset ts -> wall time seen


@dataclass
class AlertRecord:
    alert_id: str
    device: str
    severity: str  # the highest seen
    opened_ts: float  # ts of the `new` event
    started_at: float
    opened_wall: float
    ended_at: float | None = None
    peak_score: float = 0.0
    features: list[dict] = field(default_factory=list)


@dataclass
class Fault:
    device: str
    kind: str
    start_ts: float
    end_ts: float


@dataclass
class MachineGroup:
    """One machine type of the demo: its simulated devices, the model that serves them, the two columns of the live view."""

    key: str  # the --machines value: "pumps"
    machine: str  # synth --machine and the device-name prefix: "pump"
    devices: int
    model: Path
    temp: tuple[str, str]  # (feature, column title) of the temperature column
    vibration: tuple[str, str]
    synth: subprocess.Popen | None = None
    schedule: Path | None = None

    def owns(self, device: str) -> bool:
        return device.startswith(self.machine + "-")


# --machines value -> (synth --machine, bundle, temperature column, vibration column)
MACHINE_TYPES = {
    "pumps": ("pump", "pump-lstm", ("bearing_temp", "bearing temp"), ("vibration_rms", "vibration mm/s")),
    "fans": ("fan", "fan-lstm", ("motor_temp", "motor temp"), ("fan_vibration", "vibration mm/s")),
}


def shipped_bundle(name: str) -> Path:
    """A bundle shipped with edgecast: the source tree's exported_models/<name>, or the installed copy."""
    source_tree = Path(__file__).resolve().parent.parent / "exported_models" / name
    if source_tree.is_dir():
        return source_tree
    from importlib.resources import files

    return Path(str(files("agent") / "shipped_models" / name))


def parse_machines(text: str) -> list[str]:
    """The --machines value as a list of MACHINE_TYPES keys, in the order given; ValueError naming the choices."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MACHINE_TYPES]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise ValueError(f"--machines takes a comma-separated list of {', '.join(MACHINE_TYPES)} (each once), got {text!r}")
    return keys


def models_config(groups: list[MachineGroup]) -> str:
    """The daemon's TOML for several machine types: one `[[models]]` entry per type, each serving its device names."""
    lines = []
    for group in groups:
        lines += ["[[models]]", f'name = "{group.key}"', f"path = {json.dumps(str(group.model))}",
                  f'devices = ["{group.machine}-*"]', ""]
    return "\n".join(lines)


class DemoState:
    """Everything the live view and the summary need; updated only by the main thread."""

    def __init__(self):
        self.devices: dict[str, DeviceView] = {}
        self.alerts: dict[str, AlertRecord] = {}
        self.alert_events = 0
        self.forecasts = 0
        self.bad_forecasts: list[str] = []
        self.status: dict | None = None
        self.status_history: list[str] = []
        self.sim_start_ts: float | None = None
        self.faults: list[Fault] = []
        self.errors = 0

    def device(self, name: str) -> DeviceView:
        if name not in self.devices:
            self.devices[name] = DeviceView(name)
        return self.devices[name]

    def sim_elapsed(self, ts: float) -> float:
        return ts - self.sim_start_ts if self.sim_start_ts is not None else 0.0


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)  # polling a port that is not open yet: nothing to wait on
    return False


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if never started).

    Children run in their own session, so a Ctrl-C reaches only the demo, which stops them in order.
    """
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a running process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_retained(port: int, topic: str, timeout: float = 3.0) -> dict | None:
    """The retained JSON message on `topic`, as a newly connecting client receives it (None if there is none)."""
    import paho.mqtt.client as mqtt

    got: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgecast-demo-check-{os.getpid()}")
    client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic, 1) if not rc.is_failure else got.put(None)
    # Only the asked topic counts: a broker may send other retained messages first (unpatched amqtt 0.12.1 sends a
    # connecting client those of every other client's subscriptions: simulation/broker.py).
    client.on_message = lambda c, u, message: got.put(message.payload if message.retain else None) if message.topic == topic else None
    client.connect_async("127.0.0.1", port)
    client.loop_start()
    try:
        payload = got.get(timeout=timeout)
        return json.loads(payload) if payload else None
    except (queue.Empty, ValueError):
        return None
    finally:
        client.disconnect()
        client.loop_stop()


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or in the sbin folders Debian and Homebrew put it (often not on a user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class Broker:
    """mosquitto (config in the work dir) or the embedded broker (amqtt, simulation/broker.py), on a free port."""

    def __init__(self, kind: str, workdir: Path):
        self.requested = kind
        self.workdir = workdir
        self.kind = ""
        self.port = 0
        self.note = ""  # why the embedded broker was chosen when mosquitto was asked for by `auto`
        self.process: subprocess.Popen | None = None
        self.embedded = None

    def start(self) -> None:
        mosquitto = find_mosquitto() if self.requested in ("auto", "mosquitto") else None
        if self.requested == "mosquitto" and not mosquitto:
            raise RuntimeError("--broker mosquitto: no mosquitto binary on PATH (use --broker embedded)")
        if mosquitto:
            self.kind = "mosquitto"
            self.port = free_port()
            config = self.workdir / "mosquitto.conf"
            config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            log = open(self.workdir / "mosquitto.log", "wb")
            self.process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            if not wait_for_port(self.port, 10.0, self.process):
                raise RuntimeError(f"mosquitto did not start:\n{tail(self.workdir / 'mosquitto.log')}")
            return
        from simulation.broker import BrokerUnavailable, EmbeddedBroker

        if self.requested == "auto":
            self.note = "mosquitto is not installed: using the embedded broker (amqtt)"
        try:
            self.embedded = EmbeddedBroker("127.0.0.1", 0).start()
        except BrokerUnavailable as exc:
            if self.requested == "auto":
                raise RuntimeError("no MQTT broker: install mosquitto (apt-get install mosquitto) or the embedded one "
                                   "(pip install 'edgecast[demo]', as scripts/demo.sh does)") from exc
            raise RuntimeError(f"--broker embedded: {exc}") from exc
        self.kind = "embedded"
        self.port = self.embedded.port

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        stop_process(self.process, 5.0)


# ------------------------------------------------------------------------------------------------ the demo


def plan_fan_faults(hours: float) -> str:
    """Fault spec for the simulated fans: fan-01's impeller goes out of balance, a little after the pump's fault.

    The imbalance (+2.5..4 mm/s * speed squared, 20 min time constant) is caught within half an hour even at the
    night's low speeds, so the short runs of the tests find it too.
    """
    warmup_h = WARMUP_ROWS / 60.0
    onset = warmup_h + max(0.6, 0.4 * (hours - warmup_h))
    return f"imbalance:fan-01@{onset:.2f}+{min(3.0, max(0.5, hours - onset)):.2f}"


def plan_faults(devices: int, hours: float) -> str:
    """Fault specs for the simulator: pump-01 overheats a few hours in; on long runs pump-02 wears a bearing out.

    Overheating (+12..18 degC within ~30 min) is caught within minutes; bearing wear ramps up slowly and is
    caught after 2-3 simulated hours, so it is injected only when the run is long enough (the default one is).
    """
    warmup_h = WARMUP_ROWS / 60.0
    live_h = hours - warmup_h
    # At least 30 healthy minutes of forecasts before the first fault.
    onset = warmup_h + max(0.5, 0.3 * live_h)
    specs = [f"overheating:pump-01@{onset:.2f}+{min(2.0, max(0.5, hours - onset)):.2f}"]
    wear_onset = warmup_h + 0.5
    if devices >= 3 and hours - wear_onset >= 6.5:
        specs.append(f"bearing_wear:pump-02@{wear_onset:.2f}+6")
    return ",".join(specs)


class Demo:
    def __init__(self, args: argparse.Namespace, out=sys.stdout):
        self.args = args
        self.out = out
        self.style = Style(out)
        self.state = DemoState()
        self.events: queue.Queue = queue.Queue()
        self.started = time.monotonic()
        self.table_lines = 0  # lines of the live table currently on screen (tty mode)
        self.last_snapshot = 0.0
        self.daemon: subprocess.Popen | None = None
        self.subscriber = None
        self.broker: Broker | None = None
        self.hours = 0.0
        self.groups: list[MachineGroup] = []
        self.peak_rss: int | None = None
        self.daemon_exit: int | None = None
        self.offline_seen = False
        self.retained_state = "unknown"
        self.synth_exit: int | None = None

    # ---------------------------------------------------------------- printing

    def say(self, text: str = "") -> None:
        """A line that stays (above the live table in tty mode)."""
        self.clear_table()
        print(text, file=self.out, flush=True)

    def clear_table(self) -> None:
        if self.table_lines:
            self.out.write(f"\x1b[{self.table_lines}F\x1b[J")
            self.table_lines = 0

    def wall(self) -> float:
        return time.monotonic() - self.started

    def stamp(self, ts: float | None = None) -> str:
        sim = sim_clock(self.state.sim_elapsed(ts)) if ts is not None and self.state.sim_start_ts else "       "
        return self.style.dim(f"[{self.wall():5.1f}s {sim}]")

    def table(self) -> list[str]:
        """The live view, kept under 80 columns so the redraw never wraps."""
        s, st = self.style, self.state
        latest = max((d.last_ts for d in st.devices.values() if d.last_ts), default=None)
        status = st.status.get("state", "?") if st.status else "waiting"
        status_text = s.green(status) if status == "online" else s.red(status)
        head = (
            f" {s.bold('sim ' + (sim_clock(st.sim_elapsed(latest)) if latest else '--'))} of {self.hours:.1f} h"
            f"   wall {self.wall():3.0f}/{self.args.duration:.0f} s   agent {status_text}   forecasts {st.forecasts}"
        )
        lines = [head]
        for group in self.groups:
            lines += self.group_table(group)
        return lines

    def group_table(self, group: MachineGroup) -> list[str]:
        """One machine type's rows of the live view: its temperature and vibration, observed and forecast."""
        s, st = self.style, self.state
        (temp_feature, temp_title), (vib_feature, vib_title) = group.temp, group.vibration
        mine = [d for name, d in sorted(st.devices.items()) if group.owns(name)]
        horizon_min = next((len(d.forecast.get(temp_feature, [])) * d.period_s / 60 for d in mine if d.forecast), 10)
        later = f"+{horizon_min:g}m"
        lines = [
            s.dim(f" {'':<14}  {temp_title + ' ' + s.degree:^20}   {vib_title:^13}"),
            s.dim(f" {group.machine:<8}{'fcsts':>6}  {'now':>6} {'+1m':>6} {later:>6}   {'now':>6} {later:>6}   {'window':>6}  alert"),
        ]
        for d in mine:
            name = d.name
            if not d.forecast:
                lines.append(f" {name:<8}{d.forecasts:>6}  {s.dim('waiting for the first forecast')}")
                continue
            nan = [float("nan")]
            temp, vib = d.forecast.get(temp_feature, nan), d.forecast.get(vib_feature, nan)
            temp_now = d.observed.get(temp_feature, float("nan"))
            vib_now = d.observed.get(vib_feature, float("nan"))
            if d.open_alert is not None:
                since = sim_clock(st.sim_elapsed(d.open_alert["started_at"]))
                alert = s.severity(d.open_alert["severity"], f"{d.open_alert['severity'].upper()} {since}")
            else:
                alert = s.green("ok")
            lines.append(f" {name:<8}{d.forecasts:>6}  {temp_now:6.1f} {temp[0]:6.1f} {temp[-1]:6.1f}"
                         f"   {vib_now:6.2f} {vib[-1]:6.2f}   {d.completeness or 0:6.2f}  {alert}")
        return lines

    def render(self, force_snapshot: bool = False) -> None:
        if self.style.tty:
            self.clear_table()
            lines = self.table()
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
            self.table_lines = len(lines)
        elif force_snapshot or self.wall() - self.last_snapshot >= 15.0:
            # Not a terminal (a log file, CI): a snapshot of the table now and then instead of a live redraw.
            self.last_snapshot = self.wall()
            for line in self.table():
                print(line, file=self.out)
            self.out.flush()

    # ---------------------------------------------------------------- MQTT

    def connect_subscriber(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        ready = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                self.events.put(("error", f"subscriber could not connect: {reason_code}", time.monotonic()))
                return
            client.subscribe([("edgecast/#", 1), ("sensors/+/telemetry", 0)])

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            ready.set()

        def on_message(client, userdata, message):
            self.events.put((message.topic, message.payload, time.monotonic()))

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgecast-demo-view-{os.getpid()}")
        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        client.connect_async("127.0.0.1", port, keepalive=30)
        client.loop_start()
        self.subscriber = client
        if not ready.wait(10.0):
            raise RuntimeError(f"could not subscribe at the broker on port {port}")

    def handle(self, topic: str, payload, wall: float) -> None:
        st, s = self.state, self.style
        if topic == "error":
            raise RuntimeError(payload)
        if topic == "synth":
            self.say(f"{self.stamp()} {s.dim('simulator: ' + payload)}")
            return
        parts = topic.split("/")
        try:
            data = json.loads(payload) if payload else None
        except ValueError:
            return
        if parts[0] == "sensors" and len(parts) == 3 and isinstance(data, dict):
            device = st.device(parts[1])
            values = data.get("values") or {}
            device.observed = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
            ts = data.get("ts")
            if st.sim_start_ts is None and isinstance(ts, (int, float)):
                st.sim_start_ts = float(ts)  # the warm-up burst starts at the first simulated sample
            for fault in st.faults:
                if fault.device == parts[1] and isinstance(ts, (int, float)) and ts >= fault.start_ts:
                    device.first_sample_wall_after.setdefault(fault.start_ts, wall)
            return
        if parts[0] != "edgecast" or data is None:
            return
        if parts[1:3] == ["agent", AGENT_ID] and parts[3:] == ["status"]:
            st.status = data
            state = data.get("state", "?")
            st.status_history.append(state)
            if state == "offline":
                self.offline_seen = True
            model = data.get("model") or {}
            text = s.green(state) if state == "online" else s.red(state)
            models = [m for m in data.get("models") or [] if isinstance(m, dict)]  # only with several models
            if models:
                running = " (models " + ", ".join(f"{m.get('model')}: {m.get('name')} {m.get('version')}" for m in models) + ")"
            else:
                running = f" (model {model.get('name')} {model.get('version')})" if model else ""
            self.say(f"{self.stamp()} agent {AGENT_ID} is {text}" + running
                     + (f": {data['reason']}" if data.get("reason") else ""))
            return
        if parts[1] == "agent" and parts[3:] == ["errors"]:
            st.errors += 1
            if st.errors <= 3:
                self.say(f"{self.stamp()} {s.dim('agent rejected input: ' + str(data.get('reason')) + ' ' + str(data.get('detail')))}")
            return
        if len(parts) == 3 and parts[2] == "forecast":
            self.on_forecast(parts[1], data)
        elif len(parts) == 3 and parts[2] == "alert":
            self.on_alert(parts[1], data, wall)

    def on_forecast(self, device_name: str, data: dict) -> None:
        st = self.state
        st.forecasts += 1
        device = st.device(device_name)
        device.forecasts += 1
        try:
            device.last_ts = float(data["ts"])
            device.forecast = {k: [float(x) for x in v] for k, v in data["forecast"].items()}
            device.completeness = float(data.get("completeness", 0.0))
            device.period_s = float(data.get("period_s", 60.0))
        except (KeyError, TypeError, ValueError) as exc:
            st.bad_forecasts.append(f"{device_name}: {exc!r}")

    def on_alert(self, device_name: str, data: dict, wall: float) -> None:
        st, s = self.state, self.style
        st.alert_events += 1
        alert_id, state = data.get("alert_id", "?"), data.get("state", "?")
        severity = data.get("severity", "warning")
        device = st.device(device_name)
        record = st.alerts.get(alert_id)
        if record is None:
            record = AlertRecord(alert_id, device_name, severity, float(data.get("ts", 0)), float(data.get("started_at", 0)), wall)
            st.alerts[alert_id] = record
        # Print the opening and the first escalation to critical; other updates only refresh the table.
        worth_a_line = state == "new" or (state == "update" and severity == "critical" and record.severity != "critical")
        if severity == "critical":
            record.severity = "critical"
        score = float(data.get("score") or 0.0)
        if data.get("features") and (score >= record.peak_score or not record.features):
            record.features = data["features"]  # the attribution at the alert's worst moment
        record.peak_score = max(record.peak_score, score)
        top = ""
        if data.get("features"):
            f = max(data["features"], key=lambda item: abs(item.get("z") or 0))
            top = f"  {f['name']} {f['observed']:.2f}, expected {f['expected']:.2f} (z {f['z']:+.0f})"
        if state == "end":
            record.ended_at = float(data.get("ended_at") or data.get("ts") or 0)
            device.open_alert = None
            lasted = (record.ended_at - record.started_at) / 60.0
            self.say(f"{self.stamp(data.get('ts'))} {s.green('alert ended')}  {device_name}  {alert_id} (after {lasted:.0f} simulated min)")
            return
        device.open_alert = {"alert_id": alert_id, "severity": severity, "started_at": record.started_at}
        if not worth_a_line:
            return
        label = "ALERT" if state == "new" else "alert escalated to"
        self.say(f"{self.stamp(data.get('ts'))} {s.severity(severity, label + ' ' + severity.upper())}  {s.bold(device_name)}"
                 f"  score {score:.1f} (threshold {float(data.get('threshold') or 0):.1f})  {alert_id}{top}")

    def drain(self, until: float) -> None:
        """Handle events until the monotonic time `until`, redrawing the view a few times a second."""
        next_render = 0.0
        while True:
            now = time.monotonic()
            if now >= until:
                break
            try:
                topic, payload, wall = self.events.get(timeout=min(0.25, until - now))
                self.handle(topic, payload, wall)
            except queue.Empty:
                pass
            if time.monotonic() >= next_render:
                self.render()
                next_render = time.monotonic() + 0.3

    # ---------------------------------------------------------------- run

    def start_daemon(self, workdir: Path, port: int) -> None:
        env = dict(os.environ)
        env.update({
            "EDGECAST_MQTT__HOST": "127.0.0.1",
            "EDGECAST_MQTT__PORT": str(port),
            "EDGECAST_AGENT_ID": AGENT_ID,
        })
        env.setdefault("EDGECAST_LOG__LEVEL", "INFO")
        env.setdefault("EDGECAST_STATE__DIRECTORY", str(workdir / "agent-state"))  # the outbox, beside the demo's files
        command = [sys.executable, "-m", "agent", "run"]
        if len(self.groups) > 1:
            # Several machine types: one [[models]] entry each (the daemon refuses [model] beside [[models]]).
            config = workdir / "agent.toml"
            config.write_text(models_config(self.groups), encoding="utf-8")
            command += ["--config", str(config)]
        elif self.args.model or self.groups[0].key != "pumps":
            env["EDGECAST_MODEL__PATH"] = str(self.groups[0].model)
        log = open(workdir / "agent.log", "wb")
        self.daemon = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        log.close()

    def wait_for_online(self, workdir: Path) -> None:
        deadline = time.monotonic() + STATUS_WAIT_S
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with code {self.daemon.returncode} before going online:\n"
                                   f"{tail(workdir / 'agent.log')}")
            self.drain(time.monotonic() + 0.2)
            if self.state.status and self.state.status.get("state") == "online":
                return
        raise RuntimeError(f"the daemon did not report online within {STATUS_WAIT_S:.0f} s:\n{tail(workdir / 'agent.log')}")

    def start_synth(self, workdir: Path, port: int) -> None:
        """One simulator per machine type, on one simulated clock (the same --start-ts and --hours)."""
        args = self.args
        live_s = max(10.0, args.duration - self.wall() - TAIL_BUDGET_S - SIM_START_BUDGET_S)
        self.hours = round(WARMUP_ROWS / 60.0 + live_s * args.speed / 3600.0, 2)
        # The simulated clock starts at 00:00 UTC of the day that lets it end by now (the daemon accepts rows up to
        # ingest.max_age_s old, and none from the future), the same for each type. A start that followed the wall
        # clock put the fleet's daily rhythms at a different phase in every run: the same seed, another fleet.
        latest = int(time.time() // 60 * 60) - (int(self.hours * 3600.0 // 60) - 1) * 60
        start_ts = latest - latest % 86400
        several = len(self.groups) > 1
        for group in self.groups:
            faults = plan_faults(group.devices, self.hours) if group.key == "pumps" else plan_fan_faults(self.hours)
            group.schedule = workdir / ("faults.json" if group.key == "pumps" else f"faults-{group.key}.json")
            command = [
                sys.executable, "-m", "training", "synth", "--publish", "--machine", group.machine,
                "--devices", str(group.devices), "--hours", f"{self.hours}", "--seed", str(args.seed),
                "--start-ts", str(start_ts), "--faults", faults, "--host", "127.0.0.1", "--port", str(port),
                "--speed", f"{args.speed:g}", "--warmup-rows", str(WARMUP_ROWS), "--schedule-out", str(group.schedule),
            ]
            group.synth = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
            prefix = f"({group.key}) " if several else ""

            def forward_output(process=group.synth, prefix=prefix):
                for line in process.stdout:
                    line = line.strip()
                    if line and not line.startswith("synth: fault "):
                        self.events.put(("synth", prefix + line.removeprefix("synth: "), time.monotonic()))

            threading.Thread(target=forward_output, name=f"synth-output-{group.key}", daemon=True).start()

    def synths(self) -> list[subprocess.Popen]:
        return [g.synth for g in self.groups if g.synth is not None]

    def load_schedule(self) -> None:
        """Each simulator writes its fault schedule before publishing; wait for them."""
        deadline = time.monotonic() + 30.0
        faults: dict[str, list[Fault]] = {}
        while time.monotonic() < deadline:
            for group in self.groups:
                if group.key in faults or not group.schedule.is_file():
                    if group.synth.poll() is not None and not group.schedule.is_file():
                        raise RuntimeError(f"the simulator exited with code {group.synth.returncode} before writing its schedule")
                    continue
                try:
                    items = json.loads(group.schedule.read_text())
                    faults[group.key] = [Fault(i["device"], i["kind"], float(i["start_ts"]), float(i["end_ts"])) for i in items]
                except (ValueError, KeyError):
                    pass  # still being written
            if len(faults) == len(self.groups):
                self.state.faults = [f for group in self.groups for f in faults[group.key]]
                return
            self.drain(time.monotonic() + 0.2)
        raise RuntimeError("the simulator did not write its fault schedule within 30 s")

    def run(self) -> int:
        args, s = self.args, self.style
        with tempfile.TemporaryDirectory(prefix="edgecast-demo-") as tmp:
            workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                return self._run(workdir)
            except KeyboardInterrupt:
                self.say(s.yellow("interrupted: stopping everything"))
                return 130
            except BrokenPipeError:
                return 1  # the reader of our output went away (e.g. `| head`): just clean up
            except RuntimeError as exc:
                self.say(s.red(f"demo failed: {exc}"))
                return 1
            finally:
                self.clear_table()
                self.shutdown()
                if args.workdir:
                    print(s.dim(f"logs and fault schedule kept in {workdir}"), file=self.out, flush=True)

    def _run(self, workdir: Path) -> int:
        args, s = self.args, self.style
        self.groups = self.machine_groups()
        for group in self.groups:
            if not (group.model / "manifest.json").is_file():
                build = "build-shipped" + ("" if group.key == "pumps" else f" --machine {group.machine}")
                raise RuntimeError(f"no model bundle at {group.model} (export one with `python -m training {build}`)")

        if len(self.groups) == 1:
            group = self.groups[0]
            self.say(s.bold("edgecast demo") + f": {group.devices} simulated {group.key} {s.arrow} MQTT {s.arrow} edge daemon "
                     f"(model {group.model.name}) {s.arrow} forecasts and alerts, for about {args.duration:.0f} s")
        else:
            fleet = " and ".join(f"{g.devices} {g.key}" for g in self.groups)
            models = ", ".join(f"{g.model.name} for {g.machine}-*" for g in self.groups)
            self.say(s.bold("edgecast demo") + f": {fleet} simulated {s.arrow} MQTT {s.arrow} one edge daemon with "
                     f"{len(self.groups)} models ({models}) {s.arrow} forecasts and alerts, for about {args.duration:.0f} s")
        self.broker = Broker(args.broker, workdir)
        self.broker.start()
        if self.broker.note:
            self.say(f"{self.stamp()} {s.dim(self.broker.note)}")
        self.say(f"{self.stamp()} broker: {self.broker.kind} on 127.0.0.1:{self.broker.port}")
        self.connect_subscriber(self.broker.port)
        self.start_daemon(workdir, self.broker.port)
        self.say(f"{self.stamp()} daemon started (pid {self.daemon.pid}), loading the model...")
        self.wait_for_online(workdir)

        self.start_synth(workdir, self.broker.port)
        self.load_schedule()
        planned = ", ".join(f"{f.kind} on {f.device}" for f in self.state.faults) or "none"
        others = self.groups[0].key if len(self.groups) == 1 else "machines"
        self.say(f"{self.stamp()} simulator: {self.hours:.1f} simulated hours at {args.speed:g}x real time; "
                 f"faults to find: {s.bold(planned)}; the other {others} are healthy")

        # Live view until the simulators are done (plus a moment for the last forecasts) or the time is up.
        deadline = self.started + args.duration - TAIL_BUDGET_S / 2
        while time.monotonic() < deadline:
            self.drain(min(deadline, time.monotonic() + 0.5))
            if all(p.poll() is not None for p in self.synths()):
                self.synth_exit = max((p.returncode for p in self.synths()), key=abs)  # a failure wins over 0
                self.drain(min(deadline, time.monotonic() + 2.0))
                break
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited early with code {self.daemon.returncode}:\n{tail(workdir / 'agent.log')}")
        if any(p.poll() is None for p in self.synths()):
            self.say(f"{self.stamp()} {s.dim('time is up: stopping the simulator')}")
            for process in self.synths():
                stop_process(process, 5.0)
        self.render(force_snapshot=True)
        self.clear_table()

        # Stop the daemon the way systemd would; its retained status must go offline.
        self.peak_rss = peak_rss_kib(self.daemon.pid)
        self.daemon_exit = stop_process(self.daemon, 15.0)
        offline_deadline = time.monotonic() + 5.0
        while not self.offline_seen and time.monotonic() < offline_deadline:
            self.drain(min(offline_deadline, time.monotonic() + 0.2))
        # What a client connecting now is told: the retained status must say offline.
        retained = read_retained(self.broker.port, f"edgecast/agent/{AGENT_ID}/status")
        self.retained_state = (retained or {}).get("state", "nothing retained")
        self.table_lines = 0
        return self.summary()

    def machine_groups(self) -> list[MachineGroup]:
        args = self.args
        groups = []
        for key in parse_machines(args.machines):
            machine, bundle, temp, vibration = MACHINE_TYPES[key]
            given = args.model if key == "pumps" else args.fan_model
            devices = args.devices if key == "pumps" else args.fans
            groups.append(MachineGroup(key, machine, devices, Path(given).resolve() if given else shipped_bundle(bundle), temp, vibration))
        return groups

    def group_of(self, device: str) -> MachineGroup | None:
        return next((g for g in self.groups if g.owns(device)), None)

    def shutdown(self) -> None:
        for process in (*self.synths(), self.daemon):
            stop_process(process, 5.0)
        if self.subscriber is not None:
            self.subscriber.disconnect()
            self.subscriber.loop_stop()
        if self.broker is not None:
            self.broker.stop()

    # ---------------------------------------------------------------- summary

    @staticmethod
    def during(fault: Fault, alert: AlertRecord) -> bool:
        """The alert opened while the fault was present (not before it, not for the return to normal after it)."""
        return fault.start_ts <= alert.opened_ts <= fault.end_ts

    def summary(self) -> int:
        st, s = self.state, self.style
        wall = self.wall()
        faulty = {f.device for f in st.faults}
        all_devices = sorted(st.devices)
        print(file=self.out)
        print(s.bold(f"{s.rule * 3} edgecast demo: summary {s.rule * 50}"), file=self.out)
        fleet = " and ".join(f"{g.devices} {g.key}" for g in self.groups)
        noun = self.groups[0].machine if len(self.groups) == 1 else "machine"  # "no healthy pump alerted"
        print(f"Simulated {self.hours:.1f} h of {fleet} in {wall:.0f} s of wall time "
              f"({self.args.speed:g}x), broker {self.broker.kind}, agent {AGENT_ID}.", file=self.out)

        print("\n" + s.bold("Faults injected"), file=self.out)
        detected_all = True
        delays: dict[str, list[float | None]] = {g.key: [] for g in self.groups}  # simulated minutes; None: missed
        for fault in st.faults:
            group = self.group_of(fault.device)
            onset = sim_clock(st.sim_elapsed(fault.start_ts))
            window = [a for a in st.alerts.values() if a.device == fault.device and self.during(fault, a)]
            head = f"  {fault.device:<8} {fault.kind:<13} onset {onset}, lasts {(fault.end_ts - fault.start_ts) / 3600:.1f} h"
            if not window:
                detected_all = False
                if group is not None:
                    delays[group.key].append(None)
                print(f"{head}  {s.red('NOT DETECTED')}", file=self.out)
                continue
            first = min(window, key=lambda a: a.opened_ts)
            sim_min = (first.opened_ts - fault.start_ts) / 60.0
            if group is not None:
                delays[group.key].append(sim_min)
            seen = st.device(fault.device).first_sample_wall_after.get(fault.start_ts)
            wall_s = first.opened_wall - seen if seen is not None else sim_min * 60.0 / self.args.speed
            print(f"{head}  {s.green('detected')} after {sim_min:.0f} simulated min ({wall_s:.1f} s wall)", file=self.out)

        print("\n" + s.bold("Alerts raised"), file=self.out)
        if not st.alerts:
            print("  none", file=self.out)
        false_alerts = []
        for a in sorted(st.alerts.values(), key=lambda a: a.opened_ts):
            ended = f"ended {sim_clock(st.sim_elapsed(a.ended_at))}" if a.ended_at else "still open"
            culprit = ""
            if a.features:
                top = max(a.features, key=lambda item: abs(item.get("z") or 0))
                culprit = f", mostly {top['name']} (z {top['z']:+.1f})"
            note = ""
            if a.device not in faulty:
                false_alerts.append(a)
                note = "  " + s.red(f"<- FALSE ALERT (healthy {getattr(self.group_of(a.device), 'machine', 'device')})")
            elif not any(f.device == a.device and self.during(f, a) for f in st.faults):
                note = "  " + s.dim("(outside the fault: not counted as its detection)")
            print(f"  {a.device:<8} {s.severity(a.severity, f'{a.severity:<8}')} {a.alert_id}  opened {sim_clock(st.sim_elapsed(a.opened_ts))}, "
                  f"{ended}, peak score {a.peak_score:.1f}{culprit}{note}", file=self.out)
        print(file=self.out)
        for group in self.groups:
            healthy = [d for d in all_devices if d not in faulty and group.owns(d)]
            quiet = [d for d in healthy if not any(a.device == d for a in false_alerts)]
            false_here = [a for a in false_alerts if group.owns(a.device)]
            print(f"False alerts on healthy {group.key}: {len(false_here)}"
                  + (f" ({', '.join(quiet)} stayed quiet)" if quiet else ""), file=self.out)
        if len(self.groups) > 1:
            self.print_per_type(delays, false_alerts)
        per_device = ", ".join(f"{d} {st.devices[d].forecasts}" for d in all_devices)
        print(f"Forecasts received: {st.forecasts} ({per_device}); alert events: {st.alert_events}", file=self.out)
        if st.bad_forecasts:
            print(s.red(f"Malformed forecasts: {len(st.bad_forecasts)} (first: {st.bad_forecasts[0]})"), file=self.out)
        memory = f"{self.peak_rss / 1024:.1f} MiB" if self.peak_rss else "unknown"
        offline = (s.green("went offline") if self.offline_seen and self.retained_state == "offline"
                   else s.red(f"did NOT go offline (retained: {self.retained_state})"))
        print(f"Daemon: peak resident memory {memory} (VmHWM); stopped with SIGTERM, exit code {self.daemon_exit}; "
              f"retained status {offline}", file=self.out)
        if self.synth_exit not in (0, None):
            print(s.red(f"The simulator exited with code {self.synth_exit}; see its lines above."), file=self.out)
        ok = detected_all and not false_alerts and bool(st.faults)
        problems = [text for bad, text in [(not st.faults, "no fault was injected"), (not detected_all, "a fault went undetected"),
                                            (bool(false_alerts), f"a healthy {noun} alerted")] if bad]
        verdict = (s.green(s.bold(f"PASS: every injected fault was detected and no healthy {noun} alerted")) if ok
                   else s.red("FAIL: " + "; ".join(problems)))
        print("\n" + verdict, file=self.out, flush=True)
        return 0 if ok else 1


    def print_per_type(self, delays: dict[str, list[float | None]], false_alerts: list[AlertRecord]) -> None:
        """One line per machine type: its model, faults injected and detected, time to detect, false alerts."""
        s = self.style
        print("\n" + s.bold("Per machine type"), file=self.out)
        for group in self.groups:
            found = [d for d in delays[group.key] if d is not None]
            injected = len(delays[group.key])
            after = f" after {', '.join(f'{d:.0f}' for d in found)} simulated min" if found else ""
            detected = f"{len(found)} detected{after}"
            detected = s.green(detected) if len(found) == injected else s.red(detected)
            false_here = sum(1 for a in false_alerts if group.owns(a.device))
            print(f"  {group.key:<6} {group.model.name:<10} {group.devices} devices: {injected} fault(s) injected, {detected}; "
                  f"{false_here} false alert(s) on healthy {group.key}", file=self.out)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=110.0, help="wall seconds the demo runs (default 110)")
    parser.add_argument("--machines", default="pumps",
                        help="machine types to simulate, comma-separated: pumps (default), fans, or pumps,fans (one daemon with "
                        "a [[models]] entry per type: pump-lstm for pump-*, fan-lstm for fan-*)")
    parser.add_argument("--devices", type=int, default=4, help="simulated pumps, at least 2 (default 4)")
    parser.add_argument("--fans", type=int, default=3, help="simulated fans with --machines ...,fans, at least 2 (default 3)")
    parser.add_argument("--speed", type=float, default=360.0, help="simulated seconds per real second (default 360)")
    parser.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                        help="auto: mosquitto when installed, else the embedded broker (amqtt: the demo extra)")
    parser.add_argument("--model", help="model bundle folder of the pumps (default: the shipped pump-lstm)")
    parser.add_argument("--fan-model", metavar="DIR", help="model bundle folder of the fans (default: the shipped fan-lstm)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (default 7)")
    parser.add_argument("--workdir", help="keep the logs, broker config and fault schedule in this folder")


def run(args: argparse.Namespace) -> int:
    try:
        machines = parse_machines(args.machines)
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    if args.devices < 2:
        print("demo: --devices must be at least 2 (pump-01 is the faulty one)", file=sys.stderr)
        return 2
    if "fans" in machines and args.fans < 2:
        print("demo: --fans must be at least 2 (fan-01 is the faulty one)", file=sys.stderr)
        return 2
    if args.duration < 20 or args.speed <= 0:
        print("demo: --duration must be at least 20 s and --speed positive", file=sys.stderr)
        return 2

    # SIGTERM (e.g. from a CI runner) cleans up like Ctrl-C does.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return Demo(args).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
