"""`python -m training search`: Optuna hyperparameter search, objective = best validation loss.

Samplers: random, tpe, grid (`--grid '{"hidden_size": [16, 32], ...}'`). With `--storage` (an Optuna RDB URL,
e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test) and the same `--study`, any number of workers on any
number of machines share one study: each asks the database for its next trial, so no trial is run twice.
Workers must not share a sampler seed (they would propose the same parameters): without `--seed` each worker
draws its own; with `--seed`, give each worker a distinct `--worker`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np

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
    from simulation.synth import FEATURES, FleetConfig, generate_fleet

    return generate_fleet(FleetConfig(devices=args.synthetic_devices, hours=args.synthetic_hours, seed=0, faults="none")).rows, FEATURES


class StudyError(RuntimeError):
    """The study's storage could not be opened (the message names it)."""


def open_study(name: str, storage: str | None, sampler):
    """Create or load the study `name` (minimize) at `storage` (None: in memory)."""
    import optuna

    for attempt in range(STUDY_OPEN_ATTEMPTS):
        try:
            return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="minimize",
                                       sampler=sampler)
        except Exception as exc:
            # Workers started together race to create the study (and, on a fresh database, Optuna's tables): the
            # loser's insert fails, and a moment later the study is there to load. A storage that cannot be
            # reached fails every attempt: say which, and why.
            if attempt == STUDY_OPEN_ATTEMPTS - 1:
                raise StudyError(f"cannot open study {name!r} at {storage}: {exc}") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)


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
    try:
        study = open_study(args.study, args.storage, make_sampler(args.sampler, seed, grid))
    except StudyError as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 2
    study.optimize(objective_factory(prepared, args, grid), n_trials=args.trials, timeout=args.timeout,
                   callbacks=[lambda s, t: print(f"trial {t.number}: {t.state.name} val loss {t.value} {t.params}", flush=True)])
    best = study.best_trial
    summary = {"study": args.study, "trials": len(study.trials), "best": {"number": best.number, "value": best.value, "params": best.params}}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------ automatic model selection (`fit --search`)

AUTO_ARCHITECTURES = ["lstm", "many_to_one", "cnn_lstm", "attention"]
AUTO_STRATEGIES = ["mimo", "recursive", "direct"]
AUTO_HIDDEN = [8, 16, 32, 64]


def fold_splits(fractions: tuple[float, float, float], folds: int, initial: float = 0.5):
    """Expanding time-series folds inside the training rows of `fractions` (per device, in time order): fold i
    trains on the first initial + i * block of the training rows and validates on the next block. The fit's
    validation and test rows are never touched."""
    from training.data import Split

    train = fractions[0]
    block = (1.0 - initial) / folds
    out = []
    for i in range(folds):
        a = train * (initial + i * block)
        b = train * block
        out.append(Split(fractions=(a, b, 1.0 - a - b)))
    return out


