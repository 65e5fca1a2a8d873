"""Ensembles, each exported as one bundle the daemon runs like any other (x (B, L, F) -> y (B, H, T)):

- mean (averaging): several forecasters trained on all training windows, averaged inside one graph;
- bagging: members trained on moving-block bootstrap resamples of the training windows (blocks of consecutive
  windows, so the temporal structure inside a block survives), averaged;
- stacking: a non-negative least-squares meta-model per horizon step and target, fitted on out-of-fold member
  predictions: each member is also trained on expanding time-series folds of the training windows (per device,
  in time order, purged of windows that overlap the held-out block) and predicts the block after its fold, so the
  meta-model never sees a prediction made by a model that trained on that row; the members in the graph are the
  full-data ones;
- boosting: members trained in sequence, each on the residuals of the ensemble so far (stage k learns
  y - F_{k-1}(x) as a change from the last observed value), added with shrinkage nu; stages are added while the
  validation MSE improves (the best prefix is kept).

`python -m training ensemble --method all --members many_to_one:mimo,cnn_lstm:mimo,attention:mimo --out runs/ens`
writes runs/ens/{mean,bagging,stacking,boosting}/ bundles plus comparison.json / comparison.md (each method
against its members, averaging and repeat-last on validation and test, and the intervals' test coverage);
`--method bagging|stacking|boosting|mean` writes one bundle to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

METHODS = ("mean", "bagging", "stacking", "boosting")


def _describe(m: nn.Module) -> dict:
    return m.describe() if hasattr(m, "describe") else {"type": "lstm", "strategy": "mimo"}


def _strategy(members) -> str:
    strategies = sorted({getattr(m, "strategy", "mimo") for m in members})
    return strategies[0] if len(strategies) == 1 else "ensemble:" + "+".join(strategies)


class EnsembleForecaster(nn.Module):
    """The mean of its members' forecasts (all members share lookback, horizon, features and targets)."""

    def __init__(self, members: list[nn.Module], combine: str = "mean"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.strategy = _strategy(members)
        self.combine = combine  # "mean" or "bagging" (also a mean; recorded in the manifest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0).mean(dim=0)  # (M, B, H, T) -> (B, H, T)

    def describe(self) -> dict:
        return {"type": "ensemble", "combine": self.combine, "members": [_describe(m) for m in self.members],
                "parameters": sum(p.numel() for p in self.parameters())}


class StackedForecaster(nn.Module):
    """sum_m weights[h, t, m] * member_m(x)[h, t]: a per-step, per-target linear meta-model (weights >= 0)."""

    def __init__(self, members: list[nn.Module], weights: np.ndarray):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))  # (H, T, M)
        if w.shape[-1] != len(members):
            raise ValueError(f"stacking weights {tuple(w.shape)} do not match {len(members)} members")
        self.register_buffer("weights", w.permute(2, 0, 1).contiguous())  # (M, H, T)
        self.strategy = _strategy(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preds = torch.stack([m(x) for m in self.members], dim=0)  # (M, B, H, T)
        return (preds * self.weights.unsqueeze(1)).sum(dim=0)  # (B, H, T)

    def describe(self) -> dict:
        w = self.weights.permute(1, 2, 0)  # (H, T, M)
        return {"type": "ensemble", "combine": "stacking", "meta_model": "non-negative least squares per horizon step and target",
                "weights": np.round(w.numpy().astype(np.float64), 6).tolist(), "members": [_describe(m) for m in self.members],
                "parameters": sum(p.numel() for p in self.parameters())}


def _last_targets(x: torch.Tensor, target_index: torch.Tensor, horizon: int) -> torch.Tensor:
    return x[:, -1:].index_select(2, target_index).expand(-1, horizon, -1)  # (B, H, T)


class BoostedForecaster(nn.Module):
    """members[0](x) + shrinkage * sum_{k >= 1} (members[k](x) - last(x)): each later member forecasts the
    previous ensemble's residual as its change from the last observed target value."""

    def __init__(self, members: list[nn.Module], shrinkage: float, target_index, horizon: int):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shrinkage, self.horizon = float(shrinkage), int(horizon)
        self.register_buffer("target_index", torch.as_tensor(np.asarray(target_index), dtype=torch.long))
        self.strategy = _strategy(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        if len(self.members) > 1:
            last = _last_targets(x, self.target_index, self.horizon)
            for m in self.members[1:]:
                out = out + self.shrinkage * (m(x) - last)
        return out

    def describe(self) -> dict:
        return {"type": "ensemble", "combine": "boosting", "shrinkage": self.shrinkage, "stages": len(self.members),
                "members": [_describe(m) for m in self.members], "parameters": sum(p.numel() for p in self.parameters())}


class ResidualStage(nn.Module):
    """What a boosting stage trains (training.train.fit with model=...): base(x) (frozen, eval mode) + member(x) -
    last(x) fitted to y, i.e. the member learns the residual y - base(x) as a change from the last value. An
    untrained member (which repeats the last value) makes the stage equal to the base: fit keeps it when the member
    does not help on validation."""

    def __init__(self, base: nn.Module, member: nn.Module, target_index, horizon: int):
        super().__init__()
        self.base, self.member, self.horizon = base, member, int(horizon)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.register_buffer("target_index", torch.as_tensor(np.asarray(target_index), dtype=torch.long))

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base's dropout stays off: its residuals are the exported ensemble's
        return self

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.base(x).float() - _last_targets(x, self.target_index, self.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shift(x) + self.member(x)

    def fit_outputs(self, x: torch.Tensor, y: torch.Tensor):
        shift = self._shift(x)
        if hasattr(self.member, "fit_outputs"):  # the member's own training outputs on the residual targets
            pred, target = self.member.fit_outputs(x, y - shift)
            return pred, target
        return self.member(x), y - shift


# ------------------------------------------------------------------------------------------ resampling, folds


def block_bootstrap(starts: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """A moving-block bootstrap of the training window starts: len(starts) windows drawn as runs of `block`
    consecutive windows (each run from a uniformly drawn position, never running past a device's end or a gap)."""
    starts = np.asarray(starts)
    n = len(starts)
    block = int(max(1, min(block, n)))
    # a run ends where the next window does not follow on the same grid row (device boundary or gap)
    breaks = np.flatnonzero(np.diff(starts) != 1) + 1
    run_end = np.searchsorted(np.concatenate([breaks, [n]]), np.arange(n), side="right")
    run_end = np.concatenate([breaks, [n]])[run_end]  # (n,) exclusive end of each position's run
    picks = []
    while sum(len(p) for p in picks) < n:
        i = int(rng.integers(n))
        picks.append(np.arange(i, min(i + block, run_end[i])))
    return starts[np.concatenate(picks)[:n]]


def with_train_starts(prepared, starts: np.ndarray):
    """A view of `prepared` whose training windows are `starts` (resampled or a fold); nothing else copied."""
    return dataclasses.replace(prepared, starts={**prepared.starts, "train": np.asarray(starts, dtype=np.int64)})


def time_series_folds(prepared, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding time-series folds of the training windows: each device's windows are cut into folds + 1 blocks
    in time order; fold i trains on the blocks before block i + 1 (minus the windows whose span reaches into it:
    purged) and predicts block i + 1. Returns [(fit starts, held-out starts)]."""
    starts = prepared.starts["train"]
    offsets = np.asarray(prepared.offsets)
    device = np.searchsorted(offsets, starts, side="right") - 1
    span = prepared.lookback + prepared.horizon
    out = []
    for i in range(folds):
        fit, held = [], []
        for d in np.unique(device):
            s = starts[device == d]
            cuts = np.linspace(0, len(s), folds + 2).astype(int)
            block = s[cuts[i + 1] : cuts[i + 2]]
            if len(block) == 0:
                continue
            fit.append(s[: cuts[i + 1]][s[: cuts[i + 1]] + span <= block[0]])
            held.append(block)
        fit_s, held_s = np.concatenate(fit) if fit else np.zeros(0, np.int64), np.concatenate(held) if held else np.zeros(0, np.int64)
        if len(fit_s) and len(held_s):
            out.append((fit_s, held_s))
    if not out:
        raise ValueError("too few training windows for time-series folds")
    return out


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a w - b| subject to w >= 0, exactly, for few columns (every active set is tried; M <= 10)."""
    m = a.shape[1]
    if m > 10:
        raise ValueError("nnls here is exact by enumeration: at most 10 members")
    best, best_w = np.inf, np.zeros(m)
    for k in range(1, m + 1):
        for cols in itertools.combinations(range(m), k):
            sub = a[:, cols]
            w, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (w < 0).any():
                continue
            err = float(np.sum((sub @ w - b) ** 2))
            if err < best - 1e-12:
                best, best_w = err, np.zeros(m)
                best_w[list(cols)] = w
    return best_w


def stacking_weights(oof: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS meta-model per horizon step and target: oof (M, W, H, T) out-of-fold member forecasts, y (W, H, T)
    -> weights (H, T, M)."""
    _, _, h, t = oof.shape
    w = np.zeros((h, t, oof.shape[0]))
    for i in range(h):
        for j in range(t):
            w[i, j] = nnls(oof[:, :, i, j].T.astype(np.float64), y[:, i, j].astype(np.float64))
    return w


# --------------------------------------------------------------------------------------------------- training


def _specs(text: str) -> list[tuple[str, str]]:
    out = []
    for spec in (s for s in text.split(",") if s.strip()):
        arch, _, strategy = spec.strip().partition(":")
        out.append((arch, strategy or "mimo"))
    if not out:
        raise ValueError("--members names no member")
    return out


def _predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    from training.bundle import torch_predictor

    return torch_predictor(model)(x)


def _val_mse(model: nn.Module, prepared) -> float:
    x, y = prepared.windows(prepared.starts["val"])
    return float(np.mean((_predict(model, x) - y) ** 2))


class Trainer:
    """Trains members with training.train.fit (unchanged) on views of one Prepared; counts fits and seconds."""

    def __init__(self, prepared, args, log=print):
        from training.cli import toolbox_config

        self.prepared, self.args, self.log = prepared, args, log
        self.base = toolbox_config(args)
        self.fits, self.seconds = 0, 0.0

    def config(self, arch: str, strategy: str, seed: int):
        from training.cli import toolbox_config

        return toolbox_config(self.args, architecture=arch, strategy=strategy, seed=seed)

    def fit(self, arch: str, strategy: str, seed: int, prepared=None, model=None, quiet: bool = False):
        from training.train import fit

        began = time.perf_counter()
        result = fit(prepared or self.prepared, self.config(arch, strategy, seed), log=(lambda *_: None) if quiet else self.log,
                     model=model)
        self.fits += 1
        self.seconds += time.perf_counter() - began
        return result


def train_mean(trainer: Trainer, specs) -> tuple[list[nn.Module], list[dict]]:
    members, history = [], []
    for i, (arch, strategy) in enumerate(specs):
        trainer.log(f"member {i}: {arch} / {strategy} (all training windows)")
        result = trainer.fit(arch, strategy, trainer.base.seed + i)
        members.append(result.model)
        history.extend({**h, "member": i} for h in result.history)
    return members, history


def train_bagging(trainer: Trainer, specs, bags: int, block: int) -> tuple[nn.Module, list[nn.Module], list[dict]]:
    rng = np.random.default_rng(trainer.base.seed + 7919)
    members, history = [], []
    for i in range(bags):
        arch, strategy = specs[i % len(specs)]
        starts = block_bootstrap(trainer.prepared.starts["train"], block, rng)
        trainer.log(f"bag {i}: {arch} / {strategy} on a block bootstrap ({len(np.unique(starts))} distinct of "
                    f"{len(starts)} windows, blocks of {block})")
        result = trainer.fit(arch, strategy, trainer.base.seed + 100 + i, prepared=with_train_starts(trainer.prepared, starts))
        members.append(result.model)
        history.extend({**h, "member": i} for h in result.history)
    return EnsembleForecaster(members, combine="bagging").eval(), members, history


def train_stacking(trainer: Trainer, specs, members: list[nn.Module], folds: int) -> tuple[nn.Module, dict]:
    """Out-of-fold member forecasts on expanding time-series folds of the training windows -> NNLS weights."""
    prepared = trainer.prepared
    oof, ys = [], []
    for f, (fit_starts, held) in enumerate(time_series_folds(prepared, folds)):
        view = with_train_starts(prepared, fit_starts)
        x, y = prepared.windows(held)
        preds = []
        for i, (arch, strategy) in enumerate(specs):
            trainer.log(f"stacking fold {f}: member {i} ({arch} / {strategy}) on {len(fit_starts)} windows, "
                        f"predicting the next {len(held)}")
            preds.append(_predict(trainer.fit(arch, strategy, trainer.base.seed + i, prepared=view, quiet=True).model, x))
        oof.append(np.stack(preds))  # (M, W_f, H, T)
        ys.append(y)
    oof_all, y_all = np.concatenate(oof, axis=1), np.concatenate(ys)
    weights = stacking_weights(oof_all, y_all)  # (H, T, M)
    model = StackedForecaster(members, weights).eval()
    info = {"folds": len(oof), "out_of_fold_windows": int(y_all.shape[0]),
            "weights_mean_per_member": np.round(weights.mean(axis=(0, 1)), 4).tolist(),
            "weight_sum_mean": round(float(weights.sum(axis=2).mean()), 4)}
    trainer.log(f"stacking: NNLS weights per member (mean over steps and targets) {info['weights_mean_per_member']}")
    return model, info


def train_boosting(trainer: Trainer, specs, stages: int, shrinkage: float, first: nn.Module | None = None
                   ) -> tuple[nn.Module, dict, list[dict]]:
    """Stage 0 fits y; stage k fits the residual of stages < k; stop when the validation MSE stops improving."""
    prepared = trainer.prepared
    t_idx = prepared.target_index
    history = []
    arch, strategy = specs[0]
    if first is None:
        trainer.log(f"boosting stage 0: {arch} / {strategy}")
        result = trainer.fit(arch, strategy, trainer.base.seed)
        first = result.model
        history.extend({**h, "member": 0} for h in result.history)
    members = [first]
    current = BoostedForecaster(members, shrinkage, t_idx, prepared.horizon).eval()
    curve = [_val_mse(current, prepared)]
    for k in range(1, stages):
        arch, strategy = specs[k % len(specs)]
        from training.train import build_model

        member = build_model(trainer.config(arch, strategy, trainer.base.seed + 200 + k), prepared)
        stage = ResidualStage(current, member, t_idx, prepared.horizon)
        trainer.log(f"boosting stage {k}: {arch} / {strategy} on the residuals of stages < {k} (shrinkage {shrinkage})")
        result = trainer.fit(arch, strategy, trainer.base.seed + 200 + k, model=stage)
        history.extend({**h, "member": k} for h in result.history)
        candidate = BoostedForecaster(members + [stage.member], shrinkage, t_idx, prepared.horizon).eval()
        mse = _val_mse(candidate, prepared)
        trainer.log(f"boosting stage {k}: validation MSE {mse:.5f} (before {curve[-1]:.5f})")
        if not mse < curve[-1] * (1 - 1e-4):
            trainer.log(f"boosting: stage {k} does not improve validation, stopping at {len(members)} stage(s)")
            curve.append(mse)
            break
        members.append(stage.member)
        current = candidate
        curve.append(mse)
    for p in current.parameters():
        p.requires_grad_(True)
    return current, {"stages_kept": len(members), "shrinkage": shrinkage, "val_mse_per_stage": [round(v, 6) for v in curve]}, history


# --------------------------------------------------------------------------------------------------- reporting


def _scores(prepared, model) -> dict:
    from training import evaluate
    from training.bundle import torch_predictor

    out = {}
    for split in ("val", "test"):
        m = evaluate.metrics(prepared, torch_predictor(model), split)
        out[split] = {"rmse": m["model"]["rmse"], "mae": m["model"]["mae"], "repeat_last_rmse": m["repeat_last"]["rmse"]}
    return out


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| forecaster | val RMSE | test RMSE | val MAE | test MAE | test RMSE / repeat-last | 80 % cov. (test) | 95 % cov. (test) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cov = r.get("coverage") or {}
        c80 = f"{cov['0.8']:.3f}" if "0.8" in cov else ""
        c95 = f"{cov['0.95']:.3f}" if "0.95" in cov else ""
        ratio = r["test"]["rmse"] / max(r["test"]["repeat_last_rmse"], 1e-12)
        name = f"**{r['name']}**" if r.get("bundle") else r["name"]
        lines.append(f"| {name} | {r['val']['rmse']:.4f} | {r['test']['rmse']:.4f} | {r['val']['mae']:.4f} | "
                     f"{r['test']['mae']:.4f} | {ratio:.3f} | {c80} | {c95} |")
    return "\n".join(lines) + "\n"


def _repeat_last_row(prepared) -> dict:
    from training import evaluate

    row = {"name": "repeat-last (baseline)"}
    for split in ("val", "test"):
        m = evaluate.metrics(prepared, lambda x: np.zeros((len(x), prepared.horizon, len(prepared.targets)), np.float32), split)
        row[split] = {"rmse": m["repeat_last"]["rmse"], "mae": m["repeat_last"]["mae"], "repeat_last_rmse": m["repeat_last"]["rmse"]}
    return row


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cli import add_toolbox_arguments

    parser.add_argument("--members", default="many_to_one:mimo,attention:mimo,cnn_lstm:mimo",
                        help="comma-separated ARCHITECTURE:STRATEGY, each trained with its own seed")
    parser.add_argument("--method", choices=(*METHODS, "all"), default="mean",
                        help="mean (averaging), bagging, stacking, boosting, or all (one bundle each under --out, and a comparison)")
    parser.add_argument("--bags", type=int, help="bagging: members (default: one per --members entry)")
    parser.add_argument("--block", type=int, help="bagging: bootstrap block in consecutive windows (default lookback + horizon)")
    parser.add_argument("--folds", type=int, default=3, help="stacking: expanding time-series folds of the training windows")
    parser.add_argument("--stages", type=int, help="boosting: most stages (default: one per --members entry)")
    parser.add_argument("--shrinkage", type=float, default=0.5, help="boosting: each later stage's weight")
    add_toolbox_arguments(parser, out_required=True)


def run(args: argparse.Namespace) -> int:
    from training.bundle import export_bundle
    from training.cli import load_training_data
    from training.intervals import format_coverage

    try:
        prepared, data_info = load_training_data(args)
        specs = _specs(args.members)
    except ValueError as exc:
        print(f"ensemble: {exc}")
        return 2
    began = time.perf_counter()
    trainer = Trainer(prepared, args)
    methods = METHODS if args.method == "all" else (args.method,)
    block = args.block or prepared.lookback + prepared.horizon
    models, infos, histories = {}, {}, {}
    members, member_history = None, []
    if {"mean", "stacking"} & set(methods) or ("boosting" in methods and args.method == "all"):
        members, member_history = train_mean(trainer, specs)
    if "mean" in methods:
        models["mean"], histories["mean"] = EnsembleForecaster(members).eval(), member_history
    if "bagging" in methods:
        models["bagging"], bag_members, histories["bagging"] = train_bagging(trainer, specs, args.bags or len(specs), block)
        infos["bagging"] = {"bags": len(bag_members), "block": block}
    if "stacking" in methods:
        models["stacking"], infos["stacking"] = train_stacking(trainer, specs, members, args.folds)
        histories["stacking"] = member_history
    if "boosting" in methods:
        first = members[0] if members is not None else None
        models["boosting"], infos["boosting"], hist = train_boosting(trainer, specs, args.stages or len(specs), args.shrinkage, first)
        histories["boosting"] = ([h for h in member_history if h["member"] == 0] if first is not None else []) + hist
    # the comparison: members, each ensemble, repeat-last; validation and test, original units
    rows = [_repeat_last_row(prepared)]
    if members is not None:
        rows += [{"name": f"member {i}: {a}/{s}", **_scores(prepared, m)} for i, ((a, s), m) in enumerate(zip(specs, members))]
    if "bagging" in models:
        rows += [{"name": f"bag member {i}", **_scores(prepared, m)} for i, m in enumerate(models["bagging"].members)]
    if "boosting" in models:
        for k in range(1, len(models["boosting"].members)):
            prefix = BoostedForecaster(list(models["boosting"].members[:k]), args.shrinkage, prepared.target_index, prepared.horizon).eval()
            rows.append({"name": f"boosting, first {k} stage(s)", **_scores(prepared, prefix)})
    for method, model in models.items():
        rows.append({"name": {"mean": "averaging (mean)"}.get(method, method), "method": method, "bundle": True,
                     **_scores(prepared, model)})
    base = trainer.base
    out = Path(args.out)
    manifests = {}
    for method, model in models.items():
        folder = out / method if args.method == "all" else out
        report = {"method": method, "comparison": rows, **({method: infos[method]} if method in infos else {})}
        manifests[method] = export_bundle(
            model, prepared, base, folder, name=args.name if args.method != "all" else f"{args.name}-{method}",
            version=args.version, command=args.invocation, history=[h for h in histories[method] if h["member"] == 0],
            training_info={"data": data_info, "ensemble": {"method": method, "members": [f"{a}:{s}" for a, s in specs],
                                                           **infos.get(method, {})}},
            calibration=args.calibration, extra_report=report)
        cov = manifests[method]["metrics"]["test"].get("interval_coverage")
        print(f"{method}: " + format_coverage(cov))
        for r in rows:
            if r.get("method") == method and cov:
                r["coverage"] = {k: v["coverage"] for k, v in cov["levels"].items()}
                r["coverage_per_step"] = {k: v["per_step"] for k, v in cov["levels"].items()}
    table = comparison_markdown(rows)
    print(table)
    summary = {"command": args.invocation, "data": data_info, "methods": list(models), "members": [f"{a}:{s}" for a, s in specs],
               "fits": trainer.fits, "training_seconds": round(trainer.seconds, 1),
               "seconds": round(time.perf_counter() - began, 1), "comparison": rows, "details": infos}
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "comparison.md").write_text(f"`{args.invocation}`\n\n{table}", encoding="utf-8")
    print(f"ensemble: {trainer.fits} fits in {trainer.seconds:.0f} s; wrote {out}")
    return 0
