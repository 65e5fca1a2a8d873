"""replay: a CSV through the daemon's pipeline -> one output row per input row (no broker)."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from bundles import PUMP_BUNDLE, healthy_series, univariate_bundle

from agent.__main__ import main
from agent.config.settings import Settings
from agent.core.model import load_bundle
from agent.tools.replay import read_table, replay, replay_table

T0 = 1_763_737_200  # a multiple of 60


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def two_device_csv(path: Path, n: int = 120, spike_at: int | None = None) -> Path:
    a, b = healthy_series(n, seed=1), healthy_series(n, seed=2) + 0.5
    if spike_at is not None:
        a[spike_at : spike_at + 20 : 2] += 1.5
    rows = []
    for k in range(n):
        rows.append([T0 + 60 * k, "dev-b", f"{b[k]:.4f}"])
        rows.append([T0 + 60 * k, "dev-a", f"{a[k]:.4f}"])
    return write_csv(path, ["ts", "device", "value"], rows)


def test_output_has_one_row_per_input_row_with_the_documented_columns(tmp_path):
    """Columns ts, device, anomaly_score, alert, expected_<t>, forecast_<t>_<k>; rows in input order."""
    data = two_device_csv(tmp_path / "in.csv")
    result = replay(univariate_bundle(), data, tmp_path / "out.csv")
    rows = read_rows(tmp_path / "out.csv")
    inputs = read_rows(data)
    assert result.rows == len(rows) == len(inputs) == 240
    assert list(rows[0]) == ["ts", "device", "anomaly_score", "alert", "expected_value"] + [f"forecast_value_{k}" for k in range(1, 5)]
    assert [(r["ts"], r["device"]) for r in rows] == [(r["ts"], r["device"]) for r in inputs]
    assert result.devices == 2


def test_values_before_and_after_the_first_forecast(tmp_path):
    """Before a device's window is full: score 0, alert 0, empty forecasts; then forecasts and expected values."""
    data = two_device_csv(tmp_path / "in.csv")
    replay(univariate_bundle(), data, tmp_path / "out.csv")
    rows = [r for r in read_rows(tmp_path / "out.csv") if r["device"] == "dev-a"]
    values = [float(r["value"]) for r in read_rows(data) if r["device"] == "dev-a"]
    for r in rows[:15]:
        assert (r["anomaly_score"], r["alert"], r["forecast_value_1"], r["expected_value"]) == ("0.000000", "0", "", "")
    assert rows[15]["forecast_value_1"] != "" and rows[15]["expected_value"] == ""
    # persistence model: row k's forecast is its own value; row k + 1 expects that value
    assert float(rows[15]["forecast_value_4"]) == pytest.approx(values[15], abs=1e-4)
    assert float(rows[16]["expected_value"]) == pytest.approx(values[15], abs=1e-4)
    scores = [float(r["anomaly_score"]) for r in rows[16:]]
    assert all(0 < s < 1 for s in scores)
    assert {r["alert"] for r in rows} == {"0"}


def test_alert_column_marks_the_rows_of_an_open_alert(tmp_path):
    """An injected deviation sets alert = 1 on the faulty device's rows while the alert is open, not elsewhere."""
    data = two_device_csv(tmp_path / "in.csv", n=300, spike_at=150)
    result = replay(univariate_bundle(), data, tmp_path / "out.csv")
    rows = read_rows(tmp_path / "out.csv")
    flagged = [int((int(r["ts"]) - T0) / 60) for r in rows if r["alert"] == "1"]
    assert result.alerts_opened == 1
    assert flagged and all(r["device"] == "dev-a" for r in rows if r["alert"] == "1")
    assert 150 <= min(flagged) <= 155 and max(flagged) < 200
    assert max(float(r["anomaly_score"]) for r in rows if r["alert"] == "1") > 0.5


