"""The `train` and `build-shipped` commands: data -> training -> ONNX export -> metrics -> calibration -> bundle."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from simulation.synth import FEATURES, FaultSpec, FleetConfig

BUNDLE_NAME = "pump-lstm"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "exported_models" / BUNDLE_NAME
# The shipped bundle's data: a fixed-seed training fleet and a separate, later evaluation fleet with one
# fault of each kind (onset 30 h in) and two healthy pumps.
SHIPPED_TRAIN_FLEET = FleetConfig(devices=8, hours=14 * 24.0, seed=0, faults="auto")
SHIPPED_EVAL_FLEET = FleetConfig(
    devices=6, hours=72.0, seed=1, start_ts=SHIPPED_TRAIN_FLEET.start_ts + 15 * 86400,
    faults=[FaultSpec("overheating", "pump-02", 30.0, 3.0), FaultSpec("bearing_wear", "pump-03", 30.0, 24.0),
            FaultSpec("spikes", "pump-04", 30.0, 2.0), FaultSpec("stuck_sensor", "pump-05", 30.0, 3.0)],
)
# The shipped fan bundle (`build-shipped --machine fan`, simulation/fans.py), the same way: a fixed-seed training
# fleet, a later evaluation fleet with one fault of each kind and two healthy fans. A smaller fleet and model than
# the pump's (2 x 32, 10 epochs): a second machine type should cost a few minutes on 2 cores, not a quarter hour.
FAN_BUNDLE_NAME = "fan-lstm"
FAN_SHIPPED_DIR = SHIPPED_DIR.parent / FAN_BUNDLE_NAME
FAN_TRAIN_FLEET = FleetConfig(devices=6, hours=10 * 24.0, seed=0, faults="auto")
FAN_EVAL_FLEET = FleetConfig(
    devices=6, hours=72.0, seed=1, start_ts=FAN_TRAIN_FLEET.start_ts + 11 * 86400,
    faults=[FaultSpec("imbalance", "fan-02", 30.0, 6.0), FaultSpec("belt_slip", "fan-03", 30.0, 6.0),
            FaultSpec("overheating", "fan-04", 30.0, 3.0), FaultSpec("stuck_sensor", "fan-05", 30.0, 3.0)],
)
# --machine -> (bundle name, folder, training fleet, evaluation fleet, TrainConfig fields that differ from the default)
SHIPPED = {
    "pump": (BUNDLE_NAME, SHIPPED_DIR, SHIPPED_TRAIN_FLEET, SHIPPED_EVAL_FLEET, {}),
    "fan": (FAN_BUNDLE_NAME, FAN_SHIPPED_DIR, FAN_TRAIN_FLEET, FAN_EVAL_FLEET,
            {"hidden_size": 32, "num_layers": 2, "epochs": 10, "train_stride": 4}),
}


TOOLBOX_FIELDS = ("architecture", "strategy", "difference", "lookback", "horizon", "dropout", "weight_decay", "loss",
                  "lr_schedule", "patience", "grad_clip", "teacher_forcing", "conv_channels", "precision", "micro_batch", "tbptt",
                  "progress", "checkpoint", "resume")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="most epochs (early stopping may end sooner)")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--train-stride", type=int, help="use every n-th training window per epoch")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--version", default="1.0.0", help="bundle version written to the manifest")
    _add_toolbox_model_arguments(parser)


def _add_toolbox_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The toolbox's choices; every default (None) keeps the shipped model's recipe."""
    from training.architectures import ARCHITECTURES
    from training.strategies import STRATEGIES

    g = parser.add_argument_group("model and training")
    g.add_argument("--architecture", choices=["lstm", *ARCHITECTURES], help="default lstm (the shipped model)")
    g.add_argument("--strategy", choices=STRATEGIES, help="multi-step strategy, run inside the exported graph (default mimo)")
    g.add_argument("--difference", action="store_const", const=True, help="first differences, inverted inside the graph")
    g.add_argument("--dropout", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--loss", choices=("mse", "mae", "huber"))
    g.add_argument("--lr-schedule", choices=("cosine", "plateau", "constant"))
    g.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--teacher-forcing", type=float, help="encoder_decoder: share of teacher-forced decoder steps")
    g.add_argument("--conv-channels", type=int, help="cnn_lstm")
    g.add_argument("--micro-batch", type=int, help="windows per forward/backward chunk; a batch's gradients are summed over chunks (default 32)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 autocast where the CPU has native bf16 (AMX, AVX512-BF16), else fp32")
    g.add_argument("--tbptt", type=int, help="many_to_one: truncated backpropagation through the last N steps")
    g.add_argument("--progress", action="store_const", const=True, help="a progress bar with the live losses")
    g.add_argument("--checkpoint", help="checkpoint file written after every epoch")
    g.add_argument("--resume", action="store_const", const=True, help="continue from --checkpoint if it exists")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data preparation")
    g.add_argument("--lookback", type=int, help="input window (default 60)")
    g.add_argument("--horizon", type=int, help="forecast steps (default 10)")
    g.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                   help="timestamp column (default: the first column named ts, timestamp, time, datetime or date, any case)")
    g.add_argument("--device-column", default="device", help="absent column = one series")
    g.add_argument("--features", help="comma-separated input features (default: every numeric column)")
    g.add_argument("--targets", help="comma-separated targets, a subset of the features (default: all)")
    g.add_argument("--period-s", "--period", dest="period_s", type=int, metavar="S",
                   help="resampling period in whole seconds (default: the median step between rows)")
    g.add_argument("--fill", choices=("ffill", "linear"), default="ffill", help="how gaps up to --max-fill are filled")
    g.add_argument("--max-fill", type=int, default=10, help="longest gap (periods) filled; longer gaps drop their windows")
    g.add_argument("--scaler", choices=("standard", "minmax"), default="standard", help="fitted on training rows only")
    g.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions per device, in time order")
    g.add_argument("--split-rows", help="TRAIN_END,VAL_END grid rows per device (instead of fractions)")
    g.add_argument("--split-times", help="VAL_START,TEST_START as unix seconds or ISO-8601 (instead of fractions)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="fleet CSV (columns as written by `synth`), or a Parquet dataset folder "
                        "(`to-parquet`): streamed, and data-parallel under torchrun (docs/distributed.md)")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced as a whole)")
    parser.add_argument("--name", default=BUNDLE_NAME)
    parser.add_argument("--eval-data", help="optional CSV with labeled faults to measure detection delay")
    parser.add_argument("--eval-schedule", help="fault schedule JSON of --eval-data (from synth --schedule-out)")
    from training import feedback

    feedback.add_arguments(parser)
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    from training.stream import add_stream_arguments

    add_stream_arguments(parser)


