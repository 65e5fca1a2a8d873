#!/usr/bin/env python3
"""Where the daemon's CPU goes at a paced, steady rate: a per-reading cost breakdown anyone can repeat.

A private mosquitto, the real daemon (`python -m agent run`, default settings, the shipped model), every device's
window filled, then readings paced one at a time at `--rate` for `--seconds` while py-spy samples every thread of
the daemon (idle samples dropped). Each sample's stack is put in one bucket by the innermost frame of ours that
names a stage (receive/decode, window, model, scoring and alert state, encode, publish, thread hand-offs); the
table gives each bucket's share and its CPU time per reading (the daemon's measured CPU over the phase split
by the shares).

    .venv/bin/python scripts/profile_paced.py --rate 1000 --seconds 20
    .venv/bin/python scripts/profile_paced.py --rate 1000 --top 40    # also the hottest functions

Needs py-spy (the dev extra) and root or ptrace rights over the daemon.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.tools import bench  # noqa: E402

# (bucket, predicate on a "function (file:line)" frame), tried from the innermost frame outwards; first hit wins.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model (onnxruntime)", ("model.py", "onnxruntime", "Pipeline.infer")),
    ("encode", ("payloads.py",)),
    ("publish (socket write)", ("publish_many", "queue_raw_packets", "_write_raw_now", "loop_write", "_packet_write", "_packet_queue",
                                "set_retained")),
    ("scoring and alert state", ("detect.py", "state.py", "learning.py", "Pipeline.finish", "Pipeline._emit", "_past_forecasts",
                                 "_remember")),
    ("window", ("window.py", "arrays.py", "Pipeline.prepare", "Pipeline._device")),
    ("receive/decode (paho, parse)", ("ingest.py", "_take_buffered_publishes", "loop_read", "_on_publishes", "_on_messages", "on_messages",
                                      "_BufferedSocket", "recv")),
    ("thread hand-offs (queues, wake-ups)", ("queue.py", "threading.py", "get_many", "put_all_nowait", "wait_for_items")),
    ("pipeline (batching, other)", ("pipeline.py", "app.py", "engine.py", "publisher.py", "router.py")),
]


def _idle_frames() -> tuple[str, ...]:
    """Innermost frames where a thread waits (py-spy counts some waits in system calls as busy): lock and
    condition waits, sleeps, and paho's select (found by its line, which depends on paho's version)."""
    import paho.mqtt.client as paho_client

    lines = Path(paho_client.__file__).read_text().splitlines()
    select_lines = [f"paho/mqtt/client.py:{k + 1})" for k, line in enumerate(lines) if "select.select(" in line]
    return ("Condition.wait", "Event.wait", "_Client._hold", *select_lines)


IDLE = _idle_frames()


def bucket(stack: list[str]) -> str:
    if stack and any(key in stack[-1] for key in IDLE):
        return "idle"
    for frame in reversed(stack):  # innermost first
        for name, keys in STAGES:
            if any(k in frame for k in keys):
                return name
    return "other"


def thread_cpu(pid: int) -> dict[str, tuple[float, float, int]]:
    """Per thread (tid:name): CPU seconds (schedstat), user/system split (stat ticks), voluntary switches."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
            switches = sum(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                           if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[f"{task.name}:{name}"] = (ns / 1e9, int(fields[12]) / 100, switches)
        except (OSError, ValueError):
            continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="readings per second, paced one at a time")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--sample-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=0, help="also print the N hottest innermost functions")
    parser.add_argument("--batch-wait-ms", type=float, help="inference.batch_wait_ms of the daemon (default: the configured default)")
    parser.add_argument("--no-profile", action="store_true", help="per-thread CPU only, without py-spy (which takes CPU itself)")
    parser.add_argument("--naive", action="store_true", help="the naive daemon (one model call per message) instead, no profile")
    parser.add_argument("--naive-hold-ms", type=float, default=0.0,
                        help="with --naive: the naive daemon that holds readings this long and batches them (the floor)")
    parser.add_argument("--config", action="append", default=[], metavar="LINE",
                        help="extra TOML for the daemon's configuration, e.g. '[inference]\\nbatch_wait_ms = 0'")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    model = REPO / "exported_models" / "pump-lstm"
    plan = bench.Plan(devices=args.devices, batch_wait_ms=args.batch_wait_ms)
    from agent.core.model import load_bundle

    bundle = load_bundle(model, 1)
    period, lookback = bundle.period_s, bundle.lookback
    del bundle
    workdir = Path(tempfile.mkdtemp(prefix="edgecast-profile-"))
    broker = bench.Broker(workdir)
    collector = bench.Collector(broker.port)
    run = bench.Run(plan, model, workdir, broker.port, collector, period, lookback, int((time.time() - 5 * 86400) // period))
    if args.naive:
        helper = bench.Helper("naive", "--port", str(broker.port), "--model", str(model), "--threads", "1",
                              "--hold-ms", str(args.naive_hold_ms))
        alive = lambda: helper.proc.poll() is None  # noqa: E731
        try:
            run.warm(args.devices, args.devices, alive)
            phase = run.paced(helper.pid, args.devices, args.rate, args.seconds, alive)
        finally:
            helper.terminate()
            collector.stop()
            broker.stop()
        held = f" holding {args.naive_hold_ms:g} ms" if args.naive_hold_ms else ""
        print(f"naive daemon{held}, {args.rate:.0f} readings/s paced: CPU {phase['cpu_cores']:.3f} cores = {phase['cpu_us_per_reading']:.0f} us "
              f"per reading; latency p50 {phase['p50_ms']:.1f} ms, p99 {phase['p99_ms']:.1f} ms")
        return 0
    daemon = bench.Daemon(workdir, broker.port, model, "profile", collector, plan, extra_config=args.config)
    try:
        run.warm(args.devices, args.devices, daemon.alive)
        slots = max(1, round(args.rate * args.seconds / args.devices))
        raw = workdir / "profile.txt"
        spy = None if args.no_profile else subprocess.Popen(
            [py_spy, "record", "--pid", str(daemon.pid), "--rate", str(args.sample_rate), "--format", "raw", "--threads", "--nonblocking",
             "--output", str(raw), "--duration", str(int(args.seconds) + 30)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        before = thread_cpu(daemon.pid)
        phase = run.latency(daemon.pid, args.devices, slots, args.rate, daemon.alive)
        after = thread_cpu(daemon.pid)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            spy.wait(60)
    finally:
        counters = daemon.stop()
        collector.stop()
        broker.stop()
    print(f"daemon counters: {({k: v for k, v in counters.items() if k != 'rejected_by_reason'})}")
    counts: collections.Counter[str] = collections.Counter()
    inner: collections.Counter[str] = collections.Counter()
    for line in (raw.read_text().splitlines() if raw.exists() else []):
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")[1:]  # the first is the thread's name
        stage = bucket(frames)
        counts[stage] += int(n)
        if stage != "idle":
            inner[frames[-1] if frames else "?"] += int(n)
    idle = counts.pop("idle", 0)
    total = sum(counts.values()) or 1
    cpu_us = phase["cpu_cores"] / phase["achieved_rate"] * 1e6
    print(f"{args.rate:.0f} readings/s paced ({phase['achieved_rate']:.0f} achieved), {args.devices} devices, {args.seconds:.0f} s; "
          f"CPU {phase['cpu_cores']:.3f} cores = {cpu_us:.0f} us per reading; latency p50 {phase['p50_ms']:.1f} ms, "
          f"p99 {phase['p99_ms']:.1f} ms; CPU: {bench.machine()['cpu']}")
    readings = phase["readings"]
    print("\n| thread | us per reading | system share | context switches per reading |\n|---|---:|---:|---:|")
    for key in sorted(after, key=lambda k: after[k][0] - before.get(k, (0, 0, 0))[0], reverse=True):
        cpu, sys_s, sw = (a - b for a, b in zip(after[key], before.get(key, (0, 0, 0))))
        if cpu > 0.001:
            print(f"| {key} | {cpu / readings * 1e6:.0f} | {sys_s / cpu:.0%} | {sw / readings:.2f} |")
    print("\n| stage | share of busy samples | us per reading |\n|---|---:|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {n / total:.0%} | {n / total * cpu_us:.0f} |")
    if args.top:
        print(f"\nhottest innermost frames ({total} busy samples; {idle} waiting, left out):")
        for frame, n in inner.most_common(args.top):
            print(f"{n / total:6.1%}  {frame}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
