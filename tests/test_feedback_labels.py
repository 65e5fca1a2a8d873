"""Operators' feedback (the export-feedback CSV) as labels for `fit`, `train` and `evaluate-alerts`."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from training.feedback import FeedbackError, apply, read_feedback
from training.__main__ import main as training_main

T0 = 1_767_571_200  # 2026-01-05T00:00:00Z
HEADER = "device,start,end,label,alert_id,by,at,comment\n"


def iso(minute: float) -> str:
    """The time `minute` minutes after T0 as the exporter writes it."""
    return datetime.fromtimestamp(T0 + 60 * minute, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def feedback_file(tmp_path: Path, *rows: tuple, name: str = "feedback.csv") -> Path:
    """A feedback CSV with rows (device, start minute, end minute, label[, comment])."""
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER.strip().split(","))
        for k, (device, start, end, label, *comment) in enumerate(rows):
            w.writerow([device, iso(start), iso(end), label, f"{device}-{k}", "alice", iso(end + 1), *(comment or [""])])
    return path


# ------------------------------------------------------------------------------------------------- parsing


def test_the_contract_example_parses_with_its_quoted_comment(tmp_path):
    """The contract's example row reads as device, UTC seconds, label and alert id; a quoted comment may hold commas and newlines."""
    path = tmp_path / "fb.csv"
    path.write_text(HEADER + 'pump-03,2026-12-07T10:00:00Z,2026-12-07T11:30:00Z,false_alarm,pump-03-1765101600-1a2b3c,'
                    'alice,2026-12-07T12:00:05Z,"valve work, not a fault\nsee ticket 12"\n'
                    "pump-04,2026-12-07T10:00:00+01:00,2026-12-07T10:00:00+01:00,unknown,,bob,2026-12-07T12:00:05Z,\n")
    first, second = read_feedback(str(path))
    assert (first.device, first.label, first.alert_id, first.line) == ("pump-03", "false_alarm", "pump-03-1765101600-1a2b3c", 2)
    assert first.start == datetime(2026, 12, 7, 10, tzinfo=timezone.utc).timestamp() and first.end - first.start == 5400
    assert second.line == 4 and second.start == second.end == datetime(2026, 12, 7, 9, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("rows, expected", [
    ("device,start,label\npump-01,2026-01-05T00:00:00Z,true_fault\n", ["missing column(s) ['end']"]),
    (HEADER + "pump-01,yesterday,2026-01-05T00:00:00Z,true_fault,a,b,c,\n", ["line 2", "column 'start'", "yesterday"]),
    (HEADER + "pump-01,2026-01-05T00:00:00Z,,true_fault,a,b,c,\n", ["line 2", "column 'end'"]),
    (HEADER + "pump-01,2026-01-05T02:00:00Z,2026-01-05T01:00:00Z,true_fault,a,b,c,\n", ["line 2", "column 'end'", "before start"]),
    (HEADER + "pump-01,2026-01-05T00:00:00Z,2026-01-05T01:00:00Z,true_fault,a,b,c,\n"
              "pump-01,2026-01-05T00:00:00Z,2026-01-05T01:00:00Z,not_sure,a,b,c,\n", ["line 3", "column 'label'", "not_sure"]),
    (HEADER + ",2026-01-05T00:00:00Z,2026-01-05T01:00:00Z,true_fault,a,b,c,\n", ["line 2", "column 'device'", "empty"]),
    (HEADER + "pump-01,2026-01-05T00:00:00Z,2026-01-05T02:00:00Z,true_fault,a,b,c,\n"
              "pump-02,2026-01-05T00:00:00Z,2026-01-05T02:00:00Z,false_alarm,a,b,c,\n"
              "pump-01,2026-01-05T01:00:00Z,2026-01-05T03:00:00Z,false_alarm,a,b,c,\n", ["lines 2 and 4", "contradictory", "pump-01"]),
    ("", ["empty"]),
], ids=["missing-column", "bad-start", "empty-end", "end-before-start", "unknown-label", "empty-device", "contradiction", "empty-file"])
def test_bad_rows_are_refused_naming_the_line_and_column(tmp_path, rows, expected):
    """Each kind of bad input raises FeedbackError whose message names the line and column (or the missing column)."""
    path = tmp_path / "fb.csv"
    path.write_text(rows)
    with pytest.raises(FeedbackError) as caught:
        read_feedback(str(path))
    for text in expected:
        assert text in str(caught.value)


def test_ranges_sharing_only_an_end_point_are_not_contradictory_and_the_instant_is_a_fault(tmp_path):
    """A false_alarm range ending where a true_fault range starts is accepted; the shared row counts as a fault."""
    ranges = read_feedback(str(feedback_file(tmp_path, ("p", 0, 5, "false_alarm"), ("p", 5, 9, "true_fault"))))
    label = apply(ranges, T0 + 60.0 * np.arange(10), np.array(["p"] * 10, dtype=object), np.ones(10, np.int64)).label
    assert label.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------- applying


def table(devices: dict[str, list[int]]):
    """(ts, devices, labels) of 20 one-minute rows per device, with the given data labels."""
    ts = np.concatenate([T0 + 60.0 * np.arange(len(v)) for v in devices.values()])
    names = np.concatenate([[d] * len(v) for d, v in devices.items()]).astype(object)
    labels = np.concatenate([np.asarray(v, np.int64) for v in devices.values()])
    return ts, names, labels


def test_true_fault_marks_rows_false_alarm_clears_them_unknown_changes_nothing(tmp_path):
    """true_fault rows in [start, end] become 1 on that device only, false_alarm rows 0 over the data's label, unknown nothing."""
    ts, names, labels = table({"a": [0] * 20, "b": [0] * 5 + [1] * 5 + [0] * 10})
    ranges = read_feedback(str(feedback_file(tmp_path, ("a", 3, 6, "true_fault"), ("b", 4, 8, "false_alarm"),
                                             ("b", 12, 15, "unknown"), ("c", 0, 100, "true_fault"))))
    applied = apply(ranges, ts, names, labels)
    a, b = applied.label[:20], applied.label[20:]
    assert np.flatnonzero(a).tolist() == [3, 4, 5, 6]  # both ends included
    assert np.flatnonzero(b).tolist() == [9]  # the data's fault rows 5..8 were false alarms
    assert (applied.fault_rows, applied.normal_rows, applied.overridden, applied.other_devices) == (4, 5, 4, 1)
    assert applied.ranges == {"true_fault": 1, "false_alarm": 1, "unknown": 1}
    summary = applied.summary()
    assert "4 rows kept out of training" in summary and "5 rows forced normal (4 of them labeled faults" in summary
    assert "1 unknown range(s) ignored" in summary and "1 range(s) of other devices" in summary


def test_a_range_outside_the_data_is_reported_with_the_data_span(tmp_path):
    """A range holding no row changes nothing and the summary says so, with the data's time span."""
    ts, names, labels = table({"a": [0] * 20})
    applied = apply(read_feedback(str(feedback_file(tmp_path, ("a", 500, 600, "true_fault")))), ts, names, labels)
    assert not applied.label.any() and applied.no_rows == 1
    assert f"outside the data's rows ({iso(0)}..{iso(19)})" in applied.summary()


def test_single_series_takes_the_files_only_device_or_the_named_one(tmp_path):
    """Data without a device column takes the file's only device, or --device; several devices without --device is an error listing them."""
    ts, names, labels = table({"series": [0] * 20})
    one = read_feedback(str(feedback_file(tmp_path, ("pump-07", 2, 3, "true_fault"), name="one.csv")))
    assert np.flatnonzero(apply(one, ts, names, labels, single_series=True).label).tolist() == [2, 3]
    two = read_feedback(str(feedback_file(tmp_path, ("pump-07", 2, 3, "true_fault"), ("pump-08", 5, 6, "true_fault"), name="two.csv")))
    with pytest.raises(FeedbackError, match=r"names 2 devices \['pump-07', 'pump-08'\].*--device"):
        apply(two, ts, names, labels, single_series=True)
    assert np.flatnonzero(apply(two, ts, names, labels, single_series=True, device="pump-08").label).tolist() == [5, 6]
    with pytest.raises(FeedbackError, match=r"--device 'pump-09' is not in the feedback file; it names \['pump-07', 'pump-08'\]"):
        apply(two, ts, names, labels, single_series=True, device="pump-09")


def test_no_matching_device_is_an_error_listing_both_sides(tmp_path):
    """With a device column, a file none of whose devices is in the data is refused, naming the file's and the data's devices."""
    ts, names, labels = table({"a": [0] * 20, "b": [0] * 20})
    ranges = read_feedback(str(feedback_file(tmp_path, ("pump-03", 2, 3, "true_fault"))))
    with pytest.raises(FeedbackError, match=r"\['pump-03'\].*\['a', 'b'\]"):
        apply(ranges, ts, names, labels)


def test_training_windows_skip_true_fault_ranges_and_regain_false_alarm_ranges(tmp_path):
    """After the feedback no training or validation window overlaps a true_fault range, and windows cover a false_alarm range the data had labeled."""
    from training.data import prepare

    n = 600
    rng = np.random.default_rng(0)
    ts, names, labels = table({"a": [0] * n})
    labels[200:230] = 1  # the data calls these faults; the operators said false alarm
    rows = {"ts": ts.astype(np.int64), "device": names, "x": np.sin(np.arange(n) / 9) + 0.1 * rng.standard_normal(n)}
    ranges = read_feedback(str(feedback_file(tmp_path, ("a", 100, 140, "true_fault"), ("a", 200, 229, "false_alarm"),
                                             ("a", 300, 350, "unknown"))))
    rows["label"] = apply(ranges, ts, names, labels).label
    prepared = prepare(rows, lookback=10, horizon=2, period_s=60, features=["x"])
    span = np.arange(12)
    for split in ("train", "val"):
        covered = (prepared.starts[split][:, None] + span).ravel()
        assert not np.isin(np.arange(100, 141), covered).any()
    covered = (prepared.starts["train"][:, None] + span).ravel()
    assert np.isin(np.arange(200, 230), covered).all() and np.isin(np.arange(300, 351), covered).all()


# ------------------------------------------------------------------------------------------ evaluate-alerts


def test_evaluate_alerts_scores_against_feedback_labels(tmp_path, capsys):
    """evaluate-alerts --feedback: alerts inside true_fault ranges are hits, alerts inside false_alarm ranges false positives, the data's label overridden."""
    pred, labels = tmp_path / "pred.csv", tmp_path / "labels.csv"
    alert = [0] * 30
    for k in (5, 6, 7, 20, 21):
        alert[k] = 1
    with open(pred, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "device", "anomaly_score", "alert"])
        w.writerows([[T0 + 60 * k, "pump-03", 0.1, alert[k]] for k in range(30)])
    with open(labels, "w", newline="") as f:  # the data marks 20..24 as a fault; the operators said false alarm
        w = csv.writer(f)
        w.writerow(["ts", "device", "label"])
        w.writerows([[T0 + 60 * k, "pump-03", int(20 <= k <= 24)] for k in range(30)])
    fb = feedback_file(tmp_path, ("pump-03", 4, 9, "true_fault"), ("pump-03", 20, 24, "false_alarm"), ("pump-03", 0, 2, "unknown"))
    out = tmp_path / "result.json"
    assert training_main(["evaluate-alerts", "--pred", str(pred), "--labels", str(labels), "--feedback", str(fb), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "feedback labels: 1 true_fault range(s) -> 6 rows counted as faults" in printed
    assert "5 rows forced normal (5 of them labeled faults in the data); 1 unknown range(s) ignored" in printed
    points = json.loads(out.read_text())["points"]
    assert (points["tp"], points["fp"], points["fn"]) == (3, 2, 3)
    assert training_main(["evaluate-alerts", "--pred", str(pred), "--feedback", str(fb), "--json", str(out)]) == 0  # no label column at all
    assert json.loads(out.read_text())["events"]["faults"] == 1


def test_evaluate_alerts_refuses_bad_feedback_with_exit_2(tmp_path, capsys):
    """A bad feedback file makes evaluate-alerts exit 2 with the line and column on stderr."""
    pred = tmp_path / "pred.csv"
    pred.write_text("ts,device,anomaly_score,alert\n" + "".join(f"{T0 + 60 * k},p,0.1,0\n" for k in range(5)))
    fb = tmp_path / "fb.csv"
    fb.write_text(HEADER + "p,2026-01-05T00:00:00Z,2026-01-05T00:01:00Z,maybe,a,b,c,\n")
    assert training_main(["evaluate-alerts", "--pred", str(pred), "--feedback", str(fb)]) == 2
    assert "line 2, column 'label'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ train and fit


def write_series(path: Path, n: int, shift: slice | None = None, label: slice | None = None) -> None:
    """One machine's CSV (no device column): ts, temp, humidity, label; `shift` rows get a fault-like +6 step."""
    rng = np.random.default_rng(3)
    temp = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 120) + 0.2 * rng.standard_normal(n)
    if shift is not None:
        temp[shift] += 6.0
    flags = np.zeros(n, int)
    if label is not None:
        flags[label] = 1
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "temp", "humidity", "label"])
        w.writerows([[T0 + 60 * k, f"{temp[k]:.4f}", f"{50 + rng.standard_normal():.3f}", flags[k]] for k in range(n)])


