"""The metrics: how far a quantized tensor or model output is from its FP32 counterpart. One definition and
one name per metric, used by ``verify``, the quantize report's ``quality`` block, ``analyze`` (per tensor and
per model), the accuracy search (its evaluator and layer sensitivity) and ONNX Runtime's optimization guard.

For a reference ``a`` (FP32) and a candidate ``b`` (quantized)::

    cosine   <a, b> / (|a| |b|), clipped to [-1, 1]
    sqnr     10 log10( sum a^2 / sum (a - b)^2 )   in dB          (report key: ``sqnr_db``)
    mse      sum (a - b)^2 / n
    top1-agreement   argmax a == argmax b, per sample (first output)
    top1             argmax b == label, per sample

Per sample (``sample_*``): one row of the batch axis, every value of the row flattened; the model metric is
the mean over samples. Whole-tensor (:func:`cosine`, :func:`sqnr_db`, :class:`TensorStats`): every value of
every sample as one long vector.

**Zero vectors** (one convention for every metric here):

* cosine of two all-zero vectors is 1.0 (they are identical); of an all-zero and a non-zero vector 0.0;
* SQNR of identical arrays (all-zero ones included) is +inf; of an all-zero reference and a non-zero
  candidate -inf (JSON has no infinities: reports write ``null`` or "inf"). The per-sample SQNR the search
  averages must be finite: :func:`sample_sqnr_db` floors both sums at :data:`SQNR_FLOOR`, so an identical
  sample scores ``10 log10(sum a^2 / 1e-30)`` (>= 300 dB for any sample with energy >= 1), an all-zero pair 0 dB;
* MSE of no values is 0.0.

**Arg-max ties**: numpy's rule, the first of the tied indices, on both sides; identical outputs always agree.

**Names** (:data:`ALIASES`): ``top1-agreement`` is the metric's one name; ``agreement`` (the search's old
``--target-metric`` spelling) is accepted for it, and ``verify``'s JSON keeps its key ``top1_agreement``;
``sqnr`` is written ``sqnr_db`` in reports (the unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelError

COSINE, SQNR, MSE, TOP1, AGREEMENT = "cosine", "sqnr", "mse", "top1", "top1-agreement"
ALIASES = {"agreement": AGREEMENT, "top1_agreement": AGREEMENT, "sqnr_db": SQNR}
SQNR_FLOOR = 1e-30  # per-sample SQNR: sums below this count as this (finite, so samples can be averaged)


def metric_name(name: str) -> str:
    """The one name of a metric (``agreement`` -> ``top1-agreement``); unknown names are returned as given."""
    return ALIASES.get(name, name)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1) if x.ndim else x.reshape(1, 1)


# --- whole tensors -----------------------------------------------------------------------------------------

def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine of ``ref`` and ``out`` as one vector each (zero vectors: see the module docstring)."""
    s = TensorStats()
    s.update(ref, out)
    return s.cosine


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """SQNR in dB of ``out`` against ``ref`` over every value (+inf when identical)."""
    s = TensorStats()
    s.update(ref, out)
    return s.sqnr_db


def mse(ref: np.ndarray, out: np.ndarray) -> float:
    s = TensorStats()
    s.update(ref, out)
    return s.mse


