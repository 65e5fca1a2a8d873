"""The ETTh1 benchmark (training/ett.py): protocol borders and scaling, the closed-form NLinear check, and the
SegmentLSTM bundle through the daemon's loader."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import ett



@pytest.fixture(scope="module")
def splits() -> ett.EttSplits:
    return ett.EttSplits.from_series(ett.load_target(ett.DEFAULT_DATA))


def test_shipped_data_is_the_published_file():
    """data/ETTh1.csv is the unmodified public file (its sha256), with the protocol's row count."""
    assert hashlib.sha256(ett.DEFAULT_DATA.read_bytes()).hexdigest() == ett.ETTH1_SHA256
    assert len(ett.load_target(ett.DEFAULT_DATA)) == 17420


def test_borders_and_scaling_follow_the_protocol(splits):
    """z-score from the train rows only (ddof 0) and stride-1 windows inside each split's row range."""
    assert splits.mean == pytest.approx(17.128262, abs=1e-6)
    assert splits.std == pytest.approx(9.176491, abs=1e-6)
    assert splits.raw[: ett.TRAIN_END].std() == pytest.approx(splits.std)  # ddof 0
    for horizon in ett.HORIZONS:
        x_test, y_test = splits.windows("test", horizon)
        assert len(x_test) == 2881 - horizon
        x_val, _ = splits.windows("val", horizon)
        assert len(x_val) == 2881 - horizon
        x_train, _ = splits.windows("train", horizon)
        assert len(x_train) == ett.TRAIN_END - ett.LOOKBACK - horizon + 1
    x_test, y_test = splits.windows("test", 96)
    scaled = splits.scaled
    # first test window: inputs are rows [11520 - 336, 11520), its first target is row 11520; the last target is row 14399
    np.testing.assert_array_equal(x_test[0], scaled[11520 - 336 : 11520])
    assert y_test[0, 0] == scaled[11520]
    assert y_test[-1, -1] == scaled[ett.TEST_END - 1]


def test_closed_form_nlinear_reproduces_the_published_figure(splits):
    """Closed-form NLinear (ridge chosen on validation) is within 0.001 of the published NLinear at H=96 and H=720."""
    for horizon in (96, 720):
        model, _ = ett.select_nlinear(splits, horizon)
        x_test, y_test = splits.windows("test", horizon)
        got = ett.mse_mae(model.predict(x_test), y_test)
        published_mse, published_mae = ett.PUBLISHED["NLinear"][horizon]
        assert abs(got["mse"] - published_mse) <= 0.001, (horizon, got)
        assert abs(got["mae"] - published_mae) <= 0.001, (horizon, got)


def test_untrained_segment_lstm_is_exactly_the_linear_path(splits):
    """Before training, the model's forecast is the closed-form NLinear's (the LSTM head starts at zero)."""
    horizon = 96
    nlinear, _ = ett.select_nlinear(splits, horizon)
    for decoder in ("last", "pmr"):
        model = ett.build_model(ett.EttConfig(horizon=horizon, decoder=decoder, hidden_size=8), nlinear).eval()
        x_val, _ = splits.windows("val", horizon)
        with torch.no_grad():
            got = model(torch.from_numpy(x_val[:64, :, None]))[..., 0].numpy()  # (64, H)
        np.testing.assert_allclose(got, nlinear.predict(x_val[:64]), atol=2e-5)


@pytest.mark.parametrize("decoder, strength", [("last", 1.0), ("pmr", 0.5)])
def test_trained_bundle_runs_in_the_daemon_loader(splits, tmp_path, decoder, strength):
    """A briefly trained SegmentLSTM (its strength set after training, as the benchmark does) exports, loads with
    agent.model.load_bundle, and its metrics are the loader's."""
    cfg = ett.EttConfig(horizon=96, decoder=decoder, hidden_size=8, epochs=1, patience=1, threads=1, strength=strength)
    nlinear, _ = ett.select_nlinear(splits, cfg.horizon)
    model, history = ett.train(dataclasses.replace(cfg, strength=1.0), splits, nlinear, log=lambda *_: None)
    ett.set_strength(model, strength)
    assert [h["epoch"] for h in history] == [0, 1]
    manifest = ett.write_ett_bundle(model, cfg, splits, tmp_path / "etth1-h96", command="pytest", history=history, extra={})
    assert manifest["scaler"]["params"]["OT"] == {"mean": splits.mean, "std": splits.std}
    assert manifest["onnx"]["verified"]["max_abs_diff"] <= 1e-5
    from agent.core.model import load_bundle

    bundle = load_bundle(tmp_path / "etth1-h96")
    assert (bundle.lookback, bundle.horizon, bundle.features) == (336, 96, ["OT"])
    x_raw, _ = splits.windows("test", 96, scaled=False)
    x_scaled, _ = splits.windows("test", 96)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_scaled[:32, :, None]))[..., 0].numpy() * splits.std + splits.mean
    np.testing.assert_allclose(bundle.predict(x_raw[:32, :, None])[..., 0], expected, atol=1e-3)  # degrees
    assert manifest["metrics"]["test"]["windows"] == 2785
    assert manifest["metrics"]["validation"]["mse"] <= history[0]["val_mse"] + 1e-6  # the best epoch is kept
    assert manifest["architecture"]["strength"] == manifest["training"]["config"]["strength"] == strength


