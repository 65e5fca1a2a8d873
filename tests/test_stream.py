"""Streaming training data from a partitioned Parquet dataset: `to-parquet`, the one-pass scaler, per-device splits and
windows equal to the in-memory path, the bounded shuffle buffer, rank assignment, and `train --data FOLDER`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.data import ScalerAccumulator, Split, load_table, prepare
from training.distributed import Dist, assign
from training.stream import ParquetFleet, PrepareOptions, eval_devices, open_stream
from simulation.synth import FEATURES, FleetConfig, generate_fleet, write_csv
from training.to_parquet import convert, synthetic

pytestmark = pytest.mark.training  # pyarrow, pandas and torch: the training extra

L, H = 20, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 5-pump fleet (faults and dropouts included) as CSV, and as device- and day-partitioned datasets (float64)."""
    root = tmp_path_factory.mktemp("stream")
    fleet = generate_fleet(FleetConfig(devices=5, hours=30.0, seed=4, faults="auto"))
    csv = root / "fleet.csv"
    write_csv(fleet, csv)
    convert([csv], root / "by_device", dtype="float64", block_rows=3000, log=lambda *_: None)
    convert([csv], root / "by_day", partition="day", dtype="float64", block_rows=3000, log=lambda *_: None)
    return {"csv": csv, "by_device": root / "by_device", "by_day": root / "by_day", "root": root}


def _in_memory(csv, **kw):
    rows, features = load_table(csv)
    return prepare(rows, L, H, 60, features=features, **kw)


