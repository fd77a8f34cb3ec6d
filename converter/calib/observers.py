"""Streaming statistics for calibration: memory is bounded, whatever the number of samples.

Every observer gets, per run of the model, the exact min and max of its tensor (computed by
ReduceMin/ReduceMax inside ONNX Runtime) and, for the histogram methods, the values themselves
(or a strided subsample of them, see :mod:`.runner`). Nothing proportional to the number of
samples is kept:

* :class:`MinMaxObserver` keeps the running min/max and their exponential moving average over
  batches (``minmax_ema``: ``m <- m + momentum * (batch_m - m)``, first batch taken as is, like
  PyTorch's MovingAverageMinMaxObserver; ``momentum`` is 1 - TensorFlow's ``ema_decay``).
* :class:`HistogramObserver` also keeps a signed histogram of ``2 * B`` bins over ``[-H, H)``
  with ``H`` a power of two, so 0 is always a bin edge and ``|x|`` folds exactly out of it. When
  data reaches ``|x| >= H`` the range doubles and neighbouring bins merge in pairs, outwards from
  zero on each side, which is exact (no re-interpolation)::

      [-H, H), width w  ->  [-2H, 2H), width 2w
      pos'[i] = pos[2i] + pos[2i+1],  neg'[i] = neg[2i] + neg[2i+1]   (i < B/2, then zeros)

  Because ``B`` and ``H`` are powers of two, a value's bin ``floor(x * B / H)`` is computed
  without rounding error: the histogram equals ``np.histogram`` over the final range, always.
  ``B = 2 * bins`` so that at least ``bins`` bins (TensorRT's 2048) cover ``[0, max|x|]``.

Range selection (:func:`observer_range`) follows the quantization grid of the tensor:
symmetric encodings and one-sided data use the ``|x|`` histogram (TensorRT style), asymmetric
encodings of data with both signs use the signed histogram.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..config import calib_method_spec
from ..errors import ConfigError
from . import ranges

log = logging.getLogger("converter")

MINMAX_METHODS = ("minmax", "minmax_ema")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
METHODS = MINMAX_METHODS + HISTOGRAM_METHODS
_MIN_LIMIT = 2.0**-100  # histograms never get finer than this (float32 scale factors stay normal)


@dataclass(frozen=True)
class ObserverSettings:
    """Knobs of the observers; :meth:`from_config` reads them from a QuantConfig."""

    bins: int = 2048  # at least this many bins cover [0, max|x|]
    ema_momentum: float = 0.01
    subsample: int = 16384  # histogram values per sample and tensor (0: every value)

    @classmethod
    def from_config(cls, config: Any) -> "ObserverSettings":
        d = cls()
        return cls(bins=getattr(config, "histogram_bins", d.bins),
                   ema_momentum=getattr(config, "ema_momentum", d.ema_momentum),
                   subsample=getattr(config, "histogram_subsample", d.subsample))


class MinMaxObserver:
    """Running min/max, and their moving average over batches."""

    needs_values = False

    def __init__(self, momentum: float = 0.01) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.momentum = momentum
        self.ema_min = self.ema_max = None
        self._batch_min, self._batch_max = np.inf, -np.inf
        self._warned = False

    def update(self, x: np.ndarray | None = None, lo: float | None = None, hi: float | None = None) -> None:
        """Add one run's statistics: the values ``x`` and/or their exact ``lo``/``hi``."""
        if lo is None or hi is None:
            if x is None or not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = self._finite_range(x)
            if lo is None:
                return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._batch_min, self._batch_max = min(self._batch_min, lo), max(self._batch_max, hi)

    def end_batch(self) -> None:
        """Close one calibration batch (the unit of the moving average)."""
        if self._batch_min > self._batch_max:
            return
        if self.ema_min is None:
            self.ema_min, self.ema_max = self._batch_min, self._batch_max
        else:
            self.ema_min += self.momentum * (self._batch_min - self.ema_min)
            self.ema_max += self.momentum * (self._batch_max - self.ema_max)
        self._batch_min, self._batch_max = np.inf, -np.inf

    def range(self) -> tuple[float, float]:
        if self.min > self.max:  # never saw data
            return 0.0, 0.0
        return float(self.min), float(self.max)

    def ema_range(self) -> tuple[float, float]:
        if self.ema_min is None:
            self.end_batch()  # a caller that never closed a batch: the data seen so far is one batch
        if self.ema_min is None:
            return self.range()
        return float(self.ema_min), float(self.ema_max)

    def state_nbytes(self) -> int:
        return 64

    def _finite_range(self, x: np.ndarray | None) -> tuple[float | None, float | None]:
        if not self._warned:
            log.warning("calibration: a tensor holds inf/NaN values; they are ignored for its range")
            self._warned = True
        if x is None:
            return None, None
        finite = x[np.isfinite(x)]
        if not finite.size:
            return None, None
        return float(finite.min()), float(finite.max())


