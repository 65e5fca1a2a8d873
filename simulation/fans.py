"""Synthetic ventilation fans: a belt-driven centrifugal fan, its induction motor on a variable-frequency drive.

The second machine type of the simulated fleet (`python -m training synth --machine fan`), with other sensors
than the pump (simulation/synth.py) so that one gateway runs two models. numpy only; the same conventions as
the pumps: one row per device per period, every device drawing from its own generator seeded by
(seed, device index), the same dropouts, labels, fault specs, CSV layout (`FEATURES` in place of the pump's)
and publishing. Devices are fan-00, fan-01, ...

Speed (0..1, fraction of rated speed), per device:
- occupied hours (from 05:30-07:00 to 20:30-22:30, drawn per fan) at a day set-point redrawn every ~3 h on
  average in 0.60..0.85, the rest of the day at a night set-point of 0.35..0.45 (minimum ventilation);
- during the day a process extraction (a booth, a machine hall) switches on and off with its own period
  (1-4 h) and duty (30-60 %), adding 0.10..0.18;
- the drive ramps the speed by at most 5 % of rated speed per minute, then a 1 min lag.

Features (per-device constants vary a little from fan to fan):
- `airflow` (m3/s): rated flow (4.0-5.0 m3/s) * speed (fan law: flow ~ speed), first-order lag 1 min,
  turbulence noise 1.5 % + 0.02 m3/s. About 1.4-4.9 m3/s.
- `power_kw` (kW, electrical input): losses (0.4-0.6 kW) + rated power (9-12 kW) * speed**3 (fan law: power ~
  speed cubed), noise 0.08 kW. About 0.8-11 kW.
- `motor_temp` (degC, motor frame): ambient (18-24 degC, daily rhythm +-4 degC, warmest mid-afternoon) + a rise
  of 6 + 32 * (power / full-load power) degC through a thermal lag of 20-30 min + slow drift (AR(1)) + noise
  0.15 degC. About 22-60 degC.
- `fan_vibration` (mm/s RMS): base (0.6-0.9) + 1.6-2.2 * speed**2 (flow turbulence and blade pass grow with speed
  squared), noise 2 % + 0.04 mm/s. About 0.8-2.8 mm/s.

Faults (label = 1 and `fault` = kind from onset to end; the effect stops at the end, as after maintenance):
- `imbalance` (a balancing weight lost, or caked dust breaking off one blade): the once-per-revolution vibration
  steps up within a few minutes by 5..7 mm/s * fan speed (on vibration isolators, above their resonance, the
  velocity of an imbalance grows with speed): near ISO 14694's alarm zone at full speed, ~2 mm/s at night.
- `belt_slip` (a worn or loose V-belt between motor and fan): severity ramps 0 -> 1 over the fault; the belt slips
  in episodes of a few minutes, more often and deeper as it wears (up to a quarter of the fan speed lost): airflow
  drops with the fan speed, the motor's power with the fan's torque, and the vibration turns erratic (belt flutter,
  up to 0.5 mm/s of extra noise). Caught when the slips become frequent and deep.
- `overheating` (blocked cooling fins, a failed motor cooling fan): motor temperature climbs +15..+25 degC with an
  8 min time constant, power +3 % (hotter windings lose more).
- `stuck_sensor`: one sensor (drawn per fault) repeats its last value exactly.

No filter clogging (airflow falling slowly at the same speed while power eases off): with these four sensors it
stays inside the normal spread of the fan laws' curved flow-to-power relation, which a bundle's linear state model
cannot tell apart (tried: a 35 % airflow loss over 24 h was not caught); a filter differential-pressure sensor
would be the way to see it.

Fault specs as for the pumps (`KIND:DEVICE@START_HOURS+DURATION_HOURS`, `auto`, `none`).
"""

from __future__ import annotations

import numpy as np

