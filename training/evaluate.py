"""Forecast metrics in original units: the model against the repeat-last baseline, overall and per target."""

from __future__ import annotations

import numpy as np

from training.data import Prepared


def forecasts(prepared: Prepared, predict, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model, repeat_last, observed) for the windows at `starts`, each (W, H, T) in original units."""
    x, y = prepared.windows(starts)  # (W, L, F), (W, H, T)
    t_idx = prepared.target_index
    mean, std = prepared.scaler.mean[t_idx], prepared.scaler.std[t_idx]
    model = predict(x) * std + mean  # (W, H, T)
    last = np.repeat(x[:, -1:, t_idx], prepared.horizon, axis=1) * std + mean  # (W, H, T)
    return model, last, y * std + mean


def _errors(pred: np.ndarray, obs: np.ndarray, axis=None) -> dict:
    err = pred.astype(np.float64) - obs
    return {"rmse": float(np.sqrt(np.mean(err**2, axis=axis))), "mae": float(np.mean(np.abs(err), axis=axis))}


def metrics(prepared: Prepared, predict, split: str) -> dict:
    model, last, obs = forecasts(prepared, predict, prepared.starts[split])
    per_target = {
        name: {"model": _errors(model[..., j], obs[..., j]), "repeat_last": _errors(last[..., j], obs[..., j])}
        for j, name in enumerate(prepared.targets)
    }
    per_step_rmse = np.sqrt(np.mean((model - obs) ** 2, axis=(0, 2))).round(5).tolist()
    return {"windows": int(len(obs)), "model": _errors(model, obs), "repeat_last": _errors(last, obs),
            "per_target": per_target, "model_rmse_per_step": per_step_rmse}


def format_metrics(title: str, m: dict) -> str:
    lines = [f"{title}: {m['windows']} windows   RMSE model {m['model']['rmse']:.4f} vs repeat-last "
             f"{m['repeat_last']['rmse']:.4f}   MAE {m['model']['mae']:.4f} vs {m['repeat_last']['mae']:.4f}"]
    for name, pt in m["per_target"].items():
        lines.append(f"  {name:16s} RMSE {pt['model']['rmse']:.4f} vs {pt['repeat_last']['rmse']:.4f}   "
                     f"MAE {pt['model']['mae']:.4f} vs {pt['repeat_last']['mae']:.4f}")
    return "\n".join(lines)
