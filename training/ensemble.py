"""Ensembles: several trained forecasters averaged inside one graph, exported as one bundle the daemon runs like
any other (x (B, L, F) -> y (B, H, T)).

`python -m training ensemble --members many_to_one:mimo,attention:mimo,cnn_lstm:direct --out runs/ensemble`
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class EnsembleForecaster(nn.Module):
    """The mean of its members' forecasts (all members share lookback, horizon, features and targets)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        strategies = sorted({getattr(m, "strategy", "mimo") for m in members})
        self.strategy = strategies[0] if len(strategies) == 1 else "ensemble:" + "+".join(strategies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0).mean(dim=0)  # (M, B, H, T) -> (B, H, T)

    def describe(self) -> dict:
        members = [m.describe() if hasattr(m, "describe") else {"type": "lstm", "strategy": "mimo"} for m in self.members]
        return {"type": "ensemble", "combine": "mean", "members": members,
                "parameters": sum(p.numel() for p in self.parameters())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cli import add_toolbox_arguments

    parser.add_argument("--members", default="many_to_one:mimo,attention:mimo,cnn_lstm:mimo",
                        help="comma-separated ARCHITECTURE:STRATEGY, each trained with its own seed")
    add_toolbox_arguments(parser, out_required=True)


def run(args: argparse.Namespace) -> int:
    from training.bundle import export_bundle, torch_predictor
    from training.cli import load_training_data, toolbox_config
    from training import evaluate
    from training.train import fit

    try:
        prepared, data_info = load_training_data(args)
    except ValueError as exc:
        print(f"ensemble: {exc}")
        return 2
    members, histories, per_member = [], [], []
    base = toolbox_config(args)
    for i, spec in enumerate(s for s in args.members.split(",") if s.strip()):
        arch, _, strategy = spec.strip().partition(":")
        cfg = toolbox_config(args, architecture=arch, strategy=strategy or "mimo", seed=base.seed + i)
        print(f"member {i}: {arch} / {cfg.strategy}")
        result = fit(prepared, cfg, log=print)
        m = evaluate.metrics(prepared, torch_predictor(result.model), "val")
        per_member.append({"architecture": arch, "strategy": cfg.strategy, "seed": cfg.seed, "val_rmse": m["model"]["rmse"]})
        members.append(result.model)
        histories.extend({**h, "member": i} for h in result.history)
    ensemble = EnsembleForecaster(members).eval()
    m = evaluate.metrics(prepared, torch_predictor(ensemble), "val")
    print(f"validation RMSE: members {[round(p['val_rmse'], 4) for p in per_member]}, ensemble {m['model']['rmse']:.4f}")
    export_bundle(ensemble, prepared, base, args.out, name=args.name, version=args.version, command=args.invocation,
                  history=[h for h in histories if h["member"] == 0],
                  training_info={"data": data_info, "members": per_member}, calibration=args.calibration,
                  extra_report={"members": per_member, "ensemble_val_rmse": m["model"]["rmse"]})
    return 0
