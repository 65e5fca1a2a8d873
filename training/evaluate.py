"""Forecast metrics in original units: the model against the repeat-last and seasonal-naive baselines,
overall, per target and per horizon step (RMSE, MAE, MAPE, SMAPE, direction accuracy), and time-series
cross-validation with expanding or sliding training windows.
"""

from __future__ import annotations

import numpy as np

from training.data import Prepared

METRICS = ("rmse", "mae", "mape", "smape", "direction_accuracy")


def _original(prepared: Prepared, scaled: np.ndarray) -> np.ndarray:
    t_idx = prepared.target_index
    return scaled * prepared.scaler.scale[t_idx] + prepared.scaler.offset[t_idx]


def seasonal_naive(prepared: Prepared, starts: np.ndarray, season: int) -> tuple[np.ndarray, np.ndarray]:
    """Scaled forecasts (W, H, T) = the value one season before each target step, and a (W,) mask of the
    windows whose season lies inside the same device's data (finite)."""
    offsets = np.asarray(prepared.offsets)
    device_start = offsets[np.searchsorted(offsets, starts, side="right") - 1]  # (W,)
    rows = starts[:, None] + prepared.lookback + np.arange(prepared.horizon) - season  # (W, H)
    ok = (rows >= device_start[:, None]).all(axis=1)
    safe = np.where(ok[:, None], rows, 0)
    values = prepared.scaled[safe][:, :, prepared.target_index]  # (W, H, T)
    ok &= np.isfinite(values).all(axis=(1, 2))
    return values, ok


def choose_season(prepared: Prepared, starts: np.ndarray, season: int | None = None) -> int:
    """A day of samples when most windows have one behind them, else the lookback (the longest season every
    window can see)."""
    if season:
        return int(season)
    daily = int(round(86400 / prepared.period_s))
    if daily >= prepared.horizon and len(starts) and seasonal_naive(prepared, starts, daily)[1].mean() >= 0.5:
        return daily
    return max(prepared.lookback, prepared.horizon)


