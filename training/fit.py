"""`python -m training fit`: train on the first N rows (or a time range) of any CSV and export a bundle.

"Train on history, replay history" is two commands on a user's file:
    python -m training fit --data plant.csv --out bundles/plant --rows 20000 --features temp,pressure
    python -m agent replay --model bundles/plant --data plant.csv --out scored.csv
The CSV is read like `agent replay` reads it (delimiter, timestamp column and format, optional device column);
the data preparation, training, ONNX export, verification and calibration are those of `train`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

NON_FEATURE_COLUMNS = ("label", "fault", "anomaly", "is_anomaly")


def _header(path: str, delimiter: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        try:
            return [h.strip() for h in next(csv.reader(f, delimiter=delimiter))]
        except StopIteration:
            raise ValueError(f"{path} is empty") from None


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def load_rows(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], list[str], list[str], float]:
    """The selected rows as training.data's column dict, the features, the targets and the period."""
    from agent.replay import ReplayError, parse_ts_column, read_table

    header = _header(args.data, args.delimiter)
    features = _names(args.features) or [c for c in header if c not in (args.ts_column, args.device_column, args.label_column, *NON_FEATURE_COLUMNS)]
    targets = _names(args.targets) or list(features)
    unknown = [t for t in targets if t not in features]
    if unknown:
        raise ValueError(f"--targets {unknown} are not among the features {features}")
    try:
        table = read_table(args.data, features, args.ts_column, args.device_column, args.delimiter, args.ts_format,
                           label_column=args.label_column)
    except ReplayError as exc:
        raise ValueError(str(exc)) from None
    keep = np.ones(len(table.ts), dtype=bool)
    if args.rows is not None:
        keep[args.rows:] = False  # the first N rows of the file, in file order
    if args.start is not None:
        keep &= table.ts >= parse_ts_column([args.start], args.ts_format)[0]
    if args.end is not None:
        keep &= table.ts < parse_ts_column([args.end], args.ts_format)[0]
    keep &= ~np.isnan(table.values).any(axis=1)  # rows with an empty feature cell are skipped
    if keep.sum() < 2:
        raise ValueError("fewer than 2 usable rows selected (check --rows / --start / --end and empty cells)")
    devices = np.asarray(table.devices, dtype=object)[keep]
    ts = table.ts[keep]
    period = args.period_s or _median_period(ts, devices)
    if period < 1 or abs(period - round(period)) > 1e-6:
        raise ValueError(f"the sampling period must be a whole number of seconds >= 1, got {period:g} (give --period-s)")
    period = int(round(period))
    rows = {"ts": np.round(ts).astype(np.int64), "device": devices}
    for j, name in enumerate(features):
        rows[name] = table.values[keep, j]
    labels = table.labels[keep] if table.labels is not None else np.zeros(int(keep.sum()))
    rows["label"] = (np.nan_to_num(labels) > 0).astype(np.int64)
    return rows, features, targets, period


def _median_period(ts: np.ndarray, devices: np.ndarray) -> float:
    steps = []
    for device in np.unique(devices):
        diffs = np.diff(np.sort(ts[devices == device]))
        steps.append(diffs[diffs > 0])
    steps = np.concatenate(steps) if steps else np.zeros(0)
    if steps.size == 0:
        raise ValueError("cannot infer the sampling period (one row per device); give --period-s")
    return float(np.median(steps))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cli import _add_model_arguments

    parser.add_argument("--data", required=True, help="CSV: a timestamp column, optional device column, numeric feature columns")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced as a whole)")
    parser.add_argument("--name", default="fitted-lstm", help="bundle name in the manifest")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--rows", type=int, help="train on the first N rows of the file")
    select.add_argument("--start", help="first timestamp of the training range (same format as the data)")
    parser.add_argument("--end", help="end of the training range, exclusive (with or without --start)")
    parser.add_argument("--features", help="comma-separated input columns (default: every other column)")
    parser.add_argument("--targets", help="comma-separated forecast targets, a subset of the features (default: all)")
    parser.add_argument("--ts-column", default="ts")
    parser.add_argument("--ts-format", default="auto", help="auto | unix | unix_ms | iso | a strptime format such as '%%Y-%%m-%%d %%H:%%M:%%S' (UTC)")
    parser.add_argument("--device-column", default="device", help="device column; without it the file is one device")
    parser.add_argument("--label-column", default="label", help="0/1 anomaly labels, if present: labeled rows are kept out of training windows")
    parser.add_argument("--delimiter", default=",")
    parser.add_argument("--period-s", type=int, help="sampling period (default: the median step between rows)")
    parser.add_argument("--lookback", type=int, default=60)
    parser.add_argument("--horizon", type=int, default=10)
    _add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from training.cli import _train_config, build_bundle

    if args.rows is not None and args.rows < 2:
        print("fit: --rows must be >= 2", file=sys.stderr)
        return 2
    if len(args.delimiter) != 1:
        print(f"fit: --delimiter must be one character, got {args.delimiter!r}", file=sys.stderr)
        return 2
    cfg = _train_config(args)
    cfg.lookback, cfg.horizon = args.lookback, args.horizon
    try:
        rows, features, targets, period = load_rows(args)
        print(f"fit: {len(rows['ts'])} rows, {len(set(rows['device'].tolist()))} device(s), features {features}, "
              f"targets {targets}, period {period:g} s")
        build_bundle(rows, cfg, args.out, args.name, args.version, args.invocation,
                     {"csv": str(Path(args.data)), "period_s": period, "rows": args.rows, "start": args.start, "end": args.end},
                     features=features, targets=targets)
    except (OSError, ValueError) as exc:
        print(f"fit: {exc}", file=sys.stderr)
        return 2
    return 0
