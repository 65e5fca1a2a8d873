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


def _bundle_with_intervals(tmp_path, model_path, adaptive=False):
    """The shipped bundle with an interval table added to its manifest: bands 1 and 2 target-stds wide below and
    above (with `adaptive`, tracked online per device)."""
    import shutil

    folder = tmp_path / "with-intervals"
    shutil.copytree(model_path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    H, T = manifest["horizon"], len(manifest["targets"])
    manifest["calibration"]["intervals"] = {"method": "split_conformal", "units": "scaled", "levels": [0.8, 0.95],
                                            "lower": [[[-1.0] * T] * H, [[-2.0] * T] * H], "upper": [[[1.0] * T] * H, [[2.0] * T] * H]}
    if adaptive:
        manifest["calibration"]["intervals"]["adaptive"] = {"method": "quantile_tracking", "version": 1, "eta": 0.05}
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


# -- normalized (locally weighted) split conformal: the band follows the input window's volatility --------------


def _random_walk_windows(rng, n, lookback, horizon, vol):
    """(n, L + H) random walks whose step size is `vol` (a scalar, or one per walk): calm and volatile periods."""
    vol = np.broadcast_to(np.asarray(vol, dtype=np.float64), (n,))[:, None]
    return 5.0 + np.cumsum(rng.standard_normal((n, lookback + horizon)) * vol, axis=1)


def test_window_scale_is_the_rms_of_the_windows_lag_h_changes_floored():
    """WindowScale (FFT and prefix sums) equals the direct root mean square of x[i + lag_h] - x[i] over the
    window, lag_h = min(h, window // 2), and never goes below its floor (a flat window)."""
    from agent.core.intervals import WindowScale, scale_lags

    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 30, 2)).cumsum(axis=1) + 100.0  # (B, L, T)
    for horizon, window in ((4, 30), (25, 20), (3, 3)):
        lags = np.array(scale_lags(horizon, window))
        assert lags.max() <= max(1, window // 2) and list(lags[: min(horizon, window // 2)]) == list(range(1, min(horizon, window // 2) + 1))
        scale = WindowScale(window, lags, np.full((horizon, 2), 1e-9))
        seg = x[:, -window:]
        direct = np.stack([np.sqrt(((seg[:, u:] - seg[:, :-u]) ** 2).mean(axis=1)) for u in lags], axis=1)  # (B, H, T)
        np.testing.assert_allclose(scale(x), direct, rtol=1e-9, atol=1e-12)
    flat = WindowScale(30, np.array([1, 2]), np.array([[0.5, 0.25], [0.5, 0.25]]))(np.ones((1, 30, 2)))
    np.testing.assert_array_equal(flat[0], [[0.5, 0.25], [0.5, 0.25]])


def test_normalized_table_round_trips_through_the_manifest():
    """interval_table with the input windows writes method "normalized": the fixed quantiles stay in lower/upper,
    the normalized member holds the scale (kind, window, lags, floor) and the quantiles of residual / scale; after
    a JSON round trip load_intervals rebuilds the same scale and bands (scaled quantile x scale x target spread)."""
    from agent.core.intervals import NORMALIZED_VERSION
    from training.intervals import fit_window_scale

    rng = np.random.default_rng(5)
    L, H, n = 12, 3, 800
    walks = np.stack([_random_walk_windows(rng, n, L, H, rng.uniform(0.2, 2.0, n)) for _ in range(2)], axis=-1)  # (n, L+H, 2)
    x, y = walks[:, :L], walks[:, L:]  # (n, L, 2), (n, H, 2)
    resid = y - x[:, -1:, :]  # repeat-last forecast errors (n, H, 2)
    table = interval_table(resid, (0.8, 0.95), inputs=x, exponent=1.0)
    assert table["method"] == "normalized" and table["normalized"]["version"] == NORMALIZED_VERSION
    np.testing.assert_allclose(table["lower"], interval_table(resid, (0.8, 0.95))["lower"])  # the fixed table, as before
    spec = table["normalized"]["scale"]
    assert spec["kind"] == "lag_diff_rms" and spec["window"] == L and spec["lags"] == [1, 2, 3] and spec["exponent"] == [1.0, 1.0]
    manifest = _manifest(table["lower"], table["upper"])
    manifest["lookback"] = L
    manifest["calibration"]["intervals"] = json.loads(json.dumps(table))
    loaded = load_intervals(manifest)
    assert loaded.normalized and loaded.method == "normalized" and loaded.levels == (0.8, 0.95)
    scale = fit_window_scale(x, H)
    np.testing.assert_array_equal(loaded.scale.lags, scale.lags)
    np.testing.assert_allclose(loaded.scale.floor, scale.floor, rtol=1e-6)
    spread = np.array([2.0, 0.5])  # the manifest's target stds
    yhat = (rng.standard_normal((5, H, 2)) * spread + [10.0, 0.0]).astype(np.float32)
    sigma = loaded.physical_scale(x[:5], spread)  # (5, H, T) original units
    np.testing.assert_allclose(sigma, scale(x[:5]) * spread, rtol=1e-6)
    lo, hi = loaded.bounds(yhat, sigma)
    np.testing.assert_allclose(lo, yhat[None] + np.asarray(table["normalized"]["lower"])[:, None] * sigma[None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, yhat[None] + np.asarray(table["normalized"]["upper"])[:, None] * sigma[None], rtol=1e-5, atol=1e-5)
    fixed_lo, _ = loaded.bounds(yhat)  # without a scale: the fixed band
    np.testing.assert_allclose(fixed_lo, yhat[None] + (np.asarray(table["lower"]) * spread)[:, None], rtol=1e-5, atol=1e-5)
    assert interval_bounds(manifest, yhat, sigma)[0.95][1].shape == (5, H, 2)


def test_normalized_bands_follow_volatility_and_cover_each_regime():
    """Calibrated on a mix of calm and volatile windows, the normalized band is narrower for a calm window than
    for a volatile one and covers each regime near the nominal rate; the fixed band over-covers the calm regime
    and under-covers the volatile one (the ETTh1 failure: a calmer test period)."""
    rng = np.random.default_rng(6)
    L, H = 24, 4
    vol = np.where(np.arange(6000) // 750 % 2 == 0, 0.3, 3.0)  # calm and volatile periods of 750 windows in turn
    walks = _random_walk_windows(rng, 6000, L, H, vol)[..., None]  # (n, L+H, 1)
    table = interval_table(walks[:, L:] - walks[:, L - 1 : L], (0.8, 0.95), inputs=walks[:, :L])
    assert table["normalized"]["scale"]["exponent"] == [1.0]  # chosen on held-out blocks of these windows
    manifest = {"targets": ["v"], "features": ["v"], "horizon": H, "lookback": L,
                "scaler": {"type": "standard", "params": {"v": {"mean": 0.0, "std": 1.0}}},
                "calibration": {"intervals": table}}
    loaded = load_intervals(manifest)
    for regime_vol in (0.3, 3.0):
        fresh = _random_walk_windows(rng, 20000, L, H, regime_vol)[..., None]
        x, obs = fresh[:, :L], fresh[:, L:]
        yhat = np.repeat(x[:, -1:], H, axis=1)
        sigma = loaded.physical_scale(x, [1.0])
        for k, nominal in enumerate(loaded.levels):
            lo, hi = loaded.bounds(yhat, sigma)
            per_step = ((obs >= lo[k]) & (obs <= hi[k])).mean(axis=(0, 2))
            assert np.all(np.abs(per_step - nominal) < 0.03), (regime_vol, nominal, per_step)
            flo, fhi = loaded.bounds(yhat)
            fixed = ((obs >= flo[k]) & (obs <= fhi[k])).mean()
            assert (fixed > nominal + 0.03) if regime_vol < 1 else (fixed < nominal - 0.03), (regime_vol, nominal, fixed)
    calm = _random_walk_windows(rng, 1, L, H, 0.3)[:, :L, None]
    rough = _random_walk_windows(rng, 1, L, H, 3.0)[:, :L, None]
    widths = [np.diff(loaded.bounds(np.zeros((1, H, 1)), loaded.physical_scale(w, [1.0])), axis=0)[0] for w in (calm, rough)]
    assert np.all(widths[0] < widths[1])


def test_the_exponent_is_chosen_on_held_out_validation_blocks():
    """select_exponent picks, per target, how far the band follows the window's scale from held-out blocks of the
    calibration windows: 1 for a target whose errors scale with the window's volatility, 0 (the fixed band) for one
    whose errors do not; with every exponent 0 the table keeps the fixed method (the normalized member a record),
    and too few windows select nothing (the fixed band)."""
    from training.intervals import select_exponent

    rng = np.random.default_rng(8)
    L, H, n = 16, 3, 4000
    walks = _random_walk_windows(rng, n, L, H, np.where(np.arange(n) // 500 % 2 == 0, 0.3, 3.0))  # regimes in turn
    x = np.stack([walks[:, :L], walks[:, :L]], axis=-1)  # (n, L, 2): the same volatile input for both targets
    resid = np.stack([walks[:, L:] - walks[:, L - 1 : L], rng.standard_normal((n, H))], axis=-1)  # target 1: noise
    chosen = select_exponent(resid, x, (0.8, 0.95))
    assert chosen["exponent"] == [1.0, 0.0], chosen
    assert np.asarray(chosen["coverage_error"]).shape == (5, 2)
    table = interval_table(resid, (0.8, 0.95), inputs=x)
    assert table["method"] == "normalized" and table["normalized"]["scale"]["exponent"] == [1.0, 0.0]
    noise_only = interval_table(resid[..., 1:], (0.8, 0.95), inputs=x[..., 1:])
    assert noise_only["method"] == "split_conformal" and noise_only["normalized"]["scale"]["exponent"] == [0.0]
    np.testing.assert_allclose(noise_only["normalized"]["lower"], noise_only["lower"], atol=1e-6)  # exponent 0 = fixed
    few = interval_table(resid[:100], (0.8, 0.95), inputs=x[:100])
    assert few["method"] == "split_conformal" and "not selected" in few["normalized"]["selection"]


def test_malformed_normalized_tables_are_refused_naming_the_field():
    """method "normalized" needs its member, a supported version, the lag_diff_rms scale with lags in [1, window),
    a window within the lookback and a positive floor per step and target."""
    lo, hi = [[[-1, -1]] * 3] * 2, [[[1, 1]] * 3] * 2
    good = {"version": 1, "scale": {"kind": "lag_diff_rms", "window": 8, "lags": [1, 2, 3], "floor": [[0.1, 0.1]] * 3},
            "lower": lo, "upper": hi}

    def manifest_with(norm, method="normalized"):
        m = _manifest(lo, hi)
        m["lookback"] = 8
        m["calibration"]["intervals"]["method"] = method
        if norm is not None:
            m["calibration"]["intervals"]["normalized"] = norm
        return m

    assert load_intervals(manifest_with(good)).normalized
    assert not load_intervals(manifest_with(good, method="split_conformal")).normalized  # recorded, not used
    bad = [(None, "member is missing"), ({**good, "version": 2}, "version"),
           ({**good, "scale": {**good["scale"], "kind": "std"}}, "kind"),
           ({**good, "scale": {**good["scale"], "window": 9}}, "window"),
           ({**good, "scale": {**good["scale"], "lags": [1, 2, 8]}}, "lags"),
           ({**good, "scale": {**good["scale"], "floor": [[0.1, 0.0]] * 3}}, "floor"),
           ({**good, "scale": {**good["scale"], "exponent": [0.5, 1.5]}}, "exponent"),
           ({**good, "lower": hi, "upper": lo}, "lower > upper")]
    for norm, field in bad:
        with pytest.raises(IntervalError, match=field):
            load_intervals(manifest_with(norm))


def test_coverage_reports_both_methods_side_by_side():
    """With a normalized adaptive table the printed and markdown coverage show every method, the adaptive one on the
    normalized band named as the one published, with its width relative to the fixed band."""
    from training.intervals import coverage_arrays

    rng = np.random.default_rng(7)
    L, H = 16, 2
    walks = _random_walk_windows(rng, 3000, L, H, np.where(rng.random(3000) < 0.5, 0.5, 2.0))[..., None]
    manifest = {"targets": ["v"], "features": ["v"], "horizon": H, "lookback": L,
                "scaler": {"type": "standard", "params": {"v": {"mean": 0.0, "std": 1.0}}},
                "calibration": {"intervals": interval_table(walks[:1500, L:] - walks[:1500, L - 1 : L], inputs=walks[:1500, :L], exponent=1.0)}}
    x, obs = walks[1500:, :L], walks[1500:, L:]
    cov = coverage_arrays(manifest, x, np.repeat(x[:, -1:], H, axis=1), obs, ["v"])
    assert cov["method"] == "normalized+adaptive"
    assert set(cov["by_method"]) == {"split_conformal", "normalized", "normalized+adaptive"}
    assert cov["levels"] == cov["by_method"]["normalized+adaptive"]
    text = format_coverage(cov)
    assert "normalized+adaptive (published)" in text and "split_conformal:" in text and "of fixed" in text
    assert "tracks its own coverage online" in text
    md = "\n".join(coverage_markdown(cov))
    assert "split_conformal 80 % coverage" in md and "normalized 95 % coverage" in md and "normalized+adaptive 80 % coverage" in md


def _bundle_with_normalized_intervals(tmp_path, model_path, rows):
    """The shipped bundle with a normalized table: fitted on its own repeat-last errors of `rows` (windows of each
    device), normalized quantiles from the input windows' scale."""
    import shutil

    from agent.core.model import load_bundle

    folder = tmp_path / "with-normalized"
    shutil.copytree(model_path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    bundle = load_bundle(model_path)
    L, H = manifest["lookback"], manifest["horizon"]
    xs, rs = [], []
    for device in sorted({r[0] for r in rows}):
        raw = np.array([[v[f] for f in bundle.features] for d, _, v in rows if d == device])  # (N, F)
        scaled = (raw - bundle.offset) / bundle.scale
        for s in range(0, len(scaled) - L - H + 1, 3):
            xs.append(scaled[s : s + L][:, bundle.target_index])
            rs.append(scaled[s + L : s + L + H][:, bundle.target_index] - scaled[s + L - 1, bundle.target_index])
    manifest["calibration"]["intervals"] = interval_table(np.array(rs), (0.8, 0.95), inputs=np.array(xs), exponent=1.0)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_daemon_replay_and_training_give_the_same_adaptive_normalized_bands(tmp_path, model_path):
    """For the same windows, the daemon's pipeline (Forecast.interval_scale and interval_multiplier -> payload),
    `agent replay`'s band columns and training's test-coverage bands (interval_bands and adaptive_multipliers on
    the windows scaled as training scales them) are the same numbers; the fast payload encoder writes the
    reference encoder's bytes, valid against the schema; the published band differs from the static ones."""
    from pathlib import Path

    import jsonschema
    from conftest import healthy_rows

    from agent.config.settings import Settings
    from agent.core.events import Forecast, Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline
    from agent.tools.replay import replay
    from agent.transport import payloads
    from training.intervals import adaptive_multipliers, interval_bands

    calib_rows = healthy_rows(devices=2, rows=400, seed=11, end_ts=T0 - 10 * 86400)
    rows = healthy_rows(devices=2, rows=90, seed=12, end_ts=T0)
    folder, manifest = _bundle_with_normalized_intervals(tmp_path, model_path, calib_rows)
    bundle = load_bundle(folder)
    assert bundle.intervals.normalized
    L, H, targets, features = bundle.lookback, bundle.horizon, bundle.targets, bundle.features

    # the daemon: pipeline -> Forecast events (with the window's scale) -> payloads
    pipeline = Pipeline(bundle, Settings(model={"path": folder}))
    samples = [Sample(d, float(ts), dict(v), float(ts)) for d, ts, v in rows]
    events = [e for e in pipeline.process(samples, now=float(rows[-1][1])) if isinstance(e, Forecast)]
    assert events and all(e.interval_scale is not None and e.interval_scale.shape == (H, len(targets)) for e in events)
    K = len(bundle.intervals.levels)
    assert all(e.interval_multiplier is not None and e.interval_multiplier.shape == (K, H, len(targets)) for e in events)
    schema = json.loads((Path(payloads.__file__).parents[1] / "schemas" / "forecast.json").read_text())
    bodies = payloads.forecasts(events, "m", "1", bundle.intervals)
    assert bodies == [payloads._forecast_reference(fc, "m", "1", bundle.intervals) for fc in events]
    daemon, forecast = {}, {}
    for fc, body in zip(events, bodies):
        data = json.loads(body)
        jsonschema.validate(data, schema)
        daemon[(fc.device, int(fc.ts))] = data
        forecast[(fc.device, int(fc.ts))] = np.array([fc.values[t] for t in targets]).T  # (H, T) unrounded

    # replay of the same rows
    data_csv, out_csv = tmp_path / "rows.csv", tmp_path / "scored.csv"
    with open(data_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "device", *features])
        w.writerows([[ts, d, *(v[x] for x in features)] for d, ts, v in rows])
    replay(folder, data_csv, out_csv)
    with open(out_csv) as f:
        replayed = {(r["device"], int(float(r["ts"]))): r for r in csv.DictReader(f) if r[f"forecast_{targets[0]}_1"]}
    assert set(replayed) == set(daemon)

    # training: the same windows, scaled as training.data scales them, through interval_bands
    by_device = {}
    for d, ts, v in rows:
        by_device.setdefault(d, []).append((ts, [v[x] for x in features]))
    keys, windows, yhat, obs, devices, origins = [], [], [], [], [], []
    period = bundle.period_s
    for (device, ts), data in daemon.items():
        series = by_device[device]
        end = next(i for i, (t, _) in enumerate(series) if t == ts) + 1
        raw = np.array([vals for _, vals in series[end - L : end]])  # (L, F)
        windows.append(((raw - bundle.offset) / bundle.scale)[:, bundle.target_index])
        yhat.append(forecast[(device, ts)])  # (H, T)
        later = {int(t): vals for t, vals in series[end : end + H]}
        obs.append([[later[ts + h * period][j] if ts + h * period in later else np.nan for j in bundle.target_index]
                    for h in range(1, H + 1)])  # (H, T) what the daemon read afterwards
        keys.append((device, ts))
        devices.append(device)
        origins.append(int(ts // period))
    windows, yhat = np.array(windows), np.array(yhat)
    bands = interval_bands(manifest, windows, yhat)
    table = bundle.intervals
    sigma = table.physical_scale(windows, bundle.target_scale)
    multiplier = adaptive_multipliers(table, yhat, sigma, np.array(obs), np.array(devices), np.array(origins))
    lo_n, hi_n = table.bounds(yhat, sigma, multiplier)  # what training's coverage counts as published
    assert np.abs(multiplier - 1).max() > 1e-3  # the bands moved with the coverage they had
    assert np.abs(lo_n - bands["normalized"][0]).max() > 1e-4  # so the published band is not the static one
    lo_f, _ = bands["split_conformal"]
    for w, key in enumerate(keys):
        for k, level in enumerate(bundle.intervals.level_names()):
            for j, t in enumerate(targets):
                from_daemon = np.array(daemon[key]["interval"][level]["lower"][t])
                from_replay = np.array([float(replayed[key][f"forecast_{t}_{h}_lower_{level}"]) for h in range(1, H + 1)])
                np.testing.assert_allclose(from_daemon, lo_n[k, w, :, j], rtol=2e-4, atol=1e-4)
                np.testing.assert_allclose(from_replay, lo_n[k, w, :, j], rtol=2e-4, atol=1e-4)
                np.testing.assert_allclose(np.array(daemon[key]["interval"][level]["upper"][t]), hi_n[k, w, :, j], rtol=2e-4, atol=1e-4)
                np.testing.assert_allclose([float(replayed[key][f"forecast_{t}_{h}_upper_{level}"]) for h in range(1, H + 1)],
                                           hi_n[k, w, :, j], rtol=2e-4, atol=1e-4)
    assert np.abs(lo_n - lo_f).max() > 1e-3  # the published band is the normalized one, not the fixed


def test_bundles_without_the_normalized_method_publish_as_before(tmp_path, model_path):
    """A fixed table (method split_conformal) or none: the pipeline computes no window scale, forecasts carry
    none, and the payloads are those of the fixed band or none; a scale handed to a fixed table is ignored."""
    from conftest import healthy_rows

    from agent.config.settings import Settings
    from agent.core.events import Forecast, Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline
    from agent.transport import payloads

    rows = healthy_rows(devices=1, rows=70, seed=3, end_ts=T0)
    samples = [Sample(d, float(ts), dict(v), float(ts)) for d, ts, v in rows]
    fixed_folder, _ = _bundle_with_intervals(tmp_path, model_path)
    for folder in (model_path, fixed_folder):
        bundle = load_bundle(folder)
        pipeline = Pipeline(bundle, Settings(model={"path": folder}))
        prepared = pipeline.prepare(samples)
        assert prepared.interval_scale is None
        events = [e for e in pipeline.finish(prepared, pipeline.infer(prepared), float(rows[-1][1])) if isinstance(e, Forecast)]
        assert events and all(e.interval_scale is None for e in events)
        body = payloads.forecast(events[0], "m", "1", bundle.intervals)
        assert body == payloads._forecast_reference(events[0], "m", "1", bundle.intervals)
        assert (b'"interval"' in body) == (bundle.intervals is not None)
        if bundle.intervals is not None:
            yhat = np.zeros((bundle.horizon, bundle.n_targets), np.float32)
            np.testing.assert_array_equal(bundle.intervals.bounds(yhat, np.ones_like(yhat))[0], bundle.intervals.bounds(yhat)[0])
    shipped = json.loads((model_path / "manifest.json").read_text())
    assert "intervals" not in shipped["calibration"]  # the shipped pump-lstm stays without a table


# ---------------------------------------------------------------------------------------------- adaptive bands


def _adaptive_manifest(eta=0.02):
    lower, upper = [[[-1.0, -1.0]] * 3] * 2, [[[1.0, 1.0]] * 3] * 2
    manifest = _manifest(lower, upper)
    manifest["calibration"]["intervals"]["adaptive"] = {"method": "quantile_tracking", "version": 1, "eta": eta}
    return manifest


def test_adaptive_band_widens_after_misses_and_narrows_after_hits_one_step_at_a_time():
    """Each reading settles the bands issued 1..H slots before it, once: a miss widens step h's band by
    exp(eta / sqrt(h) (1 - miss_rate)), a hit narrows it by exp(-eta / sqrt(h) miss_rate); other steps and devices
    are untouched."""
    from agent.core.intervals import AdaptiveBands

    table = load_intervals(_adaptive_manifest(eta=0.1))
    assert table.adaptive and table.adaptive_eta == 0.1
    bands = AdaptiveBands(table)
    bands.grow(2)
    yhat = np.zeros((3, 2), np.float32)
    m0 = bands.issue(0, 10, yhat, None)
    np.testing.assert_array_equal(m0, np.ones((2, 3, 2)))
    bands.observe(0, 11, [100.0, 0.0])  # step 1 of the band issued at 10: target a far outside, b inside
    m1 = bands.issue(0, 11, yhat, None)
    miss_rate = np.array([0.2, 0.05])
    np.testing.assert_allclose(m1[:, 0, 0], np.exp(0.1 * (1 - miss_rate)), rtol=1e-6)  # a: a miss at every level
    np.testing.assert_allclose(m1[:, 0, 1], np.exp(-0.1 * miss_rate), rtol=1e-6)  # b: a hit
    np.testing.assert_array_equal(m1[:, 1:], 1.0)  # steps 2 and 3 not settled yet
    bands.observe(0, 12, [0.0, 0.0])  # step 2 of the band of 10, step 1 of the band of 11
    m2 = bands.issue(0, 12, yhat, None)
    np.testing.assert_allclose(m2[:, 1, 0], np.exp(-0.1 / np.sqrt(2) * miss_rate), rtol=1e-6)  # step 2 (rate eta / sqrt 2): a hit
    np.testing.assert_allclose(m2[:, 0, 0], np.exp(0.1 * (1 - miss_rate) - 0.1 * miss_rate), rtol=1e-6)  # then a hit at step 1
    np.testing.assert_array_equal(bands.issue(1, 12, yhat, None), 1.0)  # another device: its own state
    lo, hi = table.bounds(yhat, None, m1)
    np.testing.assert_allclose(hi - lo, 2 * (table.upper - table.lower) / 2 * m1, rtol=1e-6)  # half-width x m, same centre
    bands.reset(0)
    np.testing.assert_array_equal(bands.issue(0, 13, yhat, None), 1.0)
    bands.observe(0, 14, [100.0, 100.0])  # the bands issued before the reset are gone; the one of 13 is checked
    assert (bands.issue(0, 14, yhat, None)[:, 0] > 1).all()


def test_adaptive_bands_cover_at_the_nominal_rate_when_the_test_months_are_calmer(tmp_path):
    """Calibrated on a volatile stretch, checked on a calm one: the static band covers far above nominal, the
    adaptive one (the published method in the coverage report) within 3 points at every level and step."""
    from training.intervals import coverage_arrays

    rng = np.random.default_rng(5)
    L, H = 16, 4
    calib = _random_walk_windows(rng, 1500, L, H, np.full(1500, 2.0))[..., None]
    table = interval_table(calib[:, L:] - calib[:, L - 1 : L], (0.8, 0.95))  # repeat-last residuals, fixed band
    assert table["method"] == "split_conformal" and table["adaptive"]["method"] == "quantile_tracking"
    manifest = {"targets": ["v"], "features": ["v"], "horizon": H, "lookback": L,
                "scaler": {"type": "standard", "params": {"v": {"mean": 0.0, "std": 1.0}}},
                "calibration": {"intervals": table}}
    walk = np.cumsum(rng.normal(0, 0.7, 6000))  # one calm device, every window in time order
    starts = np.arange(len(walk) - L - H + 1)
    x = np.stack([walk[s : s + L] for s in starts])[..., None]  # (W, L, 1)
    obs = np.stack([walk[s + L : s + L + H] for s in starts])[..., None]  # (W, H, 1)
    cov = coverage_arrays(manifest, x, np.repeat(x[:, -1:], H, axis=1), obs, ["v"], "test",
                          np.zeros(len(starts), np.int64), starts + L - 1)
    assert cov["method"] == "split_conformal+adaptive"
    for name, level in cov["levels"].items():
        static = cov["by_method"]["split_conformal"][name]
        assert static["coverage"] > level["nominal"] + 0.04  # calibration drift: the static band over-covers
        assert max(abs(c - level["nominal"]) for c in level["per_step"]) <= 0.03, (name, level["per_step"])
        assert level["mean_width"] < static["mean_width"]


def test_malformed_adaptive_members_are_refused_naming_the_field():
    """An adaptive member with another method, a newer version or a step outside (0, 1] is refused by name."""
    for member, field in (({"method": "aci", "eta": 0.02}, "quantile_tracking"),
                          ({"method": "quantile_tracking", "version": 2, "eta": 0.02}, "version"),
                          ({"method": "quantile_tracking", "eta": 0}, "eta"),
                          ({"method": "quantile_tracking", "eta": "fast"}, "eta")):
        manifest = _adaptive_manifest()
        manifest["calibration"]["intervals"]["adaptive"] = member
        with pytest.raises(IntervalError, match=field):
            load_intervals(manifest)


def test_adaptive_state_is_per_device_and_survives_growth_but_not_a_device_restart(model_path, tmp_path):
    """In the pipeline each device has its own multipliers; growing the device table keeps them, a restarted
    device (restart_device) starts again from the calibrated band."""
    from conftest import healthy_rows

    from agent.config.settings import Settings
    from agent.core.events import Forecast, Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline

    folder, _ = _bundle_with_intervals(tmp_path, model_path, adaptive=True)
    bundle = load_bundle(folder)
    assert bundle.intervals.adaptive
    pipeline = Pipeline(bundle, Settings(model={"path": folder}))
    rows = healthy_rows(devices=1, rows=90, seed=4, end_ts=T0)
    events = [e for e in pipeline.process([Sample(d, float(ts), dict(v), float(ts)) for d, ts, v in rows], float(rows[-1][1]))
              if isinstance(e, Forecast)]
    moved = events[-1].interval_multiplier
    assert np.abs(moved - 1).max() > 1e-3
    d = pipeline.windows.index[rows[0][0]]
    before = pipeline.adaptive_bands.log_multiplier[d].copy()
    for i in range(40):  # new devices grow every per-device array
        pipeline.process([Sample(f"other-{i:02d}", float(rows[-1][1]), dict(rows[-1][2]), float(rows[-1][1]))], float(rows[-1][1]))
    np.testing.assert_array_equal(pipeline.adaptive_bands.log_multiplier[d], before)
    pipeline.restart_device(rows[0][0], float(rows[-1][1]), relearn=False)
    np.testing.assert_array_equal(pipeline.adaptive_bands.log_multiplier[d], 0.0)


def test_adaptive_bands_resume_after_a_restart_with_the_same_bundle_only(model_path, tmp_path):
    """The open-alerts state carries each device's adaptive multipliers: a pipeline on the same bundle resumes them,
    one on another bundle (or a malformed entry) starts from the calibrated band."""
    from conftest import healthy_rows

    from agent.config.settings import Settings
    from agent.core.events import Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline

    folder, _ = _bundle_with_intervals(tmp_path, model_path, adaptive=True)
    bundle = load_bundle(folder)
    pipeline = Pipeline(bundle, Settings(model={"path": folder}))
    rows = healthy_rows(devices=2, rows=90, seed=6, end_ts=T0)
    pipeline.process([Sample(d, float(ts), dict(v), float(ts)) for d, ts, v in rows], float(rows[-1][1]))
    state = json.loads(json.dumps(pipeline.open_alerts_state()))
    assert set(state["interval_log_multipliers"]) == {r[0] for r in rows}
    again = Pipeline(bundle, Settings(model={"path": folder}))
    state["interval_log_multipliers"]["ghost"] = [[1.0]]  # wrong shape: skipped
    again.restore_open_alerts(state, float(rows[-1][1]))
    for name in {r[0] for r in rows}:
        np.testing.assert_allclose(again.adaptive_bands.log_multiplier[again.windows.index[name]],
                                   pipeline.adaptive_bands.log_multiplier[pipeline.windows.index[name]], atol=1e-5)
    assert "ghost" not in again.windows.index
    other = Pipeline(bundle, Settings(model={"path": folder}))
    other.restore_open_alerts({**state, "model_sha256": "another"}, float(rows[-1][1]))
    assert not np.abs(other.adaptive_bands.log_multiplier).any()


def test_adaptive_intervals_can_be_turned_off_in_the_settings(model_path, tmp_path):
    """inference.adaptive_intervals = false: the pipeline keeps no adaptive state and publishes the calibrated band."""
    from conftest import healthy_rows

    from agent.config.settings import Settings
    from agent.core.events import Forecast, Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline
    from agent.transport import payloads

    folder, _ = _bundle_with_intervals(tmp_path, model_path, adaptive=True)
    bundle = load_bundle(folder)
    rows = healthy_rows(devices=1, rows=90, seed=8, end_ts=T0)
    samples = [Sample(d, float(ts), dict(v), float(ts)) for d, ts, v in rows]
    off = Pipeline(bundle, Settings(model={"path": folder}, inference={"adaptive_intervals": False}))
    assert off.adaptive_bands is None
    events = [e for e in off.process(samples, float(rows[-1][1])) if isinstance(e, Forecast)]
    assert events and all(e.interval_multiplier is None for e in events)
    on = Pipeline(bundle, Settings(model={"path": folder}))
    moved = [e for e in on.process(samples, float(rows[-1][1])) if isinstance(e, Forecast)][-1]
    assert payloads.forecast(events[-1], "m", "1", bundle.intervals) != payloads.forecast(moved, "m", "1", bundle.intervals)
