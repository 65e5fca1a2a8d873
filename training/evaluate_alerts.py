"""`python -m training evaluate-alerts`: how well replayed alerts match labeled faults.

Inputs: the replay output (ts, device, alert 0/1, anomaly_score) and labels (ts, device, label 0/1, optionally
the fault kind), joined on (device, ts) as written; or one file holding both. Figures:
- point-wise (one point = one row): precision, recall, F1, false-alarm rate FP / (FP + TN), missed-alarm rate
  FN / (TP + FN);
- events: a fault event is a run of consecutive labeled rows of one device; it is detected when an alert is
  open on one of its rows; delay = first such row - the event's first row. Alert events are runs of rows with
  an open alert; one that overlaps no fault is a false alarm, except one that starts within `grace` after a
  fault ended on the same device: the return to normal surprises a forecaster as much as the fault's onset,
  so it is reported apart as a recovery alert (and its rows still count as false positives point-wise);
- healthy devices (no labeled row): alert events and device-days;
- point-wise per fault kind: TP and FN are the rows labeled with that kind; FP are the unlabeled rows of the
  alert events charged to it (an alert event that overlaps a fault, or a recovery alert, is charged to that
  fault's kind; a false alarm to none, reported apart), so the per-kind FP add up to all FP.
A second point-wise line leaves out the `recovery` minutes after each fault's end (the forecaster's window
still holds the fault there); the first line, on every row, is the headline figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass

import numpy as np

from agent.transport.ingest import parse_timestamp


class EvaluationError(Exception):
    """Unusable inputs (missing column, nothing to join); the message says what."""


def read_header(path: str, delimiter: str = ",") -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return [h.strip() for h in next(csv.reader(f, delimiter=delimiter))]
        except StopIteration:
            raise EvaluationError(f"{path} is empty") from None


def find_ts(path: str, given: str | None) -> str:
    """The file's timestamp column: `given`, or found by name (agent.tools.replay.find_ts_column); EvaluationError if none."""
    from agent.tools.replay import TimestampColumnError, find_ts_column

    try:
        return find_ts_column(read_header(path), given, path)
    except TimestampColumnError as exc:
        raise EvaluationError(str(exc)) from None


def read_columns(path: str, wanted: list[str], optional: list[str] = (), delimiter: str = ",") -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise EvaluationError(f"{path} is empty") from None
        missing = [c for c in wanted if c not in header]
        if missing:
            raise EvaluationError(f"{path} lacks column(s) {missing}; it has {header}")
        names = [c for c in list(wanted) + list(optional) if c in header]
        index = [header.index(c) for c in names]
        columns: dict[str, list[str]] = {c: [] for c in names}
        lists = [columns[c] for c in names]
        for row in reader:
            if not row:
                continue
            for column, k in zip(lists, index):
                column.append(row[k])
    return columns


def _seconds(texts: list[str]) -> np.ndarray:
    try:
        return np.asarray(texts, dtype=np.float64)
    except ValueError:
        return np.array([parse_timestamp(t) for t in texts], dtype=np.float64)


@dataclass
class Joined:
    device: np.ndarray  # (N,) object
    ts: np.ndarray  # (N,) seconds
    alert: np.ndarray  # (N,) bool
    label: np.ndarray  # (N,) bool
    kind: np.ndarray  # (N,) object ("" when healthy)


