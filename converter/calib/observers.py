"""Streaming statistics for calibration: memory is bounded, whatever the number of samples.

``MinMaxObserver`` keeps two numbers. ``HistogramObserver`` keeps ``bins`` counts over a range
that grows when new data falls outside it: the range doubles towards the side that overflowed
and pairs of neighbouring bins merge into one, which is exact (no re-interpolation), so the
histogram is always the true histogram of everything seen at the current resolution::

    [lo, hi) with N bins of width w  ->  [lo, 2hi - lo) with N bins of width 2w
    new[i] = old[2i] + old[2i+1] for i < N/2, then zeros

Percentile ranges are read from the cumulative counts; the range always includes 0.
"""

from __future__ import annotations

import numpy as np


class MinMaxObserver:
    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.min = min(self.min, float(x.min()))
            self.max = max(self.max, float(x.max()))

    def range(self) -> tuple[float, float]:
        if self.min > self.max:  # never saw data
            return 0.0, 0.0
        return self.min, self.max


class HistogramObserver(MinMaxObserver):
    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo = self.hi = None

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        super().update(x)
        if self.lo is None:
            lo, hi = self.min, self.max
            if hi <= lo:
                hi = lo + max(abs(lo), 1e-6) * 1e-3
            self.lo, self.hi = lo, hi
        while self.min < self.lo or self.max >= self.hi:
            self._grow(low=self.min < self.lo)
        hist, _ = np.histogram(x, bins=self.bins, range=(self.lo, self.hi))
        self.counts += hist

    def _grow(self, low: bool) -> None:
        width = self.hi - self.lo
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        half = self.bins // 2
        new = np.zeros_like(self.counts)
        if low:  # extend downwards: old data lands in the upper half
            new[half:] = merged
            self.lo -= width
        else:
            new[:half] = merged
            self.hi += width
        self.counts = new

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """Range keeping ``percentile`` % of the values: (100 - p) / 2 % is clipped on each side."""
        total = self.counts.sum()
        if total == 0:
            return self.range()
        tail = (100.0 - percentile) / 200.0 * total
        cdf = np.cumsum(self.counts)
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
        lo = max(float(edges[lo_bin]), self.min)
        hi = min(float(edges[min(hi_bin + 1, self.bins)]), self.max)
        return min(lo, 0.0), max(hi, 0.0)


def make_observer(method: str):
    return HistogramObserver() if method == "percentile" else MinMaxObserver()


def observer_range(obs, method: str, percentile: float) -> tuple[float, float]:
    if method == "percentile":
        return obs.percentile_range(percentile)
    return obs.range()
