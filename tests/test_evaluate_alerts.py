"""evaluate-alerts: point-wise and event-level metrics on small hand-made cases."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from training.evaluate_alerts import Joined, evaluate, join, run

T0 = 1_767_571_200


def make(alert: list[int], label: list[int], kinds: list[str] | None = None, device: str = "p") -> Joined:
    n = len(alert)
    kinds = kinds or ["fault" if l else "" for l in label]
    return Joined(np.array([device] * n, dtype=object), T0 + 60.0 * np.arange(n), np.array(alert, bool), np.array(label, bool),
                  np.array(kinds, dtype=object))


def test_point_wise_counts_rates_and_f1():
    """precision, recall, F1, false-alarm and missed-alarm rates follow from TP/FP/FN/TN over rows."""
    #        rows: 0  1  2  3  4  5  6  7  8  9
    result = evaluate(make([0, 0, 1, 1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]), recovery_s=0)
    p = result["points"]
    assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (2, 2, 2, 4)
    assert p["precision"] == pytest.approx(0.5) and p["recall"] == pytest.approx(0.5) and p["f1"] == pytest.approx(0.5)
    assert p["false_alarm_rate"] == pytest.approx(2 / 6) and p["missed_alarm_rate"] == pytest.approx(0.5)


def test_event_recall_and_delay_per_fault_kind():
    """A fault event is detected when an alert is open on one of its rows; delay = first such row - onset."""
    alert = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    label = [0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    kinds = ["", "overheating"] + ["overheating"] * 4 + ["", "", "", "spikes", "spikes", "", ""]
    result = evaluate(make(alert, label, kinds), recovery_s=0)
    per_kind = result["events"]["per_kind"]
    assert per_kind["overheating"] == {"events": 1, "detected": 1, "recall": 1.0, "delay_min_median": 3.0,
                                       "delay_min_mean": 3.0, "delay_min_max": 3.0}
    assert per_kind["spikes"]["recall"] == 0.0 and per_kind["spikes"]["delay_min_median"] is None
    assert result["events"]["recall"] == pytest.approx(0.5)


def test_alert_after_a_fault_ends_is_a_recovery_alert_not_a_false_alarm():
    """An alert starting within the grace after a fault's end is counted apart; a later one is a false alarm."""
    alert = [0, 1, 1, 0, 0, 1, 0] + [0] * 60 + [1, 0]
    label = [0, 1, 1, 1, 0, 0, 0] + [0] * 60 + [0, 0]
    result = evaluate(make(alert, label), grace_s=600, recovery_s=0)
    assert result["alerts"] == {"total": 3, "during_fault": 1, "recovery": 1, "false": 1}
    assert result["points"]["fp"] == 2  # recovery rows still count as false positives point-wise


def test_recovery_window_is_left_out_only_of_the_second_point_wise_figure():
    """recovery_s removes the rows just after a fault's end from points_excluding_recovery, not from points."""
    result = evaluate(make([1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]), recovery_s=120)
    assert result["points"]["fp"] == 2
    assert result["points_excluding_recovery"]["fp"] == 0 and result["points_excluding_recovery"]["excluded_rows"] == 2


def test_healthy_devices_alerts_and_days():
    """Devices without labeled rows report their alert events and covered days."""
    healthy = make([0] * 1441, [0] * 1441, device="h")
    result = evaluate(healthy)
    assert result["healthy_devices"] == {"devices": 1, "alerts": 0, "device_days": 1.0}


def test_cli_joins_predictions_and_labels_on_device_and_ts(tmp_path: Path, capsys):
    """The command joins the replay output and the labels file on (device, ts) and prints the table."""
    pred, labels = tmp_path / "pred.csv", tmp_path / "labels.csv"
    with open(pred, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "device", "anomaly_score", "alert"])
        w.writerows([[T0 + 60 * k, "a", 0.1, int(k in (3, 4))] for k in range(8)])
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "device", "label", "fault"])
        w.writerows([[T0 + 60 * k, "a", int(2 <= k <= 4), "spikes" if 2 <= k <= 4 else ""] for k in range(8)])
    data = join(str(pred), str(labels))
    assert data.label.sum() == 3 and data.alert.sum() == 2
    assert run(type("Args", (), {"pred": str(pred), "labels": str(labels), "label_column": "label", "kind_column": "fault",
                                 "ts_column": "ts", "device_column": "device", "grace_min": 30.0, "recovery_min": 60.0,
                                 "json": None})()) == 0
    out = capsys.readouterr().out
    assert "| spikes | 1 | 1 | 1.00 | 1.0 |" in out


def test_point_wise_per_kind_charges_alert_rows_to_the_fault_they_overlap_or_follow():
    """Per kind: TP/FN over its labeled rows; FP = unlabeled rows of alerts overlapping or just after it; false alarms apart."""
    #         0  1  2  3  4  5  6  7  8  9 10 11 ... then a false alarm of 2 rows
    alert = [0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0] + [0] * 60 + [1, 1, 0]
    label = [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0] + [0] * 60 + [0, 0, 0]
    kinds = ["", "", "overheating", "overheating", "", "", "spikes", "spikes", "spikes", "", "", ""] + [""] * 63
    result = evaluate(make(alert, label, kinds), grace_s=600, recovery_s=0)
    per_kind = result["points_per_kind"]
    assert {k: (v["tp"], v["fp"], v["fn"]) for k, v in per_kind.items()} == {"overheating": (2, 2, 0), "spikes": (1, 2, 2)}
    assert per_kind["spikes"]["precision"] == pytest.approx(1 / 3) and per_kind["spikes"]["recall"] == pytest.approx(1 / 3)
    assert result["false_alarm_points"] == 2
    assert sum(v["fp"] for v in per_kind.values()) + result["false_alarm_points"] == result["points"]["fp"]