def forecasts(prepared: Prepared, predict, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model, repeat_last, observed) for the windows at `starts`, each (W, H, T) in original units."""
    x, y = prepared.windows(starts)  # (W, L, F), (W, H, T)
    t_idx = prepared.target_index
    model = _original(prepared, predict(x))  # (W, H, T)
    last = _original(prepared, np.repeat(x[:, -1:, t_idx], prepared.horizon, axis=1))  # (W, H, T)
    return model, last, _original(prepared, y)


def _errors(pred: np.ndarray, obs: np.ndarray, last: np.ndarray | None = None, axis=None) -> dict:
    """Error metrics over `axis` (None = everything); `last` (the last observed value) for direction accuracy."""
    pred = pred.astype(np.float64)
    obs = obs.astype(np.float64)
    err = pred - obs
    out = {"rmse": np.sqrt(np.mean(err**2, axis=axis)), "mae": np.mean(np.abs(err), axis=axis)}
    with np.errstate(divide="ignore", invalid="ignore"):
        ape = np.where(np.abs(obs) > 1e-9, np.abs(err) / np.abs(obs), np.nan)
        out["mape"] = 100 * np.nanmean(ape, axis=axis)
        denom = np.abs(pred) + np.abs(obs)
        out["smape"] = 200 * np.mean(np.where(denom > 0, np.abs(err) / np.where(denom > 0, denom, 1), 0.0), axis=axis)
    if last is not None:
        out["direction_accuracy"] = np.mean(np.sign(pred - last) == np.sign(obs - last), axis=axis)
    return {k: (float(v) if np.ndim(v) == 0 else np.round(v, 6).tolist()) for k, v in out.items()}


def metrics(prepared: Prepared, predict, split: str, season: int | None = None) -> dict:
    """Every metric, overall / per target / per horizon step, for the model and both baselines."""
    starts = prepared.starts[split]
    model, last, obs = forecasts(prepared, predict, starts)
    anchor = last  # the last observed value, repeated over the horizon
    season = choose_season(prepared, starts, season)
    naive_scaled, naive_ok = seasonal_naive(prepared, starts, season)
    naive = _original(prepared, naive_scaled)
    forecasters = {"model": (model, np.ones(len(obs), bool)), "repeat_last": (last, np.ones(len(obs), bool)),
                   "seasonal_naive": (naive, naive_ok)}
    out: dict = {"windows": int(len(obs)), "seasonal_naive_season_steps": season,
                 "seasonal_naive_windows": int(naive_ok.sum())}
    for name, (pred, ok) in forecasters.items():
        out[name] = _errors(pred[ok], obs[ok], anchor[ok]) if ok.any() else None
    out["per_target"] = {
        target: {name: (_errors(pred[ok][..., j], obs[ok][..., j], anchor[ok][..., j]) if ok.any() else None)
                 for name, (pred, ok) in forecasters.items()}
        for j, target in enumerate(prepared.targets)
    }
    out["per_step"] = {name: (_errors(pred[ok], obs[ok], anchor[ok], axis=(0, 2)) if ok.any() else None)
                       for name, (pred, ok) in forecasters.items()}
    out["model_rmse_per_step"] = out["per_step"]["model"]["rmse"]
    return out


def format_metrics(title: str, m: dict) -> str:
    def row(label: str, d: dict | None) -> str:
        if d is None:
            return f"  {label:15s} (no windows)"
        return (f"  {label:15s} RMSE {d['rmse']:.4f}  MAE {d['mae']:.4f}  MAPE {d['mape']:.2f}%  "
                f"SMAPE {d['smape']:.2f}%  direction {d.get('direction_accuracy', float('nan')):.2f}")

    lines = [f"{title}: {m['windows']} windows (original units)"]
    for name in ("model", "repeat_last", "seasonal_naive"):
        lines.append(row(name, m.get(name)))
    for target, pt in m["per_target"].items():
        lines.append(f"  {target:16s} RMSE model {pt['model']['rmse']:.4f} vs repeat-last {pt['repeat_last']['rmse']:.4f}")
    return "\n".join(lines)


def cross_validate(rows, cfg, folds: int = 3, mode: str = "expanding", initial: float = 0.5, log=print,
                   prepare_kwargs: dict | None = None) -> dict:
    """Time-series cross-validation: the later part of every device's series is cut into `folds` blocks;
    fold i trains on what precedes block i (all of it: expanding; the latest `initial` share: sliding) and is
    scored on block i. Never shuffled, never trained on the future."""
    from training.data import Split, prepare
    from training.train import fit

    if mode not in ("expanding", "sliding"):
        raise ValueError("mode must be expanding or sliding")
    block = (1 - initial) / folds
    results = []
    for i in range(folds):
        train_end = initial + i * block
        fractions = (train_end, block, max(1.0 - train_end - block, 0.0))
        split = Split(fractions=fractions, train_start=0.0 if mode == "expanding" else train_end - initial)
        prepared = prepare(rows, cfg.lookback, cfg.horizon, required_splits=("train", "val"), split=split,
                           **(prepare_kwargs or {}))
        result = fit(prepared, cfg, log=lambda *_: None)

        def predict(x, model=result.model):
            import torch

            with torch.no_grad():
                return np.concatenate([model(torch.from_numpy(x[j : j + 1024])).numpy() for j in range(0, len(x), 1024)])

        m = metrics(prepared, predict, "val")
        results.append({"fold": i, "train_fraction": [split.train_start, train_end], "val_fraction": [train_end, train_end + block],
                        "train_windows": int(len(prepared.starts["train"])), "metrics": m})
        log(f"fold {i} ({mode}): train {split.train_start:.2f}-{train_end:.2f}, val {train_end:.2f}-{train_end + block:.2f}: "
            f"RMSE model {m['model']['rmse']:.4f} vs repeat-last {m['repeat_last']['rmse']:.4f}")
    mean = {name: {k: float(np.mean([r["metrics"][name][k] for r in results])) for k in ("rmse", "mae")}
            for name in ("model", "repeat_last")}
    return {"mode": mode, "folds": results, "mean": mean}
