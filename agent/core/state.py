"""How far a sample lies from normal operation: PCA statistics of the scaled feature vector.

A forecaster sees surprises: the moment a level shifts, its residuals jump, but within a few samples it has
adopted the new level and the residuals look normal again. A machine that stays in an abnormal state needs a
second view that does not adapt: the distance of the current sample from the normal operation learned from
the training rows. Two classical statistics of a principal component model of those rows give it:

- T^2 (Hotelling): the Mahalanobis distance inside the k principal components (an unusual combination of
  the usual directions of variation), divided by k so that its mean on normal data is about 1;
- SPE (Q): the squared distance from the principal subspace (a correlation that normally holds is broken),
  divided by its mean on the training rows.

Both are computed here with numpy only (the daemon has no torch); training.calibrate fits the model and sets
how much of each statistic is the warning level (docs/contracts.md, "Anomaly score").
"""

from __future__ import annotations

import numpy as np


class NormalState:
    """PCA model of the normal rows in the bundle's scaled units; `statistics` maps samples to (T^2, SPE)."""

    def __init__(self, center, components, eigenvalues, spe_mean: float):
        self.center = np.asarray(center, dtype=np.float64)  # (F,) scaled units
        self.components = np.asarray(components, dtype=np.float64)  # (F, k) orthonormal columns
        self.inv_eigenvalues = 1.0 / np.asarray(eigenvalues, dtype=np.float64)  # (k,)
        F, k = self.components.shape
        if self.center.shape != (F,) or self.inv_eigenvalues.shape != (k,) or not 1 <= k <= F:
            raise ValueError(f"state model shapes do not fit: center {self.center.shape}, components {(F, k)}, "
                             f"eigenvalues {self.inv_eigenvalues.shape}")
        if not (np.isfinite(self.components).all() and np.isfinite(self.inv_eigenvalues).all() and (self.inv_eigenvalues > 0).all()):
            raise ValueError("state model holds non-finite or non-positive values")
        self.k = k
        self.has_spe = k < F  # with every component kept there is no residual subspace
        self.spe_mean = float(spe_mean) if self.has_spe else 1.0
        if not self.spe_mean > 0:
            raise ValueError(f"state spe_mean must be > 0, got {spe_mean!r}")

    @classmethod
    def fit(cls, rows: np.ndarray, variance: float = 0.9, max_components: int | None = None) -> "NormalState":
        """PCA of scaled normal rows (N, F): the fewest components that explain `variance` of the total."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] < 2:
            raise ValueError("the state model needs at least 2 rows")
        center = rows.mean(axis=0)  # (F,)
        centered = rows - center  # (N, F)
        cov = centered.T @ centered / max(rows.shape[0] - 1, 1)  # (F, F)
        eigenvalues, vectors = np.linalg.eigh(cov)
        eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]  # largest first
        total = max(float(eigenvalues.clip(min=0).sum()), 1e-12)
        k = int(np.searchsorted(np.cumsum(eigenvalues) / total, variance - 1e-12)) + 1
        k = min(k, max_components or rows.shape[1], rows.shape[1], rows.shape[0] - 1 if rows.shape[0] > 1 else 1)
        k = max(k, 1)
        # A component with (nearly) no variance on the training rows would make any movement along it infinite.
        floor = 1e-3 * total / rows.shape[1]
        model = cls(center, vectors[:, :k], np.maximum(eigenvalues[:k], floor), 1.0)
        if model.has_spe:
            model.spe_mean = max(float(model.raw_spe(rows).mean()), 1e-3 * floor)
        return model

    def raw_spe(self, scaled: np.ndarray) -> np.ndarray:
        z = scaled - self.center  # (K, F)
        return np.square(z - (z @ self.components) @ self.components.T).sum(axis=1)  # (K,)

    def statistics(self, scaled: np.ndarray) -> np.ndarray:
        """(K, F) scaled rows -> (K, 2): T^2 / k and SPE / its training mean (0 without a residual subspace)."""
        z = np.asarray(scaled, dtype=np.float64) - self.center  # (K, F)
        t = z @ self.components  # (K, k) scores
        out = np.empty((z.shape[0], 2), dtype=np.float64)
        out[:, 0] = (np.square(t) * self.inv_eigenvalues).sum(axis=1) / self.k
        if self.has_spe:
            out[:, 1] = np.square(z - t @ self.components.T).sum(axis=1) / self.spe_mean
        else:
            out[:, 1] = 0.0
        return out

    def to_manifest(self) -> dict:
        return {"center": [round(float(v), 7) for v in self.center],
                "components": [[round(float(v), 7) for v in row] for row in self.components],
                "eigenvalues": [float(1.0 / v) for v in self.inv_eigenvalues], "spe_mean": self.spe_mean}

    @classmethod
    def from_manifest(cls, section: dict) -> "NormalState":
        try:
            return cls(section["center"], section["components"], section["eigenvalues"], section.get("spe_mean", 1.0))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state model: {exc!r}") from None