def test_train_applies_feedback_before_training_and_refuses_a_bad_file(tmp_path, monkeypatch, capsys):
    """train --feedback changes the labels handed to training; a bad file exits 2 before anything is trained or written."""
    from training import cli

    data = tmp_path / "plant.csv"
    write_series(data, 200, label=slice(50, 60))
    handed = {}
    monkeypatch.setattr(cli, "build_bundle", lambda rows, *a, **k: handed.update(rows=rows))
    fb = feedback_file(tmp_path, ("pump-07", 10, 20, "true_fault"), ("pump-07", 50, 59, "false_alarm"))
    assert training_main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--feedback", str(fb)]) == 0
    assert np.flatnonzero(handed["rows"]["label"]).tolist() == list(range(10, 21))
    assert "11 rows kept out of training" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "pump-07,2026-01-05T01:00:00Z,2026-01-05T00:00:00Z,true_fault,a,b,c,\n")
    handed.clear()
    assert training_main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--feedback", str(bad)]) == 2
    assert "line 2, column 'end'" in capsys.readouterr().err and not handed


def test_fit_with_feedback_trains_on_windows_that_exclude_the_true_fault_range(tmp_path, capsys):
    """fit --feedback: the bundle's training windows are exactly those that avoid the true_fault range and include the false_alarm range."""
    pytest.importorskip("torch")
    from training.data import Split, prepare
    from training.fit import add_arguments, load_rows
    import argparse

    data = tmp_path / "plant.csv"
    write_series(data, 900, shift=slice(200, 240), label=slice(400, 420))  # a real fault the data missed, a false label
    fb = feedback_file(tmp_path, ("pump-07", 200, 239, "true_fault", "seized bearing"), ("pump-07", 400, 419, "false_alarm"))
    argv = ["--data", str(data), "--out", str(tmp_path / "bundle"), "--features", "temp,humidity", "--targets", "temp",
            "--lookback", "12", "--horizon", "3", "--feedback", str(fb)]
    code = training_main(["fit", *argv, "--epochs", "1", "--hidden-size", "8", "--num-layers", "1", "--min-steps", "10"])
    assert code == 0, capsys.readouterr().err
    assert "feedback labels: 1 true_fault range(s) -> 40 rows kept out of training" in capsys.readouterr().out

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rows, features, targets, period = load_rows(parser.parse_args(argv))
    prepared = prepare(rows, 12, 3, period, features=features, targets=targets, split=Split())
    covered = (prepared.starts["train"][:, None] + np.arange(15)).ravel()  # rows of every training window
    assert not np.isin(np.arange(200, 240), covered).any() and np.isin(np.arange(400, 420), covered).all()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["training"]["train_windows"] == len(prepared.starts["train"])
    without = dict(rows, label=np.zeros_like(rows["label"]))
    assert len(prepare(without, 12, 3, period, features=features, targets=targets, split=Split()).starts["train"]) > \
        manifest["training"]["train_windows"]
