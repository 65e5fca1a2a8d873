"""Synthetic pump fleet: a centrifugal pump driven by an induction motor, one row per device per period.

numpy only (paho-mqtt is imported lazily by --publish). Deterministic for a seed: every device draws from
its own generator seeded by (seed, device index), so adding devices never changes the existing ones.

Load (0..1, fraction of rated flow), per device:
- a duty cycle between a high and a low set-point, with its own period (2-6 h), duty fraction and phase;
- random set-point changes (every ~2 h on average the high set-point is redrawn in 0.70..1.00);
- a daily demand rhythm (+-8 %, peak in the afternoon);
- the variable-frequency drive ramps the speed: at most 3 % of rated load per minute, then a 2 min lag.
  Ramps make switching predictable after the first minute, as on a real VFD-driven pump.

Features (per-device constants vary a little from pump to pump):
- `motor_current` (A): no-load current (10-12 A) + load-proportional term (~26 A at full load) + noise 0.25 A.
- `outlet_pressure` (bar): 1.8 + ~4 * load**1.5 (pump affinity law), first-order lag 2 min, noise 0.04 bar.
- `bearing_temp` (degC): ambient (21-25 degC, daily rhythm +-3 degC, warmest mid-afternoon) + frictional rise
  (16 + 24 * load degC) through a first-order thermal lag of ~20 min + slow drift (AR(1)) + noise 0.15 degC.
  Range roughly 40-70 degC.
- `vibration_rms` (mm/s): base (1.0-1.4) + 1.5 * load + noise 0.06 mm/s (a little multiplicative). ~1.3-3 mm/s.

Dropouts: whole rows missing (the device did not send): isolated rows at `dropout_rate` plus occasional bursts
of 2-4 rows. Dropped rows are absent from `Fleet.rows`.

Faults (label = 1 and `fault` = kind from onset to end; the effect stops at the end, as after maintenance):
- `bearing_wear`: severity s ramps 0 -> 1 over the fault; vibration mean rises by up to +1.5 mm/s and becomes
  erratic (impacting: extra noise up to 0.6 mm/s), bearing temperature creeps up by up to +6 degC.
  Detectable when the erratic part reaches a few sigma of the healthy noise.
- `overheating` (e.g. lubricant loss): bearing temperature climbs +12..+18 degC with a 5 min time constant
  (95 % of it within 15 min), motor current rises by ~1 A (more friction).
- `stuck_sensor`: one sensor (drawn per fault) repeats its last value exactly.
- `spikes`: a burst period in which vibration (+1.5..4 mm/s) and/or pressure (+0.8..2 bar) show single-sample
  spikes on ~8 % of the rows.

Fault specs: `KIND:DEVICE@START_HOURS+DURATION_HOURS` (start relative to the first simulated sample);
`auto` = about half the devices get one fault each (kinds cycle so that 4+ faulty devices cover all kinds);
`none` = all healthy.

Other machine types (`--machine fan`: simulation/fans.py, ventilation fans with other sensors and faults) are a
MachineType each: their own physics and fault kinds, the same fleet assembly, CSV layout (the type's features in
place of the pump's) and publishing as here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]
COLUMNS = ["ts", "device"] + FEATURES + ["label", "fault"]
FAULT_KINDS = ("bearing_wear", "overheating", "stuck_sensor", "spikes")
TYPICAL_HOURS = {"bearing_wear": (6.0, 18.0), "overheating": (1.0, 3.0), "stuck_sensor": (1.0, 4.0), "spikes": (1.0, 3.0)}
MACHINES = ("pump", "fan")  # --machine choices; each a MachineType (machine_type(name))
DEFAULT_START_TS = 1767571200  # 2026-01-05T00:00:00Z: a fixed clock keeps CSV output reproducible
DAY_S = 86400.0

_SPEC_RE = re.compile(r"^(?P<kind>[a-z_]+):(?P<device>[\w.-]+)@(?P<start>[0-9.]+)\+(?P<dur>[0-9.]+)$")


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    device: str
    start_h: float
    duration_h: float


@dataclass
class FleetConfig:
    devices: int = 4
    hours: float = 14 * 24.0
    seed: int = 0
    period_s: int = 60
    start_ts: int = DEFAULT_START_TS
    faults: str | list[FaultSpec] = "auto"  # "auto" | "none" | list of FaultSpec
    dropout_rate: float = 0.003  # isolated missing rows
    dropout_burst_rate: float = 0.0002  # starts of 2-4 row gaps


@dataclass
class Fleet:
    rows: dict[str, np.ndarray]  # column -> array, sorted by ts then device (dropouts removed)
    schedule: list[dict] = field(default_factory=list)  # [{"device", "kind", "start_ts", "end_ts"}]
    config: FleetConfig | None = None
    features: list[str] = field(default_factory=lambda: list(FEATURES))  # the sensor columns, in CSV order


@dataclass(frozen=True)
class MachineType:
    """A kind of simulated machine: device names, sensors, fault kinds and physics.

    `simulate(cfg, index, t_abs, specs)` returns (values (N, F) in `features` order, label (N,), fault kind per
    row (N,), observed mask (N,)) for one device, drawing only from generators seeded by (cfg.seed, index, ...),
    so that every type keeps the fleet's determinism; generate_fleet assembles the devices the same way for all.
    """

    name: str  # the --machine value and the device-name prefix: pump-00, fan-00, ...
    features: tuple[str, ...]
    fault_kinds: tuple[str, ...]
    typical_hours: dict[str, tuple[float, float]]  # kind -> shortest, longest duration of an `auto` fault
    simulate: Callable

    def device_name(self, index: int) -> str:
        return f"{self.name}-{index:02d}"


def device_name(index: int) -> str:
    return f"pump-{index:02d}"


def machine_type(name: str) -> MachineType:
    """The MachineType for a --machine value; ValueError naming the choices."""
    if name == "pump":
        return PUMP
    if name == "fan":
        from simulation.fans import FAN  # imported here: fans imports this module

        return FAN
    raise ValueError(f"unknown machine type {name!r}: one of {', '.join(MACHINES)}")


def parse_fault_specs(text: str, kinds: tuple[str, ...] = FAULT_KINDS) -> str | list[FaultSpec]:
    """Parse the --faults value (fault kinds of one machine type); raises ValueError naming the bad part."""
    text = text.strip()
    if text in ("auto", "none"):
        return text
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _SPEC_RE.match(part)
        if not match:
            raise ValueError(f"bad fault spec {part!r}: expected KIND:DEVICE@START_HOURS+DURATION_HOURS")
        if match["kind"] not in kinds:
            raise ValueError(f"bad fault kind {match['kind']!r} in {part!r}: one of {', '.join(kinds)}")
        duration = float(match["dur"])
        if duration <= 0:
            raise ValueError(f"fault duration must be > 0 in {part!r}")
        specs.append(FaultSpec(match["kind"], match["device"], float(match["start"]), duration))
    return specs


def _auto_faults(cfg: FleetConfig, machine: MachineType | None = None) -> list[FaultSpec]:
    machine = machine or PUMP
    rng = np.random.default_rng([cfg.seed, 9_999])
    n_faulty = max(1, round(cfg.devices / 2)) if cfg.devices >= 2 else 0
    faulty = rng.permutation(cfg.devices)[:n_faulty]
    kinds = [str(k) for k in rng.permutation(machine.fault_kinds)]
    specs = []
    for n, index in enumerate(sorted(faulty)):
        kind = kinds[n % len(kinds)]
        low, high = machine.typical_hours[kind]
        duration = min(rng.uniform(low, high), cfg.hours * 0.3)
        # Onset after the first 10 % so every fault has healthy history before it.
        start = rng.uniform(cfg.hours * 0.1, max(cfg.hours * 0.1, cfg.hours - duration))
        specs.append(FaultSpec(kind, machine.device_name(int(index)), round(start, 3), round(duration, 3)))
    return specs


def _first_order_lag(target: np.ndarray, tau_periods: float, initial: float | None = None) -> np.ndarray:
    """y[t] = y[t-1] + (target[t] - y[t-1]) * (1 - exp(-1/tau)): a first-order system sampled once per period."""
    gain = 1.0 - math.exp(-1.0 / tau_periods)
    out = np.empty_like(target)
    y = target[0] if initial is None else initial
    for t in range(target.shape[0]):
        y += (target[t] - y) * gain
        out[t] = y
    return out


def _load_profile(rng: np.random.Generator, t_s: np.ndarray, period_s: int) -> np.ndarray:
    n = t_s.shape[0]
    cycle_s = rng.uniform(2.0, 6.0) * 3600.0
    duty = rng.uniform(0.45, 0.7)
    phase = rng.uniform(0.0, 1.0)
    low = rng.uniform(0.25, 0.4)
    # High set-point redrawn at random times (Poisson, mean 2 h between changes).
    change = rng.random(n) < period_s / 7200.0
    change[0] = True
    draws = rng.uniform(0.7, 1.0, size=n)
    high = draws[np.maximum.accumulate(np.where(change, np.arange(n), 0))]
    on = ((t_s / cycle_s + phase) % 1.0) < duty
    daily = 1.0 + 0.08 * np.sin(2 * np.pi * (t_s / DAY_S - 0.375))  # peak around 15:00
    setpoint = np.clip(np.where(on, high, low) * daily, 0.15, 1.05)
    # VFD: rate-limited ramp, then a short lag.
    ramped = _rate_limited(setpoint, 0.03 * period_s / 60.0)
    return _first_order_lag(ramped, 2.0 * 60.0 / period_s)


def _rate_limited(setpoint: np.ndarray, max_step: float) -> np.ndarray:
    """A drive's ramp: follows the set-point by at most `max_step` per period."""
    ramped = np.empty(setpoint.shape[0])
    level = setpoint[0]
    for t in range(setpoint.shape[0]):
        level += np.clip(setpoint[t] - level, -max_step, max_step)
        ramped[t] = level
    return ramped


