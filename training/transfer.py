"""Transfer learning: fine-tune a shipped bundle on a little data from a new machine, optionally with the LSTM
layers frozen, and measure the gain over training the same architecture from scratch on the same data.

A bundle carries ONNX only; `model_from_bundle` rebuilds the PyTorch model from the ONNX weights (LSTM gate
order i,o,f,c -> PyTorch's i,f,g,o) and checks it reproduces the bundle's outputs before anything is trained.
The new machine: a synthetic pump with other constants (another seed), `--hours` of it for training +
validation, the next `--test-hours` for the test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from training.cli import SHIPPED_DIR


def _reorder_gates(w: np.ndarray, hidden: int) -> np.ndarray:
    i, o, f, c = (w[k * hidden : (k + 1) * hidden] for k in range(4))  # ONNX order
    return np.concatenate([i, f, c, o])  # PyTorch order: input, forget, cell (g), output


def model_from_bundle(bundle_dir: str | Path = SHIPPED_DIR):
    """The bundle's LSTMForecaster with its weights, verified against the bundle's ONNX (max abs diff <= 1e-5)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from training.model import LSTMForecaster

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    arch = manifest["architecture"]
    if arch.get("type") != "lstm" or manifest.get("strategy") != "mimo":
        raise ValueError(f"{bundle_dir}: fine-tuning reads 'lstm' MIMO bundles, this one is {arch.get('type')}/{manifest.get('strategy')}")
    features, targets = manifest["features"], manifest["targets"]
    model = LSTMForecaster(len(features), manifest["horizon"], [features.index(t) for t in targets],
                           arch["hidden_size"], arch["num_layers"], arch.get("dropout", 0.0))
    graph = onnx.load(str(bundle_dir / manifest["onnx"]["file"]))
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    lstm_nodes = [n for n in graph.graph.node if n.op_type == "LSTM"]
    state = {}
    hidden = arch["hidden_size"]
    for layer, node in enumerate(lstm_nodes):
        w, r, b = (weights[name][0] for name in node.input[1:4])  # (4H, in), (4H, H), (8H,)
        state[f"lstm.weight_ih_l{layer}"] = _reorder_gates(w, hidden)
        state[f"lstm.weight_hh_l{layer}"] = _reorder_gates(r, hidden)
        state[f"lstm.bias_ih_l{layer}"] = _reorder_gates(b[: 4 * hidden], hidden)
        state[f"lstm.bias_hh_l{layer}"] = _reorder_gates(b[4 * hidden :], hidden)
    for key in model.state_dict():
        if key.startswith("head."):
            state[key] = weights[key]
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()})
    model.eval()
    session = ort.InferenceSession(str(bundle_dir / manifest["onnx"]["file"]), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, manifest["lookback"], len(features))).astype(np.float32)
    with torch.no_grad():
        diff = float(np.abs(model(torch.from_numpy(x)).numpy() - session.run(["y"], {"x": x})[0]).max())
    if diff > 1e-5:
        raise ValueError(f"{bundle_dir}: the rebuilt PyTorch model differs from the ONNX graph by {diff:.2e}")
    return model, manifest


