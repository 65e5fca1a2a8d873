"""Prediction intervals: the manifest table (training.intervals), its daemon-side reader (agent.core.intervals, numpy
only) and the coverage report of `fit`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from agent.core.intervals import IntervalError, interval_bounds, load_intervals
from training.intervals import coverage_markdown, format_coverage, interval_table

T0 = 1_767_571_200


def _manifest(lower, upper, levels=(0.8, 0.95), kind="standard"):
    params = ({"a": {"mean": 10.0, "std": 2.0}, "b": {"mean": 0.0, "std": 0.5}} if kind == "standard"
              else {"a": {"min": 0.0, "max": 2.0}, "b": {"min": -1.0, "max": -0.5}})
    return {"features": ["a", "b"], "targets": ["a", "b"], "horizon": 3, "scaler": {"type": kind, "params": params},
            "calibration": {"residual_mean": [[0, 0]] * 3, "intervals": {"method": "split_conformal", "units": "scaled",
                                                                        "levels": list(levels), "lower": lower, "upper": upper}}}


def test_bounds_are_forecast_plus_scaled_quantiles_times_spread_for_any_batch():
    """Bounds = yhat + quantile x target spread (std or max - min), per level, step and target, broadcast over (B, H, T)."""
    rng = np.random.default_rng(0)
    lower = -np.abs(rng.standard_normal((2, 3, 2)))
    upper = np.abs(rng.standard_normal((2, 3, 2)))
    upper[1] += upper[0]
    for kind, spread in (("standard", np.array([2.0, 0.5])), ("minmax", np.array([2.0, 0.5]))):
        table = load_intervals(_manifest(lower.tolist(), upper.tolist(), kind=kind))
        yhat = rng.standard_normal((7, 3, 2)).astype(np.float32)
        lo, hi = table.bounds(yhat)
        assert lo.shape == hi.shape == (2, 7, 3, 2) and lo.dtype == np.float32
        np.testing.assert_allclose(lo, yhat[None] + (lower * spread)[:, None], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(hi, yhat[None] + (upper * spread)[:, None], rtol=1e-6, atol=1e-6)
        one = interval_bounds(_manifest(lower.tolist(), upper.tolist(), kind=kind), yhat[0])  # a single (H, T) forecast
        assert set(one) == {0.8, 0.95}
        np.testing.assert_allclose(one[0.95][1], hi[1, 0], rtol=1e-6)
    assert table.level_names() == ["80", "95"]


def test_bundles_without_intervals_load_as_none():
    """An old bundle (no calibration.intervals) gives None: payloads and replay carry no band for it."""
    manifest = _manifest([[[0, 0]] * 3] * 2, [[[0, 0]] * 3] * 2)
    del manifest["calibration"]["intervals"]
    assert load_intervals(manifest) is None
    assert interval_bounds(manifest, np.zeros((1, 3, 2), np.float32)) is None


def test_malformed_tables_are_refused_naming_the_field():
    """Wrong shape, lower above upper, unordered levels or a forecast of the wrong shape raise a clear error."""
    good_lo, good_hi = [[[-1, -1]] * 3] * 2, [[[1, 1]] * 3] * 2
    with pytest.raises(IntervalError, match="lower has shape"):
        load_intervals(_manifest([[[-1, -1]] * 2] * 2, good_hi))
    with pytest.raises(IntervalError, match="lower > upper"):
        load_intervals(_manifest(good_hi, good_lo))
    with pytest.raises(IntervalError, match="levels"):
        load_intervals(_manifest(good_lo, good_hi, levels=(0.95, 0.8)))
    with pytest.raises(ValueError, match="horizon, targets"):
        load_intervals(_manifest(good_lo, good_hi)).bounds(np.zeros((4, 2, 2)))


def test_conformal_table_covers_exchangeable_residuals_at_the_nominal_rate():
    """Split-conformal quantiles of one sample cover a fresh sample of the same law at about the nominal level, per step."""
    rng = np.random.default_rng(1)
    calib = rng.standard_t(5, size=(4000, 4, 2)) * np.array([1.0, 2.0])  # (W, H, T)
    fresh = rng.standard_t(5, size=(20000, 4, 2)) * np.array([1.0, 2.0])
    table = interval_table(calib, (0.8, 0.95))
    assert table["levels"] == [0.8, 0.95] and table["windows"] == 4000 and table["units"] == "scaled"
    lo, hi = np.asarray(table["lower"]), np.asarray(table["upper"])  # (K, H, T)
    assert (lo[1] <= lo[0]).all() and (hi[1] >= hi[0]).all()  # the wider level contains the narrower
    for k, nominal in enumerate((0.8, 0.95)):
        inside = ((fresh >= lo[k]) & (fresh <= hi[k])).mean(axis=(0, 2))  # per step
        assert np.all(np.abs(inside - nominal) < 0.02), inside


def test_coverage_formats_per_step_next_to_nominal():
    """The printed and markdown coverage tables show every step and the nominal level."""
    cov = {"split": "test", "windows": 10, "method": "split_conformal",
           "levels": {"0.8": {"nominal": 0.8, "coverage": 0.79, "per_step": [0.81, 0.77], "per_target": {},
                              "mean_width_per_step": [1.0, 1.5]}}}
    text = format_coverage(cov)
    assert "80 %: overall 0.790" in text and "0.810 0.770" in text and "-1.0 points" in text
    md = "\n".join(coverage_markdown(cov))
    assert "| 1 | 0.810 | 1 |" in md and "| 2 | 0.770 | 1.5 |" in md


def test_agent_intervals_imports_numpy_only():
    """agent/core/intervals.py runs on the daemon: importing it pulls in neither torch nor onnxruntime."""
    code = "import sys, agent.core.intervals; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.training
def test_fit_writes_intervals_and_prints_their_test_coverage(tmp_path, capsys):
    """A fitted bundle carries calibration.intervals (from the validation residuals that set the detector's
    normalization) and metrics.test.interval_coverage; fit prints the coverage per step next to the nominal."""
    pytest.importorskip("torch")
    from agent.core.model import load_bundle
    from training.__main__ import main as training_main

    rng = np.random.default_rng(0)
    n = 1200
    level = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 120) + 0.3 * rng.standard_normal(n)
    data = tmp_path / "plant.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "temp"])
        w.writerows([[T0 + 60 * k, f"{v:.4f}"] for k, v in enumerate(level)])
    bundle = tmp_path / "bundle"
    assert training_main(["fit", "--data", str(data), "--out", str(bundle), "--lookback", "16", "--horizon", "4",
                          "--epochs", "2", "--hidden-size", "8", "--num-layers", "1", "--min-steps", "50"]) == 0
    printed = capsys.readouterr().out
    assert "interval coverage on the test split" in printed and "80 %: overall" in printed and "95 %: overall" in printed
    manifest = json.loads((bundle / "manifest.json").read_text())
    cal = manifest["calibration"]
    iv = cal["intervals"]
    assert iv["levels"] == [0.8, 0.95] and np.asarray(iv["lower"]).shape == (2, 4, 1)
    cov = manifest["metrics"]["test"]["interval_coverage"]
    assert len(cov["levels"]["0.8"]["per_step"]) == 4
    assert abs(cov["levels"]["0.95"]["coverage"] - 0.95) < 0.1  # a stationary series: close to nominal
    assert "coverage on the test split" in (bundle / "report.md").read_text()
    loaded = load_bundle(bundle)  # the daemon still loads it; its forecast gets a band
    x = np.asarray(level[:16], np.float32).reshape(1, 16, 1)
    lo, hi = load_intervals(loaded.manifest).bounds(loaded.predict(x))
    assert (lo[0] < hi[0]).all() and (lo[1] <= lo[0]).all()


def _bundle_with_intervals(tmp_path, model_path):
    """The shipped bundle with an interval table added to its manifest: bands 1 and 2 target-stds wide below and above."""
    import shutil

    folder = tmp_path / "with-intervals"
    shutil.copytree(model_path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    H, T = manifest["horizon"], len(manifest["targets"])
    manifest["calibration"]["intervals"] = {"method": "split_conformal", "units": "scaled", "levels": [0.8, 0.95],
                                            "lower": [[[-1.0] * T] * H, [[-2.0] * T] * H], "upper": [[[1.0] * T] * H, [[2.0] * T] * H]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_forecast_payloads_carry_the_bands_as_the_reference_encoding_and_schema_say(tmp_path, model_path):
    """A bundle with intervals: every forecast payload has `interval` per level with lower <= forecast <= upper, the
    same bytes as the plain JSON encoding, valid against forecast.json; without intervals the payload is unchanged."""
    import jsonschema

    from agent.transport import payloads
    from agent.core.events import Forecast, ForecastValues
    from agent.core.model import load_bundle

    folder, manifest = _bundle_with_intervals(tmp_path, model_path)
    bundle = load_bundle(folder, 1)
    from pathlib import Path

    schema = json.loads((Path(payloads.__file__).parents[1] / "schemas" / "forecast.json").read_text())
    rng = np.random.default_rng(3)
    H, T = bundle.horizon, bundle.n_targets
    batch = rng.normal(50, 5, (3, T, H))  # (N, T, H) as the pipeline holds them
    fcs = [Forecast(device=f"pump-{i}", ts=T0, period_s=60.0, horizon_ts=[T0 + 60 * k for k in range(1, H + 1)],
                    values=ForecastValues(tuple(bundle.targets), batch, i), completeness=1.0, staleness_s=2.0) for i in range(3)]
    bodies = payloads.forecasts(fcs, "m", "1", bundle.intervals)
    assert bodies == [payloads._forecast_reference(fc, "m", "1", bundle.intervals) for fc in fcs]
    for fc, body in zip(fcs, bodies):
        data = json.loads(body)
        jsonschema.validate(data, schema)
        assert list(data["interval"]) == ["80", "95"]
        for j, target in enumerate(bundle.targets):
            yhat = np.array(data["forecast"][target])
            inner, outer = data["interval"]["80"], data["interval"]["95"]
            assert np.all(np.array(outer["lower"][target]) <= np.array(inner["lower"][target]))
            assert np.all(np.array(inner["lower"][target]) <= yhat) and np.all(yhat <= np.array(inner["upper"][target]))
            np.testing.assert_allclose(np.array(inner["upper"][target]) - yhat, bundle.target_scale[j], atol=2e-3)  # 5 digits
    assert b"interval" not in payloads.forecasts(fcs, "m", "1")[0]


def test_replay_writes_each_levels_band_beside_every_forecast(tmp_path, model_path):
    """replay with a bundle that has intervals adds forecast_<target>_<k>_lower/upper_<level> columns bracketing the
    forecast; a bundle without intervals writes none."""
    from conftest import healthy_rows

    folder, manifest = _bundle_with_intervals(tmp_path, model_path)
    rows = healthy_rows(devices=1, rows=manifest["lookback"] + 5, seed=2)
    data = tmp_path / "in.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        features = manifest["features"]
        writer.writerow(["ts", "device", *features])
        for device, ts, values in rows:
            writer.writerow([ts, device, *(values[x] for x in features)])
    for bundle_dir, has_bands in ((folder, True), (model_path, False)):
        out = tmp_path / f"out-{has_bands}.csv"
        done = subprocess.run([sys.executable, "-m", "agent", "replay", "--model", str(bundle_dir), "--data", str(data), "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        with open(out) as f:
            table = list(csv.DictReader(f))
        t = manifest["targets"][0]
        assert (f"forecast_{t}_1_lower_95" in table[0]) == has_bands
        if has_bands:
            last = table[-1]
            for level in ("80", "95"):
                assert float(last[f"forecast_{t}_3_lower_{level}"]) < float(last[f"forecast_{t}_3"]) < float(last[f"forecast_{t}_3_upper_{level}"])
