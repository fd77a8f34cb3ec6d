"""Streaming error statistics between a reference tensor and its quantized counterpart.

For a reference ``a`` (float) and a candidate ``b`` (quantized), over every element of every sample
seen so far (the tensors are treated as one long vector, so nothing is kept between batches)::

    MSE    = sum((a - b)**2) / n
    SQNR   = 10 * log10(sum(a**2) / sum((a - b)**2))   dB; +inf when b == a exactly
    cosine = sum(a * b) / sqrt(sum(a**2) * sum(b**2))  1.0 when both are all zeros

Shared by the analyzer (per tensor), ``compare`` and ``verify`` (per model output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TensorStats:
    """Running sums for MSE / SQNR / cosine between a reference and a candidate tensor."""

    n: int = 0
    sse: float = 0.0  # sum of squared errors
    ref_energy: float = 0.0  # sum(a**2)
    out_energy: float = 0.0  # sum(b**2)
    dot: float = 0.0
    max_abs_err: float = 0.0

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        a = np.asarray(ref, dtype=np.float64).reshape(-1)
        b = np.asarray(out, dtype=np.float64).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {np.shape(ref)} vs {np.shape(out)}")
        d = a - b
        self.n += a.size
        self.sse += float(d @ d)
        self.ref_energy += float(a @ a)
        self.out_energy += float(b @ b)
        self.dot += float(a @ b)
        if d.size:
            self.max_abs_err = max(self.max_abs_err, float(np.abs(d).max()))

    @property
    def mse(self) -> float:
        return self.sse / self.n if self.n else 0.0

    @property
    def sqnr_db(self) -> float:
        if self.sse == 0.0:
            return math.inf
        if self.ref_energy == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref_energy / self.sse)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_energy * self.out_energy)
        if denom == 0.0:
            return 1.0 if self.ref_energy == self.out_energy else 0.0
        return max(-1.0, min(1.0, self.dot / denom))

    def to_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "sqnr_db": self.sqnr_db, "cosine": self.cosine, "max_abs_err": self.max_abs_err,
                "elements": self.n}


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    s = TensorStats()
    s.update(ref, out)
    return s.sqnr_db
