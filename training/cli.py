"""The `train` and `build-shipped` commands: data -> training -> ONNX export -> metrics -> calibration -> bundle."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from training.synth import FEATURES, FaultSpec, FleetConfig

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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="fleet CSV (columns as written by `synth`)")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced as a whole)")
    parser.add_argument("--name", default=BUNDLE_NAME)
    parser.add_argument("--eval-data", help="optional CSV with labeled faults to measure detection delay")
    parser.add_argument("--eval-schedule", help="fault schedule JSON of --eval-data (from synth --schedule-out)")
    _add_model_arguments(parser)


def add_build_shipped_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(SHIPPED_DIR), help=f"bundle folder (default {SHIPPED_DIR})")
    parser.add_argument("--quick", action="store_true", help="a fast, rough model (2 epochs, sparse windows)")
    _add_model_arguments(parser)


def _train_config(args: argparse.Namespace, quick: bool = False):
    from training.train import TrainConfig

    cfg = TrainConfig(epochs=2, train_stride=8) if quick else TrainConfig()
    for field in ("epochs", "hidden_size", "num_layers", "batch_size", "learning_rate", "train_stride", "seed", "threads"):
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)
    return cfg


def build_bundle(rows, cfg, out_dir, name: str, version: str, command: str, data_info: dict,
                 eval_rows=None, eval_schedule=None, log=print) -> dict:
    """Train, export, verify, evaluate and calibrate; write the bundle; return the manifest."""
    import torch

    from training import calibrate, evaluate
    from training.data import prepare, to_device_series
    from training.export import OnnxPredictor, export_onnx, utc_now, write_bundle
    from training.train import fit

    began = time.perf_counter()
    prepared = prepare(rows, cfg.lookback, cfg.horizon, data_info.get("period_s", 60))
    log(f"data: {len(prepared.series)} devices, windows train {len(prepared.starts['train'])} "
        f"val {len(prepared.starts['val'])} test {len(prepared.starts['test'])}")
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
        calibration, scorer, _ = calibrate.calibrate(prepared, predict)
        thresholds = calibration["thresholds"]
        log(f"calibration: thresholds {thresholds}, validation scores {calibration['validation_score_quantiles']}")
        checks = {"healthy_test": calibrate.healthy_alert_check(prepared, predict, scorer, thresholds, "test")}
        log(f"healthy test split: {checks['healthy_test']['alerts']} alerts in {checks['healthy_test']['device_hours']} device-hours")
        if eval_rows is not None:
            eval_series = to_device_series(eval_rows, prepared.period_s)
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
            "strategy": "mimo",
            "architecture": {"type": "lstm", "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                             "dropout": cfg.dropout, "head": "mlp, predicts the change from the last observed value"},
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
        report = {"history": result.history, "checks": checks}
        write_bundle(out_dir, onnx_path, manifest, {"report.json": json.dumps(report, indent=2) + "\n",
                                                    "README.md": model_card(manifest, checks)})
    log(f"wrote {out_dir} in {time.perf_counter() - began:.0f} s")
    return manifest


def model_card(manifest: dict, checks: dict) -> str:
    """A short human-readable summary of the bundle (the manifest stays the source of truth)."""
    test = manifest["metrics"]["test"]
    cal = manifest["calibration"]
    lines = [
        f"# {manifest['name']} {manifest['version']}", "",
        f"LSTM ({manifest['architecture']['num_layers']} x {manifest['architecture']['hidden_size']}), MIMO head, "
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


def run_train(args: argparse.Namespace) -> int:
    from training.synth import read_csv

    cfg = _train_config(args)
    try:
        rows = read_csv(args.data)
        eval_rows = read_csv(args.eval_data) if args.eval_data else None
        schedule = json.loads(Path(args.eval_schedule).read_text()) if args.eval_schedule else []
    except (OSError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    try:
        build_bundle(rows, cfg, args.out, args.name, args.version, args.invocation, {"csv": args.data, "period_s": 60},
                     eval_rows, schedule)
    except ValueError as exc:  # unusable data (too short, duplicate timestamps, ...): nothing is written
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


def run_build_shipped(args: argparse.Namespace) -> int:
    from training.synth import generate_fleet

    cfg = _train_config(args, quick=args.quick)
    train_fleet = generate_fleet(SHIPPED_TRAIN_FLEET)
    eval_fleet = generate_fleet(SHIPPED_EVAL_FLEET)
    data_info = {"synthetic": {k: v for k, v in asdict(SHIPPED_TRAIN_FLEET).items() if k != "faults"},
                 "faults": train_fleet.schedule, "period_s": SHIPPED_TRAIN_FLEET.period_s, "features": FEATURES}
    build_bundle(train_fleet.rows, cfg, args.out, BUNDLE_NAME, args.version, args.invocation, data_info,
                 eval_fleet.rows, eval_fleet.schedule)
    return 0
