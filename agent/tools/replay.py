"""Replay a historical CSV through the daemon's Pipeline (no broker) and write one scored row per input row.

Output columns: ts, device, anomaly_score (0..1, 0 before the first score), alert (1 while an alert is open),
expected_<target> (the one-step forecast of this row, empty before one exists), forecast_<target>_<k> for
k = 1..H (made from the window ending at this row; empty when none was made); for bundles with prediction
intervals, forecast_<target>_<k>_lower_<level> and _upper_<level> (e.g. level 80, 95) after them.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from agent.config.settings import Settings
from agent.core.events import Sample
from agent.transport.ingest import parse_timestamp, plausible_limits
from agent.core.model import Bundle, load_bundle
from agent.core.pipeline import Pipeline

DEFAULT_DEVICE = "device"
REPLAY_MAX_BATCH = 512  # windows per model call when the configuration does not set inference.max_batch


class ReplayError(Exception):
    """The data file cannot be replayed (missing column, unparseable cell); the message says where."""


class TimestampColumnError(ReplayError, ValueError):
    """No usable timestamp column: the message lists the columns and says to pass --ts-column NAME.
    A ValueError too, so the training commands (which report ValueErrors) show it as it is."""


# Timestamp column names recognised without --ts-column, in order of preference (matched case-insensitively);
# every command that reads a data file (replay, fit, train, data-report, cv, search, evaluate-alerts) uses this.
TS_COLUMN_NAMES = ("ts", "timestamp", "time", "datetime", "date")


def find_ts_column(header: list[str], given: str | None = None, source: str | None = None) -> str:
    """The timestamp column of a file with this header: `given` (--ts-column) when set, else the first of
    TS_COLUMN_NAMES present (any case). Raises TimestampColumnError naming the columns that exist; `source`
    (the file) starts the message."""
    where = f"{source}: " if source else ""
    columns = [str(h) for h in header]
    if given:
        if given in columns:
            return given
        try:
            found = find_ts_column(columns)
            hint = f"; without --ts-column the timestamp column {found!r} is used"
        except TimestampColumnError:
            hint = ""
        raise TimestampColumnError(f"{where}no timestamp column {given!r} (--ts-column); the columns are {columns}{hint}")
    lowered = [c.strip().lstrip("\ufeff").lower() for c in columns]
    for name in TS_COLUMN_NAMES:
        if name in lowered:
            return columns[lowered.index(name)]
    raise TimestampColumnError(
        f"{where}no timestamp column: none of the columns {columns} is named {', '.join(TS_COLUMN_NAMES)} (any case); "
        f"name it with --ts-column NAME")


@dataclass
class ReplayResult:
    rows: int
    devices: int
    seconds: float
    alerts_opened: int
    inferences: int
    implausible_values: int = 0  # cells outside the plausible range, dropped as the daemon rejects them

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Table:
    ts_text: list[str]
    ts: np.ndarray  # (N,) unix seconds
    devices: list[str]  # (N,) device name per row
    values: np.ndarray  # (N, F) float64, NaN where a cell is empty
    labels: np.ndarray | None = None  # (N,) float64 of the optional label column (for plots and `fit`)


def _numbers(column: list[str], name: str, first_line: int) -> np.ndarray:
    """Column of numeric text -> float64; empty cells -> NaN; anything else is an error naming the line."""
    try:
        return np.asarray(column, dtype=np.float64)
    except ValueError:
        pass
    out = np.empty(len(column), dtype=np.float64)
    for k, text in enumerate(column):
        text = text.strip()
        if not text:
            out[k] = math.nan
            continue
        try:
            out[k] = float(text)
        except ValueError:
            raise ReplayError(f"line {first_line + k}: column {name!r}: {text[:40]!r} is not a number") from None
    return out


TS_FORMATS = ("auto", "unix", "unix_ms", "iso")


def parse_ts_column(texts: list[str], ts_format: str = "auto") -> np.ndarray:
    """Timestamp cells -> unix seconds (float64). Formats: auto (numbers are unix seconds, other cells
    ISO-8601), unix, unix_ms, iso, or a strptime format with '%' (naive times are UTC). Raises ValueError
    whose message starts with the index of the first bad cell as `#k:`."""
    if ts_format in ("auto", "unix", "unix_ms"):
        try:
            ts = np.asarray(texts, dtype=np.float64)
            return ts / 1000.0 if ts_format == "unix_ms" else ts
        except ValueError:
            if ts_format != "auto":
                for k, text in enumerate(texts):
                    if not _is_number(text):
                        raise ValueError(f"#{k}: {text[:40]!r} is not a number ({ts_format})") from None
    out = np.empty(len(texts), dtype=np.float64)
    strptime = "%" in ts_format
    if not strptime and ts_format not in TS_FORMATS:
        raise ValueError(f"#0: unknown timestamp format {ts_format!r}: auto, unix, unix_ms, iso or a strptime format")
    for k, text in enumerate(texts):
        try:
            if strptime:
                parsed = datetime.strptime(text.strip(), ts_format)
                out[k] = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
            else:
                out[k] = float(text) if ts_format == "auto" and _is_number(text) else parse_timestamp(text.strip())
        except ValueError as exc:
            raise ValueError(f"#{k}: {exc}") from None
    return out


def read_table(path: str | Path, features: list[str], ts_column: str | None = None, device_column: str = "device", delimiter: str = ",",
               ts_format: str = "auto", label_column: str | None = None) -> Table:
    """Read the CSV; `ts_column` None finds the timestamp column by name (find_ts_column)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is not part of the first name
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ReplayError(f"{path} is empty") from None
        rows = [row for row in reader if row]
    one_column = "" if len(header) > 1 else f" (one column only: is the delimiter {delimiter!r} right?)"
    try:
        ts_column = find_ts_column(header, ts_column, str(path))
    except TimestampColumnError as exc:
        raise TimestampColumnError(f"{exc}{one_column}") from None
    position = {name: k for k, name in enumerate(header)}
    missing = [c for c in features if c not in position]
    if missing:
        raise ReplayError(f"{path} lacks column(s) {missing}; it has {header}{one_column}")
    width = len(header)
    for k, row in enumerate(rows):
        if len(row) != width:
            raise ReplayError(f"line {k + 2}: {len(row)} fields, the header has {width}")
    columns = list(zip(*rows)) if rows else [()] * width

    ts_text = list(columns[position[ts_column]])
    try:
        ts = parse_ts_column(ts_text, ts_format)
    except ValueError as exc:
        index, _, message = str(exc).partition(": ")
        raise ReplayError(f"line {int(index[1:]) + 2}: column {ts_column!r}: {message}") from None
    if not np.isfinite(ts).all():
        bad = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise ReplayError(f"line {bad + 2}: column {ts_column!r}: {ts_text[bad]!r} is not a finite timestamp")
    devices = list(columns[position[device_column]]) if device_column in position else [DEFAULT_DEVICE] * len(rows)
    values = np.empty((len(rows), len(features)), dtype=np.float64)  # (N, F)
    for j, name in enumerate(features):
        values[:, j] = _numbers(list(columns[position[name]]), name, 2)
    labels = None
    if label_column and label_column in position:
        labels = _numbers(list(columns[position[label_column]]), label_column, 2)
    return Table(ts_text, ts, devices, values, labels)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _RowTrace:
    """Pipeline trace that writes the per-row outputs; `rows` maps the chunk's sample index to the input row."""

    wants_forecast_events = False  # the forecasts are read from on_forecast; replay publishes nothing

    def __init__(self, pipeline: Pipeline, n_rows: int):
        self.pipeline = pipeline
        T, H = pipeline.bundle.n_targets, pipeline.horizon
        self.anomaly = np.full(n_rows, np.nan)  # (N,)
        self.alert = np.full(n_rows, -1, dtype=np.int8)  # (N,) -1: not set by this row
        self.expected = np.full((n_rows, T), np.nan, dtype=np.float32)  # (N, T)
        self.forecast = np.full((n_rows, H, T), np.nan, dtype=np.float32)  # (N, H, T)
        self.rows: np.ndarray = np.empty(0, dtype=np.int64)
        self.detector = pipeline.detector
        intervals = getattr(pipeline.bundle, "intervals", None)
        # Normalized prediction intervals: each forecast's window scale (H, T), as the daemon's payload uses it.
        self.interval_scale = (np.full((n_rows, H, T), np.nan, dtype=np.float32)  # (N, H, T)
                               if intervals is not None and intervals.normalized else None)
        # Adaptive prediction intervals: each forecast's multiplier (K, H, T), as its payload had it.
        self.interval_multiplier = (np.ones((len(intervals.levels), n_rows, H, T), dtype=np.float32)  # (K, N, H, T)
                                    if pipeline.adaptive_bands is not None else None)

    def on_slot(self, i, d, expected, alert_open):
        row = self.rows[i]
        detector = self.detector
        self.anomaly[row] = detector.score[d] / (detector.score[d] + detector.warn[d])
        self.alert[row] = alert_open
        if expected is not None:
            self.expected[row] = expected

    def on_forecast(self, i, d, forecast):
        self.forecast[self.rows[i]] = forecast

    def on_interval_scale(self, i, d, scale):
        self.interval_scale[self.rows[i]] = scale

    def on_interval_multiplier(self, i, d, multiplier):
        self.interval_multiplier[:, self.rows[i]] = multiplier