def scaler_from_manifest(manifest: dict):
    from training.data import MinMaxScaler, StandardScaler

    params = manifest["scaler"]["params"]
    cols = manifest["features"]
    if manifest["scaler"]["type"] == "standard":
        return StandardScaler(np.array([params[f]["mean"] for f in cols]), np.array([params[f]["std"] for f in cols]))
    return MinMaxScaler(np.array([params[f]["min"] for f in cols]), np.array([params[f]["max"] for f in cols]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=str(SHIPPED_DIR), help="the bundle to fine-tune (an 'lstm' MIMO bundle)")
    parser.add_argument("--hours", type=float, default=24.0, help="hours of new-machine data to train and validate on")
    parser.add_argument("--test-hours", type=float, default=48.0, help="the following hours, for the test")
    parser.add_argument("--seed", type=int, default=77, help="the new machine: a synthetic pump drawn with this seed")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--freeze-lstm", action="store_true", help="also report fine-tuning with the LSTM layers frozen")
    parser.add_argument("--out", help="write the fine-tuned bundle here (and transfer.json)")


def run(args: argparse.Namespace) -> int:
    from training import evaluate
    from training.bundle import export_bundle, torch_predictor
    from training.data import Split, prepare
    from simulation.synth import FleetConfig, generate_fleet
    from training.train import TrainConfig, fit

    shipped, manifest = model_from_bundle(args.bundle)
    total = args.hours + args.test_hours
    rows = generate_fleet(FleetConfig(devices=1, hours=total, seed=args.seed, faults="none")).rows
    train_share = args.hours / total
    split = Split(fractions=(train_share * 0.8, train_share * 0.2, 1 - train_share))
    prepared = prepare(rows, manifest["lookback"], manifest["horizon"], manifest["sampling_period_s"],
                       features=manifest["features"], targets=manifest["targets"], split=split,
                       fitted_scaler=scaler_from_manifest(manifest))
    arch = manifest["architecture"]
    cfg = TrainConfig(lookback=manifest["lookback"], horizon=manifest["horizon"], hidden_size=arch["hidden_size"],
                      num_layers=arch["num_layers"], dropout=arch.get("dropout", 0.1), epochs=args.epochs,
                      learning_rate=args.learning_rate, train_stride=1, patience=3, lr_schedule="plateau", seed=0)
    print(f"new machine (seed {args.seed}): {len(prepared.starts['train'])} training windows "
          f"({args.hours * 0.8:.1f} h), {len(prepared.starts['test'])} test windows ({args.test_hours:.0f} h)")

    def test_rmse(model) -> float:
        return evaluate.metrics(prepared, torch_predictor(model), "test")["model"]["rmse"]

    results = {"zero_shot": test_rmse(shipped)}
    baseline = evaluate.metrics(prepared, torch_predictor(shipped), "test")["repeat_last"]["rmse"]
    scratch = fit(prepared, cfg, log=lambda *_: None)
    results["scratch"] = test_rmse(scratch.model)
    tuned = fit(prepared, cfg, log=lambda *_: None, model=model_from_bundle(args.bundle)[0])
    results["fine_tuned"] = test_rmse(tuned.model)
    if args.freeze_lstm:
        frozen_model = model_from_bundle(args.bundle)[0]
        for p in frozen_model.lstm.parameters():
            p.requires_grad_(False)
        frozen = fit(prepared, cfg, log=lambda *_: None, model=frozen_model)
        results["fine_tuned_frozen_lstm"] = test_rmse(frozen.model)
    summary = {"bundle": str(args.bundle), "new_machine_seed": args.seed, "train_hours": args.hours, "test_hours": args.test_hours,
               "epochs": args.epochs, "test_rmse": {k: round(v, 5) for k, v in results.items()}, "repeat_last_rmse": round(baseline, 5),
               "gain_over_scratch_pct": round(100 * (results["scratch"] - results["fine_tuned"]) / results["scratch"], 1)}
    if "fine_tuned_frozen_lstm" in results:
        summary["gain_frozen_over_scratch_pct"] = round(100 * (results["scratch"] - results["fine_tuned_frozen_lstm"]) / results["scratch"], 1)
    print("| model | test RMSE (original units, all targets) |\n|---|---|")
    print(f"| repeat-last | {baseline:.4f} |")
    for k, v in results.items():
        print(f"| {k} | {v:.4f} |")
    print(f"fine-tuning gain over training from scratch on the same {args.hours:.0f} h: {summary['gain_over_scratch_pct']}% lower RMSE"
          + (f"; LSTM frozen: {summary['gain_frozen_over_scratch_pct']}%" if "gain_frozen_over_scratch_pct" in summary else ""))
    if args.out:
        export_bundle(tuned.model, prepared, cfg, args.out, name=f"{manifest['name']}-finetuned", command=args.invocation,
                      history=tuned.history, training_info={"transfer": summary}, extra_report={"transfer": summary})
        Path(args.out, "transfer.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return 0
