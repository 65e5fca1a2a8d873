"""Detection that holds on data nobody tuned to: the state channels, out-of-sample thresholds, fit's defaults."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from agent.core.state import NormalState


def _correlated(rng: np.random.Generator, n: int) -> np.ndarray:
    latent = rng.standard_normal((n, 2))  # (N, 2)
    mix = np.array([[1.0, 0.8, 0.0, 0.3], [0.0, 0.6, 1.0, -0.5]])  # (2, 4)
    return latent @ mix + 0.1 * rng.standard_normal((n, 4))  # (N, 4)


def test_state_statistics_are_near_one_on_normal_rows_and_large_when_a_correlation_breaks():
    """T^2 / k and SPE / mean are ~1 on new normal rows; a row that breaks the usual correlation has a large SPE."""
    rng = np.random.default_rng(0)
    model = NormalState.fit(_correlated(rng, 2000), variance=0.9)
    assert model.k == 2 and model.has_spe
    normal = model.statistics(_correlated(rng, 2000))  # (N, 2)
    assert 0.8 < normal[:, 0].mean() < 1.25 and 0.8 < normal[:, 1].mean() < 1.25
    broken = _correlated(rng, 1)
    broken[0, 1] += 2.0  # the second sensor leaves the plane the others define
    assert model.statistics(broken)[0, 1] > 20 * normal[:, 1].mean()
    again = NormalState.from_manifest(json.loads(json.dumps(model.to_manifest())))
    np.testing.assert_allclose(again.statistics(broken), model.statistics(broken), rtol=1e-5)


def test_state_model_of_one_feature_has_no_spe_and_rejects_bad_shapes():
    """With every component kept there is no residual subspace (SPE 0); inconsistent shapes are refused."""
    rng = np.random.default_rng(1)
    model = NormalState.fit(rng.standard_normal((200, 1)))
    assert not model.has_spe
    assert (model.statistics(rng.standard_normal((5, 1)))[:, 1] == 0).all()
    with pytest.raises(ValueError, match="shapes"):
        NormalState([0.0, 0.0], [[1.0], [0.0], [0.0]], [1.0], 1.0)


@pytest.mark.training
def test_pot_threshold_extrapolates_a_known_tail_and_never_sits_below_the_data():
    """The peaks-over-threshold level at risk r is close to the true (1 - r) quantile, and never under the largest score."""
    from training.calibrate import pot_threshold

    rng = np.random.default_rng(2)
    scores = rng.exponential(1.0, 5000)
    assert pot_threshold(scores, 1e-4) == pytest.approx(math.log(1e4), rel=0.15)
    few = rng.exponential(1.0, 30)
    assert pot_threshold(few, 1e-4) >= few.max()


@pytest.mark.training
def test_small_data_trains_a_floor_of_optimizer_steps_and_large_data_is_unchanged():
    """sized_for_data: 300 windows still get >= min_steps optimizer steps; a large data set keeps its recipe."""
    from training.train import TrainConfig, sized_for_data

    cfg = sized_for_data(TrainConfig(), 300, 600)
    steps_per_epoch = math.ceil(math.ceil(300 / cfg.train_stride) / cfg.batch_size)
    assert steps_per_epoch * cfg.epochs >= 600 and cfg.batch_size <= 300 // 8 + 16
    assert cfg.patience > TrainConfig().patience
    big = sized_for_data(TrainConfig(), 1_000_000, 600)
    assert (big.epochs, big.batch_size, big.train_stride) == (TrainConfig().epochs, TrainConfig().batch_size, TrainConfig().train_stride)


@pytest.mark.training
def test_lookback_and_horizon_follow_the_documented_rule():
    """lookback = sqrt(rows per device) within 8..60, horizon = lookback / 6 within 1..10."""
    from training.fit import window_sizes

    assert window_sizes(400) == (20, 3)
    assert window_sizes(50) == (8, 1)
    assert window_sizes(1_000_000) == (60, 10)


# -- end to end: fit with no tuning flags on a 400-row training part, replay the whole file --------------------

SHIFT = (700, 900)  # rows where the second sensor leaves its usual relation to the others
ROWS = 1200


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("generalizes")
    latent = np.zeros((ROWS, 2))
    for i in range(1, ROWS):  # slow AR(1) drivers: the sensors move together, as on a real machine
        latent[i] = 0.95 * latent[i - 1] + 0.3 * rng.standard_normal(2)
    values = latent @ np.array([[1.0, 0.8, 0.0, 0.3], [0.0, 0.6, 1.0, -0.5]]) + 0.05 * rng.standard_normal((ROWS, 4))
    values[SHIFT[0] : SHIFT[1], 1] += 1.5  # a sustained abnormal state, not a blip
    data = folder / "plant.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "temp", "pressure", "flow", "current"])
        for i, row in enumerate(values):
            writer.writerow([f"2026-03-01T{i // 60:02d}:{i % 60:02d}:00"] + [f"{v:.5f}" for v in row])
    from training.__main__ import main as train_main

    model = folder / "bundle"
    assert train_main(["fit", "--data", str(data), "--out", str(model), "--rows", "400"]) == 0
    from agent.__main__ import main as agent_main

    scored = folder / "scored.csv"
    assert agent_main(["replay", "--model", str(model), "--data", str(data), "--out", str(scored)]) == 0
    with open(scored, newline="", encoding="utf-8") as f:
        alert = np.array([int(r["alert"]) for r in csv.DictReader(f)])
    manifest = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    return manifest, alert


@pytest.mark.training
def test_fit_works_on_400_rows_with_no_tuning_flags(fitted):
    """fit needs only --data, --out and the training range on 400 rows (the old fixed lookback 60 + horizon 10 failed)."""
    manifest, _ = fitted
    assert manifest["lookback"] == 20 and manifest["horizon"] == 3
    calibration = manifest["calibration"]
    assert calibration["thresholds"]["warning"] == 1.0  # every bundle's warning is 1.0: anomaly_score 0.5
    assert "state" in calibration and len(calibration["state"]["center"]) == 4


@pytest.mark.training
def test_a_sustained_abnormal_state_keeps_its_alert_open_and_the_alert_ends_after_it(fitted):
    """The alert covers most of a sustained shift (not only its onset) and ends within 30 samples of its end."""
    _, alert = fitted
    inside = alert[SHIFT[0] : SHIFT[1]]
    assert inside.mean() > 0.8
    assert alert[SHIFT[1] + 30 :].sum() == 0


@pytest.mark.training
def test_no_alert_on_the_rows_the_model_was_fitted_on(fitted):
    """The training rows (the first 400) raise no alert: thresholds come from out-of-sample scores."""
    _, alert = fitted
    assert alert[:400].sum() == 0


@pytest.mark.training
def test_fit_on_data_too_short_for_its_validation_part_says_what_would_fit_instead_of_crashing(tmp_path, capsys):
    """A validation part too short for the windows exits 2 with a message naming a lookback/horizon or split, no traceback."""
    from training.__main__ import main as train_main

    data = tmp_path / "short.csv"
    rng = np.random.default_rng(3)
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "a", "b"])
        for i, (a, b) in enumerate(rng.standard_normal((300, 2))):
            writer.writerow([1_700_000_000 + 60 * i, f"{a:.4f}", f"{b:.4f}"])
    code = train_main(["fit", "--data", str(data), "--out", str(tmp_path / "m"), "--split", "0.9,0.05,0.05"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--lookback" in err or "--split" in err
    assert "Traceback" not in err


@pytest.mark.training
def test_fit_warns_when_the_model_does_not_beat_repeat_last(tmp_path, capsys):
    """On a random walk (repeat-last is the best forecast) fit says that its model adds little, instead of staying silent."""
    from training.__main__ import main as train_main

    data = tmp_path / "walk.csv"
    walk = np.cumsum(np.random.default_rng(4).standard_normal((400, 2)), axis=0)
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ts", "a", "b"])
        for i, (a, b) in enumerate(walk):
            writer.writerow([1_700_000_000 + 60 * i, f"{a:.4f}", f"{b:.4f}"])
    assert train_main(["fit", "--data", str(data), "--out", str(tmp_path / "m")]) == 0
    assert "does not beat repeat-last on validation" in capsys.readouterr().out


@pytest.mark.training
def test_a_univariate_bundle_has_no_state_channels_unless_asked(tmp_path):
    """With one feature the state channels are off by default (a level limit on a drifting stream) and on with --state on."""
    from training.__main__ import main as train_main

    data = tmp_path / "one.csv"
    values = np.sin(np.arange(400) / 7.0) + 0.1 * np.random.default_rng(5).standard_normal(400)
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "level"])
        for i, v in enumerate(values):
            writer.writerow([1_700_000_000 + 60 * i, f"{v:.4f}"])
    assert train_main(["fit", "--data", str(data), "--out", str(tmp_path / "auto"), "--min-steps", "50"]) == 0
    assert "state" not in json.loads((tmp_path / "auto" / "manifest.json").read_text())["calibration"]
    assert train_main(["fit", "--data", str(data), "--out", str(tmp_path / "on"), "--min-steps", "50", "--state", "on"]) == 0
    assert "state" in json.loads((tmp_path / "on" / "manifest.json").read_text())["calibration"]