from simulation.synth import (
    DAY_S,
    Fleet,
    FleetConfig,
    FaultSpec,
    MachineType,
    _dropouts,
    _fault_rows,
    _first_order_lag,
    _rate_limited,
    generate_fleet as _generate_fleet,
    parse_fault_specs as _parse_fault_specs,
)

FEATURES = ["motor_temp", "fan_vibration", "airflow", "power_kw"]
FAULT_KINDS = ("imbalance", "belt_slip", "overheating", "stuck_sensor")
TYPICAL_HOURS = {"imbalance": (4.0, 12.0), "belt_slip": (3.0, 10.0), "overheating": (1.0, 3.0), "stuck_sensor": (1.0, 4.0)}
TEMP, VIBRATION, AIRFLOW, POWER = range(4)  # columns of `values`, in FEATURES order


def device_name(index: int) -> str:
    return f"fan-{index:02d}"


def _speed_profile(rng: np.random.Generator, t_s: np.ndarray, period_s: int) -> np.ndarray:
    n = t_s.shape[0]
    hour = (t_s % DAY_S) / 3600.0
    occupied = (hour >= rng.uniform(5.5, 7.0)) & (hour < rng.uniform(20.5, 22.5))
    night = rng.uniform(0.35, 0.45)  # the minimum ventilation rate for air quality
    # Day set-point redrawn at random times (Poisson, mean 3 h between changes).
    change = rng.random(n) < period_s / (3.0 * 3600.0)
    change[0] = True
    day = rng.uniform(0.60, 0.85, size=n)[np.maximum.accumulate(np.where(change, np.arange(n), 0))]
    cycle_s = rng.uniform(1.0, 4.0) * 3600.0
    duty = rng.uniform(0.3, 0.6)
    extraction = ((t_s / cycle_s + rng.uniform(0.0, 1.0)) % 1.0) < duty
    boost = rng.uniform(0.10, 0.18)
    setpoint = np.clip(np.where(occupied, day + np.where(extraction, boost, 0.0), night), 0.2, 1.0)
    ramped = _rate_limited(setpoint, 0.05 * period_s / 60.0)
    return _first_order_lag(ramped, 1.0 * 60.0 / period_s)


def _belt_slip(frng: np.random.Generator, m: int, period_s: int) -> tuple[np.ndarray, np.ndarray]:
    """Slip (share of speed lost) and flutter (mm/s) over a belt fault of m periods: episodes of ~3 min that start
    more often and go deeper as the belt wears (severity 0 -> 1)."""
    severity = np.linspace(0.0, 1.0, m)
    per_min = 60.0 / period_s
    start_p = (0.02 + 0.10 * severity) / per_min  # per period
    end_p = 0.3 / per_min
    depth = frng.uniform(0.08, 0.25, m) * (0.3 + 0.7 * severity)
    draws = frng.random(m)
    slip = np.zeros(m)
    slipping, current = False, 0.0
    for t in range(m):
        if slipping and draws[t] < end_p:
            slipping = False
        elif not slipping and draws[t] < start_p[t]:
            slipping, current = True, depth[t]
        slip[t] = current if slipping else 0.0
    return slip, 0.5 * severity