def _forward_fill(order: np.ndarray, device_codes: np.ndarray, anomaly: np.ndarray, alert: np.ndarray) -> None:
    """Rows that committed no slot (merged duplicates, partial rows) take their device's previous state."""
    for code in np.unique(device_codes):
        rows = order[device_codes[order] == code]  # this device's rows in time order
        a = anomaly[rows]
        idx = np.where(~np.isnan(a), np.arange(len(rows)), -1)
        np.maximum.accumulate(idx, out=idx)
        anomaly[rows] = np.where(idx >= 0, a[np.maximum(idx, 0)], 0.0)
        flags = alert[rows]
        idx = np.where(flags >= 0, np.arange(len(rows)), -1)
        np.maximum.accumulate(idx, out=idx)
        alert[rows] = np.where(idx >= 0, flags[np.maximum(idx, 0)], 0)


def replay_table(table: Table, bundle: Bundle, settings: Settings, chunk_rows: int = 8192) -> tuple[Pipeline, _RowTrace]:
    pipeline = Pipeline(bundle, settings)
    n = len(table.ts)
    trace = _RowTrace(pipeline, n)
    order = np.argsort(table.ts, kind="stable")  # time order; ties keep file order
    features = bundle.features
    # Cells outside the plausible range are dropped as the daemon rejects such readings (ingest.plausible_limits).
    limits = np.array(list(plausible_limits(features, bundle.offset, bundle.scale, settings.ingest).values()))  # (F, 2)
    implausible = (table.values < limits[:, 0]) | (table.values > limits[:, 1]) | np.isinf(table.values)
    values = np.where(implausible, np.nan, table.values) if implausible.any() else table.values
    pipeline.counters["implausible_values"] = int(implausible.sum())
    complete = ~np.isnan(values).any(axis=1)
    for start in range(0, n, chunk_rows):
        rows = order[start : start + chunk_rows]
        chunk_values = values[rows].tolist()
        samples = []
        for row, vals in zip(rows.tolist(), chunk_values):
            if complete[row]:
                mapping = dict(zip(features, vals))
            else:
                mapping = {f: v for f, v in zip(features, vals) if v == v}  # v == v drops NaN
            ts = float(table.ts[row])
            samples.append(Sample(table.devices[row], ts, mapping, ts))
        trace.rows = rows
        pipeline.process(samples, now=float(table.ts[rows[-1]]), trace=trace)
    codes = np.unique(np.asarray(table.devices, dtype=object), return_inverse=True)[1] if n else np.empty(0, dtype=np.int64)
    _forward_fill(order, codes, trace.anomaly, trace.alert)
    return pipeline, trace


