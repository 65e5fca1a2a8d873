"""Bagging, stacking and boosting ensembles: their resampling and folds, and their bundles through the daemon's
loader (agent.core.model.load_bundle) against PyTorch."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytestmark = pytest.mark.training

torch = pytest.importorskip("torch")

from agent.core.model import load_bundle  # noqa: E402
from training import ensemble  # noqa: E402
from training.__main__ import main as training_main  # noqa: E402
from training.bundle import export_bundle  # noqa: E402
from training.cli import load_training_data  # noqa: E402

TINY = ["--synthetic-devices", "2", "--synthetic-hours", "16", "--lookback", "24", "--horizon", "4", "--epochs", "2",
        "--hidden-size", "8", "--num-layers", "1", "--calibration", "residual"]


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    ensemble.add_arguments(parser)
    args = parser.parse_args([*TINY, "--members", "many_to_one:mimo,cnn_lstm:mimo", "--out", str(tmp_path), *extra])
    args.invocation = "test"
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The members, and one model per method, on a tiny synthetic fleet."""
    args = _args(tmp_path_factory.mktemp("ens"))
    prepared, _ = load_training_data(args)
    trainer = ensemble.Trainer(prepared, args, log=lambda *_: None)
    specs = ensemble._specs(args.members)
    members, _ = ensemble.train_mean(trainer, specs)
    bagging, _, _ = ensemble.train_bagging(trainer, specs, 2, prepared.lookback + prepared.horizon)
    stacking, info = ensemble.train_stacking(trainer, specs, members, 2)
    boosting, boost_info, _ = ensemble.train_boosting(trainer, specs, 3, 0.5, first=members[0])
    return {"args": args, "prepared": prepared, "members": members, "bagging": bagging, "stacking": stacking,
            "boosting": boosting, "stacking_info": info, "boosting_info": boost_info}


def test_block_bootstrap_draws_runs_of_consecutive_windows_within_a_stretch():
    """Every drawn block is consecutive windows of one stretch (no run crosses a device boundary or a gap), and
    the resample has as many windows as the original."""
    starts = np.concatenate([np.arange(0, 100), np.arange(150, 260), np.arange(1000, 1040)])
    rng = np.random.default_rng(0)
    out = ensemble.block_bootstrap(starts, 10, rng)
    assert len(out) == len(starts) and np.isin(out, starts).all()
    steps = np.diff(out)
    jumps = np.flatnonzero(steps != 1)
    runs = np.split(out, jumps + 1)
    assert max(len(r) for r in runs) >= 10  # blocks survive
    for r in runs:
        stretch = [(0, 100), (150, 260), (1000, 1040)]
        assert any(lo <= r[0] and r[-1] < hi for lo, hi in stretch)
    assert len(np.unique(out)) < len(starts)  # a resample, not a permutation


def test_stacking_folds_predict_only_windows_after_their_training_windows(trained):
    """Each time-series fold trains on windows that end before its held-out block starts (per device, purged)."""
    prepared = trained["prepared"]
    span = prepared.lookback + prepared.horizon
    offsets = np.asarray(prepared.offsets)
    for fit_starts, held in ensemble.time_series_folds(prepared, 3):
        for d in range(len(offsets)):
            dev = lambda s: s[np.searchsorted(offsets, s, side="right") - 1 == d]  # noqa: E731
            f, h = dev(fit_starts), dev(held)
            if len(f) and len(h):
                assert f.max() + span <= h.min()


def test_nnls_is_exact_and_non_negative():
    """The meta-model's NNLS recovers non-negative weights and zeroes a member whose best weight would be negative."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 3))
    b = a @ np.array([0.7, 0.0, 0.3]) - 0.2 * a[:, 1] + 0.01 * rng.standard_normal(500)
    w = ensemble.nnls(a, b)
    assert (w >= 0).all() and w[1] == 0 and np.allclose(w[[0, 2]], [0.7, 0.3], atol=0.02)


@pytest.mark.parametrize("method", ["bagging", "stacking", "boosting"])
def test_ensemble_bundle_runs_in_the_daemons_loader_and_matches_pytorch(trained, method, tmp_path):
    """The exported bundle loads with agent.core.model.load_bundle and forecasts (original units) what PyTorch does."""
    prepared, model = trained["prepared"], trained[method]
    manifest = export_bundle(model, prepared, ensemble.Trainer(prepared, trained["args"]).base,
                             tmp_path / method, name=f"ens-{method}", calibration="residual", reports=False, log=lambda *_: None)
    assert manifest["architecture"]["combine"] == method and "intervals" in manifest["calibration"]
    bundle = load_bundle(tmp_path / method)
    x_scaled, _ = prepared.windows(prepared.starts["test"][:64])  # (B, L, F)
    raw = (x_scaled * prepared.scaler.scale + prepared.scaler.offset).astype(np.float32)
    t = prepared.target_index
    with torch.no_grad():
        expected = model(torch.from_numpy(x_scaled)).numpy() * prepared.scaler.scale[t] + prepared.scaler.offset[t]
    np.testing.assert_allclose(bundle.predict(raw), expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_stacking_and_boosting_record_their_meta_model(trained):
    """Stacking weights are non-negative per (step, target, member); boosting keeps a prefix chosen on validation."""
    w = trained["stacking"].describe()["weights"]
    assert np.asarray(w).shape == (trained["prepared"].horizon, len(trained["prepared"].targets), 2) and np.min(w) >= 0
    info = trained["boosting_info"]
    assert 1 <= info["stages_kept"] <= 3 and len(trained["boosting"].members) == info["stages_kept"]
    curve = info["val_mse_per_stage"][: info["stages_kept"]]
    assert curve == sorted(curve, reverse=True)  # every kept stage lowered the validation MSE


def test_boosting_stage_starts_from_the_previous_ensemble(trained):
    """An untrained stage (which repeats the last value) leaves the ensemble's forecast unchanged."""
    from training.train import build_model

    prepared = trained["prepared"]
    base = trained["members"][0]
    cfg = ensemble.Trainer(prepared, trained["args"]).config("many_to_one", "mimo", 5)
    stage = ensemble.ResidualStage(base, build_model(cfg, prepared), prepared.target_index, prepared.horizon).eval()
    x = torch.from_numpy(prepared.windows(prepared.starts["val"][:16])[0])
    with torch.no_grad():
        torch.testing.assert_close(stage(x), base(x), rtol=1e-5, atol=1e-5)
    for p in base.parameters():
        p.requires_grad_(True)


def test_ensemble_all_writes_four_bundles_and_the_comparison(tmp_path, capsys):
    """`ensemble --method all` exports mean, bagging, stacking and boosting bundles and a comparison table with the
    members, averaging and repeat-last on validation and test, and each bundle's interval coverage."""
    out = tmp_path / "ens"
    assert training_main(["ensemble", "--method", "all", "--members", "many_to_one:mimo,cnn_lstm:mimo", "--folds", "2",
                          *TINY, "--out", str(out)]) == 0
    for method in ("mean", "bagging", "stacking", "boosting"):
        manifest = json.loads((out / method / "manifest.json").read_text())
        assert manifest["training"]["ensemble"]["method"] == method
        assert "interval_coverage" in manifest["metrics"]["test"]
    table = (out / "comparison.md").read_text()
    for row in ("repeat-last", "member 0", "member 1", "averaging (mean)", "**bagging**", "**stacking**", "**boosting**"):
        assert row in table
    summary = json.loads((out / "comparison.json").read_text())
    assert all({"val", "test"} <= set(r) for r in summary["comparison"])
    assert "interval coverage on the test split" in capsys.readouterr().out