def _simulate_device(cfg: FleetConfig, index: int, t_s: np.ndarray, faults: list[FaultSpec]):
    """Returns (values (N, 4), label (N,), fault kind per row (N,) object, observed mask (N,))."""
    rng = np.random.default_rng([cfg.seed, index])
    n = t_s.shape[0]
    per_min = 60.0 / cfg.period_s  # periods per minute
    speed = _speed_profile(rng, t_s, cfg.period_s)
    rated_flow = rng.uniform(4.0, 5.0)
    rated_power = rng.uniform(9.0, 12.0)
    losses_kw = rng.uniform(0.4, 0.6)

    label = np.zeros(n, dtype=np.int64)
    kind_per_row = np.full(n, "", dtype=object)
    segments = []  # (spec, start, stop, generator) of the faults inside the span
    slip = np.zeros(n)  # share of the motor's speed the fan loses to a slipping belt
    flutter = np.zeros(n)  # extra vibration noise (mm/s) of a fluttering belt
    for spec in faults:
        rows = _fault_rows(cfg, spec, n)
        if rows is None:
            continue
        start, stop = rows
        frng = np.random.default_rng([cfg.seed, index, start, FAULT_KINDS.index(spec.kind)])
        segments.append((spec, start, stop, frng))
        if spec.kind == "belt_slip":
            # Before the physics: the fan turns slower than the motor, so airflow, torque and vibration all follow.
            slip[start:stop], flutter[start:stop] = _belt_slip(frng, stop - start, cfg.period_s)
        label[start:stop] = 1
        kind_per_row[start:stop] = spec.kind

    fan_speed = speed * (1.0 - slip)
    airflow = _first_order_lag(rated_flow * fan_speed, 1.0 * per_min)
    # Motor power = fan torque (~ fan speed squared) x motor speed: the fan laws' speed cubed when nothing slips.
    power = losses_kw + rated_power * speed * fan_speed**2
    ambient = rng.uniform(18.0, 24.0) + 4.0 * np.sin(2 * np.pi * (t_s / DAY_S - 0.375))  # warmest around 15:00
    rise = _first_order_lag(6.0 + 32.0 * power / (losses_kw + rated_power), rng.uniform(20.0, 30.0) * per_min)
    drift = _first_order_lag(rng.normal(0.0, 0.6, size=n), 60.0 * per_min, initial=0.0) * 6.0  # slow wander
    temp = ambient + rise + drift
    vibration = rng.uniform(0.6, 0.9) + rng.uniform(1.6, 2.2) * fan_speed**2

    # Measurement noise (vibration and airflow a little multiplicative).
    temp = temp + rng.normal(0.0, 0.15, n)
    vibration = vibration * (1.0 + rng.normal(0.0, 0.02, n)) + rng.normal(0.0, 0.04, n)
    if flutter.any():  # only then: a healthy fan's draws stay those of a fleet without belt faults
        vibration += np.abs(np.random.default_rng([cfg.seed, index, 7_777]).normal(0.0, 1.0, n)) * flutter
    airflow = airflow * (1.0 + rng.normal(0.0, 0.015, n)) + rng.normal(0.0, 0.02, n)
    power = power + rng.normal(0.0, 0.08, n)

    values = np.stack([temp, vibration, airflow, power], axis=1)  # (N, 4), FEATURES order
    for spec, start, stop, frng in segments:
        seg = slice(start, stop)
        elapsed_min = np.arange(stop - start) * cfg.period_s / 60.0
        if spec.kind == "imbalance":
            values[seg, VIBRATION] += frng.uniform(5.0, 7.0) * fan_speed[seg] * (1.0 - np.exp(-elapsed_min / 2.0))
        elif spec.kind == "overheating":
            onset = 1.0 - np.exp(-elapsed_min / 8.0)
            values[seg, TEMP] += frng.uniform(15.0, 25.0) * onset
            values[seg, POWER] *= 1.0 + 0.03 * onset
        elif spec.kind == "stuck_sensor":
            sensor = int(frng.integers(0, len(FEATURES)))
            values[seg, sensor] = values[start - 1 if start > 0 else start, sensor]
    return values, label, kind_per_row, _dropouts(rng, cfg, n)


FAN = MachineType("fan", tuple(FEATURES), FAULT_KINDS, TYPICAL_HOURS, _simulate_device)


def generate_fleet(cfg: FleetConfig) -> Fleet:
    """A fleet of `cfg.devices` fans (fan-00, ...): simulation.synth.generate_fleet with the fan physics."""
    return _generate_fleet(cfg, FAN)


def parse_fault_specs(text: str) -> str | list[FaultSpec]:
    """The --faults value with the fan's fault kinds; ValueError naming the bad part."""
    return _parse_fault_specs(text, FAULT_KINDS)