def test_scaler_accumulator_equals_fit_on_all_rows():
    """Merging blocks (any split into blocks) gives fit_scaler's scaler: standard and minmax, constant features too."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.normal(5, 3, (500, 3)), np.full((500, 1), 7.0)], axis=1)
    for kind in ("standard", "minmax"):
        acc = ScalerAccumulator(4)
        for block in np.array_split(rows, [3, 100, 101, 420]):
            acc.add(block)
        again = ScalerAccumulator.from_array(acc.to_array())
        from training.data import MinMaxScaler, StandardScaler

        want = (StandardScaler if kind == "standard" else MinMaxScaler).fit(rows)
        got = again.scaler(kind)
        np.testing.assert_allclose(got.offset, want.offset, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.scale, want.scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["by_device", "by_day"])
def test_stream_matches_in_memory_scaler_splits_and_windows(files, layout):
    """The streaming pass over either layout fits the in-memory scaler and finds the same windows per device and split."""
    prepared = _in_memory(files["csv"])
    data = open_stream(files[layout], PrepareOptions(lookback=L, horizon=H))
    assert data.period_s == 60 and data.features == FEATURES
    np.testing.assert_allclose(data.scaler.mean, prepared.scaler.mean, rtol=1e-9)
    np.testing.assert_allclose(data.scaler.std, prepared.scaler.std, rtol=1e-9)
    for k in ("train", "val", "test"):
        assert data.totals["windows"][k] == len(prepared.starts[k])
        assert data.totals["rows"][k] == prepared.rows_per_split[k]
    for i, s in enumerate(prepared.series):
        scaled, starts = data.load(s.name)
        np.testing.assert_allclose(scaled, prepared.scaled[prepared.offsets[i] : prepared.offsets[i] + len(s.ts)], rtol=1e-6)
        for k in ("train", "val", "test"):
            np.testing.assert_array_equal(starts[k] + prepared.offsets[i], prepared.starts[k][
                (prepared.starts[k] >= prepared.offsets[i]) & (prepared.starts[k] < prepared.offsets[i] + len(s.ts))])


def test_csv_conversion_equals_the_direct_synthetic_writer(files, tmp_path):
    """`to-parquet --data fleet.csv` and `to-parquet --synthetic-devices` hold the same rows for the same fleet."""
    direct = tmp_path / "direct"
    synthetic(direct, devices=5, days=30.0 / 24, seed=4, dtype="float64", log=lambda *_: None)
    a, b = ParquetFleet(files["by_device"]), ParquetFleet(direct)
    assert a.devices == b.devices == [f"pump-{i:02d}" for i in range(5)]
    for name in a.devices:
        ra, rb = a.read(name), b.read(name)
        np.testing.assert_array_equal(ra["ts"], rb["ts"])
        np.testing.assert_array_equal(ra["label"], rb["label"])
        for f in FEATURES:
            np.testing.assert_allclose(ra[f], rb[f], atol=1e-9)


def test_shuffle_buffer_draws_each_training_window_once_and_mixes_devices(files):
    """Stride 1: an epoch's batches are distinct training windows of this rank's devices, from several devices per
    batch, with the buffer never holding more than its device cap (plus what one batch needs)."""
    data = open_stream(files["by_device"], PrepareOptions(lookback=L, horizon=H))
    n = data.train_window_floor(1) // 16
    loaded = []
    original = data.load
    data.load = lambda name: loaded.append(name) or original(name)
    seen = set()
    devices_per_batch = []
    batch = data._batch
    data._batch = lambda arrays, slots, starts, ti: devices_per_batch.append(len(set(slots.tolist()))) or batch(arrays, slots, starts, ti)
    import torch

    for x, y in data.train_batches(np.random.default_rng(1), 16, 1, n, buffer_windows=300, live_devices=2):
        assert x.shape == (16, L, len(FEATURES)) and y.shape == (16, H, len(FEATURES))
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        for row in x:
            key = row.numpy().tobytes()
            assert key not in seen
            seen.add(key)
    assert len(seen) == 16 * n and len(loaded) == len(data.devices)
    assert max(devices_per_batch) <= 3 and sum(k > 1 for k in devices_per_batch) > n / 2


def test_ranks_take_disjoint_devices_and_agree_on_the_scaler(files):
    """Round-robin by sorted name: the ranks' devices cover the fleet once; eval_devices spreads over the fleet."""
    names = [f"pump-{i:02d}" for i in range(7)]
    parts = [assign(names, Dist(rank=r, world=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == names and all(parts)
    assert eval_devices(names, 3) == ["pump-00", "pump-03", "pump-06"] and eval_devices(names, 0) == names


def test_ts_column_and_split_options_apply_per_device(files, tmp_path):
    """Explicit time borders and the minmax scaler give what prepare gives on the whole file."""
    rows, _ = load_table(files["csv"])
    t_val = float(np.quantile(rows["ts"], 0.6))
    t_test = float(np.quantile(rows["ts"], 0.8))
    split = Split(times=(t_val, t_test))
    prepared = _in_memory(files["csv"], split=split, scaler="minmax")
    data = open_stream(files["by_device"], PrepareOptions(lookback=L, horizon=H, split=split, scaler="minmax"))
    np.testing.assert_allclose(data.scaler.min, prepared.scaler.min)
    np.testing.assert_allclose(data.scaler.max, prepared.scaler.max)
    assert {k: data.totals["windows"][k] for k in ("train", "val", "test")} == {k: len(v) for k, v in prepared.starts.items()}


def test_train_command_on_a_dataset_writes_the_bundle(files, tmp_path):
    """`train --data FOLDER` streams, trains, exports and calibrates on the evaluation devices: a full bundle whose
    manifest records the fleet-wide counts and the scaler fitted in the streaming pass."""
    from training.__main__ import main

    out = tmp_path / "bundle"
    code = main(["train", "--data", str(files["by_device"]), "--out", str(out), "--epochs", "1", "--lookback", str(L),
                 "--horizon", str(H), "--hidden-size", "8", "--num-layers", "1", "--batch-size", "32", "--threads", "1",
                 "--eval-devices", "3", "--architecture", "many_to_one", "--strategy", "recursive"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    data = open_stream(files["by_device"], PrepareOptions(lookback=L, horizon=H))
    assert manifest["training"]["data"]["stream"]["devices"] == 5
    assert manifest["training"]["data"]["stream"]["windows"] == data.totals["windows"]
    assert manifest["strategy"] == "recursive"
    assert manifest["scaler"]["params"]["bearing_temp"]["mean"] == pytest.approx(float(data.scaler.mean[0]))
    for name in ("model.onnx", "report.md", "report.json", "README.md"):
        assert (out / name).exists()


def test_stream_checkpoint_resume_continues_exactly(files, tmp_path):
    """Two epochs, a checkpoint, then resume to three: the same weights and history as three epochs at once (the
    stream's random draws are a function of seed, rank and epoch)."""
    import torch

    from training.train import TrainConfig, fit_stream

    data = open_stream(files["by_device"], PrepareOptions(lookback=L, horizon=H))

    def cfg(**extra):
        return TrainConfig(**{**dict(lookback=L, horizon=H, hidden_size=8, num_layers=1, epochs=3, batch_size=32,
                                     max_batches=3, threads=1, architecture="many_to_one", patience=10, lr_schedule="plateau"), **extra})

    quiet = lambda *_: None  # noqa: E731
    straight = fit_stream(data, cfg(), log=quiet, buffer_windows=500, live_devices=2, max_val_batches=4)
    ck = str(tmp_path / "ck.pt")
    fit_stream(data, cfg(epochs=2, checkpoint=ck), log=quiet, buffer_windows=500, live_devices=2, max_val_batches=4)
    resumed = fit_stream(data, cfg(checkpoint=ck, resume=True), log=quiet, buffer_windows=500, live_devices=2, max_val_batches=4)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in straight.history], rel=1e-6)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
