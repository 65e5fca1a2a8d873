"""A new user's CSV works in every command without flags: the timestamp column is found by its usual names,
every command spells its flags the same way (old spellings still accepted), repeated timestamps are averaged
instead of refused, and errors say what would work."""

from __future__ import annotations

import argparse
import csv
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from bundles import healthy_series, univariate_bundle

from agent.__main__ import _parser as agent_parser
from agent.__main__ import main as agent_main
from agent.tools.replay import TS_COLUMN_NAMES, ReplayError, find_ts_column, read_table
from training.data import prepare, to_device_series
from training.evaluate_alerts import EvaluationError, join

T0 = 1_763_737_200  # a multiple of 60


def iso(t: int) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def series_csv(path: Path, ts_name: str, n: int = 120, period: int = 60, render=str, seed: int = 3) -> Path:
    """One device, column `value` (the test bundle's feature), timestamps under the column `ts_name`."""
    values = healthy_series(n, seed=seed)
    return write_csv(path, [ts_name, "value"], [[render(T0 + period * k), f"{v:.4f}"] for k, v in enumerate(values)])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def command_parser(add_arguments) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------- finding the column


def test_timestamp_column_is_found_by_its_common_names_in_order_of_preference_any_case():
    """Without --ts-column the first of ts, timestamp, time, datetime, date (any case) is the timestamp column."""
    assert TS_COLUMN_NAMES == ("ts", "timestamp", "time", "datetime", "date")
    assert find_ts_column(["value", "Timestamp"], None) == "Timestamp"
    assert find_ts_column(["Date", "value"], None) == "Date"
    assert find_ts_column(["date", "TIME", "value"], None) == "TIME"  # time is preferred to date
    assert find_ts_column(["value", "timestamp", "ts"], None) == "ts"
    assert find_ts_column(["when", "value"], "when") == "when"  # --ts-column wins


def test_a_file_without_a_recognizable_timestamp_column_names_its_columns_and_the_flag(tmp_path):
    """No timestamp column: the error lists the file's columns and says to pass --ts-column NAME."""
    data = write_csv(tmp_path / "plant.csv", ["when", "value"], [[T0, 1.0], [T0 + 60, 2.0]])
    with pytest.raises(ReplayError) as caught:
        read_table(data, ["value"])
    message = str(caught.value)
    assert "'when'" in message and "'value'" in message and "--ts-column" in message
    assert isinstance(caught.value, ValueError)  # the training commands report ValueErrors as they are
    with pytest.raises(ValueError, match=r"no timestamp column 'stamp'.*'when'.*'value'"):
        find_ts_column(["when", "value"], "stamp")  # a --ts-column that is not there names those that are
    with pytest.raises(ValueError, match="without --ts-column the timestamp column 'Date' is used"):
        find_ts_column(["Date", "value"], "ts")


@pytest.mark.training
def test_replay_cli_without_a_time_column_exits_1_naming_the_columns(tmp_path, capsys):
    """`agent replay` on a file with no timestamp column exits 1 and names the columns and --ts-column."""
    data = write_csv(tmp_path / "in.csv", ["when", "value"], [[T0, 1.0]])
    assert agent_main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "'when'" in err and "--ts-column" in err


@pytest.mark.training
@pytest.mark.parametrize("ts_name, render", [("timestamp", str), ("Date", iso)])
def test_replay_finds_timestamp_and_date_columns_without_a_flag(tmp_path, ts_name, render):
    """`agent replay` reads a file whose time column is `timestamp` or `Date` (ISO) exactly like one named `ts`."""
    reference = series_csv(tmp_path / "ref.csv", "ts")
    other = series_csv(tmp_path / "other.csv", ts_name, render=render)
    assert agent_main(["replay", "--model", str(univariate_bundle()), "--data", str(reference), "--out", str(tmp_path / "a.csv")]) == 0
    assert agent_main(["replay", "--model", str(univariate_bundle()), "--data", str(other), "--out", str(tmp_path / "b.csv")]) == 0
    a, b = read_rows(tmp_path / "a.csv"), read_rows(tmp_path / "b.csv")
    assert list(b[0])[0] == "ts" and [r["ts"] for r in b] == [render(T0 + 60 * k) for k in range(len(b))]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ts"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


@pytest.mark.training
@pytest.mark.parametrize("ts_name, render", [("timestamp", str), ("Date", iso)])
def test_fit_reads_timestamp_and_date_columns_without_a_flag(tmp_path, ts_name, render):
    """`fit`'s loader finds `timestamp` / `Date` itself, keeps it out of the features and infers the period."""
    from training.fit import add_arguments, load_rows

    data = series_csv(tmp_path / "plant.csv", ts_name, render=render)
    args = command_parser(add_arguments).parse_args(["--data", str(data), "--out", str(tmp_path / "b")])
    assert args.ts_column is None
    rows, features, targets, period = load_rows(args)
    assert features == targets == ["value"] and period == 60
    assert rows["ts"].tolist() == [T0 + 60 * k for k in range(120)]