def add_build_shipped_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machine", choices=tuple(SHIPPED), default="pump",
                        help=f"pump (default: {BUNDLE_NAME}) or fan ({FAN_BUNDLE_NAME}, simulation/fans.py)")
    parser.add_argument("--out", help=f"bundle folder (default {SHIPPED_DIR}, or {FAN_SHIPPED_DIR} with --machine fan)")
    parser.add_argument("--quick", action="store_true", help="a fast, rough model (2 epochs, sparse windows)")
    _add_model_arguments(parser)


def _train_config(args: argparse.Namespace, quick: bool = False, recipe: dict | None = None):
    """TrainConfig: the defaults, then `recipe` (a shipped bundle's own fields), then --quick, then the options."""
    from training.train import TrainConfig

    cfg = TrainConfig(**(recipe or {}))
    if quick:
        cfg.epochs, cfg.train_stride = 2, 8
    for field in ("epochs", "hidden_size", "num_layers", "batch_size", "learning_rate", "train_stride", "seed", "threads",
                  *TOOLBOX_FIELDS, "max_batches"):  # max_batches: `train --max-batches` (memory and speed checks)
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)
    return cfg


def build_bundle(rows, cfg, out_dir, name: str, version: str, command: str, data_info: dict,
                 eval_rows=None, eval_schedule=None, log=print, features=None, targets=None,
                 prepare_kwargs: dict | None = None, min_steps: int = 0, false_alarm_rate: float | None = None,
                 state: bool | None = None, trained=None) -> dict:
    """Train, export, verify, evaluate and calibrate; write the bundle (+ report.md and plots); return the manifest.

    `prepare_kwargs` go to training.data.prepare (scaler, fill, max_fill_periods, split). `trained` = (Prepared,
    TrainResult) skips preparing and training: the streaming path (training.stream) trained already and hands over
    its evaluation devices."""
    import torch

    from training import calibrate

    from training import evaluate
    from training.data import prepare, to_device_series
    from training.export import OnnxPredictor, export_onnx, utc_now, write_bundle
    from training.bundle import architecture_section
    from training.report import report_files
    from training.train import fit, sized_for_data

    began = time.perf_counter()
    if trained is not None:
        prepared, result = trained
    else:
        prepared = prepare(rows, cfg.lookback, cfg.horizon, data_info.get("period_s", 60),
                           **({"features": list(features)} if features else {}), targets=targets, **(prepare_kwargs or {}))
        log(f"data: {len(prepared.series)} devices, windows train {len(prepared.starts['train'])} "
            f"val {len(prepared.starts['val'])} test {len(prepared.starts['test'])}")
    if min_steps and trained is None:
        cfg = sized_for_data(cfg, len(prepared.starts["train"]), min_steps)
        log(f"training: batch {cfg.batch_size}, every {cfg.train_stride} window(s), up to {cfg.epochs} epochs "
            f"(at least {min_steps} optimizer steps), patience {cfg.patience}")
    if trained is None:
        result = fit(prepared, cfg, log=log)
    log(f"trained {result.epochs_run} epochs in {result.seconds:.0f} s (best epoch {result.best_epoch})")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_info = export_onnx(result.model, onnx_path, cfg.lookback, len(prepared.features), cfg.seed)
        log(f"exported ONNX, verified at batch {onnx_info['verified']['batch_sizes']}: "
            f"max abs diff {onnx_info['verified']['max_abs_diff']:.2e}")
        predict = OnnxPredictor(onnx_path, threads=cfg.threads)
        test_metrics = evaluate.metrics(prepared, predict, "test")
        val_metrics = evaluate.metrics(prepared, predict, "val")
        log(evaluate.format_metrics("test", test_metrics))
        ratio = val_metrics["model"]["rmse"] / max(val_metrics["repeat_last"]["rmse"], 1e-12)
        if ratio >= 0.99:
            log(f"warning: the model does not beat repeat-last on validation (RMSE ratio {ratio:.4f}): its forecasts add "
                f"little; more rows, a longer --lookback or more --epochs may help (the state channels still score)")
        calibration, scorer, _ = calibrate.calibrate(
            prepared, predict, state=state, **({"false_alarm_rate": false_alarm_rate} if false_alarm_rate is not None else {}))
        thresholds = calibration["thresholds"]
        log(f"calibration: thresholds {thresholds}, validation scores {calibration['validation_score_quantiles']}")
        checks = {"healthy_test": calibrate.healthy_alert_check(prepared, predict, scorer, thresholds, "test")}
        log(f"healthy test split: {checks['healthy_test']['alerts']} alerts in {checks['healthy_test']['device_hours']} device-hours")
        if eval_rows is not None:
            eval_series = to_device_series(eval_rows, prepared.period_s, features=prepared.features)
            checks["eval_fleet"] = calibrate.fault_detection_check(eval_series, eval_schedule or [], prepared, predict,
                                                                   scorer, thresholds)
            for f in checks["eval_fleet"]["faults"]:
                delay = "not detected" if f["delay_min"] is None else f"detected after {f['delay_min']:.0f} min"
                log(f"eval fleet: {f['kind']:13s} on {f['device']}: {delay}")
            log(f"eval fleet: {checks['eval_fleet']['false_alerts']} alerts outside faults in "
                f"{checks['eval_fleet']['device_hours']} device-hours")
        manifest = {
            "schema_version": 1, "name": name, "version": version, "created_at": utc_now(),
            "features": prepared.features, "targets": prepared.targets,
            "lookback": cfg.lookback, "horizon": cfg.horizon, "sampling_period_s": prepared.period_s,
            "scaler": prepared.scaler.manifest(prepared.features),
            "strategy": getattr(result.model, "strategy", "mimo"),
            "architecture": architecture_section(result.model, cfg),
            "preprocessing": {"difference": bool(getattr(result.model, "difference", False)), "in_graph": True},
            "training": {"command": command, "config": cfg.to_dict(), "seed": cfg.seed, "epochs": result.epochs_run,
                         "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                         "train_rows": prepared.rows_per_split["train"], "val_rows": prepared.rows_per_split["val"],
                         "test_rows": prepared.rows_per_split["test"], "train_windows": int(len(prepared.starts["train"])),
                         "seconds": round(time.perf_counter() - began, 1), "data": data_info,
                         "torch_threads": torch.get_num_threads()},
            "onnx": onnx_info,
            "metrics": {"test": test_metrics, "validation": val_metrics},
            "calibration": calibration,
        }
        files = report_files(manifest, prepared, predict, result.history, {"checks": checks})  # report.json/.md, plots
        files["README.md"] = model_card(manifest, checks)
        write_bundle(out_dir, onnx_path, manifest, files)
    log(f"wrote {out_dir} in {time.perf_counter() - began:.0f} s")
    return manifest


