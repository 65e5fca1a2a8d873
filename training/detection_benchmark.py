"""`python -m training detection-benchmark`: the detection figures end to end, on a held-out synthetic fleet.

1. generate a labeled fleet with training.synth (seed HELDOUT_SEED by default: never used for training,
   calibration or tuning; TUNING_SEEDS were used to choose the score steps, EWMA and alert settings):
   `healthy` pumps without faults, the others with two faults each of different kinds at random times;
2. replay it through `python -m agent replay`'s code path (agent.replay.replay) with the bundle;
3. evaluate-alerts on the replay output and the fleet's labels; print the table (and write JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training.synth import FAULT_KINDS, DEFAULT_START_TS, FaultSpec, FleetConfig, device_name, generate_fleet, write_csv

HELDOUT_SEED = 2027
TUNING_SEEDS = (101, 102)
TYPICAL_HOURS = {"bearing_wear": (6.0, 18.0), "overheating": (1.0, 3.0), "stuck_sensor": (1.0, 4.0), "spikes": (1.0, 3.0)}


def benchmark_fleet(seed: int, devices: int = 20, healthy: int = 4, days: float = 8.0) -> FleetConfig:
    """`healthy` fault-free pumps, then two faults of different kinds per pump, kinds cycling evenly."""
    rng = np.random.default_rng([seed, 77])
    hours = days * 24.0
    specs = []
    for n, index in enumerate(range(healthy, devices)):
        kinds = (FAULT_KINDS[(2 * n) % 4], FAULT_KINDS[(2 * n + 1) % 4])
        # One fault per half of the span (after a day of healthy history), so they never overlap.
        for half, kind in enumerate(kinds):
            low, high = TYPICAL_HOURS[kind]
            duration = float(rng.uniform(low, high))
            lo = 24.0 + half * (hours - 24.0) / 2
            hi = lo + (hours - 24.0) / 2 - duration - 6.0
            specs.append(FaultSpec(kind, device_name(index), round(float(rng.uniform(lo, hi)), 3), round(duration, 3)))
    # Later than the shipped training fleet's span (2026-01-05 + 14 days).
    return FleetConfig(devices=devices, hours=hours, seed=seed, faults=specs, start_ts=DEFAULT_START_TS + 40 * 86400)


def run_benchmark(model_dir: str | Path, out_dir: str | Path, seed: int = HELDOUT_SEED, devices: int = 20, healthy: int = 4,
                  days: float = 8.0, settings=None, grace_min: float = 30.0, recovery_min: float = 60.0, log=print) -> dict:
    from agent.config import Settings
    from agent.replay import replay
    from training import evaluate_alerts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    fleet = generate_fleet(benchmark_fleet(seed, devices, healthy, days))
    data = out / f"fleet-seed{seed}.csv"
    write_csv(fleet, data)
    (out / f"fleet-seed{seed}-schedule.json").write_text(json.dumps(fleet.schedule, indent=2) + "\n")
    log(f"fleet: seed {seed}, {devices} pumps ({healthy} healthy), {days:g} days, {len(fleet.schedule)} faults -> {data} "
        f"({time.perf_counter() - began:.0f} s)")
    pred = out / f"replay-seed{seed}.csv"
    settings = settings or Settings(model={"path": Path(model_dir)})
    result = replay(model_dir, data, pred, settings=settings)
    log(f"replay: {result.rows} rows in {result.seconds:.1f} s ({result.rows_per_s:,.0f} rows/s), {result.alerts_opened} alerts opened")
    evaluation = evaluate_alerts.evaluate(evaluate_alerts.join(str(pred), str(data)), grace_min * 60.0, recovery_min * 60.0)
    evaluation["benchmark"] = {"seed": seed, "devices": devices, "healthy": healthy, "days": days, "model": str(model_dir),
                               "threshold_mode": settings.detect.threshold_mode, "replay_rows_per_s": round(result.rows_per_s)}
    (out / f"evaluation-seed{seed}.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    return evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agent.config import shipped_model_path

    parser.add_argument("--model", default=str(shipped_model_path()), help="bundle folder (default: the shipped pump-lstm)")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help=f"fleet seed (default {HELDOUT_SEED}, held out; tuning used {TUNING_SEEDS})")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--healthy", type=int, default=4, help="pumps without faults")
    parser.add_argument("--days", type=float, default=8.0)
    parser.add_argument("--threshold-mode", choices=["fixed", "dynamic"], default="fixed")
    parser.add_argument("--grace-min", type=float, default=30.0)
    parser.add_argument("--out", default="benchmark-detection", help="folder for the fleet, replay output and JSON")


def run(args: argparse.Namespace) -> int:
    from agent.config import Settings
    from agent.model import BundleError
    from training import evaluate_alerts

    if not 0 <= args.healthy < args.devices:
        print("detection-benchmark: need 0 <= --healthy < --devices", file=sys.stderr)
        return 2
    settings = Settings(model={"path": Path(args.model)}, detect={"threshold_mode": args.threshold_mode})
    try:
        result = run_benchmark(args.model, args.out, args.seed, args.devices, args.healthy, args.days, settings, args.grace_min)
    except BundleError as exc:
        print(f"detection-benchmark: model bundle {args.model} refused: {exc}", file=sys.stderr)
        return 1
    print(evaluate_alerts.format_report(result))
    return 0
