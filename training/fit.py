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
import math
import sys
from pathlib import Path

import numpy as np

NON_FEATURE_COLUMNS = ("label", "fault", "anomaly", "is_anomaly")
MIN_STEPS = 600


def _header(path: str, delimiter: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return [h.strip() for h in next(csv.reader(f, delimiter=delimiter))]
        except StopIteration:
            raise ValueError(f"{path} is empty") from None


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def load_rows(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], list[str], list[str], float]:
    """The selected rows as training.data's column dict, the features, the targets and the period."""
    from agent.tools.replay import ReplayError, find_ts_column, parse_ts_column, read_table

    header = _header(args.data, args.delimiter)
    ts_column = find_ts_column(header, args.ts_column, args.data)  # a ValueError naming the columns when there is none
    features = _names(args.features) or [c for c in header if c not in (ts_column, args.device_column, args.label_column, *NON_FEATURE_COLUMNS)]
    targets = _names(args.targets) or list(features)
    unknown = [t for t in targets if t not in features]
    if unknown:
        raise ValueError(f"--targets {unknown} are not among the features {features}")
    try:
        table = read_table(args.data, features, ts_column, args.device_column, args.delimiter, args.ts_format,
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
    period = infer_period(ts, devices, args.period_s)
    rows = {"ts": np.round(ts).astype(np.int64), "device": devices}
    for j, name in enumerate(features):
        rows[name] = table.values[keep, j]
    labels = table.labels[keep] if table.labels is not None else np.zeros(int(keep.sum()))
    rows["label"] = (np.nan_to_num(labels) > 0).astype(np.int64)
    from training.feedback import from_args  # --feedback: operators' labels over the data's own

    rows["label"] = from_args(args, ts, devices, rows["label"], single_series=args.device_column not in header)
    return rows, features, targets, period


def infer_period(ts: np.ndarray, devices: np.ndarray, given: int | None = None) -> int:
    """The sampling period in whole seconds: `given` (--period-s) when set, else the median step between a
    device's rows (fit, train, data-report, cv and search share this default)."""
    if given:
        if given < 1:
            raise ValueError(f"--period-s must be a whole number of seconds >= 1, got {given}")
        return int(given)
    period = _median_period(ts, devices)
    if period < 1 or abs(period - round(period)) > 1e-6:
        suggestion = max(1, int(round(period)))
        raise ValueError(f"the median step between rows is {period:g} s, not a whole number of seconds >= 1: "
                         f"give --period-s (e.g. --period-s {suggestion}; rows in one period are averaged)")
    return int(round(period))


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
    parser.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                        help="timestamp column (default: the first column named ts, timestamp, time, datetime or date, any case)")
    parser.add_argument("--ts-format", default="auto", help="auto | unix | unix_ms | iso | a strptime format such as '%%Y-%%m-%%d %%H:%%M:%%S' (UTC)")
    parser.add_argument("--device-column", default="device", help="device column; without it the file is one device")
    parser.add_argument("--label-column", default="label", help="0/1 anomaly labels, if present: labeled rows are kept out of training windows")
    from training import feedback

    feedback.add_arguments(parser)
    parser.add_argument("--delimiter", default=",")
    parser.add_argument("--period-s", "--period", dest="period_s", type=int, metavar="S",
                        help="sampling period in whole seconds (default: the median step between rows)")
    parser.add_argument("--lookback", type=int, help="input window in samples (default: sqrt of the training rows per device, 8..60)")
    parser.add_argument("--horizon", type=int, help="forecast steps (default: lookback / 6, 1..10)")
    parser.add_argument("--split", default="0.7,0.15,0.15",
                        help="train,validation,test fractions of the selected rows per device, in time order (default 0.7,0.15,0.15)")
    parser.add_argument("--false-alarm-rate", type=float, default=None,
                        help="share of healthy samples allowed over the warning level (default 0.001)")
    parser.add_argument("--state", choices=("auto", "on", "off"), default="auto",
                        help="state channels (how far the features are from normal operation): auto (default) = on with two "
                             "or more features; off for data whose normal level drifts past the training range")
    parser.add_argument("--min-steps", type=int, default=MIN_STEPS,
                        help=f"at least this many optimizer steps however small the data (default {MIN_STEPS})")
    g = parser.add_argument_group("automatic model selection")
    g.add_argument("--search", metavar="TRIALS|auto",
                   help="Optuna study over architecture, strategy, lookback, hidden size, dropout and learning rate on "
                        "time-series folds of the training rows; TRIALS trials or `auto` (as many as --search-budget allows); "
                        "the best configuration is trained, exported and reported like any fit")
    g.add_argument("--search-budget", type=float, default=600.0, metavar="S",
                   help="wall-clock seconds for the study (default 600); training and exporting the chosen model follow")
    g.add_argument("--search-folds", type=int, default=3, help="expanding time-series folds of the training rows (default 3)")
    g.add_argument("--search-min-steps", type=int, default=200, help="optimizer steps per fold at least (default 200)")
    g.add_argument("--storage", help="Optuna RDB URL (e.g. postgresql+psycopg2://postgres@host:5432/db): workers on several "
                                     "machines running the same --study share the trials (default: in memory)")
    g.add_argument("--study", help="study name (default: a fresh one per run)")
    g.add_argument("--search-seed", type=int, default=None, help="TPE sampler seed (default: random; distinct per worker)")
    _add_model_arguments(parser)


