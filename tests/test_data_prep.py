"""Data preparation: CSV/Parquet loading, resampling, gap filling, scalers, splits; metrics and baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data import MinMaxScaler, Split, gap_report, load_table, prepare, to_device_series
from training.evaluate import cross_validate, metrics, seasonal_naive

pytestmark = pytest.mark.training

T0 = 1_767_571_200


def _frame(n: int = 400, period: int = 60, drop: tuple[int, ...] = ()) -> pd.DataFrame:
    """One device, a ramp in `a` and a sine in `b`, with the rows in `drop` missing."""
    i = np.array([k for k in range(n) if k not in drop])
    return pd.DataFrame({"time": pd.to_datetime(T0 + i * period, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "a": i * 0.5, "b": np.sin(i / 10.0)})


def test_csv_and_parquet_with_iso_timestamps_load_the_same(tmp_path):
    """CSV and Parquet of the same table give the same columns; ISO timestamps become unix seconds."""
    frame = _frame(50)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    from_csv, feats_csv = load_table(tmp_path / "d.csv", timestamp="time")
    from_pq, feats_pq = load_table(tmp_path / "d.parquet", timestamp="time")
    assert feats_csv == feats_pq == ["a", "b"]
    assert from_csv["ts"][0] == T0 and np.array_equal(from_csv["ts"], from_pq["ts"])
    assert np.allclose(from_csv["b"], from_pq["b"]) and set(from_csv["device"]) == {"series"}
    with pytest.raises(ValueError, match=r"timestamp column 'ts'.*\['time', 'a', 'b'\]"):
        load_table(tmp_path / "d.csv", timestamp="ts")  # a named column that is not there: the message lists those that are


def test_resampling_averages_rows_in_one_slot():
    """Rows that fall into the same period are averaged onto one grid row."""
    rows = {"ts": np.array([0, 20, 40, 60, 120]), "device": np.array(["d"] * 5, dtype=object),
            "a": np.array([1.0, 2.0, 3.0, 10.0, 20.0])}
    (s,) = to_device_series(rows, 60, features=["a"])
    assert s.values[:, 0].tolist() == [2.0, 10.0, 20.0] and s.observed.all()


def test_gap_filling_forward_or_linear_up_to_the_limit():
    """Short gaps are forward-filled or interpolated; longer gaps stay empty and no window spans them."""
    drop = (10, 11, 12, 100, 101, 102, 103, 104, 105)  # a 3-row gap and a 6-row gap
    i = np.array([k for k in range(300) if k not in drop])
    rows = {"ts": T0 + i * 60, "device": np.array(["d"] * len(i), dtype=object), "a": i * 0.5, "b": np.sin(i / 10.0)}
    (ff,) = to_device_series(rows, 60, max_fill_periods=4, features=["a", "b"], fill="ffill")
    (lin,) = to_device_series(rows, 60, max_fill_periods=4, features=["a", "b"], fill="linear")
    assert ff.values[10:13, 0].tolist() == [4.5, 4.5, 4.5]
    assert np.allclose(lin.values[10:13, 0], [5.0, 5.5, 6.0])  # the ramp, recovered
    assert np.isnan(lin.values[100:106]).all() and not lin.valid[100:106].any()
    report = gap_report([lin], max_fill_periods=4)["d"]
    assert report == {"rows": 300, "observed": 291, "filled": 3, "gaps": 2, "longest_gap": 6, "long_gaps": 1, "rows_in_long_gaps": 6}
    prepared = prepare(rows, lookback=20, horizon=5, features=["a", "b"], max_fill_periods=4, fill="linear")
    span = np.arange(25)
    for split in ("train", "val", "test"):
        idx = prepared.starts[split][:, None] + span
        assert np.isfinite(prepared.scaled[idx]).all()
    assert not ((prepared.starts["train"] > 100 - 25) & (prepared.starts["train"] < 106)).any()


def test_minmax_scaler_is_fitted_on_training_rows_and_written_to_the_manifest():
    """minmax: training rows map to [0, 1]; later rows may leave it; the manifest says type minmax with min/max."""
    frame = _frame(400)
    rows = {"ts": T0 + np.arange(400) * 60, "device": np.array(["d"] * 400, dtype=object), "a": frame["a"].to_numpy(), "b": frame["b"].to_numpy()}
    prepared = prepare(rows, lookback=10, horizon=2, features=["a", "b"], scaler="minmax")
    assert isinstance(prepared.scaler, MinMaxScaler)
    lo, hi = prepared.series[0].bounds["train"]
    train = prepared.scaled[lo:hi]
    assert np.allclose(train.min(axis=0), 0) and np.allclose(train.max(axis=0), 1)
    assert prepared.scaled[hi:, 0].max() > 1  # the ramp keeps rising after the training rows
    m = prepared.scaler.manifest(["a", "b"])
    assert m["type"] == "minmax" and m["params"]["a"] == {"min": 0.0, "max": (hi - 1) * 0.5}


def test_explicit_row_and_time_borders_split_in_time_order():
    """Splits by rows or by timestamps cut every device at the given borders, train before val before test."""
    rows = {"ts": T0 + np.arange(200) * 60, "device": np.array(["d"] * 200, dtype=object), "a": np.arange(200.0)}
    (by_rows,) = to_device_series(rows, 60, features=["a"], split=Split(rows=(120, 160)))
    (by_time,) = to_device_series(rows, 60, features=["a"], split=Split(times=(T0 + 120 * 60, T0 + 160 * 60)))
    assert by_rows.bounds == by_time.bounds == {"train": (0, 120), "val": (120, 160), "test": (160, 200)}
    (sliding,) = to_device_series(rows, 60, features=["a"], split=Split(fractions=(0.6, 0.2, 0.2), train_start=0.25))
    assert sliding.bounds["train"] == (50, 120)
    with pytest.raises(ValueError, match="sum to 1"):
        to_device_series(rows, 60, features=["a"], split_fractions=(0.5, 0.2, 0.2))


def test_metrics_and_baselines_in_original_units():
    """A perfect model scores 0; repeat-last and seasonal-naive are computed from the data, per horizon step."""
    n, season = 600, 50
    i = np.arange(n)
    rows = {"ts": T0 + i * 60, "device": np.array(["d"] * n, dtype=object), "a": 10 + 3 * np.sin(2 * np.pi * i / season)}
    prepared = prepare(rows, lookback=60, horizon=4, features=["a"])

    x_all, y_all = prepared.windows(prepared.starts["test"])
    answers = {x_all[k].tobytes(): y_all[k] for k in range(len(x_all))}

    def perfect(x):  # the true future, looked up by window
        return np.stack([answers[w.tobytes()] for w in x])

    m = metrics(prepared, perfect, "test", season=season)
    assert m["model"]["rmse"] < 1e-5 and m["model"]["direction_accuracy"] == 1.0
    assert m["seasonal_naive"]["rmse"] < 1e-4  # a pure sine of period `season` repeats exactly
    x, y = prepared.windows(prepared.starts["test"])
    last = x[:, -1:, 0] * prepared.scaler.std[0] + prepared.scaler.mean[0]
    obs = y[:, :, 0] * prepared.scaler.std[0] + prepared.scaler.mean[0]
    assert m["repeat_last"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((last - obs) ** 2))), rel=1e-5)
    per_step = np.sqrt(np.mean((last - obs) ** 2, axis=0))
    assert np.allclose(m["per_step"]["repeat_last"]["rmse"], per_step, rtol=1e-4)
    assert m["per_step"]["repeat_last"]["rmse"][0] < m["per_step"]["repeat_last"]["rmse"][-1]
    _, ok = seasonal_naive(prepared, prepared.starts["train"][:5], season=10_000)
    assert not ok.any()  # a season longer than the data is never used


def test_cross_validation_folds_expand_or_slide_and_never_train_on_the_future():
    """Expanding folds grow the training range; sliding folds keep its length; validation always follows it."""
    from simulation.synth import FleetConfig, generate_fleet
    from training.train import TrainConfig

    rows = generate_fleet(FleetConfig(devices=1, hours=12.0, seed=2, faults="none")).rows
    cfg = TrainConfig(lookback=20, horizon=2, hidden_size=4, num_layers=1, epochs=1, max_batches=1, architecture="many_to_one")
    for mode in ("expanding", "sliding"):
        result = cross_validate(rows, cfg, folds=2, mode=mode, log=lambda *_: None)
        (a0, a1), (b0, b1) = (f["train_fraction"] for f in result["folds"])
        assert a1 < b1 and all(f["train_fraction"][1] == f["val_fraction"][0] for f in result["folds"])
        assert (a0, b0) == ((0.0, 0.0) if mode == "expanding" else (0.0, 0.25))
        assert result["mean"]["model"]["rmse"] > 0