def write_output(path: str | Path, table: Table, bundle: Bundle, trace: _RowTrace) -> None:
    targets, H = bundle.targets, bundle.horizon
    header = ["ts", "device", "anomaly_score", "alert"]
    header += [f"expected_{t}" for t in targets]
    header += [f"forecast_{t}_{k}" for t in targets for k in range(1, H + 1)]
    n = len(table.ts)
    parts = [
        trace.anomaly[:, None],
        trace.alert[:, None].astype(np.float64),
        trace.expected.astype(np.float64),
        trace.forecast.transpose(0, 2, 1).reshape(n, -1).astype(np.float64),  # (N, T*H) target-major
    ]
    intervals = getattr(bundle, "intervals", None)
    if intervals is not None:  # each level's band around every forecast value, named after it
        lower, upper = intervals.bounds(trace.forecast, trace.interval_scale,  # (K, N, H, T) each; normalized: per window
                                        trace.interval_multiplier)  # adaptive: per device and forecast
        for k, level in enumerate(intervals.level_names()):
            for side, bound in (("lower", lower[k]), ("upper", upper[k])):
                header += [f"forecast_{t}_{h}_{side}_{level}" for t in targets for h in range(1, H + 1)]
                parts.append(bound.transpose(0, 2, 1).reshape(n, -1).astype(np.float64))  # (N, T*H)
    numbers = np.concatenate(parts, axis=1)
    row_format = "%.6f,%d," + ",".join(["%.6g"] * (numbers.shape[1] - 2))
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        block = 65536
        for start in range(0, n, block):
            stop = min(n, start + block)
            lines = [
                f"{ts},{_csv_field(device)},{(row_format % tuple(values)).replace('nan', '')}\n"
                for ts, device, values in zip(table.ts_text[start:stop], table.devices[start:stop], numbers[start:stop].tolist())
            ]
            f.write("".join(lines))


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def replay(
    model_dir: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    *,
    settings: Settings | None = None,
    ts_column: str | None = None,
    device_column: str = "device",
    delimiter: str = ",",
    chunk_rows: int = 8192,
    ts_format: str = "auto",
    plot_path: str | Path | None = None,
    plot_device: str | None = None,
    label_column: str = "label",
) -> ReplayResult:
    """Read, run and write; returns counts and timing (the whole run, reading and writing included, the plot not).
    `ts_column` None finds the timestamp column by name (TS_COLUMN_NAMES); the output's column is always `ts`."""
    settings = settings or Settings(model={"path": Path(model_dir)})
    if "max_batch" not in settings.inference.model_fields_set:
        # Offline there is no latency to keep low: larger model calls, same results (the batch never changes them).
        settings = settings.model_copy(update={"inference": settings.inference.model_copy(update={"max_batch": REPLAY_MAX_BATCH})})
    bundle = load_bundle(model_dir, settings.model.intra_op_threads)
    if plot_path is not None:
        _pyplot()  # fail before the work, not after it
    started = time.perf_counter()
    table = read_table(data_path, bundle.features, ts_column, device_column, delimiter, ts_format, label_column)
    pipeline, trace = replay_table(table, bundle, settings, chunk_rows)
    write_output(out_path, table, bundle, trace)
    seconds = time.perf_counter() - started
    if plot_path is not None:
        plot(plot_path, table, bundle, pipeline, trace, plot_device)
    stats = pipeline.stats()
    return ReplayResult(len(table.ts), stats["devices"], seconds, stats["alerts_opened"], stats["inferences"],
                        stats.get("implausible_values", 0))