def _parse_search(text: str | None) -> int | None:
    """--search TRIALS|auto -> trials (None = until the budget)."""
    if text is None or text.strip().lower() == "auto":
        return None
    trials = int(text)
    if trials < 1:
        raise ValueError(f"--search needs a number of trials >= 1 or `auto`, got {text!r}")
    return trials


def validation_rmse(rows, cfg, period, features, targets, split, min_steps: int) -> float:
    """Train `cfg` on the fit's training rows; its validation RMSE in original units (the default model's
    score in `fit --search`'s report)."""
    from training import evaluate
    from training.bundle import torch_predictor
    from training.data import prepare
    from training.train import fit, sized_for_data

    prepared = prepare(rows, cfg.lookback, cfg.horizon, period, features=list(features), targets=targets, split=split)
    result = fit(prepared, sized_for_data(cfg, len(prepared.starts["train"]), min_steps), log=lambda *_: None)
    return float(evaluate.metrics(prepared, torch_predictor(result.model), "val")["model"]["rmse"])


def run_search(args, rows, cfg, features, targets, period, split) -> tuple:
    """The study, then the default model on the fit's own split: (chosen config, summary)."""
    import copy
    import json as _json

    from training.search import StudyError, auto_select

    trials = _parse_search(args.search)
    print(f"fit --search: {'as many trials as fit' if trials is None else trials} in {args.search_budget:.0f} s, "
          f"{args.search_folds} time-series folds of the training rows")
    try:
        result = auto_select(rows, cfg, features=features, targets=targets, period=period, fractions=split.fractions,
                             trials=trials, budget_s=args.search_budget, folds=args.search_folds,
                             min_steps=args.search_min_steps, storage=args.storage, study_name=args.study,
                             seed=args.search_seed, log=print)
    except StudyError as exc:
        raise ValueError(str(exc)) from None
    chosen = result.pop("config")
    print(f"fit --search: {result['completed']} of {result['trials']} trials completed in {result['seconds']:.0f} s; "
          f"chose {result['params']} (fold-mean validation MSE {result['best_value']:.5f}, default "
          f"{result['default_value'] if result['default_value'] is None else round(result['default_value'], 5)})")
    default = copy.copy(cfg)
    same = all(getattr(default, k) == getattr(chosen, k)
               for k in ("architecture", "strategy", "lookback", "hidden_size", "dropout", "learning_rate"))
    result["default_val_rmse"] = None if same else validation_rmse(rows, default, period, features, targets, split, args.min_steps)
    result["chosen_is_default"] = same
    return chosen, _json.loads(_json.dumps(result, default=str))


