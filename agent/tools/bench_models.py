"""Several models in one daemon: memory per added model and CPU per reading, beside one process per model.

    python -m agent.tools.bench_models [--devices 1000] [--models 1,2,4] [--rate 200] [--json FILE]

For K models the same D devices are split between K copies of the shipped bundle (each its own onnxruntime
session, as distinct models would be), by the last digit of the device name. Each configuration fills every
device's window (lookback readings each, one forecast per device), then takes readings paced one at a time at
`--rate` for `--seconds`: resident memory after that, and CPU time per reading during it. The naive alternative,
what a gateway needed before: K daemon processes, one model each, sharing the devices by hash partition
([partition]: the others' readings are dropped before decoding), measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

DIGIT_GROUPS = {1: ["0123456789"], 2: ["02468", "13579"], 4: ["012", "345", "67", "89"], 3: ["0123", "456", "789"]}


def _patterns(k: int) -> list[list[str]]:
    if k not in DIGIT_GROUPS:
        raise SystemExit(f"--models: {k} is not one of {sorted(DIGIT_GROUPS)}")
    return [[f"bench-*{digit}" for digit in group] for group in DIGIT_GROUPS[k]]


def _measure(run, daemons, devices: int, rate: float, seconds: float, capacity_slots: int = 0) -> dict:
    from agent.tools.bench import cpu_seconds, peak_rss_mib, rss_mib

    def alive() -> bool:
        return all(d.alive() for d in daemons)

    run.warm(devices, devices, alive)
    pids = [d.pid for d in daemons]
    cpu0, started = sum(cpu_seconds(pid) for pid in pids), time.time()
    slots = max(1, round(rate * seconds / devices))
    run.collector.reset()
    _, generated = run.publish(devices, slots, rate=rate)
    complete = run.collector.wait_forecasts(devices * slots, 120, alive)
    elapsed, cpu1 = time.time() - started, sum(cpu_seconds(pid) for pid in pids)
    readings = devices * slots
    out = {"processes": len(daemons), "readings": readings, "achieved_rate": generated["rate"], "complete": complete,
           "cpu_us_per_reading": (cpu1 - cpu0) / readings * 1e6, "cpu_cores": (cpu1 - cpu0) / elapsed,
           "rss_mib": round(sum(rss_mib(pid) for pid in pids), 1), "peak_rss_mib": round(sum(peak_rss_mib(pid) for pid in pids), 1),
           "rss_per_process_mib": [round(rss_mib(pid), 1) for pid in pids]}
    if capacity_slots:
        # A backlog (the daemons paused while readings queue at the broker): full batches for every model.
        backlog = devices * capacity_slots
        drained = run.capacity(pids, backlog, devices, capacity_slots, backlog, alive)
        out["capacity_readings_per_s"] = drained["readings_per_s"]
        out["capacity_cpu_us_per_reading"] = drained["cpu_cores"] / drained["readings_per_s"] * 1e6
    return out


def run_models_bench(devices: int, counts: list[int], rate: float, seconds: float, progress=print, capacity_slots: int = 0,
                     batch_wait_ms: float | None = None) -> dict:
    from agent.config.settings import Settings
    from agent.core.model import load_bundle
    from agent.tools.bench import Broker, Collector, Daemon, Plan, Run, machine

    model = Path(Settings().model.path)
    bundle = load_bundle(model)
    period, lookback = bundle.period_s, bundle.lookback
    del bundle
    plan = Plan(devices=devices, batch_wait_ms=batch_wait_ms)
    workdir = Path(tempfile.mkdtemp(prefix="edgecast-bench-models-"))
    copies = []
    for k in range(max(counts)):
        folder = workdir / f"model-{k}"
        shutil.copytree(model, folder)
        copies.append(folder)
    broker = Broker(workdir)
    collector = Collector(broker.port)
    first_slot = math.floor((time.time() - 5 * 86400) / period)
    run = Run(plan, model, workdir, broker.port, collector, period, lookback, first_slot)
    result: dict = {"devices": devices, "rate": rate, "seconds": seconds, "batch_wait_ms": batch_wait_ms, "machine": machine(), "one_daemon": {}, "one_process_per_model": {}}
    daemons: list = []
    try:
        for k in counts:
            progress(f"one daemon, {k} model(s), {devices} devices")
            models = None if k == 1 else [(f"m{i}", copies[i], patterns) for i, patterns in enumerate(_patterns(k))]
            daemons[:] = [Daemon(workdir, broker.port, copies[0], f"bench-models-{k}", collector, plan, models=models)]
            result["one_daemon"][k] = _measure(run, daemons, devices, rate, seconds, capacity_slots)
            daemons[0].stop()
            if k == 1:
                continue
            progress(f"{k} daemon processes, one model each, {devices} devices by hash partition")
            daemons[:] = [Daemon(workdir, broker.port, copies[i], f"bench-models-{k}-p{i}", collector, plan, partition=(k, i))
                          for i in range(k)]
            result["one_process_per_model"][k] = _measure(run, daemons, devices, rate, seconds, capacity_slots)
            for d in daemons:
                d.stop()
        daemons.clear()
    finally:
        for d in daemons:
            d.stop()
        collector.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    one = result["one_daemon"][1]
    for k, phase in result["one_daemon"].items():
        if k > 1:
            phase["mib_per_added_model"] = round((phase["rss_mib"] - one["rss_mib"]) / (k - 1), 1)
            phase["cpu_vs_one_model"] = round(phase["cpu_us_per_reading"] / one["cpu_us_per_reading"], 2)
    for k, phase in result["one_process_per_model"].items():
        phase["mib_per_added_model"] = round((phase["rss_mib"] - one["rss_mib"]) / (k - 1), 1)
        phase["cpu_vs_one_model"] = round(phase["cpu_us_per_reading"] / one["cpu_us_per_reading"], 2)
    for phases in (result["one_daemon"], result["one_process_per_model"]):
        for phase in phases.values():
            if "capacity_cpu_us_per_reading" in phase:
                phase["capacity_cpu_vs_one_model"] = round(phase["capacity_cpu_us_per_reading"] / one["capacity_cpu_us_per_reading"], 2)
    result["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    return result


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; {result['devices']} devices, readings paced "
             f"one at a time at {result['rate']:.0f}/s for {result['seconds']:.0f} s after every window was full.", "",
             "| models | setup | processes | RSS (MiB) | MiB per added model | CPU us/reading | vs one model | all forecasts | backlog: readings/s | backlog: CPU us/reading (vs one model) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, phase in result["one_daemon"].items():
        lines.append(f"| {k} | one daemon | 1 | {phase['rss_mib']:.1f} | {phase.get('mib_per_added_model', '-')} | "
                     f"{phase['cpu_us_per_reading']:.0f} | {phase.get('cpu_vs_one_model', 1.0)} | {phase['complete']} | {_backlog(phase)} |")
        naive = result["one_process_per_model"].get(k)
        if naive is not None:
            lines.append(f"| {k} | one process per model (naive) | {naive['processes']} | {naive['rss_mib']:.1f} | "
                         f"{naive['mib_per_added_model']} | {naive['cpu_us_per_reading']:.0f} | {naive['cpu_vs_one_model']} | {naive['complete']} | "
                         f"{_backlog(naive)} |")
    return "\n".join(lines)


def _backlog(phase: dict) -> str:
    if "capacity_readings_per_s" not in phase:
        return "- | -"
    return f"{phase['capacity_readings_per_s']:,.0f} | {phase['capacity_cpu_us_per_reading']:.0f} ({phase['capacity_cpu_vs_one_model']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.bench_models", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--models", default="1,2,4", help="model counts to measure (1 is always measured: the reference)")
    parser.add_argument("--rate", type=float, default=200.0, help="readings per second in the paced phase")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-wait-ms", type=float, help="inference.batch_wait_ms of every daemon (default: the configured default)")
    parser.add_argument("--capacity-slots", type=int, default=0, help="also drain a backlog of this many slots per device (0: no)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    counts = sorted({1, *(int(k) for k in args.models.split(","))})
    result = run_models_bench(args.devices, counts, args.rate, args.seconds, progress=lambda text: print(f"# {text}", flush=True),
                              capacity_slots=args.capacity_slots, batch_wait_ms=args.batch_wait_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
