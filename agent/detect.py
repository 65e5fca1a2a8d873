"""Residual scoring and the alert state machine.

`ResidualScorer` is the single definition of the anomaly score (docs/contracts.md); training's calibration
runs the same class over validation data so the thresholds mean the same thing on the device.
"""

from __future__ import annotations

import numpy as np


class ResidualScorer:
    """Per-device EWMA of squared normalized one-step residuals; score = sqrt(max over targets)."""

    def __init__(self, residual_mean: np.ndarray, residual_std: np.ndarray, scale: np.ndarray, alpha: float):
        # residual_mean / residual_std: (H, T) in scaled units; only step 0 (one step ahead) is used here.
        self.mean0 = np.asarray(residual_mean, dtype=np.float64)[0]  # (T,)
        self.std0 = np.maximum(np.asarray(residual_std, dtype=np.float64)[0], 1e-6)  # (T,)
        self.scale = np.asarray(scale, dtype=np.float64)  # (T,) original units per scaled unit
        self.alpha = float(alpha)

    def initial_state(self, n_devices: int = 1) -> np.ndarray:
        return np.ones((n_devices, self.mean0.shape[0]), dtype=np.float64)  # (D, T)

    def z(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """Normalized residuals; observed and forecast in original units, (..., T)."""
        return ((observed - forecast) / self.scale - self.mean0) / self.std0

    def update(self, state: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One EWMA step in place; state (D, T) or (T,), z the same shape. Returns the score(s)."""
        state *= 1.0 - self.alpha
        state += self.alpha * np.square(z)
        return np.sqrt(state.max(axis=-1))

    def score_series(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """Scores of one device's consecutive samples, (N, T) each -> (N,); the offline twin of `update`."""
        zs = self.z(observed, forecast)  # (N, T)
        state = self.initial_state(1)[0]  # (T,)
        out = np.empty(zs.shape[0], dtype=np.float64)
        for i in range(zs.shape[0]):
            out[i] = self.update(state, zs[i])
        return out


def anomaly_score(score: float | np.ndarray, warning: float) -> float | np.ndarray:
    """Map an unbounded score to [0, 1): 0.5 exactly at the warning threshold."""
    return score / (score + warning)
