"""Small synthetic model bundles for tests (torch is only needed to build them; the agent never imports it).

`build_bundle` writes model.onnx + manifest.json (docs/contracts.md) for a tiny LSTM forecaster. With
`persistence=True` the LSTM head is multiplied by zero, so the model forecasts "the last value, H times":
exact, deterministic, and calibrated by construction for slowly varying data with known noise.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

PUMP_FEATURES = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]
REPO_ROOT = Path(__file__).resolve().parent.parent
PUMP_BUNDLE = REPO_ROOT / "exported_models" / "pump-lstm"


def build_bundle(
    out_dir: str | Path,
    *,
    features: list[str] | tuple[str, ...] = ("value",),
    targets: list[str] | tuple[str, ...] | None = None,
    lookback: int = 16,
    horizon: int = 4,
    period_s: int = 60,
    hidden: int = 8,
    persistence: bool = True,
    means: list[float] | None = None,
    stds: list[float] | None = None,
    residual_std: float = 0.15,
    thresholds: dict | None = None,
    ewma_alpha: float = 0.2,
    name: str = "test-model",
    version: str = "0.0.1",
    seed: int = 0,
    dynamic_batch: bool = True,
) -> Path:
    import torch
    from torch import nn

    features = list(features)
    targets = list(targets) if targets is not None else list(features)
    n_features, n_targets = len(features), len(targets)
    target_index = [features.index(t) for t in targets]
    torch.manual_seed(seed)

    class TinyForecaster(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
            self.head = nn.Linear(hidden, horizon * n_targets)
            self.register_buffer("mix", torch.tensor(0.0 if persistence else 1.0))
            self.register_buffer("target_index", torch.tensor(target_index, dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)  # (B, L, hidden)
            learned = self.head(out[:, -1]).view(-1, horizon, n_targets)  # (B, H, T)
            last = x[:, -1].index_select(1, self.target_index)  # (B, T)
            return last.unsqueeze(1) + self.mix * learned  # (B, H, T)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = TinyForecaster().eval()
    onnx_path = out / "model.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer chatter
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, lookback, n_features),),
            str(onnx_path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None,
            opset_version=17,
            dynamo=False,
        )
    means = means if means is not None else [10.0] * n_features
    stds = stds if stds is not None else [1.0] * n_features
    manifest = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created_at": "2026-11-21T15:00:00Z",
        "features": features,
        "targets": targets,
        "lookback": lookback,
        "horizon": horizon,
        "sampling_period_s": period_s,
        "scaler": {"type": "standard", "params": {f: {"mean": m, "std": s} for f, m, s in zip(features, means, stds)}},
        "strategy": "mimo",
        "architecture": {"type": "lstm", "hidden_size": hidden, "num_layers": 1, "dropout": 0.0},
        "training": {"command": "tests/bundles.py build_bundle", "config": {}, "seed": seed},
        "onnx": {
            "file": "model.onnx",
            "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "opset": 17,
            "input": "x",
            "output": "y",
        },
        "metrics": {},
        "calibration": {
            "residual_mean": [[0.0] * n_targets for _ in range(horizon)],
            "residual_std": [[residual_std] * n_targets for _ in range(horizon)],
            "ewma_alpha": ewma_alpha,
            "thresholds": thresholds or {"warning": 3.0, "critical": 6.0, "exit": 2.1},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


_scratch = Path(tempfile.mkdtemp(prefix="edgecast-test-bundles-"))
atexit.register(shutil.rmtree, _scratch, True)


@functools.lru_cache(maxsize=None)
def univariate_bundle(lookback: int = 16, horizon: int = 4, period_s: int = 60) -> Path:
    """A persistence forecaster of one feature `value` (mean 10, std 1), built once per test session."""
    return build_bundle(_scratch / f"uni-{lookback}-{horizon}-{period_s}", lookback=lookback, horizon=horizon, period_s=period_s)


@functools.lru_cache(maxsize=None)
def multivariate_bundle() -> Path:
    """A persistence forecaster of the four pump features with a target subset (two targets)."""
    return build_bundle(
        _scratch / "multi",
        features=PUMP_FEATURES,
        targets=["bearing_temp", "vibration_rms"],
        lookback=8,
        horizon=3,
        means=[55.0, 3.0, 20.0, 4.0],
        stds=[4.0, 0.5, 2.0, 0.3],
    )


def healthy_series(n: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """Slow sine around 10 plus white noise: a persistence forecaster's residual std is about noise * sqrt(2)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 10.0 + np.sin(2 * np.pi * t / 400.0) + rng.normal(0.0, noise, n)
