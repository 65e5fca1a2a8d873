"""The forecaster: a small LSTM encoder with a MIMO head that predicts all horizon steps at once.

The head predicts the change from the last observed value of each target, so the untrained model starts as
the repeat-last baseline and training only has to learn the dynamics on top of it.
"""

from __future__ import annotations

import torch
from torch import nn

from training.architectures import run_lstm


class LSTMForecaster(nn.Module):
    def __init__(self, n_features: int, horizon: int, target_index: list[int], hidden_size: int = 64,
                 num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.horizon = horizon
        self.n_targets = len(target_index)
        self.register_buffer("target_index", torch.tensor(target_index, dtype=torch.long), persistent=False)
        self.lstm = nn.LSTM(n_features, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                  nn.Linear(hidden_size, horizon * self.n_targets))
        nn.init.zeros_(self.head[-1].weight)  # start exactly at repeat-last
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, F) scaled features, oldest first
        encoded, _ = run_lstm(self.lstm, x)  # (B, L, hidden)
        delta = self.head(encoded[:, -1])  # (B, H * T)
        delta = delta.reshape(-1, self.horizon, self.n_targets)  # (B, H, T)
        last = x[:, -1:, :].index_select(2, self.target_index)  # (B, 1, T)
        return last + delta  # (B, H, T)
