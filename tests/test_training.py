"""Training pipeline: temporal split, train-only scaler, fault-free windows, ONNX export parity, the bundle."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.__main__ import main as training_main
from training.data import prepare, to_device_series
from training.export import ExportError, export_onnx
from training.model import LSTMForecaster
from simulation.synth import FEATURES, FaultSpec, FleetConfig, generate_fleet, write_csv
from training.train import TrainConfig, build_model, evaluate_loss, fit

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def tiny_rows():
    faults = [FaultSpec("overheating", "pump-01", 3.0, 1.0)]
    return generate_fleet(FleetConfig(devices=2, hours=16.0, seed=11, faults=faults)).rows


def test_split_is_temporal_per_device(tiny_rows):
    """Train rows precede validation rows precede test rows on every device; windows stay inside their split."""
    prepared = prepare(tiny_rows, lookback=60, horizon=10)
    span = prepared.lookback + prepared.horizon
    for s, offset in zip(prepared.series, prepared.offsets):
        (tr_lo, tr_hi), (va_lo, va_hi), (te_lo, te_hi) = (s.bounds[k] for k in ("train", "val", "test"))
        assert tr_lo == 0 and tr_hi == va_lo and va_hi == te_lo and te_hi == len(s.ts)
        assert s.ts[tr_hi - 1] < s.ts[va_lo] < s.ts[te_lo]
        for split in ("train", "val", "test"):
            lo, hi = s.bounds[split]
            local = prepared.starts[split] - offset
            local = local[(local >= 0) & (local < len(s.ts))]
            assert local.size > 0
            assert (local >= lo).all() and (local + span <= hi).all()


def test_scaler_uses_training_rows_only(tiny_rows):
    """Shifting the validation/test rows by +100 leaves the scaler unchanged; shifting training rows does not."""
    base = prepare(tiny_rows).scaler
    series = to_device_series(tiny_rows)
    first_test_ts = {s.name: s.ts[s.bounds["val"][0]] for s in series}
    later = np.array([ts >= first_test_ts[d] for ts, d in zip(tiny_rows["ts"], tiny_rows["device"])])
    shifted = dict(tiny_rows)
    shifted["bearing_temp"] = tiny_rows["bearing_temp"] + np.where(later, 100.0, 0.0)
    same = prepare(shifted).scaler
    assert np.allclose(same.mean, base.mean) and np.allclose(same.std, base.std)
    shifted["bearing_temp"] = tiny_rows["bearing_temp"] + np.where(later, 0.0, 100.0)
    assert not np.allclose(prepare(shifted).scaler.mean, base.mean)


def test_windows_skip_labeled_faults_and_long_gaps(tiny_rows):
    """No training window touches a labeled row or an unfilled gap; short gaps are forward-filled."""
    prepared = prepare(tiny_rows)
    healthy = np.concatenate([s.healthy & s.valid for s in prepared.series])
    faulty_rows = np.concatenate([~s.healthy for s in prepared.series])
    assert faulty_rows.any()
    idx = prepared.starts["train"][:, None] + np.arange(prepared.lookback + prepared.horizon)  # (W, L+H)
    assert healthy[idx].all()
    x, y = prepared.windows(prepared.starts["train"])
    assert np.isfinite(x).all() and np.isfinite(y).all()
    filled = np.concatenate([s.valid & ~s.observed for s in prepared.series])
    assert filled.any(), "the synthetic dropouts should leave short gaps to fill"


def test_untrained_model_is_repeat_last():
    """The head predicts the change from the last value, starting at zero: an untrained model repeats the last value."""
    model = LSTMForecaster(n_features=4, horizon=10, target_index=[0, 1, 2, 3], hidden_size=8, num_layers=1).eval()
    x = torch.randn(5, 60, 4)
    y = model(x)
    assert y.shape == (5, 10, 4)
    assert torch.allclose(y, x[:, -1:, :].expand(5, 10, 4))


def test_short_training_lowers_validation_loss_and_exports_exactly(tiny_rows, tmp_path):
    """Two epochs beat the repeat-last start; ONNX matches PyTorch within 1e-5 at batch 1, 7 and 64."""
    prepared = prepare(tiny_rows)
    cfg = TrainConfig(hidden_size=16, num_layers=1, epochs=2, train_stride=2, batch_size=64, patience=5)
    repeat_last_loss = evaluate_loss(build_model(cfg, prepared), prepared, prepared.starts["val"], 64)
    result = fit(prepared, cfg, log=lambda *_: None)
    assert result.best_val_loss < repeat_last_loss
    path = tmp_path / "model.onnx"
    info = export_onnx(result.model, path, cfg.lookback, len(FEATURES))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"] and [o.name for o in session.get_outputs()] == ["y"]
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64):
        x = rng.standard_normal((batch, 60, 4)).astype(np.float32)
        with torch.no_grad():
            expected = result.model(torch.from_numpy(x)).numpy()
        got = session.run(["y"], {"x": x})[0]
        assert got.shape == (batch, 10, 4)
        assert np.abs(got - expected).max() <= 1e-5
    assert info["verified"]["max_abs_diff"] <= 1e-5 and info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_refuses_a_graph_that_disagrees_with_pytorch(tmp_path):
    """A model whose eager output differs from its traced graph is refused with ExportError."""

    class Drifting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):  # traced once; later eager calls add a growing offset the graph lacks
            self.calls += 1
            return x[:, -10:, :] + float(self.calls)

    with pytest.raises(ExportError, match="max abs diff"):
        export_onnx(Drifting(), tmp_path / "m.onnx", lookback=60, n_features=4)


def test_train_cli_writes_a_complete_bundle(tiny_rows, tmp_path):
    """`python -m training train` writes model.onnx + a manifest with every contract field and a matching sha256."""
    csv_path = tmp_path / "fleet.csv"
    write_csv(generate_fleet(FleetConfig(devices=2, hours=16.0, seed=11, faults="none")), csv_path)
    out = tmp_path / "bundle"
    args = ["train", "--data", str(csv_path), "--out", str(out), "--epochs", "1", "--hidden-size", "8",
            "--num-layers", "1", "--train-stride", "4"]
    assert training_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("schema_version", "name", "version", "created_at", "features", "targets", "lookback", "horizon",
                "sampling_period_s", "scaler", "strategy", "architecture", "training", "onnx", "metrics", "calibration"):
        assert key in manifest, key
    assert manifest["features"] == manifest["targets"] == FEATURES
    assert (manifest["lookback"], manifest["horizon"], manifest["sampling_period_s"]) == (60, 10, 60)
    assert manifest["onnx"]["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert manifest["onnx"]["opset"] == 17 and manifest["onnx"]["verified"]["batch_sizes"] == [1, 7, 64]
    assert manifest["training"]["command"].startswith("python -m training train --data")
    assert set(manifest["scaler"]["params"]) == set(FEATURES)
    test = manifest["metrics"]["test"]
    assert set(test["per_target"]) == set(FEATURES)
    assert test["model"]["rmse"] > 0 and test["repeat_last"]["rmse"] > 0
    cal = manifest["calibration"]
    assert np.array(cal["residual_mean"]).shape == np.array(cal["residual_std"]).shape == (10, 4)
    t = cal["thresholds"]
    assert t["critical"] == pytest.approx(2 * t["warning"], abs=2e-3) and t["exit"] == pytest.approx(0.7 * t["warning"], abs=2e-3)
    from training.calibrate import EWMA_ALPHA

    assert cal["ewma_alpha"] == EWMA_ALPHA  # the full calibration (not the residual-only default of training.bundle)
    assert training_main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "b2")]) == 2
    assert not (tmp_path / "b2").exists()


def test_shipped_bundle_matches_its_manifest():
    """The shipped exported_models/pump-lstm is complete: checksum, shapes, names and metrics beat repeat-last."""
    from training.cli import SHIPPED_DIR

    manifest = json.loads((SHIPPED_DIR / "manifest.json").read_text())
    onnx_bytes = (SHIPPED_DIR / "model.onnx").read_bytes()
    assert manifest["onnx"]["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = session.run(["y"], {"x": np.zeros((3, manifest["lookback"], len(manifest["features"])), np.float32)})[0]
    assert out.shape == (3, manifest["horizon"], len(manifest["targets"]))
    assert manifest["metrics"]["test"]["model"]["rmse"] < manifest["metrics"]["test"]["repeat_last"]["rmse"]