def model_card(manifest: dict, checks: dict) -> str:
    """A short human-readable summary of the bundle (the manifest stays the source of truth)."""
    test = manifest["metrics"]["test"]
    cal = manifest["calibration"]
    lines = [
        f"# {manifest['name']} {manifest['version']}", "",
        f"{manifest['architecture']['type']} ({manifest['architecture']['num_layers']} x {manifest['architecture']['hidden_size']}), "
        f"strategy {manifest['strategy']}, "
        f"lookback {manifest['lookback']} -> horizon {manifest['horizon']} at {manifest['sampling_period_s']} s.", "",
        f"Regenerate: `{manifest['training']['command']}` ({manifest['training']['seconds']:.0f} s, "
        f"{manifest['training']['epochs']} epochs, best {manifest['training']['best_epoch']}).", "",
        f"## Test split ({test['windows']} windows, original units)", "",
        "| target | RMSE model | RMSE repeat-last | MAE model | MAE repeat-last |", "|---|---|---|---|---|",
        f"| all | {test['model']['rmse']:.4f} | {test['repeat_last']['rmse']:.4f} | {test['model']['mae']:.4f} | "
        f"{test['repeat_last']['mae']:.4f} |",
    ]
    for name, pt in test["per_target"].items():
        lines.append(f"| {name} | {pt['model']['rmse']:.4f} | {pt['repeat_last']['rmse']:.4f} | "
                     f"{pt['model']['mae']:.4f} | {pt['repeat_last']['mae']:.4f} |")
    t = cal["thresholds"]
    healthy = checks["healthy_test"]
    lines += ["", "## Anomaly calibration", "",
              f"Thresholds (score units): warning {t['warning']:.3f}, critical {t['critical']:.3f}, exit {t['exit']:.3f}; "
              f"EWMA alpha {cal['ewma_alpha']}.",
              f"Healthy test split: {healthy['alerts']} alerts in {healthy['device_hours']} device-hours."]
    for f in checks.get("eval_fleet", {}).get("faults", []):
        outcome = "not detected" if f["delay_min"] is None else f"alert after {f['delay_min']:.0f} min"
        lines.append(f"- {f['kind']} ({f['duration_min']:.0f} min) on {f['device']}: {outcome}")
    if "eval_fleet" in checks:
        lines.append(f"- alerts outside faults: {checks['eval_fleet']['false_alerts']} in "
                     f"{checks['eval_fleet']['device_hours']} device-hours")
    return "\n".join(lines) + "\n"


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _period(args: argparse.Namespace, rows: dict) -> int:
    """--period-s, or else the median step between a device's rows (the default of `fit` too)."""
    from training.fit import infer_period

    return infer_period(rows["ts"], rows["device"], getattr(args, "period_s", None))