def test_bad_data_gets_a_clear_error(tmp_path):
    """A missing file, a missing column, a non-number or too few rows is named in the error."""
    with pytest.raises(ett.EttDataError, match="not found"):
        ett.load_target(tmp_path / "nope.csv")
    (tmp_path / "nocol.csv").write_text("date,HUFL\n2016-07-01 00:00:00,1\n")
    with pytest.raises(ett.EttDataError, match="no 'OT' column"):
        ett.load_target(tmp_path / "nocol.csv")
    (tmp_path / "text.csv").write_text("date,OT\n2016-07-01 00:00:00,1.5\n2016-07-01 01:00:00,warm\n")
    with pytest.raises(ett.EttDataError, match="line 3"):
        ett.load_target(tmp_path / "text.csv")
    (tmp_path / "short.csv").write_text("date,OT\n" + "".join(f"t{i},{i}\n" for i in range(100)))
    with pytest.raises(ett.EttDataError, match="needs at least 14400"):
        ett.load_target(tmp_path / "short.csv")
    done = subprocess.run([sys.executable, "-m", "training", "benchmark", "ett", "--data", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not found" in done.stderr


def test_selection_folds_read_no_test_row_and_hold_the_winter_out(splits):
    """Every fold lives in rows < 11520; the winter fold's training windows never touch its scored windows; the
    held-out block is 2017-01-01 00:00 (minus the 336 h of inputs) to 2017-02-28 23:00."""
    import csv

    official, winter = ett.selection_folds()
    assert official.fit == ((0, ett.TRAIN_END),) and official.stop == official.score == splits.segment("val")
    assert winter.stop is None  # trained for the official fold's epoch count
    for fold in (official, winter):
        rows = [*fold.fit, fold.score] + ([fold.stop] if fold.stop else [])
        assert all(0 <= start < end <= ett.VAL_END for start, end in rows)
    score_start, score_end = winter.score
    assert (score_start, score_end) == (ett.WINTER_BLOCK[0] - ett.LOOKBACK, ett.WINTER_BLOCK[1])
    assert all(end <= score_start or start >= score_end for start, end in winter.fit)  # no overlap, inputs included
    with ett.DEFAULT_DATA.open(newline="") as fh:
        dates = [row[0] for _, row in zip(range(ett.WINTER_BLOCK[1] + 2), csv.reader(fh))][1:]  # row i = dates[i]
    assert dates[ett.WINTER_BLOCK[0]] == "2017-01-01 00:00:00" and dates[ett.WINTER_BLOCK[1]] == "2017-03-01 00:00:00"
    x, y = splits.fold_windows(winter.fit, 96)
    assert len(x) == (score_start - 336 - 96 + 1) + (ett.TRAIN_END - score_end - 336 - 96 + 1)
    assert y.shape == (len(x), 96)


def test_strength_scales_the_lstm_correction(splits):
    """forecast = linear path + strength x correction, for one model and for an average of members."""
    horizon = 96
    nlinear, _ = ett.select_nlinear(splits, horizon)
    x_val, _ = splits.windows("val", horizon)
    x = torch.from_numpy(x_val[:16, :, None])
    torch.manual_seed(3)
    members = [ett.build_model(ett.EttConfig(horizon=horizon, hidden_size=8, decoder=d), nlinear).eval() for d in ("last", "pmr")]
    for member in members:
        torch.nn.init.normal_(member.head.weight, std=0.1)  # a nonzero correction
    model = ett.build_average(members)
    linear = nlinear.predict(x_val[:16])
    with torch.no_grad():
        full = model(x)[..., 0].numpy()
        ett.set_strength(model, 0.25)
        quarter = model(x)[..., 0].numpy()
    assert np.abs(full - linear).max() > 1e-3
    np.testing.assert_allclose(quarter - linear, 0.25 * (full - linear), atol=2e-5)
    assert model.describe()["strength"] == 0.25
    with pytest.raises(ValueError, match="strength"):
        ett.build_model(ett.EttConfig(horizon=horizon, hidden_size=8, strength=0.0), nlinear)


def test_fold_selection_end_to_end_on_a_tiny_grid(splits, monkeypatch):
    """select_by_folds: one tiny grid point x the strengths, both folds scored, the winter fold trained for the
    official fold's epoch count, and the choice made by the declared rule."""
    monkeypatch.setattr(ett, "SEARCH_SPACE", {"decoder": ("last",), "segment": (48,), "hidden_size": (8,)})
    base = ett.EttConfig(horizon=96, epochs=2, patience=2, threads=1)
    nlinear, _ = ett.select_nlinear(splits, 96)
    chosen, trials = ett.select_by_folds(splits, base, nlinear, seed=0, log=lambda *_: None)
    assert [t["strength"] for t in trials] == list(ett.STRENGTHS)
    for t in trials:
        assert set(t["fold_ratio"]) == {"official", "winter"}
        assert t["score"] == pytest.approx(np.mean(list(t["fold_ratio"].values())))
        epochs = t["best_epoch"]
        assert epochs["winter"] == epochs["official"]  # the winter fold trains as long as the official one kept
    x_val, y_val = splits.windows("val", 96)
    assert trials[0]["fold_linear_mse"]["official"] == pytest.approx(ett.mse_mae(nlinear.predict(x_val), y_val)["mse"])
    eligible = ([t for t in trials if t["has_lstm"] and t["improves_every_fold"]]
                or [t for t in trials if t["has_lstm"]] or trials)
    best = min(eligible, key=lambda t: t["score"])
    assert (chosen.strength, chosen.decoder, chosen.segment, chosen.hidden_size) == (best["strength"], "last", 48, 8)


def test_fixed_length_training_keeps_the_last_epoch(splits):
    """A fold without stop rows trains exactly cfg.epochs epochs and keeps the last state."""
    nlinear, _ = ett.select_nlinear(splits, 96)
    fold = ett.Fold("fixed", ((0, 2000),), None, (2000, 3000))
    model, history = ett.train(ett.EttConfig(horizon=96, hidden_size=8, epochs=2, patience=1), splits, nlinear,
                               log=lambda *_: None, fold=fold)
    assert [h["epoch"] for h in history] == [0, 1, 2] and model.best_epoch == 2
    assert np.isnan(model.best_val)
    assert float(model.head.weight.detach().abs().sum()) > 0  # trained: the head left zero


def test_another_file_is_named_after_itself_not_after_the_published_dataset(tmp_path, monkeypatch, capsys):
    """A slice of the data under another name (ETTh2.csv): results, bundle names and manifests say ETTh2, nothing
    is compared with ETTh1's published figures, and the unknown file is said to be unchecked."""
    import argparse
    import json

    lines = ett.DEFAULT_DATA.read_text().splitlines(keepends=True)[: ett.TEST_END + 1]  # header + the protocol's rows
    data = tmp_path / "ETTh2.csv"
    data.write_text("".join(lines))
    monkeypatch.setattr(sys, "argv", ["python -m training", "benchmark", "ett", "--data", str(data)])
    args = argparse.Namespace(data=str(data), dataset=None, horizons=[96], seeds=[0], models_dir=str(tmp_path / "models"),
                              out=str(tmp_path / "out"), no_search=True, epochs=1, members=1, threads=1)
    assert ett.run(args) == 0
    printed = capsys.readouterr()
    assert "no published figures for ETTh2" in printed.out
    assert "no published sha256 for ETTh2" in printed.err
    assert "NO" not in printed.out.split()  # no comparison row at all

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["dataset"] == "ETTh2" and results["meta"]["data_file"] == "ETTh2.csv"
    assert results["meta"]["published_file"] is None and results["meta"]["published_source"] is None
    assert [(r["dataset"], r["published"]) for r in results["results"]] == [("ETTh2", None)]
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("ETTh2, univariate") and "No published figures for ETTh2" in table
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["etth2-h96"]
    manifest = json.loads((tmp_path / "models" / "etth2-h96" / "manifest.json").read_text())
    assert manifest["name"] == "etth2-h96"
    assert manifest["training"]["data"]["dataset"] == "ETTh2" and manifest["training"]["data"]["file"] == "ETTh2.csv"
    assert manifest["metrics"]["published"] is None
    said = "".join(line for line in printed.out.splitlines(keepends=True) if not line.startswith("no published figures"))
    for text in ((tmp_path / "out" / "results.json").read_text(), table, json.dumps(manifest), said, printed.err):
        assert "etth1" not in text.lower()  # (the line above names the datasets that do have figures)


def test_dataset_names_published_figures_and_sha256_reports():
    """The name comes from --dataset or the file's stem (known names keep their spelling); published figures exist
    for ETTh1 only; a file that is not the published one is said to be so."""
    assert ett.dataset_name("data/ETTh2.csv") == "ETTh2"
    assert ett.dataset_name("/x/etth1.csv") == "ETTh1"
    assert ett.dataset_name("/x/ETTh1.csv", "transformer-7") == "transformer-7"
    assert ett.EttData("My Data!", "x.csv").slug == "my-data"
    assert ett.published_rows(ett.ETTH1, 96)["NLinear"] == {"mse": 0.053, "mae": 0.177}
    assert ett.published_rows(ett.EttData("ETTh2", "ETTh2.csv"), 96) is None
    assert ett.sha256_report(ett.ETTH1) == ("ETTh1.csv: sha256 matches the published ETTh1 file", False)
    altered, warn = ett.sha256_report(ett.EttData("ETTh1", "ETTh1.csv", "0" * 64))
    assert warn and "is NOT the published ETTh1 file" in altered and ett.ETTH1_SHA256 in altered
    renamed, warn = ett.sha256_report(ett.EttData("copy", "copy.csv", ett.ETTH1_SHA256))
    assert warn and "byte for byte the published ETTh1 file" in renamed and "--dataset ETTh1" in renamed