@pytest.mark.training
def test_fit_without_a_time_column_names_the_columns_and_the_flag(tmp_path):
    """`fit` on a file with no timestamp column raises a ValueError (exit 2) listing the columns and --ts-column."""
    from training.fit import add_arguments, load_rows

    data = write_csv(tmp_path / "plant.csv", ["when", "value"], [[T0 + 60 * k, k] for k in range(10)])
    args = command_parser(add_arguments).parse_args(["--data", str(data), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match=r"\['when', 'value'\].*--ts-column NAME"):
        load_rows(args)


@pytest.mark.training
@pytest.mark.parametrize("ts_name, render", [("timestamp", str), ("Date", iso)])
def test_load_table_finds_timestamp_and_date_columns_without_a_flag(tmp_path, ts_name, render):
    """train / cv / search / data-report's loader finds `timestamp` / `Date` itself and keeps it out of the features."""
    from training.data import load_table

    rows, features = load_table(series_csv(tmp_path / "plant.csv", ts_name, render=render))
    assert features == ["value"] and rows["ts"].tolist() == [T0 + 60 * k for k in range(120)]
    with pytest.raises(ValueError, match=r"\['when', 'value'\].*--ts-column"):
        load_table(write_csv(tmp_path / "none.csv", ["when", "value"], [[T0, 1.0]]))


@pytest.mark.training
@pytest.mark.parametrize("ts_name, render", [("timestamp", str), ("Date", iso)])
def test_data_report_finds_timestamp_and_date_columns_without_a_flag(tmp_path, capsys, ts_name, render):
    """`data-report` on a file whose time column is `timestamp` or `Date`, no flags: it reports the file's windows."""
    from training.__main__ import main as training_main

    data = series_csv(tmp_path / "plant.csv", ts_name, render=render, n=300)
    assert training_main(["data-report", "--data", str(data), "--lookback", "16", "--horizon", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["features"] == ["value"] and report["gaps"]["series"]["rows"] == 300 and report["windows"]["train"] > 0


@pytest.mark.training
def test_data_report_period_defaults_to_the_median_step_of_the_data(tmp_path, capsys):
    """Without --period-s, data-report (like train and fit) resamples at the data's own step: 300 s, not 60 s."""
    from training.__main__ import main as training_main

    data = series_csv(tmp_path / "plant.csv", "ts", n=300, period=300)
    assert training_main(["data-report", "--data", str(data), "--lookback", "16", "--horizon", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["period_s"] == 300
    assert report["gaps"]["series"] == {"rows": 300, "observed": 300, "filled": 0, "gaps": 0, "longest_gap": 0,
                                        "long_gaps": 0, "rows_in_long_gaps": 0}


def test_evaluate_alerts_joins_replay_output_with_a_data_file_whose_time_column_is_named_otherwise(tmp_path, capsys):
    """evaluate-alerts finds each file's timestamp column on its own: replay's `ts` against the data file's `time`."""
    from training.__main__ import main as training_main

    pred = write_csv(tmp_path / "pred.csv", ["ts", "device", "anomaly_score", "alert"],
                     [[T0 + 60 * k, "a", 0.1, int(k in (3, 4))] for k in range(8)])
    labels = write_csv(tmp_path / "data.csv", ["time", "device", "value", "label"],
                       [[T0 + 60 * k, "a", 1.0, int(2 <= k <= 4)] for k in range(8)])
    data = join(str(pred), str(labels))
    assert data.label.sum() == 3 and data.alert.sum() == 2
    assert training_main(["evaluate-alerts", "--pred", str(pred), "--labels", str(labels)]) == 0
    assert "event-level recall 1.000 (1/1 fault events)" in capsys.readouterr().out
    assert join(str(pred), str(labels), ts_column="time").label.sum() == 3  # --ts-column names the labels' column
    none = write_csv(tmp_path / "none.csv", ["when", "device", "label"], [[T0, "a", 0]])
    with pytest.raises(EvaluationError, match=r"\['when', 'device', 'label'\].*--ts-column"):
        join(str(pred), str(none))


def test_evaluate_alerts_device_column_names_the_data_files_not_replays(tmp_path):
    """--device-column names the data file's device column; replay's output always calls it `device`."""
    pred = write_csv(tmp_path / "pred.csv", ["ts", "device", "anomaly_score", "alert"],
                     [[T0 + 60 * k, "m1", 0.1, int(k == 3)] for k in range(6)])
    labels = write_csv(tmp_path / "data.csv", ["ts", "machine", "label"],
                       [[T0 + 60 * k, "m1", int(k == 3)] for k in range(6)])
    data = join(str(pred), str(labels), device_column="machine")
    assert data.label.sum() == 1 and data.alert.sum() == 1 and set(data.device) == {"m1"}


# ------------------------------------------------------------------------------------------ one spelling


def _training_parser(command: str) -> argparse.ArgumentParser:
    from training.__main__ import COMMANDS

    return command_parser(COMMANDS[command][1])


@pytest.mark.training
@pytest.mark.parametrize("command", ["fit", "train", "data-report", "cv", "search"])
def test_ts_column_and_period_s_are_spelled_alike_and_the_old_spellings_still_parse(command):
    """fit, train, data-report, cv and search take --ts-column / --period-s; --timestamp-column / --period are aliases."""
    required = {"fit": ["--data", "d.csv", "--out", "o"], "train": ["--data", "d.csv", "--out", "o"],
                "data-report": ["--data", "d.csv"]}.get(command, [])
    parser = _training_parser(command)
    default = parser.parse_args(required)
    assert default.ts_column is None and default.period_s is None  # found in / inferred from the data
    new = parser.parse_args([*required, "--ts-column", "when", "--period-s", "30"])
    old = parser.parse_args([*required, "--timestamp-column", "when", "--period", "30"])
    assert (new.ts_column, new.period_s) == (old.ts_column, old.period_s) == ("when", 30)
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args([*required, "--period-s", "1.5"])  # a whole number of seconds


def test_replay_and_evaluate_alerts_take_ts_column_and_the_old_spelling():
    """`agent replay` and `evaluate-alerts` take --ts-column (default: found) and --timestamp-column as an alias."""
    from training.evaluate_alerts import add_arguments

    base = ["replay", "--model", "m", "--data", "d.csv", "--out", "o.csv"]
    assert agent_parser().parse_args(base).ts_column is None
    assert agent_parser().parse_args([*base, "--timestamp-column", "when"]).ts_column == "when"
    assert agent_parser().parse_args([*base, "--ts-column", "when"]).ts_column == "when"
    parser = command_parser(add_arguments)
    assert parser.parse_args(["--pred", "p.csv"]).ts_column is None
    assert parser.parse_args(["--pred", "p.csv", "--timestamp-column", "when"]).ts_column == "when"


# ---------------------------------------------------------------------------------------- duplicate timestamps


def test_duplicate_timestamps_are_averaged_by_the_data_preparation():
    """Repeated timestamps of one device are averaged into their slot (like any rows of one slot), not refused."""
    ts = T0 + 60 * np.arange(200)
    ts = np.insert(ts, 50, ts[50])  # row 50 twice
    a = np.arange(200.0)
    a = np.insert(a, 50, 51.0)  # 50.0 and 51.0 at the same time
    rows = {"ts": ts, "device": np.array(["pump-1"] * len(ts), dtype=object), "a": a}
    (s,) = to_device_series(rows, 60, features=["a"])
    assert len(s.ts) == 200 and s.values[50, 0] == 50.5 and s.observed.all()
    prepared = prepare(rows, 16, 4, 60, features=["a"])
    assert all(len(prepared.starts[k]) > 0 for k in ("train", "val", "test"))


@pytest.mark.training
def test_fit_and_replay_both_accept_duplicate_timestamps(tmp_path):
    """A file with a repeated timestamp is accepted by fit's data preparation and by replay alike."""
    from training.fit import add_arguments, load_rows

    values = healthy_series(200, seed=4)
    rows = [[T0 + 60 * k, f"{v:.4f}"] for k, v in enumerate(values)]
    rows.insert(100, [T0 + 60 * 100, f"{values[100] + 0.1:.4f}"])
    data = write_csv(tmp_path / "dup.csv", ["ts", "value"], rows)
    args = command_parser(add_arguments).parse_args(["--data", str(data), "--out", str(tmp_path / "b")])
    loaded, features, targets, period = load_rows(args)
    prepared = prepare(loaded, 16, 4, period, features=features, targets=targets)
    assert len(prepared.series[0].ts) == 200 and len(prepared.starts["val"]) > 0
    assert agent_main(["replay", "--model", str(univariate_bundle()), "--data", str(data), "--out", str(tmp_path / "o.csv")]) == 0
    assert len(read_rows(tmp_path / "o.csv")) == 201


# ---------------------------------------------------------------------------------------- too short


def test_too_short_data_names_the_rows_per_device_and_a_lookback_and_horizon_that_fit():
    """The "no healthy windows" error gives the split's rows per device and a --lookback / --horizon that works."""
    rows = {"ts": T0 + 60 * np.arange(100), "device": np.array(["pump-1"] * 100, dtype=object),
            "a": np.sin(np.arange(100) / 5.0)}
    with pytest.raises(ValueError) as caught:
        prepare(rows, 60, 10, 60, features=["a"])
    message = str(caught.value)
    assert "no healthy val windows" in message and "val split has 15 rows per device" in message
    assert "lookback + horizon must be at most 15" in message
    lookback, horizon = map(int, re.search(r"--lookback (\d+) --horizon (\d+)", message).groups())
    prepared = prepare(rows, lookback, horizon, 60, features=["a"])  # the suggestion works
    assert all(len(prepared.starts[k]) > 0 for k in ("train", "val", "test"))