def _fault_rows(cfg: FleetConfig, spec: FaultSpec, n: int) -> tuple[int, int] | None:
    """The rows [start, stop) a fault covers among the n simulated periods, or None when it falls outside them."""
    start = int(round(spec.start_h * 3600.0 / cfg.period_s))
    stop = min(n, int(round((spec.start_h + spec.duration_h) * 3600.0 / cfg.period_s)))
    return None if start >= n or stop <= start else (start, stop)


def _dropouts(rng: np.random.Generator, cfg: FleetConfig, n: int) -> np.ndarray:
    """The observed mask: isolated missing rows at `dropout_rate`, plus bursts of 2-4 rows."""
    observed = rng.random(n) >= cfg.dropout_rate
    for burst_start in np.flatnonzero(rng.random(n) < cfg.dropout_burst_rate):
        observed[burst_start : burst_start + int(rng.integers(2, 5))] = False
    return observed


def _simulate_device(cfg: FleetConfig, index: int, t_s: np.ndarray, faults: list[FaultSpec]):
    """Returns (values (N, 4), label (N,), fault kind per row (N,) object, observed mask (N,))."""
    rng = np.random.default_rng([cfg.seed, index])
    n = t_s.shape[0]
    per_min = 60.0 / cfg.period_s  # periods per minute
    load = _load_profile(rng, t_s, cfg.period_s)

    current_no_load = rng.uniform(10.0, 12.0)
    current_gain = rng.uniform(24.0, 28.0)
    current = current_no_load + current_gain * load

    pressure = _first_order_lag(1.8 + rng.uniform(3.7, 4.2) * load**1.5, 2.0 * per_min)

    ambient = rng.uniform(21.0, 25.0) + 3.0 * np.sin(2 * np.pi * (t_s / DAY_S - 0.375))
    rise = _first_order_lag(16.0 + rng.uniform(22.0, 26.0) * load, rng.uniform(18.0, 22.0) * per_min)
    drift = _first_order_lag(rng.normal(0.0, 0.6, size=n), 60.0 * per_min, initial=0.0) * 6.0  # slow wander
    temp = ambient + rise + drift

    vibration = rng.uniform(1.0, 1.4) + rng.uniform(1.3, 1.7) * load

    # Measurement noise (vibration a little multiplicative).
    temp = temp + rng.normal(0.0, 0.15, n)
    vibration = vibration * (1.0 + rng.normal(0.0, 0.02, n)) + rng.normal(0.0, 0.05, n)
    current = current + rng.normal(0.0, 0.25, n)
    pressure = pressure + rng.normal(0.0, 0.04, n)

    label = np.zeros(n, dtype=np.int64)
    kind_per_row = np.full(n, "", dtype=object)
    values = np.stack([temp, vibration, current, pressure], axis=1)  # (N, 4)
    for spec in faults:
        rows = _fault_rows(cfg, spec, n)
        if rows is None:
            continue
        start, stop = rows
        seg = slice(start, stop)
        m = stop - start
        elapsed_min = np.arange(m) * cfg.period_s / 60.0
        frng = np.random.default_rng([cfg.seed, index, start, FAULT_KINDS.index(spec.kind)])
        if spec.kind == "bearing_wear":
            severity = np.linspace(0.0, 1.0, m)
            values[seg, 1] += 1.5 * severity**1.5 + frng.normal(0.0, 1.0, m) * 0.6 * severity
            values[seg, 0] += 6.0 * severity**1.2
        elif spec.kind == "overheating":
            rise_c = frng.uniform(12.0, 18.0)
            values[seg, 0] += rise_c * (1.0 - np.exp(-elapsed_min / 5.0))
            values[seg, 2] += 1.0 * (1.0 - np.exp(-elapsed_min / 5.0))
        elif spec.kind == "stuck_sensor":
            sensor = int(frng.integers(0, len(FEATURES)))
            values[seg, sensor] = values[start - 1 if start > 0 else start, sensor]
        elif spec.kind == "spikes":
            hit = frng.random(m) < 0.08
            which = frng.integers(0, 3, m)  # 0 vibration, 1 pressure, 2 both
            vib_hit = hit & (which != 1)
            prs_hit = hit & (which != 0)
            values[seg, 1] += np.where(vib_hit, frng.uniform(1.5, 4.0, m), 0.0)
            values[seg, 3] += np.where(prs_hit, frng.uniform(0.8, 2.0, m), 0.0)
        label[seg] = 1
        kind_per_row[seg] = spec.kind

    return values, label, kind_per_row, _dropouts(rng, cfg, n)