def per_channel_sqnr(ref: np.ndarray, out: np.ndarray, axis: int) -> np.ndarray:
    """SQNR in dB of each slice along ``axis`` (+inf where a channel is reproduced exactly, -inf where an
    all-zero channel is not)."""
    a = np.moveaxis(np.asarray(ref, np.float64), axis, 0).reshape(ref.shape[axis], -1)
    b = np.moveaxis(np.asarray(out, np.float64), axis, 0).reshape(ref.shape[axis], -1)
    err = ((a - b) ** 2).sum(1)
    sig = (a**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(sig / err)
    db[err == 0] = np.inf
    db[(err > 0) & (sig == 0)] = -np.inf
    return db


# --- per sample (rows of the batch axis) -------------------------------------------------------------------

def sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each sample (row) of ``ref`` and ``out``."""
    a, b = _rows(ref), _rows(out)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(np.where((na == 0) & (nb == 0), 1.0, cos), -1.0, 1.0)


def sample_sqnr_db(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """SQNR in dB of each sample, finite (sums floored at :data:`SQNR_FLOOR`)."""
    a, b = _rows(ref), _rows(out)
    err = np.maximum(((a - b) ** 2).sum(1), SQNR_FLOOR)
    return 10 * np.log10(np.maximum((a**2).sum(1), SQNR_FLOOR) / err)


def argmax_rows(x: np.ndarray) -> np.ndarray:
    """The arg-max of each sample, its values flattened (ties: the first index)."""
    x = np.asarray(x)
    return x.reshape(len(x), -1).argmax(1)


def sample_agreement(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """1.0 where a sample's arg-max equals the reference's, else 0.0 (top-1 agreement)."""
    return (argmax_rows(out) == argmax_rows(ref)).astype(np.float64)


def sample_top1(out: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where a sample's arg-max equals its label, else 0.0."""
    return (argmax_rows(out) == np.asarray(labels)).astype(np.float64)


def paired_top1(float_right: np.ndarray, quant_right: np.ndarray) -> dict[str, Any]:
    """Top-1 of two models on the same samples, paired: ``lost`` (float right, quantized wrong), ``gained`` (the
    other way round) and the 95% interval of the drop ``(lost - gained) / n`` (Wald, for paired proportions as
    McNemar's test pairs them: standard error ``sqrt(lost + gained - (lost - gained)^2 / n) / n``). Only the samples
    where the two differ move it; on 900 ImageNet images two 4-bit EfficientNet-Lite0 models differed on 40-48."""
    f, q = np.asarray(float_right, bool), np.asarray(quant_right, bool)
    n = len(f)
    lost, gained = int((f & ~q).sum()), int((~f & q).sum())
    drop = (lost - gained) / n
    half = 1.96 * math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    return {"lost": lost, "gained": gained, "drop": drop, "drop_ci95": [drop - half, drop + half]}


def sample_scores(metric: str, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The per-sample scores of ``metric`` (any name of :data:`ALIASES`); their mean is the metric."""
    metric = metric_name(metric)
    if metric == TOP1:
        return sample_top1(out, labels)
    if metric == AGREEMENT:
        return sample_agreement(ref, out)
    if metric == COSINE:
        return sample_cosines(ref, out)
    if metric == SQNR:
        return sample_sqnr_db(ref, out)
    raise ValueError(f"unknown metric {metric!r}")


# --- streaming accumulators ------------------------------------------------------------------------------------

@dataclass
class TensorStats:
    """Running sums for MSE / SQNR / cosine between a reference and a candidate tensor, over every value of every
    sample seen so far (one long vector: nothing is kept between batches)."""

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


def finite(x: float | None) -> float | None:
    """``x``, or None for an infinity or NaN (JSON has none)."""
    return x if x is None or math.isfinite(x) else None


@dataclass
class OutputStats:
    """Streaming comparison of one model output, batch by batch: per-sample cosine (mean and min), whole-output
    SQNR and max error, and for a classifier-like output (``[N, C]``, C >= 2, floating) the top-1 agreement and
    each model's predicted classes (for the accuracy against labels)."""

    name: str
    shape: tuple[int, ...] = ()
    classifier: bool = False
    rows: int = 0
    row_size: int = 0
    cos_sum: float = 0.0
    cos_min: float = math.inf
    whole: TensorStats = field(default_factory=TensorStats)  # every value of every sample as one vector
    agree: int = 0
    float_top1: list[np.ndarray] = field(default_factory=list)
    quant_top1: list[np.ndarray] = field(default_factory=list)

    def update(self, ref: np.ndarray, got: np.ndarray, n: int) -> None:
        if ref.shape != got.shape:
            raise ModelError(f"output {self.name!r} has shape {list(got.shape)} in the quantized model but "
                             f"{list(ref.shape)} in the float model",
                             "compare a quantized model with the float model it was made from")
        if not self.rows:
            self.shape = ref.shape
            self.classifier = ref.ndim == 2 and ref.shape[0] == n and ref.shape[1] >= 2 \
                and np.issubdtype(ref.dtype, np.floating)
        f = ref.astype(np.float64, copy=False)
        q = got.astype(np.float64, copy=False)
        per_sample = f.ndim >= 1 and f.shape[0] == n
        f2, q2 = (f.reshape(n, -1), q.reshape(n, -1)) if per_sample else (f.reshape(1, -1), q.reshape(1, -1))
        cos = sample_cosines(f2, q2)
        self.rows += len(cos)
        self.row_size = f2.shape[1]
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.whole.update(f2, q2)
        if self.classifier:
            fa, qa = argmax_rows(ref), argmax_rows(got)
            self.agree += int((fa == qa).sum())
            self.float_top1.append(fa)
            self.quant_top1.append(qa)

    @property
    def whole_cosine(self) -> bool:
        """A cosine of one number is only its sign: such outputs get one cosine over all the data."""
        return self.row_size == 1

    @property
    def cosine_mean(self) -> float:
        if not self.whole_cosine:
            return self.cos_sum / max(self.rows, 1)
        return self.whole.cosine

    @property
    def cosine_min(self) -> float:
        return self.cosine_mean if self.whole_cosine else self.cos_min

    @property
    def sqnr_db(self) -> float:
        return self.whole.sqnr_db

    @property
    def agreement(self) -> float | None:
        return self.agree / self.rows if self.classifier and self.rows else None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": ["N", *self.shape[1:]] if self.shape else [], "classifier": self.classifier,
                "cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min,
                "sqnr_db": finite(self.sqnr_db), "identical": self.whole.sse == 0.0,
                "max_abs_error": self.whole.max_abs_err, "top1_agreement": self.agreement}
