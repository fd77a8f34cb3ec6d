"""Range selection from a histogram: percentile, entropy (KL divergence) and MSE.

Pure functions on count arrays; :mod:`.observers` decides which histogram (of ``|x|`` or of the
signed values) and which quantization grid a tensor gets.

Entropy (TensorRT / pytorch-quantization ``_compute_amax_entropy``): for every candidate threshold
of ``i`` bins (``i = 128 .. n``) the reference distribution ``P`` is ``hist[:i]`` with the clipped
outliers added to its last bin, the candidate ``Q`` is ``hist[:i]`` merged into ``nq`` quantized bins
(128 for int8 symmetric, 256 for uint8) and spread back evenly over the non-empty bins of each
chunk; the threshold minimising ``KL(P || Q)`` wins (the largest one on ties). Bin ``j`` belongs
to chunk ``floor(j * nq / i)`` (``np.digitize`` over ``linspace(0, i, nq + 1)`` in the reference).
Instead of the reference's Python loop (O(n^2) per tensor) every candidate is evaluated at once (at most
MAX_CANDIDATES of them, evenly strided, like the reference's ``stride`` argument)
from prefix sums::

    KL(i) = (1/N) [ sum_j p_j log p_j - N log N - sum_j p_j log q_j + N log C_i ]
    sum_j p_j log q_j = sum_k S_k log(S_k / Z_k) + L log q_first + R log q_last

with ``S_k``/``Z_k`` the count and the number of non-empty bins of chunk ``k``, ``C_i`` the counts
inside the window, ``L``/``R`` the outliers left and right of it and ``N`` the total. A window may
also start inside the histogram (``start > 0``): that is how asymmetric ranges of signed data are
searched (the window shrinks towards zero keeping its proportions). A window whose values all lie in
its last chunk is skipped: there P and Q are the same spike and KL is 0 however much is clipped
(the reference picks such a window for data with an empty region next to zero, e.g. a sigmoid).

MSE (pytorch-quantization ``mse``, AIMET tf-enhanced): expected squared error of quantizing the
histogram with a candidate range: in-range values pay the rounding noise ``step**2 / 12``, values
outside pay their squared distance to the clipping bound (bin centre, plus ``width**2 / 12`` for
the spread inside the bin). Candidates are the bin edges.
"""

from __future__ import annotations

import numpy as np

ENTROPY_START_BIN = 128  # TensorRT / pytorch-quantization: thresholds below bin 128 of 2048 are not tried
_BLOCK = 256  # candidates evaluated per vectorised block (bounds the temporary matrices)
_MSE_GRID = 512  # candidates per side for the two-sided MSE search
_TINY = 1e-300  # log(max(x, _TINY)): finite for x = 0, and x * log(...) = 0 there
MAX_CANDIDATES = 1024  # KL candidates per tensor: past this, every k-th threshold (pytorch-quantization's stride)


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    pos = x > 0
    out[pos] = x[pos] * np.log(x[pos])
    return out


def _prefix(x: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(x, dtype=np.float64)))


