"""`python -m training detection-benchmark`: the detection figures end to end, on a held-out synthetic fleet.

1. generate a labeled fleet with simulation.synth (seed HELDOUT_SEED by default: never used for training,
   calibration or tuning; TUNING_SEEDS were used to choose the score steps, EWMA and alert settings):
   `healthy` pumps without faults, the others with two faults each of different kinds at random times;
2. replay it through `python -m agent replay`'s code path (agent.tools.replay.replay) with the bundle;
3. evaluate-alerts on the replay output and the fleet's labels; print the table (and write JSON).

`--machine fan` runs the synthetic suite on ventilation fans (simulation/fans.py) with the shipped fan-lstm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from simulation.synth import DEFAULT_START_TS, MACHINES, FaultSpec, FleetConfig, MachineType, generate_fleet, machine_type, write_csv

HELDOUT_SEED = 2027
TUNING_SEEDS = (101, 102)


def benchmark_fleet(seed: int, devices: int = 20, healthy: int = 4, days: float = 8.0,
                    machine: MachineType | None = None) -> FleetConfig:
    """`healthy` fault-free machines (default pumps), then two faults of different kinds per machine, kinds cycling evenly."""
    machine = machine or machine_type("pump")
    kinds_all = machine.fault_kinds
    rng = np.random.default_rng([seed, 77])
    hours = days * 24.0
    specs = []
    for n, index in enumerate(range(healthy, devices)):
        kinds = (kinds_all[(2 * n) % len(kinds_all)], kinds_all[(2 * n + 1) % len(kinds_all)])
        # One fault per half of the span (after a day of healthy history), so they never overlap.
        for half, kind in enumerate(kinds):
            low, high = machine.typical_hours[kind]
            duration = float(rng.uniform(low, high))
            lo = 24.0 + half * (hours - 24.0) / 2
            hi = lo + (hours - 24.0) / 2 - duration - 6.0
            specs.append(FaultSpec(kind, machine.device_name(index), round(float(rng.uniform(lo, hi)), 3), round(duration, 3)))
    # Later than the shipped training fleet's span (2026-01-05 + 14 days).
    return FleetConfig(devices=devices, hours=hours, seed=seed, faults=specs, start_ts=DEFAULT_START_TS + 40 * 86400)


def run_benchmark(model_dir: str | Path, out_dir: str | Path, seed: int = HELDOUT_SEED, devices: int = 20, healthy: int = 4,
                  days: float = 8.0, settings=None, grace_min: float = 30.0, recovery_min: float = 60.0, log=print,
                  machine: MachineType | None = None) -> dict:
    from agent.config.settings import Settings
    from agent.tools.replay import replay
    from training import evaluate_alerts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    machine = machine or machine_type("pump")
    fleet = generate_fleet(benchmark_fleet(seed, devices, healthy, days, machine), machine)
    data = out / f"fleet-seed{seed}.csv"
    write_csv(fleet, data)
    (out / f"fleet-seed{seed}-schedule.json").write_text(json.dumps(fleet.schedule, indent=2) + "\n")
    log(f"fleet: seed {seed}, {devices} {machine.name}s ({healthy} healthy), {days:g} days, {len(fleet.schedule)} faults -> {data} "
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


ABLATIONS = ("full", "no state channels", "no residual channels", "no slow channels", "no flat-line check")


def ablation_variants(model: Path, folder: Path, names=ABLATIONS):
    """(name, bundle folder) per ablation: copies of the bundle whose calibration has one component switched off
    (the same model and thresholds: what each component adds at the calibrated levels)."""
    import shutil

    manifest = json.loads((Path(model) / "manifest.json").read_text(encoding="utf-8"))
    calibration = manifest["calibration"]
    for name in names:
        if name == "full":
            yield name, Path(model)
            continue
        cal = json.loads(json.dumps(calibration))
        if name == "no state channels":
            if "state" not in cal:
                continue
            cal.pop("state")
        elif name == "no residual channels":
            if "state" not in cal:
                continue
            cal["fast_gain"], cal["flatline_repeats"] = 1e-9, [0] * len(cal.get("flatline_repeats") or manifest["targets"])
            for key in ("slow_alpha", "slow_recent_alpha", "slow_gain", "slow_clip"):
                cal.pop(key, None)
        elif name == "no slow channels":
            if "slow_alpha" not in cal:
                continue
            for key in ("slow_alpha", "slow_recent_alpha", "slow_gain", "slow_clip"):
                cal.pop(key, None)
        elif name == "no flat-line check":
            if not any(cal.get("flatline_repeats") or []):
                continue
            cal["flatline_repeats"] = [0] * len(cal["flatline_repeats"])
        target = folder / name.replace(" ", "-")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model, target)
        (target / "manifest.json").write_text(json.dumps({**manifest, "calibration": cal}, indent=1), encoding="utf-8")
        yield name, target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="bundle folder (default: the shipped pump-lstm, or fan-lstm with --machine fan)")
    parser.add_argument("--machine", choices=MACHINES, default="pump", help="the synthetic suite's machine type (default pump)")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help=f"fleet seed (default {HELDOUT_SEED}, held out; tuning used {TUNING_SEEDS})")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--healthy", type=int, default=4, help="machines without faults")
    parser.add_argument("--days", type=float, default=8.0)
    parser.add_argument("--threshold-mode", choices=["fixed", "dynamic"], default="fixed")
    parser.add_argument("--grace-min", type=float, default=30.0)
    parser.add_argument("--out", default="benchmark-detection", help="folder for the fleet, replay output and JSON")
    parser.add_argument("--suite", choices=("all", "tep", "synthetic"), default="all",
                        help="all (default): the Tennessee Eastman protocol and the held-out synthetic fleet")
    parser.add_argument("--tep-dir", default=None, help="folder of d00.csv and dNN_te.csv (default: ../shared/data/tep beside the repository)")
    parser.add_argument("--no-ablation", action="store_true", help="only the full detector (each component off is skipped)")


def run(args: argparse.Namespace) -> int:
    from agent.config.settings import Settings
    from agent.core.model import BundleError
    from training import evaluate_alerts

    if not 0 <= args.healthy < args.devices:
        print("detection-benchmark: need 0 <= --healthy < --devices", file=sys.stderr)
        return 2
    from training import tep_benchmark

    names = ABLATIONS[:1] if args.no_ablation else ABLATIONS
    out = Path(args.out)
    summary = {}
    if args.suite in ("all", "tep"):
        tep = Path(args.tep_dir) if args.tep_dir else tep_benchmark.default_tep_dir()
        try:
            results = tep_benchmark.run_tep(tep, out / "tep", lambda model, folder: ablation_variants(model, folder, names))
            timing = tep_benchmark.new_user_timing(tep, out / "tep")
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"detection-benchmark: {exc}", file=sys.stderr)
            return 1
        summary["tep"] = {"results": results, "new_user_timing": timing}
        print(tep_benchmark.format_tep(results, timing), flush=True)
    if args.suite in ("all", "synthetic"):
        from agent.config.settings import shipped_model_path
        from training.cli import SHIPPED

        machine = machine_type(args.machine)
        model = Path(args.model) if args.model else (shipped_model_path() if args.machine == "pump" else SHIPPED[args.machine][1])
        rows = []
        for name, bundle in ablation_variants(model, out / "variants", names):
            settings = Settings(model={"path": bundle}, detect={"threshold_mode": args.threshold_mode})
            try:
                result = run_benchmark(bundle, out / "synthetic" / name.replace(" ", "-"), args.seed, args.devices, args.healthy,
                                       args.days, settings, args.grace_min, log=lambda *a: None, machine=machine)
            except BundleError as exc:
                print(f"detection-benchmark: model bundle {bundle} refused: {exc}", file=sys.stderr)
                return 1
            if name == "full":
                print("\n## Synthetic fleet (held-out seed %d), the shipped or given bundle\n" % args.seed)
                print(evaluate_alerts.format_report(result), flush=True)
            rows.append((name, result))
        summary["synthetic"] = {name: {k: r[k] for k in ("points", "events", "healthy_devices") if k in r} for name, r in rows}
        print(f"\n| synthetic fleet, ablation | point F1 | precision | recall | event recall | alerts on healthy {machine.name}s |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            p, e = r["points"], r["events"]
            print(f"| {name} | {p['f1']:.3f} | {p['precision']:.3f} | {p['recall']:.3f} | {e['recall']:.3f} | "
                  f"{r['healthy_devices']['alerts']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
