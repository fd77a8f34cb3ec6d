"""Latency of two ONNX Runtime sessions, timed so the ratio can be quoted.

Both sessions run the same feed, interleaved (float, quantized, float, ...), so machine noise (another process,
a frequency change) hits both alike. After ``warmup`` untimed runs of each, pairs are timed until ``min_runs``
pairs and ``min_seconds`` of timing have passed (at most ``max_runs`` pairs). Reported per model: the median and
the 10th-90th percentiles. The ratio is the median over pairs of (quantized run / the float run beside it): a
burst of load hits both runs of a pair, so it cancels in the pair's ratio, where a ratio of the two medians
still moved by a third under bursts (EfficientNet-Lite0 against itself, load average 5-16 on 2 cores: x0.65
once in three runs).

Sessions timed this way should not spin (``session.intra_op.allow_spinning`` 0, as ``quantize``'s quality block
makes them): after its run each session's thread pool spins for a while and takes the cores from the other's run,
so whoever ran first in a pair was faster. Measured on PP-OCRv4's recognizer W8A8 on 2 cores, three timings of 20
pairs each: with spinning the pairs' median ratios were 1.10-1.31 with FP32 first and 0.91-1.17 with the quantized
model first (the medians' ratio 1.04-1.16 across six timings); without, 1.18-1.21 and 1.14-1.16 (1.16-1.19 across
three), and FP32's median 20.7-21.0 ms instead of 22.8-25.5.

Below :data:`TOO_FAST_MS` per run (the float model's median) timer and scheduler noise are a large share of the
time, so no ratio is given ("too fast to time"); the medians are still reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

TOO_FAST_MS = 1.0


@dataclass(frozen=True)
class PairedLatency:
    float_ms: list[float]
    quant_ms: list[float]

    @staticmethod
    def _stats(ms: list[float]) -> dict[str, float]:
        a = np.asarray(ms, dtype=np.float64)
        return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
                "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean())}

    @property
    def too_fast(self) -> bool:
        return float(np.median(self.float_ms)) < TOO_FAST_MS

    @property
    def ratio(self) -> float | None:
        """Median over interleaved pairs of quantized / float; None when too fast to time."""
        if self.too_fast:
            return None
        return float(np.median(np.asarray(self.quant_ms) / np.asarray(self.float_ms)))

    def to_dict(self) -> dict[str, Any]:
        return {"float": self._stats(self.float_ms), "quant": self._stats(self.quant_ms), "runs": len(self.float_ms),
                "ratio": self.ratio, "too_fast_to_time": self.too_fast, "too_fast_ms": TOO_FAST_MS,
                "method": "medians of interleaved runs, spread p10-p90; ratio: median of the pairs' ratios"}


def paired_latency(run_float: Callable[[], Any], run_quant: Callable[[], Any], min_runs: int = 20,
                   min_seconds: float = 0.5, max_runs: int = 500, warmup: int = 2) -> PairedLatency:
    """Time ``run_float`` and ``run_quant`` interleaved (see the module doc)."""
    for _ in range(warmup):
        run_float()
        run_quant()
    f_ms: list[float] = []
    q_ms: list[float] = []
    start = time.perf_counter()
    while len(f_ms) < max_runs and (len(f_ms) < min_runs or time.perf_counter() - start < min_seconds):
        for fn, out in ((run_float, f_ms), (run_quant, q_ms)) if len(f_ms) % 2 == 0 else \
                ((run_quant, q_ms), (run_float, f_ms)):  # alternate who goes first: no order bias
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000.0)
    return PairedLatency(f_ms, q_ms)


def format_latency(lat: dict[str, Any], what: str) -> str:
    """One line: medians, spreads and the ratio (or why there is none)."""
    f, q = lat["float"], lat["quant"]
    ratio = (f"quantized/float x{lat['ratio']:.2f} (median of the paired runs' ratios)" if lat["ratio"] is not None else
             f"too fast to time (under {lat['too_fast_ms']:g} ms): no ratio")
    return (f"latency {what}, median (p10-p90) of {lat['runs']} interleaved runs: float {f['median_ms']:.3f} ms "
            f"({f['p10_ms']:.3f}-{f['p90_ms']:.3f})  quantized {q['median_ms']:.3f} ms ({q['p10_ms']:.3f}-"
            f"{q['p90_ms']:.3f})  {ratio}")