def print_summary(result: ReplayResult, out_path: str | Path, stream=None) -> None:
    print(
        f"replay: {result.rows} rows, {result.devices} device(s), {result.inferences} forecasts, "
        f"{result.alerts_opened} alert(s) opened in {result.seconds:.2f} s ({result.rows_per_s:,.0f} rows/s) -> {out_path}"
        + (f"; {result.implausible_values} implausible value(s) dropped (ingest.plausible_range_stds, ingest.value_limits)"
           if result.implausible_values else ""),
        file=stream or sys.stderr,
    )


# -- plot ---------------------------------------------------------------------------------------------------------


class PlotUnavailable(ReplayError):
    """matplotlib is not installed (it is part of the `training` extra, not of the edge install)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'edgecast[training]' (or pip install matplotlib)") from None
    return plt


def _shade(ax, x: np.ndarray, flags: np.ndarray, color: str, label: str) -> None:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    for k, (begin, end) in enumerate(zip(edges[::2], edges[1::2])):
        ax.axvspan(x[begin], x[end - 1], color=color, alpha=0.25, lw=0, label=label if k == 0 else None)


def plot(path: str | Path, table: Table, bundle: Bundle, pipeline: Pipeline, trace: _RowTrace, device: str | None = None) -> None:
    """One device's signals with their one-step forecasts, labeled faults and open alerts, then the anomaly
    score with the warning, critical and exit levels (in anomaly-score units)."""
    plt = _pyplot()
    names = np.asarray(table.devices, dtype=object)
    device = device if device is not None else str(names[0]) if len(names) else DEFAULT_DEVICE
    rows = np.flatnonzero(names == device)
    if rows.size == 0:
        raise ReplayError(f"--plot-device {device!r} is not in the data")
    rows = rows[np.argsort(table.ts[rows], kind="stable")]
    x = (table.ts[rows] - table.ts[rows[0]]) / 3600.0  # hours since the device's first row
    targets = bundle.targets
    fig, axes = plt.subplots(len(targets) + 1, 1, figsize=(12, 2.2 * (len(targets) + 1)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    alert = trace.alert[rows] > 0
    labeled = table.labels[rows] > 0 if table.labels is not None else np.zeros(rows.size, dtype=bool)
    for j, name in enumerate(targets):
        ax = axes[j]
        ax.plot(x, table.values[rows, bundle.features.index(name)], lw=0.8, color="black", label="observed")
        ax.plot(x, trace.expected[rows, j], lw=0.8, color="tab:blue", alpha=0.8, label="forecast (1 step)")
        _shade(ax, x, labeled, "tab:orange", "labeled fault")
        _shade(ax, x, alert, "tab:red", "alert open")
        ax.set_ylabel(name)
    axes[0].legend(loc="upper left", fontsize=8, ncol=4)
    detector = pipeline.detector
    ax = axes[-1]
    ax.plot(x, trace.anomaly[rows], lw=0.8, color="tab:purple", label="anomaly_score")
    warning = detector.warning
    for level, style, label in ((warning, "-", "warning"), (detector.critical, "--", "critical"), (detector.exit, ":", "exit")):
        ax.axhline(level / (level + warning), color="tab:red", ls=style, lw=0.8, label=label)
    _shade(ax, x, labeled, "tab:orange", None)
    _shade(ax, x, alert, "tab:red", None)
    ax.set_ylim(0, 1)
    ax.set_ylabel("anomaly score")
    ax.set_xlabel(f"hours since {table.ts_text[rows[0]]} ({device})")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    mode = "dynamic thresholds (fixed levels shown)" if detector.dynamic else "fixed thresholds"
    fig.suptitle(f"{bundle.name} {bundle.version}: replay of {device}, {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