def join(pred_path: str, labels_path: str | None, label_column: str = "label", kind_column: str = "fault",
         ts_column: str | None = None, device_column: str = "device", labels_optional: bool = False) -> Joined:
    """Join the predictions and the labels on (device, timestamp text). Each file's timestamp column is found on
    its own: `ts_column` (--ts-column) names the labels file's, and the predictions' when they have it; otherwise
    the first column named ts, timestamp, time, datetime or date (replay writes `ts`, the data file may say `time`)."""
    pred_header = read_header(pred_path)
    pred_ts = find_ts(pred_path, ts_column if labels_path is None or ts_column in pred_header else None)
    pred_device = device_column if device_column in pred_header else "device"  # replay writes `device`, whatever the input's
    pred = read_columns(pred_path, [pred_ts, "alert"], [pred_device, label_column, kind_column])
    if labels_path is None:
        if label_column not in pred and labels_optional:  # --feedback alone labels the rows
            pred[label_column] = ["0"] * len(pred[pred_ts])
        if label_column not in pred:
            raise EvaluationError(f"{pred_path} has no {label_column!r} column; give --labels FILE (or --feedback FILE)")
        labels, lab_ts = pred, pred_ts
    else:
        lab_ts = find_ts(labels_path, ts_column)
        labels = read_columns(labels_path, [lab_ts, label_column], [device_column, kind_column])
    n_pred, n_lab = len(pred[pred_ts]), len(labels[lab_ts])
    pred_dev = pred.get(pred_device, ["device"] * n_pred)
    lab_dev = labels.get(device_column, ["device"] * n_lab)
    position = {key: k for k, key in enumerate(zip(lab_dev, labels[lab_ts]))}
    rows = [position.get(key, -1) for key in zip(pred_dev, pred[pred_ts])]
    rows = np.array(rows, dtype=np.int64)
    if not (rows >= 0).any():
        first = lambda devices, stamps: (devices[0], stamps[0]) if stamps else None  # noqa: E731
        raise EvaluationError(
            f"no row of the predictions matches a labeled row on (device, timestamp as written): the predictions' first "
            f"(device, {pred_ts}) is {first(pred_dev, pred[pred_ts])}, the labels' (device, {lab_ts}) {first(lab_dev, labels[lab_ts])}; "
            f"give --labels the file that was replayed (replay copies its timestamps as written) and the same --device-column")
    keep = rows >= 0
    kinds = labels.get(kind_column, [""] * n_lab)
    label = np.array([labels[label_column][r] for r in rows[keep]], dtype=np.float64) > 0
    kind = np.array([kinds[r] or ("fault" if l else "") for r, l in zip(rows[keep], label)], dtype=object)
    alert = np.asarray(pred["alert"], dtype=np.float64)[keep] > 0
    ts = _seconds([t for t, k in zip(pred[pred_ts], keep) if k])
    device = np.array([d for d, k in zip(pred_dev, keep) if k], dtype=object)
    return Joined(device, ts, alert, label, kind)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) index ranges of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def point_metrics(alert: np.ndarray, label: np.ndarray) -> dict:
    tp = int((alert & label).sum())
    fp = int((alert & ~label).sum())
    fn = int((~alert & label).sum())
    tn = int((~alert & ~label).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"rows": int(label.size), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "f1": f1, "false_alarm_rate": _ratio(fp, fp + tn), "missed_alarm_rate": _ratio(fn, tp + fn)}


def recovery_rows(data: Joined, window_s: float) -> np.ndarray:
    """Rows of a device within `window_s` after one of its fault events ended (unlabeled rows only)."""
    out = np.zeros(data.label.size, dtype=bool)
    if window_s <= 0:
        return out
    for device in set(data.device.tolist()):
        rows = np.flatnonzero(data.device == device)
        rows = rows[np.argsort(data.ts[rows], kind="stable")]
        ts, label = data.ts[rows], data.label[rows]
        for _, end in _runs(label):
            after = (ts > ts[end - 1]) & (ts <= ts[end - 1] + window_s) & ~label
            out[rows[after]] = True
    return out


