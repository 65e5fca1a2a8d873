#!/usr/bin/env python3
"""Write agent/bench_pumps.npz, the healthy pump telemetry the benchmark's load generator replays.

Four healthy pumps of the synthetic fleet (simulation/synth.py: the physics the shipped pump-lstm was trained on),
four days at one reading a minute, no faults and no dropouts; float32 in original units, (pumps, slots, features).
Deterministic: `python scripts/bench_trace.py` writes the same file again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulation import synth  # noqa: E402

FEATURES = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]
PUMPS, HOURS, SEED = 4, 96, 21


def main() -> int:
    config = synth.FleetConfig(devices=PUMPS, hours=HOURS, seed=SEED, faults="none", dropout_rate=0.0, dropout_burst_rate=0.0)
    rows = synth.generate_fleet(config).rows
    pumps = sorted(set(rows["device"].tolist()))
    values = np.stack([np.stack([rows[f][rows["device"] == p] for f in FEATURES], axis=1) for p in pumps])  # (P, N, F)
    out = REPO / "agent" / "tools" / "bench_pumps.npz"
    np.savez_compressed(out, values=values.astype(np.float32), features=np.array(FEATURES), period_s=np.array(60.0))
    print(f"wrote {out} {values.shape} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