def lookback_choices(default: int, horizon: int, shortest_val_rows: int) -> list[int]:
    """Half, the default and twice the default lookback, where lookback + horizon fits a fold's validation rows
    at least twice (each fold must keep several validation windows)."""
    options = sorted({max(4, default // 2), default, default * 2})
    fits = [lb for lb in options if 2 * (lb + horizon) <= shortest_val_rows]
    return fits or [min(options)]


def trial_config(trial, base, lookbacks: list[int]):
    """The TrainConfig a trial proposes: architecture, strategy, lookback, hidden size, dropout, learning rate."""
    cfg = copy.copy(base)
    cfg.architecture = trial.suggest_categorical("architecture", AUTO_ARCHITECTURES)
    cfg.strategy = "mimo" if cfg.architecture == "lstm" else trial.suggest_categorical("strategy", AUTO_STRATEGIES)
    cfg.lookback = trial.suggest_categorical("lookback", lookbacks)
    cfg.hidden_size = trial.suggest_categorical("hidden_size", AUTO_HIDDEN)
    cfg.dropout = trial.suggest_float("dropout", 0.0, 0.3)
    cfg.learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    return cfg


def default_params(cfg, lookbacks: list[int]) -> dict:
    """The default model as a trial (enqueued first: the search's baseline on the same folds)."""
    params = {"architecture": cfg.architecture if cfg.architecture in AUTO_ARCHITECTURES else "lstm",
              "lookback": cfg.lookback if cfg.lookback in lookbacks else lookbacks[len(lookbacks) // 2],
              "hidden_size": cfg.hidden_size if cfg.hidden_size in AUTO_HIDDEN else 64,
              "dropout": float(min(max(cfg.dropout, 0.0), 0.3)), "learning_rate": float(min(max(cfg.learning_rate, 1e-4), 1e-2))}
    if params["architecture"] != "lstm":
        params["strategy"] = cfg.strategy if cfg.strategy in AUTO_STRATEGIES else "mimo"
    return params


class _BudgetSpent(Exception):
    """Raised from the training loop's log callback once `fit --search`'s time budget is spent."""


def auto_select(rows: dict, base_cfg, *, features, targets, period: int, fractions, trials: int | None, budget_s: float,
                folds: int = 3, min_steps: int = 200, storage: str | None = None, study_name: str | None = None,
                seed: int | None = 0, log=print) -> dict:
    """Optuna study over architecture, strategy, lookback, hidden size, dropout and learning rate, scored by the
    mean best validation MSE (scaled) over expanding time-series folds of the training rows, within `budget_s`
    seconds of wall clock (no trial starts that the longest trial so far says would end past it; a trial in
    flight stops at its next epoch once the budget is spent). The default configuration is the first trial.

    Returns {"params", "config" (the chosen TrainConfig), "default_params", "trials", "completed", "seconds",
    "best_value", "default_value", "study", "storage"}."""
    import optuna

    from training.data import prepare
    from training.train import fit, sized_for_data

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    began = time.perf_counter()
    splits = fold_splits(tuple(fractions), folds)
    rows_per_device = min(int((rows["device"] == d).sum()) for d in np.unique(rows["device"]))
    shortest_val = int(rows_per_device * fractions[0] * (1.0 - 0.5) / folds)
    lookbacks = lookback_choices(base_cfg.lookback, base_cfg.horizon, shortest_val)
    prepared_cache: dict = {}

    def fold_data(lookback: int, i: int):
        key = (lookback, i)
        if key not in prepared_cache:
            prepared_cache[key] = prepare(rows, lookback, base_cfg.horizon, period, features=list(features), targets=targets,
                                          split=splits[i], required_splits=("train", "val"))
        return prepared_cache[key]

    durations: list[float] = []

    def stop_when_spent(*_) -> None:
        """The training loop's per-epoch log line: a fold still running when the budget is spent ends there."""
        if time.perf_counter() - began > budget_s:
            raise _BudgetSpent

    def objective(trial) -> float:
        started = time.perf_counter()
        cfg = trial_config(trial, base_cfg, lookbacks)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        losses = []
        for i in range(len(splits)):
            if time.perf_counter() - began > budget_s:
                raise optuna.TrialPruned("time budget spent")
            try:
                prepared = fold_data(cfg.lookback, i)
            except ValueError as exc:
                trial.set_user_attr("error", str(exc)[:200])
                raise optuna.TrialPruned(str(exc)[:200]) from None
            sized = sized_for_data(cfg, len(prepared.starts["train"]), min_steps)
            try:
                losses.append(fit(prepared, sized, log=stop_when_spent).best_val_loss)
            except _BudgetSpent:
                raise optuna.TrialPruned("time budget spent") from None
            trial.report(float(np.mean(losses)), i)
        durations.append(time.perf_counter() - started)
        return float(np.mean(losses))

    def keep_within_budget(study, trial):
        state = "pruned" if trial.state == optuna.trial.TrialState.PRUNED else f"{trial.value:.5f}" if trial.value is not None else trial.state.name
        log(f"search trial {trial.number}: fold-mean validation MSE {state} {trial.params} "
            f"({time.perf_counter() - began:.0f} s of {budget_s:.0f})")
        longest = max(durations) if durations else 0.0
        if time.perf_counter() - began + longest > budget_s:
            study.stop()

    study = open_study(study_name or f"edgecast-fit-{os.getpid()}-{int(time.time())}", storage,
                       optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    defaults = default_params(base_cfg, lookbacks)
    if not study.trials:  # a shared study gets the default once, from its first worker
        study.enqueue_trial(defaults)
    study.optimize(objective, n_trials=trials, timeout=budget_s, callbacks=[keep_within_budget], catch=())
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError(f"no search trial completed within {budget_s:.0f} s: give a larger --search-budget")
    best = study.best_trial
    chosen = trial_config(optuna.trial.FixedTrial(best.params), base_cfg, lookbacks)
    default_trials = [t for t in done if {k: v for k, v in t.params.items()} == defaults]
    return {"params": best.params, "config": chosen, "default_params": defaults, "lookbacks": lookbacks,
            "trials": len(study.trials), "completed": len(done), "seconds": round(time.perf_counter() - began, 1),
            "budget_s": budget_s, "folds": len(splits), "best_value": best.value, "best_trial": best.number,
            "default_value": default_trials[0].value if default_trials else None,
            "study": study.study_name, "storage": storage or "in memory"}
