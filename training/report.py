"""Run reports next to a bundle: report.json (everything), report.md (short), PNG plots (learning curves,
forecast vs actual on test windows, one-step residual distribution with the anomaly thresholds).

`report_files` also adds `metrics.test.interval_coverage` (training.intervals.coverage: the empirical coverage
of the bundle's prediction intervals on the test split, per level and step) to the manifest it is given, which
its callers write after it."""

from __future__ import annotations

import io
import json

import numpy as np

from training.data import Prepared

MAX_PLOTTED_TARGETS = 6


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plots(prepared: Prepared, predict, history: list[dict], calibration: dict, max_windows: int = 3) -> dict[str, bytes]:
    """The three PNGs as {file name: bytes}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss (scaled units)", title="Learning curves", yscale="log")
    ax.legend()
    out["learning_curves.png"] = _png(fig)

    starts = prepared.starts["test"]
    pick = starts[np.linspace(0, len(starts) - 1, min(max_windows, len(starts))).astype(int)]
    x, y = prepared.windows(pick)  # (W, L, F), (W, H, T)
    pred = predict(x)  # (W, H, T)
    t_idx = prepared.target_index
    scale, offset = prepared.scaler.scale[t_idx], prepared.scaler.offset[t_idx]
    n_t = min(len(prepared.targets), MAX_PLOTTED_TARGETS)  # 52 targets x 3 windows took 15 s to draw
    fig, axes = plt.subplots(n_t, len(pick), figsize=(3.2 * len(pick), 2.2 * n_t), squeeze=False)
    tail = min(prepared.lookback, 3 * prepared.horizon)
    intervals = calibration.get("intervals")
    band = (np.asarray(intervals["lower"])[-1], np.asarray(intervals["upper"])[-1]) if intervals else None  # (H, T) scaled
    for w in range(len(pick)):
        for j in range(n_t):
            a = axes[j][w]
            past = x[w, -tail:, t_idx[j]] * scale[j] + offset[j]
            a.plot(np.arange(-tail, 0), past, color="grey", label="input")
            a.plot(np.arange(prepared.horizon), y[w, :, j] * scale[j] + offset[j], "k.-", label="actual")
            a.plot(np.arange(prepared.horizon), pred[w, :, j] * scale[j] + offset[j], "r.-", label="forecast")
            if band is not None:  # the widest prediction interval
                a.fill_between(np.arange(prepared.horizon), (pred[w, :, j] + band[0][:, j]) * scale[j] + offset[j],
                               (pred[w, :, j] + band[1][:, j]) * scale[j] + offset[j], color="red", alpha=0.15,
                               label=f"{100 * intervals['levels'][-1]:g} % interval")
            if w == 0:
                a.set_ylabel(prepared.targets[j], fontsize=8)
            a.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Forecast vs actual, test windows")
    out["forecast_vs_actual.png"] = _png(fig)

    x, y = prepared.windows(starts)
    resid = (y - predict(x))[:, 0, :]  # (W, T) one-step residuals, scaled
    z = (resid - np.asarray(calibration["residual_mean"])[0]) / np.asarray(calibration["residual_std"])[0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, name in enumerate(prepared.targets[:MAX_PLOTTED_TARGETS]):
        ax.hist(np.clip(z[:, j], -10, 10), bins=80, histtype="step", density=True, label=name)
    # The warning in z units: the fast family's level where the calibration has one (then the score's warning is 1).
    warning = calibration.get("family_levels", {}).get("fast", calibration["thresholds"]["warning"])
    for level, style, label in ((warning, "--", "warning"), (2 * warning, ":", "critical")):
        for sign in (-1, 1):
            ax.axvline(sign * level, color="red", linestyle=style, label=label if sign > 0 else None)
    ax.set(xlabel="one-step residual z (test windows)", ylabel="density", yscale="log",
           title="Residuals and anomaly thresholds (score units)")
    ax.legend(fontsize=7)
    out["residuals.png"] = _png(fig)
    return out


def markdown(manifest: dict, history: list[dict]) -> str:
    arch, train = manifest["architecture"], manifest["training"]
    lines = [f"# {manifest['name']} {manifest['version']}", "",
             f"{arch.get('type')} / strategy {manifest['strategy']}"
             f"{' / differenced' if manifest.get('preprocessing', {}).get('difference') else ''}: "
             f"lookback {manifest['lookback']} -> horizon {manifest['horizon']} at {manifest['sampling_period_s']} s, "
             f"targets {', '.join(manifest['targets'])}.", "",
             f"Command: `{train.get('command', '')}`", "",
             f"Training: {train.get('epochs')} epochs (best {train.get('best_epoch')}), "
             f"{np.mean([h['seconds'] for h in history]) if history else 0:.1f} s/epoch, "
             f"{np.mean([h['windows_per_s'] for h in history]) if history else 0:.0f} windows/s.", "",
             "| split | forecaster | RMSE | MAE | MAPE % | SMAPE % | direction |", "|---|---|---|---|---|---|---|"]
    for split in ("validation", "test"):
        m = manifest["metrics"].get(split, {})
        for name in ("model", "repeat_last", "seasonal_naive"):
            d = m.get(name)
            if d:
                lines.append(f"| {split} | {name} | {d['rmse']:.4f} | {d['mae']:.4f} | {d['mape']:.2f} | {d['smape']:.2f} | "
                             f"{d.get('direction_accuracy', float('nan')):.2f} |")
    from training.intervals import coverage_markdown

    cov = coverage_markdown(manifest["metrics"].get("test", {}).get("interval_coverage"))
    if cov:
        lines += [""] + cov
    t = manifest["calibration"]["thresholds"]
    lines += ["", f"Anomaly thresholds (score units): warning {t['warning']:.3f}, critical {t['critical']:.3f}, exit {t['exit']:.3f}.",
              "", "![learning curves](learning_curves.png) ![forecast vs actual](forecast_vs_actual.png) ![residuals](residuals.png)"]
    return "\n".join(lines) + "\n"


def report_files(manifest: dict, prepared: Prepared, predict, history: list[dict], extra: dict | None = None) -> dict:
    """report.json + report.md + the plots, as {file name: str | bytes} for export.write_bundle."""
    from training.intervals import coverage

    test = manifest["metrics"].get("test")
    if isinstance(test, dict) and "interval_coverage" not in test and manifest["calibration"].get("intervals"):
        # the manifest (written after this) and the reports carry the intervals' empirical test coverage
        test["interval_coverage"] = coverage(manifest, prepared, predict, "test")
    body = {"name": manifest["name"], "architecture": manifest["architecture"], "strategy": manifest["strategy"],
            "metrics": manifest["metrics"], "history": history, "training": manifest["training"], **(extra or {})}
    files: dict = {"report.json": json.dumps(body, indent=2) + "\n", "report.md": markdown(manifest, history)}
    files.update(plots(prepared, predict, history, manifest["calibration"]))
    return files