PUMP = MachineType("pump", tuple(FEATURES), FAULT_KINDS, TYPICAL_HOURS, _simulate_device)


def generate_fleet(cfg: FleetConfig, machine: MachineType | None = None) -> Fleet:
    """The fleet of `cfg.devices` machines of one type (default: pumps), rows sorted by ts then device."""
    machine = machine or PUMP
    if cfg.devices < 1:
        raise ValueError("devices must be >= 1")
    if cfg.period_s <= 0:
        raise ValueError("period_s must be > 0")
    n = int(cfg.hours * 3600.0 // cfg.period_s)
    if n < 2:
        raise ValueError("the simulated span must cover at least 2 periods")
    specs = _auto_faults(cfg, machine) if cfg.faults == "auto" else ([] if cfg.faults == "none" else list(cfg.faults))
    names = [machine.device_name(i) for i in range(cfg.devices)]
    for spec in specs:
        if spec.device not in names:
            raise ValueError(f"fault on unknown device {spec.device!r}: devices are {names[0]}..{names[-1]}")
    t_rel = np.arange(n, dtype=np.float64) * cfg.period_s
    t_abs = cfg.start_ts + t_rel  # the daily rhythm follows wall-clock time of day
    per_device = []
    for index, name in enumerate(names):
        values, label, kinds, observed = machine.simulate(cfg, index, t_abs, [s for s in specs if s.device == name])
        per_device.append((name, values[observed], label[observed], kinds[observed], np.flatnonzero(observed)))
    # Sort by ts then device: interleave by (row index, device index).
    ts = np.concatenate([cfg.start_ts + idx * cfg.period_s for *_, idx in per_device]).astype(np.int64)
    dev_index = np.concatenate([np.full(len(idx), i) for i, (*_, idx) in enumerate(per_device)])
    order = np.lexsort((dev_index, ts))
    rows: dict[str, np.ndarray] = {"ts": ts[order], "device": np.array(names, dtype=object)[dev_index[order]]}
    all_values = np.concatenate([v for _, v, *_ in per_device])[order]
    for j, feature in enumerate(machine.features):
        rows[feature] = np.round(all_values[:, j], 4)
    rows["label"] = np.concatenate([lab for _, _, lab, *_ in per_device])[order]
    rows["fault"] = np.concatenate([k for _, _, _, k, _ in per_device])[order]
    schedule = [
        {
            "device": s.device,
            "kind": s.kind,
            "start_ts": int(cfg.start_ts + round(s.start_h * 3600.0 / cfg.period_s) * cfg.period_s),
            "end_ts": int(cfg.start_ts + min(n, round((s.start_h + s.duration_h) * 3600.0 / cfg.period_s)) * cfg.period_s),
        }
        for s in specs
        if round(s.start_h * 3600.0 / cfg.period_s) < n
    ]
    return Fleet(rows=rows, schedule=schedule, config=cfg, features=list(machine.features))


def write_csv(fleet: Fleet, path: str | Path) -> None:
    """ts, device, the fleet's features, label, fault (COLUMNS for pumps)."""
    rows = fleet.rows
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ts", "device", *fleet.features, "label", "fault"])
        columns = [rows["ts"], rows["device"]] + [[f"{v:.4f}" for v in rows[f]] for f in fleet.features] + [rows["label"], rows["fault"]]
        writer.writerows(zip(*columns))


def read_csv(path: str | Path, features: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read a fleet CSV (default: pump features) back into columns; raises ValueError naming a missing column or a bad row."""
    features = list(features or FEATURES)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("ts", "device", *features) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        records = list(reader)
    out: dict[str, np.ndarray] = {}
    try:
        out["ts"] = np.array([int(float(r["ts"])) for r in records], dtype=np.int64)
        out["device"] = np.array([r["device"] for r in records], dtype=object)
        for feature in features:
            out[feature] = np.array([float(r[feature]) for r in records], dtype=np.float64)
        out["label"] = np.array([int(r.get("label") or 0) for r in records], dtype=np.int64)
        out["fault"] = np.array([r.get("fault") or "" for r in records], dtype=object)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return out


def write_schedule(fleet: Fleet, path: str | Path) -> None:
    Path(path).write_text(json.dumps(fleet.schedule, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- publishing


def publish_fleet(fleet: Fleet, host: str, port: int, speed: float, warmup_rows: int, form: str = "telemetry",
                  topic_prefix: str = "sensors", connect_timeout_s: float = 15.0, out=sys.stdout,
                  outage_timeout_s: float = 300.0, reconnect_max_s: float = 8.0) -> int:
    """Publish the fleet over MQTT (QoS 1): warm-up rows back to back, the rest paced at `speed` x real time.

    When the broker goes away the client reconnects by itself (back-off from 0.5 s up to `reconnect_max_s`) and
    publishing goes on: QoS 1 messages published meanwhile wait in the client and go out after the reconnect,
    like those the broker had not acknowledged yet. Only a broker away for longer than `outage_timeout_s` ends
    the run (exit code 1, with a message saying so).
    """
    import threading

    import paho.mqtt.client as mqtt

    connected = threading.Event()
    failure: list[str] = []
    state = threading.Condition()
    link = {"down_since": None, "acked": 0}  # monotonic time the connection was lost (None: connected); PUBACKs

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if not connected.is_set():
                failure.append(str(reason_code))
                connected.set()
            else:
                print(f"synth: the broker refused the reconnect: {reason_code}; retrying", file=out, flush=True)
            return
        with state:
            down_since, link["down_since"] = link["down_since"], None
            state.notify_all()
        if down_since is not None:
            print(f"synth: reconnected to {host}:{port} after {time.monotonic() - down_since:.1f}s; publishing goes on",
                  file=out, flush=True)
        connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            return  # our own DISCONNECT at the end
        with state:
            if link["down_since"] is not None or not connected.is_set() or failure:
                return  # a failed reconnect attempt, or the first connect failing: not a new outage
            link["down_since"] = time.monotonic()
        print(f"synth: lost the connection to {host}:{port} ({reason_code}); reconnecting (giving up after "
              f"{outage_timeout_s:g}s away)", file=out, flush=True)

    def on_publish(client, userdata, mid, reason_code, properties):
        with state:
            link["acked"] += 1  # paho reports each QoS 1 message once, resent or not
            state.notify_all()

    def away_too_long() -> bool:
        with state:
            down_since = link["down_since"]
        if down_since is None or time.monotonic() - down_since <= outage_timeout_s:
            return False
        print(f"synth: the broker at {host}:{port} has been unreachable for more than {outage_timeout_s:g}s; giving up",
              file=sys.stderr, flush=True)
        return True

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgecast-synth-{int(time.time() * 1000) % 10**9}")
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.max_queued_messages_set(0)  # unbounded: what is published during an outage waits for the reconnect
    client.reconnect_delay_set(min_delay=min(0.5, reconnect_max_s), max_delay=reconnect_max_s)  # type: ignore[arg-type]
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(connect_timeout_s) or failure:
            print(f"synth: could not connect to {host}:{port}: {failure[0] if failure else 'timeout'}", file=sys.stderr)
            return 1
        rows = fleet.rows
        ts, devices = rows["ts"], rows["device"]
        # Row rank per device: the first `warmup_rows` of every device go out immediately.
        first_ts = {d: ts[devices == d].min() for d in np.unique(devices)}
        period = fleet.config.period_s if fleet.config else 60
        rank = np.array([(t - first_ts[d]) // period for t, d in zip(ts, devices)])
        warm = rank < warmup_rows
        paced_ts = ts[~warm]
        pace_origin_ts = paced_ts.min() if paced_ts.size else 0
        sent = 0

        def publish(topic: str, payload: dict) -> None:
            nonlocal sent
            info = client.publish(topic, json.dumps(payload), qos=1)
            # NO_CONN: queued all the same, sent after the reconnect (QoS 1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            sent += 1

        def send(i: int) -> None:
            device = devices[i]
            stamp = int(ts[i])
            if form == "telemetry":
                publish(f"{topic_prefix}/{device}/telemetry", {"ts": stamp, "values": {f: float(rows[f][i]) for f in fleet.features}})
            else:
                for f in fleet.features:
                    publish(f"{topic_prefix}/{device}/{f}", {"ts": stamp, "value": float(rows[f][i])})

        for i in np.flatnonzero(warm):
            send(int(i))
        print(f"synth: published {int(warm.sum())} warm-up rows; publishing {int((~warm).sum())} rows in real time "
              f"at {speed:g}x", file=out, flush=True)
        origin = time.monotonic()
        for i in np.flatnonzero(~warm):
            due = origin + (ts[i] - pace_origin_ts) / speed  # absolute schedule: no drift
            while (delay := due - time.monotonic()) > 0:
                if away_too_long():
                    return 1
                time.sleep(min(delay, 0.5))
            if away_too_long():
                return 1
            send(int(i))
        # Every message acknowledged; the broker is given 60 s of connected time for it (an outage stops the clock).
        patience = 60.0
        with state:
            last = time.monotonic()
            while link["acked"] < sent:
                state.wait(0.5)
                now = time.monotonic()
                if link["down_since"] is None:
                    patience -= now - last
                last = now
                if patience <= 0:
                    print("synth: broker did not acknowledge every message in time", file=sys.stderr)
                    return 1
                if link["down_since"] is not None and now - link["down_since"] > outage_timeout_s:
                    break
        if away_too_long():
            return 1
        print(f"synth: done, {sent} messages acknowledged", file=out, flush=True)
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machine", choices=MACHINES, default="pump",
                        help="pump (default: bearing_temp, vibration_rms, motor_current, outlet_pressure) or fan (ventilation "
                        "fans: motor_temp, fan_vibration, airflow, power_kw; simulation/fans.py)")
    parser.add_argument("--devices", type=int, default=4, help="number of machines (pump-00, pump-01, ... or fan-00, ...)")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--days", type=float, help="simulated span in days (default 14)")
    span.add_argument("--hours", type=float, help="simulated span in hours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--period-s", type=int, default=60, help="sampling period in seconds")
    parser.add_argument("--faults", default=None,
                        help="auto | none | KIND:DEVICE@START_HOURS+DURATION_HOURS[,...] (default: auto for CSV, none for --publish); "
                        f"kinds: {'; '.join(f'{m} ' + ', '.join(machine_type(m).fault_kinds) for m in MACHINES)}")
    parser.add_argument("--start-ts", type=int, default=None,
                        help="unix time of the first sample (default: fixed 2026-01-05 for CSV, now - span for --publish)")
    parser.add_argument("--out", help="CSV file to write")
    parser.add_argument("--schedule-out", help="JSON file listing the injected faults (unix seconds)")
    parser.add_argument("--publish", action="store_true", help="publish over MQTT instead of (or as well as) writing CSV")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second when publishing")
    parser.add_argument("--warmup-rows", type=int, default=70, help="rows per device published back to back first")
    parser.add_argument("--form", choices=["telemetry", "sensor"], default="telemetry")
    parser.add_argument("--topic-prefix", default="sensors")
    parser.add_argument("--outage-timeout-s", type=float, default=300.0,
                        help="when publishing, give up (exit 1) once the broker has been unreachable this long; until then "
                        "reconnect with back-off and go on")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.publish:
        print("synth: give --out FILE.csv and/or --publish", file=sys.stderr)
        return 2
    hours = args.hours if args.hours is not None else (args.days if args.days is not None else 14.0) * 24.0
    try:
        machine = machine_type(getattr(args, "machine", "pump"))
        faults = parse_fault_specs(args.faults or ("none" if args.publish else "auto"), machine.fault_kinds)
        if hours <= 0 or args.period_s <= 0 or args.devices < 1 or args.speed <= 0 or args.outage_timeout_s <= 0:
            raise ValueError("--days/--hours, --period-s, --devices, --speed and --outage-timeout-s must be positive")
        start_ts = args.start_ts
        if start_ts is None:
            if args.publish:
                # The simulated clock ends at about now, so the agent's timestamp bounds accept every row.
                n = int(hours * 3600.0 // args.period_s)
                start_ts = int(time.time() // args.period_s * args.period_s) - (n - 1) * args.period_s
            else:
                start_ts = DEFAULT_START_TS
        cfg = FleetConfig(devices=args.devices, hours=hours, seed=args.seed, period_s=args.period_s,
                          start_ts=start_ts, faults=faults)
        fleet = generate_fleet(cfg, machine)
    except ValueError as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    if args.out:
        write_csv(fleet, args.out)
        print(f"synth: wrote {len(fleet.rows['ts'])} rows for {args.devices} devices to {args.out}")
    if args.schedule_out:
        write_schedule(fleet, args.schedule_out)
    for item in fleet.schedule:
        print(f"synth: fault {item['kind']} on {item['device']} from {item['start_ts']} to {item['end_ts']}")
    if args.publish:
        return publish_fleet(fleet, args.host, args.port, args.speed, args.warmup_rows, args.form, args.topic_prefix,
                             outage_timeout_s=args.outage_timeout_s)
    return 0