def kl_divergences(counts: np.ndarray, starts: np.ndarray, lengths: np.ndarray, nq: int) -> np.ndarray:
    """KL(P || Q) of each window ``counts[start:start + length]`` quantized into ``nq`` bins (inf if Q misses P)."""
    c = np.asarray(counts, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = c.sum()
    cum, cnz, clc = _prefix(c), _prefix(c > 0), _prefix(_xlogx(c))
    out = np.empty(len(starts))
    k = np.arange(nq + 1, dtype=np.int64)
    for b in range(0, len(starts), _BLOCK):
        a, i = starts[b:b + _BLOCK], lengths[b:b + _BLOCK]
        e = a + i
        bounds = a[:, None] + (k[None, :] * i[:, None] + nq - 1) // nq  # ceil(k * i / nq)
        s = np.diff(cum[bounds], axis=1)
        z = np.diff(cnz[bounds], axis=1)
        # sum_k S_k log(S_k / Z_k): empty chunks (S = 0) give 0 * finite = 0, and Z >= 1 wherever S > 0
        chunk_terms = (s * (np.log(np.maximum(s, _TINY)) - np.log(np.maximum(z, 1.0)))).sum(axis=1)
        rows = np.arange(len(a))
        last = ((i - 1) * nq) // i
        q_first = s[:, 0] / np.maximum(z[:, 0], 1.0)
        q_last = s[rows, last] / np.maximum(z[rows, last], 1.0)
        left, right = cum[a], total - cum[e]
        inside = cum[e] - cum[a]
        first, last_c = c[a], c[e - 1]
        plogp = (clc[e] - clc[a] - _xlogx(first) - _xlogx(last_c) + _xlogx(first + left) + _xlogx(last_c + right))
        plogq = chunk_terms + left * np.log(np.maximum(q_first, _TINY)) + right * np.log(np.maximum(q_last, _TINY))
        kl = (plogp - total * np.log(total) - plogq + total * np.log(np.maximum(inside, 1.0))) / total
        missing = (inside <= 0) | ((left > 0) & (q_first <= 0)) | ((right > 0) & (q_last <= 0))
        # degenerate: all the window's values lie in its last chunk (data that starts far from zero, e.g. a
        # sigmoid that never goes below 0.06): P and Q are then the same spike there and KL = 0 whatever is clipped
        missing |= cnz[bounds[rows, last]] - cnz[a] <= 0
        out[b:b + _BLOCK] = np.where(missing, np.inf, np.maximum(kl, 0.0))
    return out


def _candidates(start: int, stop: int) -> np.ndarray:
    """Window lengths ``start .. stop`` (both included), strided to at most MAX_CANDIDATES."""
    stride = max(1, -(-(stop - start + 1) // MAX_CANDIDATES))
    out = np.arange(stop, start - 1, -stride)[::-1]  # keep ``stop`` (no clipping) among the candidates
    return out


def _last_argmin(values: np.ndarray) -> int:
    return len(values) - 1 - int(np.argmin(values[::-1]))


def entropy_bins(hist: np.ndarray, nq: int, start: int = ENTROPY_START_BIN, zero_bin_hack: bool = True) -> int:
    """Number of bins of the ``|x|`` histogram ``hist`` kept by the KL search (threshold = bins * width)."""
    c = np.asarray(hist, dtype=np.float64).copy()
    n = len(c)
    if zero_bin_hack and n > 1:
        c[0] = c[1]  # the reference ignores the spike of exact zeros (ReLU outputs)
    if c.sum() <= 0 or n <= start or nq >= n:
        return n
    lengths = _candidates(start, n)
    kl = kl_divergences(c, np.zeros_like(lengths), lengths, nq)
    return int(lengths[_last_argmin(kl)])


def entropy_window(counts: np.ndarray, zero: int, left: int, right: int, nq: int,
                   start: int = ENTROPY_START_BIN) -> tuple[int, int]:
    """(bins kept below, bins kept above) ``zero`` for signed counts with data in ``[zero-left, zero+right)``.

    The window keeps the data's proportions: ``i`` bins split ``left : right``.
    """
    span = left + right
    if span <= start or nq >= span:
        return left, right
    lengths = _candidates(start, span)
    lows = np.rint(lengths * (left / span)).astype(np.int64)
    kl = kl_divergences(counts, zero - lows, lengths, nq)
    best = _last_argmin(kl)
    return int(lows[best]), int(lengths[best] - lows[best])


def _clip_costs(hist: np.ndarray, width: float, thresholds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Squared clipping error of the ``|x|`` histogram for each threshold (at bin edge index ``edges``)."""
    c = np.asarray(hist, dtype=np.float64)
    centers = (np.arange(len(c)) + 0.5) * width
    s0 = _prefix(c[::-1])[::-1]  # suffix sums: s0[j] = sum(c[j:])
    s1 = _prefix((c * centers)[::-1])[::-1]
    s2 = _prefix((c * centers**2)[::-1])[::-1]
    t = thresholds
    return s2[edges] - 2 * t * s1[edges] + t * t * s0[edges] + s0[edges] * width * width / 12


def mse_threshold(hist: np.ndarray, width: float, levels: int, amax: float) -> float:
    """Threshold ``t`` minimising the expected squared error of a grid of ``levels`` steps over ``[0, t]``."""
    c = np.asarray(hist, dtype=np.float64)
    if c.sum() <= 0 or amax <= 0:
        return amax
    edges = np.arange(1, len(c) + 1)
    t = np.minimum(edges * width, amax)
    inside = _prefix(c)[edges]
    cost = inside * (t / levels) ** 2 / 12 + _clip_costs(c, width, t, edges)
    return float(t[int(np.argmin(cost))])


def _grid(n: int) -> np.ndarray:
    if n <= _MSE_GRID:
        return np.arange(1, n + 1)
    return np.unique(np.rint(np.linspace(1, n, _MSE_GRID)).astype(np.int64))


def mse_window(neg: np.ndarray, pos: np.ndarray, width: float, levels: int, amin: float,
               amax: float) -> tuple[float, float]:
    """Range ``(lo, hi)`` with ``lo < 0 < hi`` minimising the expected squared error (asymmetric grid).

    ``neg`` and ``pos`` are the histograms of ``-x`` (x < 0) and of ``x`` (x >= 0) at the same width;
    ``amin``/``amax`` the magnitudes of the data's min and max.
    """
    ln, lp = _grid(len(neg)), _grid(len(pos))
    tn, tp = np.minimum(ln * width, amin), np.minimum(lp * width, amax)
    in_n, in_p = _prefix(neg)[ln], _prefix(pos)[lp]
    step = (tn[:, None] + tp[None, :]) / levels
    cost = (in_n[:, None] + in_p[None, :]) * step**2 / 12 \
        + _clip_costs(neg, width, tn, ln)[:, None] + _clip_costs(pos, width, tp, lp)[None, :]
    a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return -float(tn[a]), float(tp[b])


def percentile_abs(hist: np.ndarray, width: float, percentile: float, amax: float) -> float:
    """Smallest bin edge below which ``percentile`` % of the ``|x|`` values lie (at most ``amax``)."""
    c = np.asarray(hist, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return amax
    j = int(np.searchsorted(np.cumsum(c), percentile / 100.0 * total, side="left"))
    return float(min((min(j, len(c) - 1) + 1) * width, amax))
