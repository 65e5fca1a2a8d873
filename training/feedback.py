"""Operators' feedback on alerts as training labels (docs/contracts.md, "Feedback labels (CSV)").

The file `edgecast-agent export-feedback` writes holds one time range per alert: device, start, end (ISO-8601)
and a label. Applied to a table of rows (timestamps, devices, 0/1 labels):
- `true_fault`: the device's rows in [start, end] become faults: kept out of training windows, faults when scored;
- `false_alarm`: they become normal, whatever the data's own label column says (the feedback wins);
- `unknown`: nothing changes; such ranges are counted.
Where a true_fault and a false_alarm range of one device only share an end point, the shared instant is a fault.
`fit`, `train` and `evaluate-alerts` take the file as `--feedback FILE` (`--device NAME` for data without a
device column); every error names the file, the line and the column, and comes before any training.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

COLUMNS = ("device", "start", "end", "label", "alert_id", "by", "at", "comment")  # the contract's order
REQUIRED = ("device", "start", "end", "label")  # the others are informational
LABELS = ("true_fault", "false_alarm", "unknown")


class FeedbackError(ValueError):
    """An unusable feedback file or one that does not fit the data; the message names the line and column."""


@dataclass(frozen=True)
class FeedbackRange:
    line: int  # line of the file where the row starts (the header is line 1)
    device: str
    start: float  # unix seconds, inclusive
    end: float  # unix seconds, inclusive
    label: str  # one of LABELS
    alert_id: str = ""


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(text: str, where: str) -> float:
    from agent.transport.ingest import parse_timestamp

    try:
        return parse_timestamp(text.strip())  # a string: ISO-8601 only (Z or an offset; naive means UTC)
    except ValueError as exc:
        raise FeedbackError(f"{where}: {exc}") from None


def read_feedback(path: str) -> list[FeedbackRange]:
    """Every row of the file, checked: the required columns, a device, a known label, readable times, end >= start,
    and no true_fault range overlapping a false_alarm range of the same device."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FeedbackError(f"feedback file {path}: {exc.strerror or exc}") from None
    ranges = []
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise FeedbackError(f"feedback file {path} is empty (expected the header {','.join(COLUMNS)})") from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise FeedbackError(f"feedback file {path}: missing column(s) {missing}; it has {header} "
                                f"(a feedback file has {','.join(COLUMNS)})")
        position = {name: k for k, name in enumerate(header)}
        line = 2
        for row in reader:
            first, line = line, reader.line_num + 1  # a quoted comment may span lines
            if not any(cell.strip() for cell in row):
                continue
            cell = lambda name: row[position[name]].strip() if position.get(name, len(row)) < len(row) else ""  # noqa: E731
            where = lambda column: f"feedback file {path}, line {first}, column {column!r}"  # noqa: E731
            if not cell("device"):
                raise FeedbackError(f"{where('device')}: empty")
            label = cell("label")
            if label not in LABELS:
                raise FeedbackError(f"{where('label')}: unknown label {label!r} (expected one of {', '.join(LABELS)})")
            start, end = _time(cell("start"), where("start")), _time(cell("end"), where("end"))
            if end < start:
                raise FeedbackError(f"{where('end')}: end {cell('end')} is before start {cell('start')}")
            ranges.append(FeedbackRange(first, cell("device"), start, end, label, cell("alert_id")))
    _check_contradictions(ranges, path)
    return ranges


def _check_contradictions(ranges: list[FeedbackRange], path: str) -> None:
    """A true_fault and a false_alarm range of one device may not overlap (sharing only an end point is fine)."""
    last: dict[tuple[str, str], FeedbackRange] = {}  # (device, label) -> the range seen so far reaching furthest
    for r in sorted((r for r in ranges if r.label != "unknown"), key=lambda r: (r.device, r.start)):
        other = last.get((r.device, "false_alarm" if r.label == "true_fault" else "true_fault"))
        if other is not None and r.start < other.end:  # `other` started no later than r
            raise FeedbackError(
                f"feedback file {path}, lines {other.line} and {r.line}: contradictory labels for {r.device}: "
                f"{other.label} {_iso(other.start)}..{_iso(other.end)} overlaps {r.label} {_iso(r.start)}..{_iso(r.end)}")
        mine = last.get((r.device, r.label))
        if mine is None or r.end > mine.end:
            last[(r.device, r.label)] = r


