"""`python -m training search`: Optuna hyperparameter search, objective = best validation loss.

Samplers: random, tpe, grid (`--grid '{"hidden_size": [16, 32], ...}'`). With `--storage` (an Optuna RDB URL,
e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test) and the same `--study`, any number of workers on any
number of machines share one study: each asks the database for its next trial, so no trial is run twice.
Workers must not share a sampler seed (they would propose the same parameters): without `--seed` each worker
draws its own; with `--seed`, give each worker a distinct `--worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

STUDY_OPEN_ATTEMPTS = 4
DEFAULT_SPACE = {
    "hidden_size": [8, 16, 32, 64],
    "num_layers": [1, 2],
    "learning_rate": (1e-4, 1e-2),  # log-uniform
    "dropout": (0.0, 0.3),
    "batch_size": [64, 128, 256],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="CSV/Parquet (default: a synthetic fleet)")
    parser.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                        help="timestamp column of --data (default: the first column named ts, timestamp, time, datetime or date, any case)")
    parser.add_argument("--device-column", default="device", help="absent column = one series")
    parser.add_argument("--period-s", "--period", dest="period_s", type=int, metavar="S",
                        help="resampling period in whole seconds (default: the median step between rows)")
    parser.add_argument("--synthetic-devices", type=int, default=3)
    parser.add_argument("--synthetic-hours", type=float, default=72.0)
    parser.add_argument("--study", default="edgecast-search", help="study name (shared by all workers)")
    parser.add_argument("--storage", help="Optuna RDB URL shared by the workers (default: in memory, one process)")
    parser.add_argument("--sampler", choices=("random", "tpe", "grid"), default="tpe")
    parser.add_argument("--grid", help="grid sampler search space as JSON {param: [values]}")
    parser.add_argument("--trials", type=int, default=10, help="trials this worker runs")
    parser.add_argument("--timeout", type=float, help="seconds this worker searches at most")
    parser.add_argument("--seed", type=int, help="sampler seed (offset by --worker)")
    parser.add_argument("--worker", type=int, default=0, help="worker index, offsets the sampler seed")
    parser.add_argument("--architectures", default="many_to_one", help="comma-separated architectures to search over")
    parser.add_argument("--lookback", type=int, default=60)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-stride", type=int, default=4)
    parser.add_argument("--max-batches", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--out", help="write the best trial as JSON here")


def _load_rows(args):
    if args.data:
        from training.data import load_table

        rows, features = load_table(args.data, args.ts_column, args.device_column)
        return rows, features
    from training.synth import FEATURES, FleetConfig, generate_fleet

    return generate_fleet(FleetConfig(devices=args.synthetic_devices, hours=args.synthetic_hours, seed=0, faults="none")).rows, FEATURES


def make_sampler(kind: str, seed: int | None, grid: dict | None = None):
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.GridSampler(grid or {"hidden_size": [8, 16, 32], "num_layers": [1, 2]}, seed=seed)


def objective_factory(prepared, args, grid: dict | None):
    from training.train import TrainConfig, fit

    architectures = [a.strip() for a in args.architectures.split(",") if a.strip()]

    def suggest(trial, name):
        if grid is not None:
            return trial.suggest_categorical(name, grid[name]) if name in grid else None
        space = DEFAULT_SPACE[name]
        if isinstance(space, list):
            return trial.suggest_categorical(name, space)
        if name == "learning_rate":
            return trial.suggest_float(name, *space, log=True)
        return trial.suggest_float(name, *space)

    def objective(trial) -> float:
        cfg = TrainConfig(lookback=args.lookback, horizon=args.horizon, epochs=args.epochs, train_stride=args.train_stride,
                          max_batches=args.max_batches, lr_schedule="plateau", patience=2, threads=args.threads,
                          architecture=(trial.suggest_categorical("architecture", architectures)
                                        if len(architectures) > 1 else architectures[0]))
        for name in ("hidden_size", "num_layers", "learning_rate", "dropout", "batch_size"):
            value = suggest(trial, name)
            if value is not None:
                setattr(cfg, name, value)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        result = fit(prepared, cfg, log=lambda *_: None)
        trial.set_user_attr("best_epoch", result.best_epoch)
        return result.best_val_loss

    return objective


def run(args: argparse.Namespace) -> int:
    import optuna

    from training.data import prepare

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = json.loads(args.grid) if args.grid else None
    if args.sampler == "grid" and grid is None:
        grid = {"hidden_size": [8, 16, 32], "num_layers": [1, 2]}
    from training.fit import infer_period

    try:
        rows, features = _load_rows(args)
        prepared = prepare(rows, args.lookback, args.horizon, infer_period(rows["ts"], rows["device"], args.period_s), features=features)
    except (OSError, ValueError) as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 2
    seed = None if args.seed is None else args.seed + args.worker
    study = None
    for attempt in range(STUDY_OPEN_ATTEMPTS):
        try:
            study = optuna.create_study(study_name=args.study, storage=args.storage, load_if_exists=True,
                                        direction="minimize", sampler=make_sampler(args.sampler, seed, grid))
            break
        except Exception as exc:
            # Workers started together race to create the study (and, on a fresh database, Optuna's tables): the
            # loser's insert fails, and a moment later the study is there to load. A storage that cannot be
            # reached fails every attempt: say which, and why.
            if attempt == STUDY_OPEN_ATTEMPTS - 1:
                print(f"search: cannot open study {args.study!r} at {args.storage}: {exc}", file=sys.stderr)
                return 2
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    study.optimize(objective_factory(prepared, args, grid), n_trials=args.trials, timeout=args.timeout,
                   callbacks=[lambda s, t: print(f"trial {t.number}: {t.state.name} val loss {t.value} {t.params}", flush=True)])
    best = study.best_trial
    summary = {"study": args.study, "trials": len(study.trials), "best": {"number": best.number, "value": best.value, "params": best.params}}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
