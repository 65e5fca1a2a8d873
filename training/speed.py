"""`python -m training speed`: training throughput (windows/s over one epoch) and peak memory (VmHWM) of the real
training loop (training.train.fit) on a synthetic fleet.

Each variant runs in a fresh process so its peak resident memory is its own (torch itself is ~250 MiB of it).
`--all` compares full backpropagation through time in float32 and bfloat16, each with the whole batch in one
pass (oneDNN splitting every LSTM step over the threads) and in micro-batches run by worker threads (the training
default), and truncated BPTT (the whole window runs forward, gradients flow through the last N steps).

Windows per CPU second is the figure to compare on a shared machine: wall-clock windows/s depends on what else
runs on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lookback", type=int, default=336)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32, help="windows per forward/backward pass (0 = the whole batch)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (micro-batches) or oneDNN threads (whole batch)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto (the training default): bf16 where the CPU computes it natively")
    parser.add_argument("--tbptt", type=int, default=0, help="truncated BPTT steps (0 = full)")
    parser.add_argument("--devices", type=int, default=4, help="synthetic pumps")
    parser.add_argument("--hours", type=float, default=96.0, help="hours of data per pump")
    parser.add_argument("--max-batches", type=int, default=40, help="batches timed in the epoch (0 = the whole epoch)")
    parser.add_argument("--all", action="store_true", help="run the variants, each in its own process, and print a table")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --all)")


def peak_rss_mib() -> float:
    """VmHWM: the peak resident set of this process."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    from training.data import prepare
    from simulation.synth import FleetConfig, generate_fleet
    from training.train import TrainConfig, fit, resolve_precision

    fleet = generate_fleet(FleetConfig(devices=args.devices, hours=args.hours, seed=0, faults="none"))
    prepared = prepare(fleet.rows, args.lookback, args.horizon)
    del fleet
    cfg = TrainConfig(lookback=args.lookback, horizon=args.horizon, hidden_size=args.hidden, num_layers=args.layers,
                      batch_size=args.batch_size, micro_batch=args.micro_batch, epochs=1, train_stride=1, val_stride=8,
                      threads=args.threads,
                      architecture="many_to_one", precision=args.precision, tbptt=args.tbptt,
                      max_batches=args.max_batches, lr_schedule="constant")
    result = fit(prepared, cfg, log=lambda *_: None)
    h = result.history[0]
    return {"lookback": args.lookback, "hidden": args.hidden, "layers": args.layers, "batch_size": args.batch_size,
            "micro_batch": args.micro_batch,
            "precision": resolve_precision(args.precision), "tbptt": args.tbptt, "threads": args.threads,
            "windows": int(h["windows_per_s"] * h["seconds"] + 0.5), "seconds": h["seconds"],
            "windows_per_s": round(result.train_windows_per_s, 1),
            "windows_per_cpu_s": round(h["windows_per_s"] * h["seconds"] / max(h["cpu_seconds"], 1e-9), 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "val_loss": round(h["val_loss"], 5), "load_avg_1min": os.getloadavg()[0]}


WHOLE_BATCH, DEFAULT_MICRO_BATCH = 0, None
VARIANTS = (  # precision, micro-batch, truncated BPTT steps
    ("fp32", WHOLE_BATCH, 0), ("fp32", DEFAULT_MICRO_BATCH, 0), ("bf16", WHOLE_BATCH, 0), ("bf16", DEFAULT_MICRO_BATCH, 0),
    ("fp32", WHOLE_BATCH, 48))


def run(args: argparse.Namespace) -> int:
    if not args.all:
        figures = measure(args)
        if args.json:
            print(json.dumps(figures))
        else:
            print(f"{figures['windows_per_s']:.0f} windows/s, peak RSS {figures['peak_rss_mib']:.0f} MiB "
                  f"(lookback {args.lookback}, {args.layers} x {args.hidden} LSTM, batch {args.batch_size}, "
                  f"{figures['precision']}, {args.threads} threads, micro-batch {args.micro_batch or 'off'}, "
                  f"tbptt {args.tbptt or 'off'}, {figures['windows']} windows in {figures['seconds']:.1f} s, "
                  f"{figures['windows_per_cpu_s']:.0f} windows per CPU second, "
                  f"load {figures['load_avg_1min']:.2f})")
        return 0
    rows = []
    for precision, micro_batch, tbptt in VARIANTS:
        micro_batch = args.micro_batch if micro_batch is DEFAULT_MICRO_BATCH else micro_batch
        argv = ["speed", "--lookback", str(args.lookback), "--horizon", str(args.horizon), "--hidden", str(args.hidden),
                "--layers", str(args.layers), "--batch-size", str(args.batch_size), "--micro-batch", str(micro_batch),
                "--threads", str(args.threads),
                "--devices", str(args.devices), "--hours", str(args.hours), "--max-batches", str(args.max_batches),
                "--precision", precision, "--tbptt", str(tbptt), "--json"]
        began = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "training", *argv], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1]["wall_s"] = round(time.perf_counter() - began, 1)
    print("| precision | micro-batch | truncated BPTT | windows/s | windows per CPU s | peak RSS MiB | "
          "val loss after the timed batches | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['micro_batch'] or 'off (whole batch)'} | {r['tbptt'] or 'off (full)'} | "
              f"{r['windows_per_s']:.0f} | {r['windows_per_cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['val_loss']:.5f} | "
              f"{r['load_avg_1min']:.2f} |")
    return 0