def evaluate(data: Joined, grace_s: float = 1800.0, recovery_s: float = 3600.0) -> dict:
    points = point_metrics(data.alert, data.label)
    excluded = recovery_rows(data, recovery_s)
    points_ex = point_metrics(data.alert[~excluded], data.label[~excluded])
    points_ex["excluded_rows"] = int(excluded.sum())
    events: list[dict] = []
    alerts = {"total": 0, "during_fault": 0, "recovery": 0, "false": 0}
    healthy = {"devices": 0, "alerts": 0, "device_days": 0.0}
    recovery_fp_points = 0
    fp_by_kind: dict[str, int] = {}  # unlabeled alert rows charged to a fault kind ("": false alarms)
    for device in sorted(set(data.device.tolist())):
        rows = np.flatnonzero(data.device == device)
        rows = rows[np.argsort(data.ts[rows], kind="stable")]
        ts, alert, label, kind = data.ts[rows], data.alert[rows], data.label[rows], data.kind[rows]
        faults = _runs(label)
        for begin, end in faults:
            hit = np.flatnonzero(alert[begin:end])
            events.append({"device": device, "kind": str(kind[begin]), "start_ts": float(ts[begin]), "end_ts": float(ts[end - 1]),
                           "detected": bool(hit.size), "delay_min": float((ts[begin + hit[0]] - ts[begin]) / 60.0) if hit.size else None})
        for begin, end in _runs(alert):
            alerts["total"] += 1
            labeled = np.flatnonzero(label[begin:end])
            ended_before = [f_end for _, f_end in faults if 0 < ts[begin] - ts[f_end - 1] <= grace_s]
            if labeled.size:
                alerts["during_fault"] += 1
                charged = str(kind[begin + labeled[0]])
            elif ended_before:
                alerts["recovery"] += 1
                recovery_fp_points += end - begin
                charged = str(kind[ended_before[-1] - 1])
            else:
                alerts["false"] += 1
                charged = ""
            fp_by_kind[charged] = fp_by_kind.get(charged, 0) + int((~label[begin:end]).sum())
        if not faults:
            healthy["devices"] += 1
            healthy["alerts"] += len(_runs(alert))
            healthy["device_days"] += float(ts[-1] - ts[0]) / 86400.0 if ts.size > 1 else 0.0
    per_kind: dict[str, dict] = {}
    for kind in sorted({e["kind"] for e in events}):
        mine = [e for e in events if e["kind"] == kind]
        delays = [e["delay_min"] for e in mine if e["detected"]]
        per_kind[kind] = {"events": len(mine), "detected": len(delays), "recall": len(delays) / len(mine),
                          "delay_min_median": float(np.median(delays)) if delays else None,
                          "delay_min_mean": float(np.mean(delays)) if delays else None,
                          "delay_min_max": float(np.max(delays)) if delays else None}
    points_per_kind: dict[str, dict] = {}
    for kind in sorted(per_kind):
        rows = data.kind == kind
        tp, fn, fp = int((data.alert & rows).sum()), int((~data.alert & rows).sum()), fp_by_kind.get(kind, 0)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        points_per_kind[kind] = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}
    detected = sum(1 for e in events if e["detected"])
    healthy["device_days"] = round(healthy["device_days"], 2)
    points["fp_in_recovery_alerts"] = recovery_fp_points
    return {
        "points": points,
        "points_excluding_recovery": points_ex,
        "points_per_kind": points_per_kind,
        "false_alarm_points": fp_by_kind.get("", 0),
        "recovery_s": recovery_s,
        "events": {"faults": len(events), "detected": detected, "recall": _ratio(detected, len(events)), "per_kind": per_kind},
        "alerts": alerts,
        "healthy_devices": healthy,
        "fault_events": events,
        "grace_s": grace_s,
    }


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(result: dict) -> str:
    p, e, a, h = result["points"], result["events"], result["alerts"], result["healthy_devices"]
    lines = [
        f"point-wise ({p['rows']} rows): precision {_f(p['precision'])}  recall {_f(p['recall'])}  F1 {_f(p['f1'])}  "
        f"false-alarm rate {_f(p['false_alarm_rate'], 5)}  missed-alarm rate {_f(p['missed_alarm_rate'])}",
        f"point-wise without the {result['recovery_s'] / 60:.0f} min after each fault's end ({result['points_excluding_recovery']['excluded_rows']} rows "
        f"left out): precision {_f(result['points_excluding_recovery']['precision'])}  recall {_f(result['points_excluding_recovery']['recall'])}  "
        f"F1 {_f(result['points_excluding_recovery']['f1'])}",
        f"event-level recall {_f(e['recall'])} ({e['detected']}/{e['faults']} fault events)",
        "",
        "| fault kind | events | detected | recall | delay median (min) | delay mean | delay max | point precision | point recall | point F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_kind_points = result.get("points_per_kind", {})
    for kind, k in e["per_kind"].items():
        pk = per_kind_points.get(kind, {})
        lines.append(f"| {kind} | {k['events']} | {k['detected']} | {_f(k['recall'], 2)} | {_f(k['delay_min_median'], 1)} | "
                     f"{_f(k['delay_min_mean'], 1)} | {_f(k['delay_min_max'], 1)} | {_f(pk.get('precision'))} | {_f(pk.get('recall'))} | "
                     f"{_f(pk.get('f1'))} |")
    lines += [
        "",
        "point precision per kind charges each alert event's unlabeled rows to the fault it overlaps or just followed; "
        f"{result.get('false_alarm_points', 0)} false-positive rows belong to false alarms (no fault).",
        "",
        f"alert events: {a['total']} ({a['during_fault']} during a fault, {a['recovery']} recovery alerts within "
        f"{result['grace_s'] / 60:.0f} min after a fault ended, {a['false']} false alarms)",
        f"healthy devices: {h['devices']}, {h['alerts']} alert(s) in {h['device_days']:.1f} device-days",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="replay output CSV (ts, device, anomaly_score, alert, ...)")
    parser.add_argument("--labels", help="CSV with ts, device and the label column (default: the label column of --pred)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--kind-column", default="fault", help="fault kind column (optional)")
    parser.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                        help="timestamp column of --labels (and of --pred when it has one of that name); default: each "
                             "file's first column named ts, timestamp, time, datetime or date, any case")
    parser.add_argument("--device-column", default="device")
    parser.add_argument("--grace-min", type=float, default=30.0, help="an alert starting this soon after a fault ended is a recovery alert")
    parser.add_argument("--recovery-min", type=float, default=60.0,
                        help="the second point-wise line leaves out this many minutes after each fault's end (the forecaster's "
                             "window still holds the fault); the first line counts every row")
    parser.add_argument("--json", help="also write the full result (per-event delays included) to this file")
    from training import feedback

    feedback.add_arguments(parser, fault_effect="scored as faults; over the label column where both are given")


def with_feedback(data: Joined, args: argparse.Namespace) -> Joined:
    """`data` labeled by --feedback (training.feedback): true_fault rows are faults (kind "fault" unless the labels
    named one), false_alarm rows normal; unchanged without it. Replay names a file without a device column's rows
    "device": such data is one series."""
    from agent.tools.replay import DEFAULT_DEVICE
    from training.feedback import from_args

    if not getattr(args, "feedback", None):
        return data
    label = from_args(args, data.ts, data.device, data.label, set(data.device.tolist()) == {DEFAULT_DEVICE},
                      fault_effect="counted as faults")
    kind = np.where(label, np.where(data.kind == "", "fault", data.kind), "").astype(object)
    return Joined(data.device, data.ts, data.alert, label, kind)


def run(args: argparse.Namespace) -> int:
    try:
        data = join(args.pred, args.labels, args.label_column, args.kind_column, args.ts_column, args.device_column,
                    labels_optional=bool(getattr(args, "feedback", None)))
        data = with_feedback(data, args)
    except (OSError, ValueError, EvaluationError) as exc:
        print(f"evaluate-alerts: {exc}", file=sys.stderr)
        return 2
    result = evaluate(data, args.grace_min * 60.0, args.recovery_min * 60.0)
    print(format_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