class HistogramObserver(MinMaxObserver):
    """Min/max plus a bounded, exactly merged histogram (see the module docstring)."""

    needs_values = True

    def __init__(self, bins: int = 2048, momentum: float = 0.01) -> None:
        super().__init__(momentum)
        if bins < 2 or bins & (bins - 1):
            raise ValueError("bins must be a power of two")
        self.half = 2 * bins  # bins on each side of zero
        self.counts = np.zeros(2 * self.half, dtype=np.int64)
        self.limit: float | None = None  # H: the histogram covers [-H, H)
        self._amax_seen = 0.0

    # --- the histogram's range, as the analyzer reads it ----------------------------------------
    @property
    def lo(self) -> float | None:
        return None if self.limit is None else -self.limit

    @property
    def hi(self) -> float | None:
        return self.limit

    @property
    def width(self) -> float:
        return self.limit / self.half

    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, 2 * self.half + 1)

    def state_nbytes(self) -> int:
        return int(self.counts.nbytes) + 64

    # --- updates -----------------------------------------------------------------------------------
    def update(self, x: np.ndarray | None = None, lo: float | None = None, hi: float | None = None) -> None:
        if x is not None:
            x = np.asarray(x).reshape(-1)
            if x.dtype != np.float32:
                x = x.astype(np.float32)
        super().update(x, lo, hi)
        if self.min > self.max:
            return
        self._cover(max(-self.min, self.max))
        if x is not None and x.size:
            exact = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
            self._add(x, checked=exact)  # values within finite bounds of the whole tensor are finite

    def _cover(self, amax: float) -> None:
        if self.limit is None or self._amax_seen == 0.0:
            # only exact zeros so far (they sit in bin [0, w) whatever w is): choose the range afresh
            _, exp = math.frexp(max(amax, _MIN_LIMIT))
            self.limit = math.ldexp(1.0, exp)  # smallest power of two > amax
        while amax >= self.limit:
            self._grow()
        self._amax_seen = max(self._amax_seen, amax)

    def _grow(self) -> None:
        b = self.half
        new = np.zeros_like(self.counts)
        new[b:b + b // 2] = self.counts[b:].reshape(-1, 2).sum(axis=1)
        new[b // 2:b] = self.counts[:b].reshape(-1, 2).sum(axis=1)
        self.counts = new
        self.limit *= 2.0

    def _add(self, x: np.ndarray, checked: bool = False) -> None:
        if not checked and not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
            x = x[np.isfinite(x)]
        buf = np.multiply(x, np.float32(self.half / self.limit), dtype=np.float32)  # exact: a power of two
        np.floor(buf, out=buf)
        buf += np.float32(self.half)
        idx = buf.astype(np.intp)
        np.clip(idx, 0, 2 * self.half - 1, out=idx)
        self.counts += np.bincount(idx, minlength=2 * self.half)

    # --- views -------------------------------------------------------------------------------------
    def signed_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(histogram of -x for x < 0, histogram of x for x >= 0), both from 0 outwards at ``width``."""
        return self.counts[:self.half][::-1], self.counts[self.half:]

    def abs_counts(self) -> np.ndarray:
        neg, pos = self.signed_counts()
        return neg + pos

    def clipped_fraction(self, lo: float, hi: float, step: float = 0.0) -> float:
        """Estimated fraction of the values seen that an encoding over ``[lo, hi]`` with step ``step`` clips.

        Values within half a step of the range saturate with no more error than rounding, so the range is
        widened by ``step / 2``. Values are taken as spread evenly within each bin, the bins first cut to
        the observed ``[min, max]`` (a min/max range then clips nothing).
        """
        total = self.counts.sum()
        if total == 0 or self.limit is None:
            return 0.0
        lo, hi = lo - step / 2, hi + step / 2
        edges = self.edges()
        left, right = np.maximum(edges[:-1], self.min), np.minimum(edges[1:], self.max)
        width = right - left
        below = np.clip(np.minimum(right, lo) - left, 0, None)
        above = np.clip(right - np.maximum(left, hi), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(width > 0, np.clip((below + above) / width, 0, 1), ((left < lo) | (left > hi)).astype(float))
        return float((self.counts * frac).sum() / total)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """Range keeping ``percentile`` % of the values: (100 - p) / 2 % is clipped on each side."""
        total = self.counts.sum()
        if total == 0 or self.limit is None:
            return self.range()
        tail = (100.0 - percentile) / 200.0 * total
        cdf = np.cumsum(self.counts)
        edges = self.edges()
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
        lo = max(float(edges[min(lo_bin, 2 * self.half - 1)]), self.min)
        hi = min(float(edges[min(hi_bin + 1, 2 * self.half)]), self.max)
        return min(lo, 0.0), max(hi, 0.0)


def needs_histogram(method: str) -> bool:
    """Whether ``method`` (a method spec, e.g. ``percentile:99.9``) reads a histogram; ``auto`` does: its
    candidates are chosen from it (:mod:`converter.techniques.calib_choice`)."""
    base = calib_method_spec(method)[0]
    return base in HISTOGRAM_METHODS or base == "auto"


def make_observer(method: str, settings: ObserverSettings | None = None) -> MinMaxObserver:
    settings = settings or ObserverSettings()
    if needs_histogram(method):
        return HistogramObserver(settings.bins, settings.ema_momentum)
    return MinMaxObserver(settings.ema_momentum)


def resolve_methods(tensors: list[str], producer_op: Mapping[str, str], default: str,
                    overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Calibration method of each tensor: ``overrides`` keyed by tensor name, or ``op:<OpType>``
    (the op type producing the tensor); a tensor name wins over its op type, both over ``default``.
    """
    overrides = dict(overrides or {})
    by_op = {k[3:]: v for k, v in overrides.items() if k.startswith("op:")}
    by_name = {k: v for k, v in overrides.items() if not k.startswith("op:")}
    unknown = sorted(set(by_name) - set(tensors))
    if unknown:
        raise ConfigError(f"calib_overrides names {', '.join(map(repr, unknown[:5]))}, which "
                          f"{'is' if len(unknown) == 1 else 'are'} not a quantized activation of this model",
                          "use activation tensor names from the report's 'tensors' section, or 'op:<OpType>' keys")
    unused = sorted(set(by_op) - {producer_op.get(t) for t in tensors})
    if unused:
        log.warning("calib_overrides: no quantized activation is produced by %s", ", ".join(unused))
    return {t: by_name.get(t, by_op.get(producer_op.get(t, ""), default)) for t in tensors}


def observer_range(obs: MinMaxObserver, method: str, percentile: float = 99.999, symmetric: bool = False,
                   bits: int = 8) -> tuple[float, float]:
    """The range ``method`` chooses from ``obs`` for a ``bits``-bit grid (symmetric or not).

    ``method`` may carry its own percentile (``percentile:99.9``: that one instead of ``percentile``); ``auto``
    gives the min/max range until :mod:`converter.techniques.calib_choice` has chosen the tensor's method."""
    method, own = calib_method_spec(method)
    if own is not None:
        percentile = own
    if method in ("minmax", "auto") or obs.min > obs.max:
        return obs.range()
    if method == "minmax_ema":
        return obs.ema_range()
    if not isinstance(obs, HistogramObserver):
        raise ValueError(f"calibration method {method!r} needs a histogram; this tensor was observed with min/max only")
    if obs.limit is None or obs.counts.sum() == 0:
        return obs.range()
    lo, hi = obs.range()
    if symmetric or lo >= 0 or hi <= 0:
        t = _abs_threshold(obs, method, percentile, symmetric, bits)
        if symmetric:
            return max(lo, -t), min(hi, t)
        return (0.0, t) if lo >= 0 else (-t, 0.0)
    return _signed_range(obs, method, percentile, bits)


def _abs_threshold(obs: HistogramObserver, method: str, percentile: float, symmetric: bool, bits: int) -> float:
    """Threshold on |x| for a grid over [-t, t] (symmetric) or [0, t] (one-sided data, asymmetric)."""
    lo, hi = obs.range()
    amax = max(-lo, hi)
    hist = _trim(obs.abs_counts(), obs.width, amax)
    if method == "percentile":
        if not symmetric:  # asymmetric grids clip (100 - p) / 2 % on each side, like ONNX Runtime
            lo_p, hi_p = obs.percentile_range(percentile)
            return max(-lo_p, hi_p)
        return ranges.percentile_abs(hist, obs.width, percentile, amax)
    if method == "entropy":
        nq = 2 ** (bits - 1) if symmetric else 2**bits
        return min(ranges.entropy_bins(hist, nq) * obs.width, amax)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    return ranges.mse_threshold(hist, obs.width, levels, amax)


def _signed_range(obs: HistogramObserver, method: str, percentile: float, bits: int) -> tuple[float, float]:
    """Asymmetric grid over data of both signs: the signed histogram."""
    lo, hi = obs.range()
    if method == "percentile":
        return obs.percentile_range(percentile)
    neg, pos = obs.signed_counts()
    w = obs.width
    left, right = _used_bins(neg, w, -lo), _used_bins(pos, w, hi)
    if method == "entropy":
        keep_l, keep_r = ranges.entropy_window(obs.counts, obs.half, left, right, 2**bits)
        return max(lo, -keep_l * w), min(hi, keep_r * w)
    return ranges.mse_window(neg[:left], pos[:right], w, 2**bits - 1, -lo, hi)


def _used_bins(hist: np.ndarray, width: float, amax: float) -> int:
    nz = np.flatnonzero(hist)
    last = int(nz[-1]) + 1 if nz.size else 1
    return max(1, min(len(hist), max(last, math.ceil(amax / width))))


def _trim(hist: np.ndarray, width: float, amax: float) -> np.ndarray:
    """The histogram up to the bin holding ``amax`` (bins past the data carry no information)."""
    return hist[:_used_bins(hist, width, amax)]