def assign(ranges: list[FeedbackRange], devices: set[str], single_series: bool,
           device: str | None = None) -> list[tuple[FeedbackRange, str]]:
    """(range, the data's device it applies to). With a device column the names must match (`device` keeps only
    that device's ranges); data without one (`single_series`, its one placeholder name in `devices`) takes the
    ranges of `device` or, when the file names exactly one device, that one's."""
    named = sorted({r.device for r in ranges})
    if device is not None and device not in named:
        raise FeedbackError(f"--device {device!r} is not in the feedback file; it names {named}")
    if single_series:
        if device is None and len(named) > 1:
            raise FeedbackError(f"the data has no device column (one series) but the feedback file names {len(named)} "
                                f"devices {named}: say which one this data is with --device NAME")
        (series,) = devices
        chosen = device if device is not None else (named[0] if named else None)
        return [(r, series) for r in ranges if r.device == chosen]
    pairs = [(r, r.device) for r in ranges if r.device in devices and (device is None or r.device == device)]
    if ranges and not pairs:
        shown = sorted(devices)
        more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise FeedbackError(f"no device of the feedback file {named} is in the data, whose device column holds "
                            f"{shown[:20]}{more} (check --device-column and the file)")
    return pairs


@dataclass
class Applied:
    """The labels after the feedback and what the feedback did."""

    label: np.ndarray  # (N,) the input labels with fault rows set to 1 and normal rows to 0
    fault_rows: int = 0  # rows inside a true_fault range
    normal_rows: int = 0  # rows inside a false_alarm range (and no true_fault range)
    overridden: int = 0  # of those, rows the data labeled as faults
    ranges: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LABELS, 0))  # applied ranges per label
    other_devices: int = 0  # ranges of devices not in the data (or not --device)
    no_rows: int = 0  # true_fault / false_alarm ranges that held no row of the data
    span: tuple[float, float] | None = None  # the data's first and last timestamp

    def summary(self, fault_effect: str = "kept out of training") -> str:
        text = (f"feedback labels: {self.ranges['true_fault']} true_fault range(s) -> {self.fault_rows} rows {fault_effect}; "
                f"{self.ranges['false_alarm']} false_alarm range(s) -> {self.normal_rows} rows forced normal "
                f"({self.overridden} of them labeled faults in the data); {self.ranges['unknown']} unknown range(s) ignored")
        if self.other_devices:
            text += f"; {self.other_devices} range(s) of other devices ignored"
        if self.no_rows:
            span = f" ({_iso(self.span[0])}..{_iso(self.span[1])})" if self.span else ""
            text += f"; {self.no_rows} range(s) outside the data's rows{span}"
        return text


def apply(ranges: list[FeedbackRange], ts: np.ndarray, devices: np.ndarray, label: np.ndarray,
          single_series: bool = False, device: str | None = None) -> Applied:
    """The rows' labels after the feedback; `ts` in unix seconds, `devices` the rows' device names."""
    ts = np.asarray(ts, dtype=np.float64)
    devices = np.asarray(devices, dtype=object)
    label = np.asarray(label)
    pairs = assign(ranges, set(devices.tolist()), single_series, device)
    fault, normal = np.zeros(ts.size, dtype=bool), np.zeros(ts.size, dtype=bool)
    result = Applied(label, other_devices=len(ranges) - len(pairs),
                     span=(float(ts.min()), float(ts.max())) if ts.size else None)
    rows_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # device -> (its rows in time order, their times)
    for r, name in pairs:
        result.ranges[r.label] += 1
        if r.label == "unknown":
            continue
        if name not in rows_of:
            rows = np.flatnonzero(devices == name)
            rows = rows[np.argsort(ts[rows], kind="stable")]
            rows_of[name] = (rows, ts[rows])
        rows, times = rows_of[name]
        inside = rows[np.searchsorted(times, r.start, "left"):np.searchsorted(times, r.end, "right")]
        result.no_rows += int(inside.size == 0)
        (fault if r.label == "true_fault" else normal)[inside] = True
    normal &= ~fault  # a shared end point is a fault
    labeled = np.nan_to_num(label.astype(np.float64)) > 0
    out = label.copy()
    out[normal] = 0
    out[fault] = 1
    result.label = out
    result.fault_rows, result.normal_rows = int(fault.sum()), int(normal.sum())
    result.overridden = int((normal & labeled).sum())
    return result


def add_arguments(parser: argparse.ArgumentParser, fault_effect: str = "kept out of training windows") -> None:
    parser.add_argument("--feedback", metavar="FILE",
                        help="operators' feedback CSV (edgecast-agent export-feedback; docs/contracts.md, \"Feedback labels "
                             f"(CSV)\"): true_fault ranges are faults ({fault_effect}), false_alarm ranges normal, "
                             "unknown ignored")
    parser.add_argument("--device", metavar="NAME",
                        help="with --feedback: use only this device's feedback; for data without a device column, the "
                             "feedback file's device this data is (default: the file's only device)")


def from_args(args: argparse.Namespace, ts: np.ndarray, devices: np.ndarray, label: np.ndarray, single_series: bool,
              fault_effect: str = "kept out of training") -> np.ndarray:
    """`label` after `--feedback` (unchanged without it); prints the one-line summary."""
    if not getattr(args, "feedback", None):
        return label
    applied = apply(read_feedback(args.feedback), ts, devices, label, single_series, getattr(args, "device", None))
    print(applied.summary(fault_effect))
    return applied.label
