"""Multi-step strategies, run *inside* the exported graph: whatever the strategy, the bundle maps
x (B, L, F) scaled features -> y (B, H, T) scaled targets, so the daemon runs every bundle unchanged.

- mimo: one core emits all H steps at once.
- recursive: a one-step core, unrolled H times, each step fed its own prediction. The fed-back row needs every
  feature: targets take their predicted value, a feature that is not a target is carried forward at its last
  observed value (its difference is 0 in differenced mode). Trained on the one-step error (teacher forcing).
- direct: H independent cores, core h predicts step h from the observed window only.
- dirrec: H cores chained: core h sees the window extended by the predictions of steps 1..h-1 (same
  carry-forward rule); trained with the true earlier values in their place (teacher forcing).

Differencing (optional) also lives in the graph: the cores see first differences of the scaled window
(divided by a per-feature spread fitted on training windows) and predict per-step differences; the graph
accumulates them onto the last observed level. The manifest's scaler stays the one for levels.
"""

from __future__ import annotations

import torch
from torch import nn

from training.architectures import CoreConfig, build_core

STRATEGIES = ("mimo", "recursive", "direct", "dirrec")


class Forecaster(nn.Module):
    def __init__(self, architecture: str, strategy: str, n_features: int, target_index: list[int], horizon: int,
                 core: CoreConfig | None = None, difference: bool = False):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        core = core or CoreConfig()
        self.architecture, self.strategy, self.horizon, self.difference = architecture, strategy, horizon, difference
        self.n_features, self.n_targets = n_features, len(target_index)
        self.register_buffer("target_index", torch.tensor(target_index, dtype=torch.long))
        keep = torch.ones(n_features)
        keep[target_index] = 0
        place = torch.zeros(len(target_index), n_features)  # (T, F) one-hot: target j -> its feature column
        place[torch.arange(len(target_index)), torch.tensor(target_index)] = 1
        self.register_buffer("keep", keep)  # (F,) 1 for features that are not targets
        self.register_buffer("place", place)
        self.register_buffer("diff_scale", torch.ones(n_features))  # (F,) spread of the differences
        n_t = len(target_index)
        if strategy == "mimo":
            self.cores = nn.ModuleList([build_core(architecture, n_features, n_t, horizon, core)])
        elif strategy == "recursive":
            self.cores = nn.ModuleList([build_core(architecture, n_features, n_t, 1, core)])
        else:
            self.cores = nn.ModuleList(build_core(architecture, n_features, n_t, 1, core) for _ in range(horizon))

    # ------------------------------------------------------------------ representation
    def fit_difference_scale(self, x: torch.Tensor) -> None:
        """Set the per-feature spread of first differences from training windows x (W, L, F)."""
        if self.difference:
            spread = (x[:, 1:] - x[:, :-1]).reshape(-1, x.shape[2]).std(dim=0)  # (F,)
            self.diff_scale.copy_(torch.where(spread > 1e-6, spread, torch.ones_like(spread)))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled levels (B, L, F) -> what the cores see: levels, or scaled differences (B, L-1, F)."""
        return (x[:, 1:] - x[:, :-1]) / self.diff_scale if self.difference else x

    def _targets_of(self, seq: torch.Tensor) -> torch.Tensor:
        return seq.index_select(2, self.target_index)  # (B, S, T)

    @property
    def _chained(self) -> bool:
        return self.strategy in ("recursive", "dirrec")

    def _step_scale(self) -> torch.Tensor:
        return self.diff_scale[self.target_index] if self.difference else torch.ones_like(self.diff_scale[self.target_index])

    # Core outputs ("deltas"), per strategy and mode:
    #   mimo/direct, levels:      change from the last observed level, per horizon step
    #   otherwise (differenced, or recursive/dirrec): the step's increment over the previous step, scaled by
    #   diff_scale when differenced; levels are their cumulative sum onto the last observed level.
    def _levels(self, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Core outputs (B, H, T) -> scaled target levels (B, H, T)."""
        last = self._targets_of(x[:, -1:])  # (B, 1, T)
        if self.difference or self._chained:
            return last + torch.cumsum(deltas * self._step_scale(), dim=1)
        return last + deltas

    def _teacher(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The true core outputs for targets y (B, H, T)."""
        last = self._targets_of(x[:, -1:])  # (B, 1, T)
        if self.difference or self._chained:
            return torch.diff(torch.cat([last, y], dim=1), dim=1) / self._step_scale()  # (B, H, T)
        return y - last

    def _next_row(self, seq: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The input row a one-step prediction adds: targets take it, other features are carried forward."""
        # step: (B, 1, T) increment of the targets over seq's last row (core units)
        if self.difference:
            return step @ self.place  # (B, 1, F) scaled differences; 0 = carried forward
        level = self._targets_of(seq[:, -1:]) + step  # (B, 1, T)
        return seq[:, -1:] * self.keep + level @ self.place  # (B, 1, F)

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, F) scaled features, oldest first -> (B, H, T) scaled targets
        return self._levels(x, self._deltas(x, teacher=None))

    def _deltas(self, x: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        seq = self._encode(x)  # (B, S, F)
        if self.strategy == "mimo":
            return self.cores[0](seq, teacher)  # (B, H, T)
        if self.strategy == "direct":
            return torch.cat([core(seq) for core in self.cores], dim=1)  # (B, H, T)
        outputs = []
        for h in range(self.horizon):
            core = self.cores[0] if self.strategy == "recursive" else self.cores[h]
            step = core(seq)  # (B, 1, T)
            outputs.append(step)
            if h + 1 < self.horizon:
                fed = step if teacher is None else teacher[:, h : h + 1]  # own prediction, or the truth in training
                row = self._next_row(seq, fed)  # (B, 1, F)
                # recursive slides the window; dirrec grows it (core h sees S + h rows)
                seq = torch.cat([seq[:, 1:] if self.strategy == "recursive" else seq, row], dim=1)
        return torch.cat(outputs, dim=1)  # (B, H, T)

    def fit_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) pair the training loss compares, in scaled level units."""
        teacher = self._teacher(x, y)  # (B, H, T)
        last = self._targets_of(x[:, -1:])  # (B, 1, T)
        if self.strategy == "recursive":  # the classic recursive training: the one-step error
            step = self.cores[0](self._encode(x))  # (B, 1, T)
            return last + step * self._step_scale(), y[:, :1]
        if self.strategy == "dirrec":  # teacher forcing: each step predicted from the true earlier steps
            previous = torch.cat([last, y[:, :-1]], dim=1)  # (B, H, T) true level before each step
            return previous + self._deltas(x, teacher) * self._step_scale(), y
        return self._levels(x, self._deltas(x, teacher)), y

    def describe(self) -> dict:
        return {"type": self.architecture, "strategy": self.strategy, "difference": self.difference,
                "models": len(self.cores), "parameters": sum(p.numel() for p in self.parameters())}
