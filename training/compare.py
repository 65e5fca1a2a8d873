"""`python -m training compare`: every architecture x strategy on the same data (default: a synthetic fleet),
validation and test metrics in original units against the repeat-last and seasonal-naive baselines, and the
training time per epoch. Writes compare.json and compare.md (the table) under --out; `--export` also writes
each combination's bundle (verified ONNX) there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cli import add_toolbox_arguments

    parser.add_argument("--architectures", help="comma-separated (default: all)")
    parser.add_argument("--strategies", help="comma-separated (default: all)")
    parser.add_argument("--export", action="store_true", help="also write every combination's bundle")
    add_toolbox_arguments(parser)
    parser.set_defaults(out="runs/compare", calibration="residual")


def _row(arch: str, strategy: str, val: dict, test: dict, epoch_s: float, epochs: int, params: int) -> dict:
    return {"architecture": arch, "strategy": strategy, "epochs": epochs, "seconds_per_epoch": round(epoch_s, 2),
            "parameters": params,
            **{f"{split}_{who}_{m}": (d[who][m] if d.get(who) else None)
               for split, d in (("val", val), ("test", test))
               for who in ("model", "repeat_last", "seasonal_naive") for m in ("rmse", "mae", "smape")}}


def table(rows: list[dict]) -> str:
    lines = ["| architecture | strategy | val RMSE | val repeat-last | val seasonal-naive | test RMSE | test MAE | "
             "test repeat-last RMSE / MAE | test seasonal-naive RMSE | test SMAPE % | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['strategy']} | {fmt(r['val_model_rmse'])} | {fmt(r['val_repeat_last_rmse'])} | "
                     f"{fmt(r['val_seasonal_naive_rmse'])} | **{fmt(r['test_model_rmse'])}** | {fmt(r['test_model_mae'])} | "
                     f"{fmt(r['test_repeat_last_rmse'])} / {fmt(r['test_repeat_last_mae'])} | {fmt(r['test_seasonal_naive_rmse'])} | "
                     f"{r['test_model_smape']:.2f} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from training import evaluate
    from training.architectures import ARCHITECTURES
    from training.bundle import export_bundle, torch_predictor
    from training.cli import load_training_data, toolbox_config
    from training.strategies import STRATEGIES
    from training.train import fit

    archs = args.architectures.split(",") if args.architectures else list(ARCHITECTURES)
    strategies = args.strategies.split(",") if args.strategies else list(STRATEGIES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    prepared, info = load_training_data(args)
    print(f"data: {info}")
    rows = []
    for arch in archs:
        for strategy in strategies:
            cfg = toolbox_config(args, architecture=arch, strategy=strategy)
            result = fit(prepared, cfg, log=lambda *_: None)
            predict = torch_predictor(result.model)
            val, test = evaluate.metrics(prepared, predict, "val"), evaluate.metrics(prepared, predict, "test")
            epoch_s = sum(result.epoch_seconds) / max(len(result.epoch_seconds), 1)
            rows.append(_row(arch, strategy, val, test, epoch_s, len(result.history),
                             sum(p.numel() for p in result.model.parameters())))
            print(f"{arch:16s} {strategy:9s} val {val['model']['rmse']:.4f} test {test['model']['rmse']:.4f} "
                  f"(repeat-last {test['repeat_last']['rmse']:.4f}) {epoch_s:.2f} s/epoch  [{time.perf_counter() - began:.0f} s]", flush=True)
            if args.export:
                export_bundle(result.model, prepared, cfg, out / f"{arch}-{strategy}", name=f"{args.name}-{arch}-{strategy}",
                              command=args.invocation, history=result.history, calibration=args.calibration,
                              training_info={"data": info}, log=lambda *_: None)
    body = {"command": args.invocation, "data": info, "config": toolbox_config(args).to_dict(), "rows": rows,
            "seconds": round(time.perf_counter() - began, 1)}
    (out / "compare.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    md = (f"# Architecture x strategy on {info.get('synthetic') and 'the synthetic fleet' or info.get('file')}\n\n"
          f"`{args.invocation}` ({body['seconds']:.0f} s). Original units, all targets and horizon steps; "
          f"{info['val_windows']} validation / {info['test_windows']} test windows.\n\n" + table(rows))
    (out / "compare.md").write_text(md, encoding="utf-8")
    print(md)
    return 0
