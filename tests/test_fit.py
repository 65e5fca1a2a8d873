"""`python -m training fit` -> `python -m agent replay`: train on the first rows of any CSV, replay the whole file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from agent.__main__ import main as agent_main  # noqa: E402
from training.__main__ import main as training_main  # noqa: E402

T0 = 1_767_571_200


def test_fit_then_replay_round_trip_on_a_small_csv(tmp_path):
    """fit trains on the first N rows of a semicolon CSV (ms timestamps, chosen columns); replay scores every row."""
    rng = np.random.default_rng(0)
    n = 1400
    level = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 120) + 0.2 * rng.standard_normal(n)
    level[1300:1320] += 4.0  # a fault after the training rows
    data = tmp_path / "plant.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["time", "temp", "humidity", "note"])
        w.writerows([[(T0 + 60 * k) * 1000, f"{v:.4f}", f"{50 + rng.standard_normal():.3f}", "x"] for k, v in enumerate(level)])
    bundle = tmp_path / "bundle"
    code = training_main(["fit", "--data", str(data), "--out", str(bundle), "--rows", "1000", "--features", "temp,humidity",
                          "--targets", "temp", "--ts-column", "time", "--ts-format", "unix_ms", "--delimiter", ";",
                          "--lookback", "16", "--horizon", "4", "--epochs", "2", "--hidden-size", "8", "--num-layers", "1"])
    assert code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["features"] == ["temp", "humidity"] and manifest["targets"] == ["temp"]
    assert manifest["sampling_period_s"] == 60 and manifest["training"]["data"]["rows"] == 1000
    assert manifest["calibration"]["score_steps"] == [1, 2, 3, 4] and len(manifest["calibration"]["flatline_repeats"]) == 1
    out = tmp_path / "scored.csv"
    assert agent_main(["replay", "--model", str(bundle), "--data", str(data), "--out", str(out), "--ts-column", "time",
                       "--ts-format", "unix_ms", "--delimiter", ";"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    alert = np.array([int(r["alert"]) for r in rows])
    assert alert[1300:1330].any()
    assert not alert[200:1000].any()


def test_fit_refuses_unknown_targets_and_too_few_rows(tmp_path, capsys):
    """Targets outside the features, or too few selected rows, exit 2 with a clear message and write nothing."""
    data = tmp_path / "d.csv"
    data.write_text("ts,a\n" + "".join(f"{T0 + 60 * k},{k % 7}\n" for k in range(50)))
    assert training_main(["fit", "--data", str(data), "--out", str(tmp_path / "b"), "--targets", "b"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert training_main(["fit", "--data", str(data), "--out", str(tmp_path / "b"), "--rows", "1"]) == 2
    assert not (tmp_path / "b").exists()


def test_fit_search_finishes_within_its_budget_and_reports_the_choice(tmp_path, capsys):
    """`fit --search` runs an Optuna study on time-series folds of the training rows within --search-budget, then
    exports the chosen model like any fit and reports the choice and its validation gain over the default."""
    rng = np.random.default_rng(1)
    n = 900
    level = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 90) + 0.2 * rng.standard_normal(n)
    data = tmp_path / "small.csv"
    data.write_text("ts,temp\n" + "".join(f"{T0 + 60 * k},{v:.4f}\n" for k, v in enumerate(level)))
    bundle = tmp_path / "bundle"
    budget = 25
    code = training_main(["fit", "--data", str(data), "--out", str(bundle), "--search", "auto", "--search-budget", str(budget),
                          "--search-min-steps", "10", "--min-steps", "30", "--epochs", "2", "--hidden-size", "8",
                          "--num-layers", "1", "--search-seed", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    search = json.loads((bundle / "search.json").read_text())
    assert search["completed"] >= 1 and search["seconds"] <= budget + 10  # at most one epoch past the budget
    assert set(search["params"]) >= {"architecture", "lookback", "hidden_size", "dropout", "learning_rate"}
    assert search["default_params"]["architecture"] == "lstm" and search["default_value"] is not None
    assert isinstance(search["val_gain_percent"], float) and "validation RMSE" in printed and "chose" in printed
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["training"]["data"]["search"]["params"] == search["params"]
    assert manifest["lookback"] == search["params"]["lookback"]
    assert manifest["onnx"]["verified"]["max_abs_diff"] < 1e-4 and "interval_coverage" in manifest["metrics"]["test"]


def test_fit_search_refuses_a_bad_trial_count(tmp_path, capsys):
    """--search takes a positive number of trials or `auto`; anything else exits 2 and writes nothing."""
    data = tmp_path / "d.csv"
    data.write_text("ts,a\n" + "".join(f"{T0 + 60 * k},{k % 7}\n" for k in range(400)))
    assert training_main(["fit", "--data", str(data), "--out", str(tmp_path / "b"), "--search", "0"]) == 2
    assert "--search" in capsys.readouterr().err and not (tmp_path / "b").exists()