def test_missing_device_column_means_one_device_and_iso_timestamps_work(tmp_path):
    """Without a device column the file is one device; ISO-8601 timestamps are read and written back as given."""
    values = healthy_series(40)
    stamps = [datetime.fromtimestamp(T0 + 60 * k, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for k in range(40)]
    data = write_csv(tmp_path / "in.csv", ["time", "value"], [[s, f"{v:.4f}"] for s, v in zip(stamps, values)], delimiter=";")
    result = replay(univariate_bundle(), data, tmp_path / "out.csv", ts_column="time", delimiter=";")
    rows = read_rows(tmp_path / "out.csv")
    assert result.devices == 1 and len(rows) == 40
    assert [r["ts"] for r in rows] == stamps
    assert rows[-1]["forecast_value_1"] != ""


def test_unsorted_input_is_replayed_in_time_order(tmp_path):
    """Rows are fed in time order whatever the file order, and written back in file order."""
    data = two_device_csv(tmp_path / "in.csv")
    lines = data.read_text().splitlines()
    shuffled = [lines[0]] + lines[1:][::-1]
    (tmp_path / "rev.csv").write_text("\n".join(shuffled) + "\n")
    replay(univariate_bundle(), data, tmp_path / "a.csv")
    replay(univariate_bundle(), tmp_path / "rev.csv", tmp_path / "b.csv")
    forward = {(r["ts"], r["device"]): r for r in read_rows(tmp_path / "a.csv")}
    backward = read_rows(tmp_path / "b.csv")
    assert [(r["ts"], r["device"]) for r in backward] == [tuple(line.split(",")[:2]) for line in shuffled[1:]]
    assert all(forward[(r["ts"], r["device"])] == r for r in backward)


def test_chunk_size_does_not_change_the_output(tmp_path):
    """Feeding the pipeline row by row or in large chunks gives identical per-row results."""
    data = two_device_csv(tmp_path / "in.csv", n=200, spike_at=100)
    bundle = load_bundle(univariate_bundle())
    table = read_table(data, bundle.features)
    settings = Settings(model={"path": bundle.path})
    _, small = replay_table(table, bundle, settings, chunk_rows=1)
    _, large = replay_table(table, bundle, settings, chunk_rows=4096)
    for name in ("anomaly", "alert", "expected", "forecast"):
        np.testing.assert_array_equal(getattr(small, name), getattr(large, name))


def test_model_batch_size_does_not_change_the_output(tmp_path):
    """Replay's larger default model batch gives the same CSV as the daemon's batch of a few windows."""
    data = two_device_csv(tmp_path / "in.csv", n=300, spike_at=150)
    replay(univariate_bundle(), data, tmp_path / "default.csv")
    settings = Settings(model={"path": univariate_bundle()}, inference={"max_batch": 3})
    assert settings.inference.max_batch == 3
    replay(univariate_bundle(), data, tmp_path / "three.csv", settings=settings)
    assert (tmp_path / "default.csv").read_bytes() == (tmp_path / "three.csv").read_bytes()


def test_shipped_model_replay_of_the_synthetic_fleet(tmp_path):
    """pump-lstm replay writes 4 expected and 40 forecast columns and flags only the pump with a sudden jump."""
    synth = pytest.importorskip("simulation.synth")
    fleet = synth.generate_fleet(synth.FleetConfig(devices=2, hours=16, seed=5, faults="none"))
    jump_ts = int(fleet.rows["ts"][0]) + 10 * 3600
    fleet.rows["vibration_rms"] = fleet.rows["vibration_rms"] + np.where((fleet.rows["device"] == "pump-00") & (fleet.rows["ts"] >= jump_ts), 2.0, 0.0)
    synth.write_csv(fleet, tmp_path / "fleet.csv")
    assert main(["replay", "--model", str(PUMP_BUNDLE), "--data", str(tmp_path / "fleet.csv"), "--out", str(tmp_path / "out.csv")]) == 0
    rows = read_rows(tmp_path / "out.csv")
    assert len(rows) == len(fleet.rows["ts"])
    assert len([c for c in rows[0] if c.startswith("forecast_")]) == 40
    assert len([c for c in rows[0] if c.startswith("expected_")]) == 4
    flagged = [int(r["ts"]) for r in rows if r["alert"] == "1"]
    assert flagged and {r["device"] for r in rows if r["alert"] == "1"} == {"pump-00"}
    assert jump_ts <= min(flagged) <= jump_ts + 300


def test_cli_reports_missing_columns_and_bad_cells(tmp_path, capsys):
    """Unusable data exits 1 with the missing column, or the line and column of a bad cell."""
    data = write_csv(tmp_path / "in.csv", ["ts", "temperature"], [[T0, 1.0]])
    assert main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv")]) == 1
    assert "value" in capsys.readouterr().err
    data = write_csv(tmp_path / "bad.csv", ["ts", "value"], [[T0, 1.0], [T0 + 60, "hot"]])
    assert main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "line 3" in err and "hot" in err


def test_cli_prints_rows_per_second(tmp_path, capsys):
    """A successful replay exits 0 and prints its throughput to stderr."""
    data = two_device_csv(tmp_path / "in.csv")
    assert main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv")]) == 0
    assert "rows/s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ts_format, render",
    [
        ("unix_ms", lambda t: str(t * 1000)),
        ("%d/%m/%Y %H:%M", lambda t: datetime.fromtimestamp(t, tz=timezone.utc).strftime("%d/%m/%Y %H:%M")),
        ("iso", lambda t: datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00:00")),
    ],
)
def test_timestamp_formats_give_the_same_scores(tmp_path, ts_format, render):
    """--ts-format unix_ms, ISO-8601 and strptime formats replay exactly like unix seconds."""
    values = healthy_series(60, seed=7)
    reference = write_csv(tmp_path / "ref.csv", ["ts", "value"], [[T0 + 60 * k, f"{v:.4f}"] for k, v in enumerate(values)])
    other = write_csv(tmp_path / "other.csv", ["when", "value"], [[render(T0 + 60 * k), f"{v:.4f}"] for k, v in enumerate(values)], delimiter="\t")
    replay(univariate_bundle(), reference, tmp_path / "a.csv")
    replay(univariate_bundle(), other, tmp_path / "b.csv", ts_column="when", delimiter="\t", ts_format=ts_format)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ts"} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "a.csv")) == strip(read_rows(tmp_path / "b.csv"))


def test_bad_timestamp_format_names_the_line(tmp_path, capsys):
    """A cell that does not match --ts-format exits 1 naming its line and column."""
    data = write_csv(tmp_path / "in.csv", ["ts", "value"], [["2026-01-05 00:00", 1.0], ["05/01/2026", 1.0]])
    args = ["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv"), "--ts-format", "%Y-%m-%d %H:%M"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "line 3" in err and "'ts'" in err


def test_plot_writes_a_png_with_the_labeled_fault(tmp_path):
    """--plot draws signals, forecast, score, thresholds, alerts and labeled faults into a PNG."""
    pytest.importorskip("matplotlib")
    values = healthy_series(200, seed=8)
    values[120:140:2] += 1.5
    rows = [[T0 + 60 * k, f"{v:.4f}", int(120 <= k < 140)] for k, v in enumerate(values)]
    data = write_csv(tmp_path / "in.csv", ["ts", "value", "label"], rows)
    png = tmp_path / "replay.png"
    assert main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
