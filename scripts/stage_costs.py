#!/usr/bin/env python3
"""CPU per stage of the daemon's pipeline for batches of B readings, in one process (no threads, no MQTT).

The benchmark's healthy pumps (1,000 devices, every window filled first), then batches of `--batch` readings through
ingest.parse, Pipeline.prepare, infer, finish and the forecast encoder, each stage timed with thread CPU time.
`--sleep S` sleeps between batches, as the daemon does at a trickle of readings: on a shared VM the same work then
costs more (caches and the core's state are cold after each wait; docs/benchmarks.md, "Paced light load").

    .venv/bin/python scripts/stage_costs.py --batch 8
    .venv/bin/python scripts/stage_costs.py --batch 8 --sleep 0.005
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.transport import payloads  # noqa: E402
from agent.config.settings import Settings  # noqa: E402
from agent.core.events import Forecast  # noqa: E402
from agent.transport.ingest import Ingest  # noqa: E402
from agent.tools.loadgen import _manifest, _scaler, telemetry_payloads  # noqa: E402
from agent.core.model import load_bundle  # noqa: E402
from agent.core.pipeline import Pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="readings per batch")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds between batches")
    parser.add_argument("--readings", type=int, default=4000, help="readings timed")
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    model = REPO / "exported_models" / "pump-lstm"
    settings = Settings(model={"path": str(model)})
    bundle = load_bundle(model, 1)
    pipeline = Pipeline(bundle, settings)
    manifest = _manifest(str(model))
    features, offset, scale = _scaler(manifest)
    period = float(manifest["sampling_period_s"])
    first = int((time.time() - 5 * 86400) // period)
    slots = bundle.lookback + args.readings // args.devices + 2
    messages = telemetry_payloads(features, offset, scale, args.devices, first, slots, period, 0, first)
    ingest = Ingest(settings, features)
    warm = bundle.lookback * args.devices
    samples = [s for topic, body in messages[:warm] for s in ingest.parse(topic, body, time.time())]
    for start in range(0, len(samples), 1000):  # every window full
        pipeline.process(samples[start : start + 1000], time.time())
    stages = dict.fromkeys(("parse", "prepare", "infer", "finish", "encode"), 0.0)
    clock, n = time.thread_time, 0
    for start in range(warm, min(len(messages), warm + args.readings), args.batch):
        if args.sleep:
            time.sleep(args.sleep)
        t0 = clock()
        batch = [s for topic, body in messages[start : start + args.batch] for s in ingest.parse(topic, body, time.time())]
        t1 = clock()
        prepared = pipeline.prepare(batch)
        t2 = clock()
        forecasts = pipeline.infer(prepared)
        t3 = clock()
        events = pipeline.finish(prepared, forecasts, time.time())
        t4 = clock()
        payloads.forecasts([e for e in events if isinstance(e, Forecast)], bundle.name, bundle.version)
        t5 = clock()
        for name, began, ended in (("parse", t0, t1), ("prepare", t1, t2), ("infer", t2, t3), ("finish", t3, t4), ("encode", t4, t5)):
            stages[name] += ended - began
        n += len(batch)
    print(f"batch {args.batch}, sleep {args.sleep:g} s: " + ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in stages.items())
          + f"; total {sum(stages.values()) / n * 1e6:.0f} us per reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
