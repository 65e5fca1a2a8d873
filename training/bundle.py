"""Any trained forecaster -> a verified bundle the daemon loads: ONNX export (checked against PyTorch at batch
1, 7, 64), metrics against the baselines, anomaly calibration, manifest, reports and plots.

`calibration="full"` runs the daemon's detector over the validation split (training.calibrate);
`"residual"` only measures the residual statistics and keeps the contract's default thresholds (fast: tests,
comparisons, search trials).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training import evaluate
from training.data import Prepared
from training.export import OnnxPredictor, export_onnx, utc_now, write_bundle

DEFAULT_THRESHOLDS = {"warning": 3.0, "critical": 6.0, "exit": 2.1}
EWMA_ALPHA = 0.2


def torch_predictor(model: torch.nn.Module, chunk: int = 1024):
    """Scaled (W, L, F) numpy -> scaled (W, H, T) numpy with the PyTorch model, in chunks."""
    model.eval()

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i : i + chunk]))).numpy()
                               for i in range(0, len(x), chunk)])

    return predict


def residual_calibration(prepared: Prepared, predict) -> dict:
    from training.intervals import fit_intervals, validation_residuals

    resid = validation_residuals(prepared, predict).astype(np.float32)  # (W, H, T) observed - forecast, scaled
    return {"residual_mean": resid.mean(axis=0).tolist(), "residual_std": np.maximum(resid.std(axis=0), 1e-6).tolist(),
            "ewma_alpha": EWMA_ALPHA, "thresholds": dict(DEFAULT_THRESHOLDS), "source": "residual statistics only, default thresholds",
            "intervals": fit_intervals(prepared, resid)}


def architecture_section(model: torch.nn.Module, cfg) -> dict:
    describe = getattr(model, "describe", None)
    info = describe() if describe else {"type": "lstm", "head": "mlp, predicts the change from the last observed value"}
    info = {k: v for k, v in info.items() if k != "strategy"}
    info.update({"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "dropout": cfg.dropout})
    if info["type"] == "cnn_lstm":
        info["conv_channels"] = cfg.conv_channels
    if info["type"] == "encoder_decoder":
        info["teacher_forcing"] = cfg.teacher_forcing
    return info


def export_bundle(model: torch.nn.Module, prepared: Prepared, cfg, out_dir: str | Path, *, name: str,
                  version: str = "1.0.0", command: str = "", history: list[dict] | None = None,
                  training_info: dict | None = None, calibration: str = "residual", reports: bool = True,
                  extra_report: dict | None = None, log=print) -> dict:
    """Export, verify, evaluate, calibrate and write the bundle folder; return the manifest."""
    began = time.perf_counter()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_info = export_onnx(model, onnx_path, prepared.lookback, len(prepared.features), cfg.seed)
        predict = OnnxPredictor(onnx_path, threads=cfg.threads)
        test_metrics = evaluate.metrics(prepared, predict, "test")
        val_metrics = evaluate.metrics(prepared, predict, "val")
        if calibration == "full":
            from training import calibrate

            cal = calibrate.calibrate(prepared, predict)[0]
        else:
            cal = residual_calibration(prepared, predict)
        manifest = {
            "schema_version": 1, "name": name, "version": version, "created_at": utc_now(),
            "features": list(prepared.features), "targets": list(prepared.targets),
            "lookback": prepared.lookback, "horizon": prepared.horizon, "sampling_period_s": prepared.period_s,
            "scaler": prepared.scaler.manifest(prepared.features),
            "strategy": getattr(model, "strategy", "mimo"),
            "architecture": architecture_section(model, cfg),
            "preprocessing": {"difference": bool(getattr(model, "difference", False)), "in_graph": True},
            "training": {"command": command, "config": cfg.to_dict(), "seed": cfg.seed,
                         "train_rows": prepared.rows_per_split["train"], "val_rows": prepared.rows_per_split["val"],
                         "test_rows": prepared.rows_per_split["test"], "train_windows": int(len(prepared.starts["train"])),
                         **(training_info or {})},
            "onnx": onnx_info,
            "metrics": {"test": test_metrics, "validation": val_metrics},
            "calibration": cal,
        }
        files = {}
        if reports:
            from training.report import report_files

            files = report_files(manifest, prepared, predict, history or [], extra_report)
        write_bundle(out_dir, onnx_path, manifest, files)
    log(f"wrote {out_dir} ({time.perf_counter() - began:.1f} s): test RMSE {test_metrics['model']['rmse']:.4f} "
        f"vs repeat-last {test_metrics['repeat_last']['rmse']:.4f}; ONNX max abs diff {onnx_info['verified']['max_abs_diff']:.1e}")
    return manifest