def window_sizes(rows_per_device: int) -> tuple[int, int]:
    """The documented default: lookback = sqrt(rows per device) within 8..60, horizon = lookback / 6 within 1..10.

    Why: a window long enough to see the dynamics, short enough that the validation part (15 %) still holds
    two windows of lookback + horizon (400 rows: lookback 20, horizon 3)."""
    lookback = int(min(60, max(8, round(math.sqrt(max(rows_per_device, 1))))))
    return lookback, int(min(10, max(1, lookback // 6)))


def run(args: argparse.Namespace) -> int:
    from training.cli import _train_config, build_bundle
    from training.data import Split
    from training.intervals import format_coverage

    if args.rows is not None and args.rows < 2:
        print("fit: --rows must be >= 2", file=sys.stderr)
        return 2
    if len(args.delimiter) != 1:
        print(f"fit: --delimiter must be one character, got {args.delimiter!r}", file=sys.stderr)
        return 2
    cfg = _train_config(args)
    try:
        split = Split(fractions=tuple(float(v) for v in args.split.split(",")))
        if len(split.fractions) != 3:
            raise ValueError(f"--split needs three fractions train,validation,test, got {args.split!r}")
        rows, features, targets, period = load_rows(args)
        devices = len(set(rows["device"].tolist()))
        lookback, horizon = window_sizes(len(rows["ts"]) // max(devices, 1))
        cfg.lookback = args.lookback or lookback
        cfg.horizon = args.horizon or horizon
        print(f"fit: {len(rows['ts'])} rows, {devices} device(s), features {features}, "
              f"targets {targets}, period {period:g} s, lookback {cfg.lookback}, horizon {cfg.horizon}")
        info = {"csv": str(Path(args.data)), "period_s": period, "rows": args.rows, "start": args.start, "end": args.end}
        search = None
        if args.search is not None:
            cfg, search = run_search(args, rows, cfg, features, targets, period, split)
            info["search"] = search
        manifest = build_bundle(rows, cfg, args.out, args.name, args.version, args.invocation, info,
                                features=features, targets=targets, prepare_kwargs={"split": split}, min_steps=args.min_steps,
                                false_alarm_rate=args.false_alarm_rate, state={"auto": None, "on": True, "off": False}[args.state])
        print(format_coverage(manifest["metrics"]["test"].get("interval_coverage")))
        if search is not None:
            report_search(args.out, search, manifest)
    except (OSError, ValueError) as exc:
        print(f"fit: {exc}", file=sys.stderr)
        return 2
    return 0


def report_search(out_dir, search: dict, manifest: dict) -> dict:
    """search.json next to the bundle and a printed summary: what was chosen, the validation gain over the default."""
    import json

    chosen = manifest["metrics"]["validation"]["model"]["rmse"]
    default = chosen if search["chosen_is_default"] else search["default_val_rmse"]
    search.update({"chosen_val_rmse": chosen, "default_val_rmse": default,
                   "val_gain_percent": round(100.0 * (1.0 - chosen / max(default, 1e-12)), 2),
                   "fold_gain_percent": (round(100.0 * (1.0 - search["best_value"] / search["default_value"]), 2)
                                         if search.get("default_value") else None)})
    Path(out_dir, "search.json").write_text(json.dumps(search, indent=2) + "\n", encoding="utf-8")
    print(f"fit --search: chose {search['params']}; validation RMSE {chosen:.4f} vs the default model's {default:.4f} "
          f"({search['val_gain_percent']:+.1f} %); fold-mean gain {search['fold_gain_percent']} %; wrote {Path(out_dir, 'search.json')}")
    return search