def data_options(args: argparse.Namespace) -> dict:
    """training.data.prepare keyword arguments from the data-preparation options."""
    from training.data import Split

    if getattr(args, "split_rows", None):
        a, b = (int(v) for v in args.split_rows.split(","))
        split = Split(rows=(a, b))
    elif getattr(args, "split_times", None):
        split = Split(times=tuple(_parse_time(v) for v in args.split_times.split(",")))
    else:
        fractions = tuple(float(v) for v in args.split.split(","))
        if len(fractions) != 3:
            raise ValueError(f"--split needs three fractions train,val,test, got {args.split!r}")
        split = Split(fractions=fractions)
    return {"scaler": args.scaler, "fill": args.fill, "max_fill_periods": args.max_fill, "split": split}


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        from datetime import datetime, timezone

        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


def run_train(args: argparse.Namespace) -> int:
    from training.data import load_table
    from simulation.synth import read_csv

    if Path(args.data).is_dir():  # a Parquet dataset: streamed (training.stream), data-parallel under torchrun
        from training.stream import run_train as run_stream

        if getattr(args, "feedback", None):
            print("train: --feedback needs a CSV or Parquet file, not a streamed dataset folder", file=sys.stderr)
            return 2
        return run_stream(args)
    cfg = _train_config(args)
    try:
        rows, features = load_table(args.data, args.ts_column, args.device_column, _names(args.features))
        from training.feedback import from_args  # --feedback: operators' labels over the data's own

        rows["label"] = from_args(args, rows["ts"], rows["device"], rows["label"],
                                  single_series=set(rows["device"].tolist()) == {"series"})  # load_table's name for one series
        period = _period(args, rows)
        eval_rows = read_csv(args.eval_data) if args.eval_data else None
        schedule = json.loads(Path(args.eval_schedule).read_text()) if args.eval_schedule else []
        options = data_options(args)
    except (OSError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    try:
        build_bundle(rows, cfg, args.out, args.name, args.version, args.invocation, {"csv": args.data, "period_s": period},
                     eval_rows, schedule, features=features, targets=_names(args.targets), prepare_kwargs=options)
    except ValueError as exc:  # unusable data (too short for the windows, ...): nothing is written
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


def run_build_shipped(args: argparse.Namespace) -> int:
    from simulation.synth import generate_fleet, machine_type

    machine_name = getattr(args, "machine", "pump")
    name, folder, train_config, eval_config, recipe = SHIPPED[machine_name]
    machine = machine_type(machine_name)
    cfg = _train_config(args, quick=args.quick, recipe=recipe)
    train_fleet = generate_fleet(train_config, machine)
    eval_fleet = generate_fleet(eval_config, machine)
    data_info = {"synthetic": {k: v for k, v in asdict(train_config).items() if k != "faults"},
                 "faults": train_fleet.schedule, "period_s": train_config.period_s, "features": list(machine.features)}
    if machine_name != "pump":  # the pump bundle's manifest stays as it was
        data_info["synthetic"]["machine"] = machine_name
    build_bundle(train_fleet.rows, cfg, args.out or str(folder), name, args.version, args.invocation, data_info,
                 eval_fleet.rows, eval_fleet.schedule, features=list(machine.features))
    return 0


# ----------------------------------------------------------------------------- shared by the toolbox commands


def add_toolbox_arguments(parser: argparse.ArgumentParser, out_required: bool = False) -> None:
    """Data (a file, or a synthetic fleet when --data is left out), model, training and bundle options."""
    parser.add_argument("--data", help="CSV or Parquet with a timestamp column (default: a synthetic fleet)")
    parser.add_argument("--synthetic-devices", type=int, default=3)
    parser.add_argument("--synthetic-hours", type=float, default=72.0)
    parser.add_argument("--out", required=out_required, help="output folder")
    parser.add_argument("--name", default="edgecast-model", help="bundle name in the manifest")
    parser.add_argument("--calibration", choices=("full", "residual"), default="full",
                        help="full: the daemon's detector sets the thresholds on validation data; residual: statistics only")
    _add_model_arguments(parser)
    _add_data_arguments(parser)


def toolbox_config(args: argparse.Namespace, **overrides):
    """TrainConfig from the options: the toolbox defaults (many_to_one, plateau schedule) unless given."""
    cfg = _train_config(args)
    if getattr(args, "architecture", None) is None:
        cfg.architecture = "many_to_one"
    if getattr(args, "lr_schedule", None) is None:
        cfg.lr_schedule = "plateau"
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def load_training_data(args: argparse.Namespace):
    """(Prepared, data description) from --data or a synthetic fleet, with the data-preparation options."""
    from training.data import load_table, prepare
    from simulation.synth import generate_fleet

    cfg = toolbox_config(args)
    if args.data:
        rows, features = load_table(args.data, args.ts_column, args.device_column, _names(args.features))
        info = {"file": args.data}
    else:
        fleet_cfg = FleetConfig(devices=args.synthetic_devices, hours=args.synthetic_hours, seed=0, faults="auto")
        rows, features = generate_fleet(fleet_cfg).rows, list(FEATURES)
        info = {"synthetic": {k: v for k, v in asdict(fleet_cfg).items() if k != "faults"}}
    period = _period(args, rows)
    prepared = prepare(rows, cfg.lookback, cfg.horizon, period, features=features, targets=_names(args.targets),
                       **data_options(args))
    info.update({"period_s": period, "train_windows": int(len(prepared.starts["train"])),
                 "val_windows": int(len(prepared.starts["val"])), "test_windows": int(len(prepared.starts["test"]))})
    return prepared, info


def add_cv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--mode", choices=("expanding", "sliding"), default="expanding")
    parser.add_argument("--initial", type=float, default=0.5, help="share of each series before the first fold")
    add_toolbox_arguments(parser)


def run_cv(args: argparse.Namespace) -> int:
    """Time-series cross-validation of one configuration."""
    from training.data import load_table
    from training.evaluate import cross_validate
    from simulation.synth import generate_fleet

    cfg = toolbox_config(args)
    if args.data:
        rows, features = load_table(args.data, args.ts_column, args.device_column, _names(args.features))
    else:
        rows = generate_fleet(FleetConfig(devices=args.synthetic_devices, hours=args.synthetic_hours, seed=0, faults="auto")).rows
        features = list(FEATURES)
    options = {k: v for k, v in data_options(args).items() if k != "split"}
    result = cross_validate(rows, cfg, args.folds, args.mode, args.initial,
                            prepare_kwargs={"features": features, "targets": _names(args.targets), "period_s": _period(args, rows), **options})
    print(json.dumps(result["mean"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "cv.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def add_data_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or Parquet with a timestamp column")
    _add_data_arguments(parser)


def run_data_report(args: argparse.Namespace) -> int:
    """Resample, report gaps and the windows per split, without training."""
    from training.data import gap_report, load_table, prepare

    try:
        rows, features = load_table(args.data, args.ts_column, args.device_column, _names(args.features))
        period = _period(args, rows)
        options = data_options(args)
        prepared = prepare(rows, args.lookback or 60, args.horizon or 10, period, features=features,
                           targets=_names(args.targets), required_splits=(), **options)
    except (OSError, ValueError) as exc:
        print(f"data-report: {exc}", file=sys.stderr)
        return 2
    report = {"features": features, "targets": prepared.targets, "period_s": period,
              "gaps": gap_report(prepared.series, args.max_fill),
              "windows": {k: int(len(v)) for k, v in prepared.starts.items()},
              "scaler": prepared.scaler.manifest(features)}
    print(json.dumps(report, indent=2))
    return 0
