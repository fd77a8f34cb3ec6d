"""Error statistics of the analyzer: per-tensor ones (:class:`converter.stats.TensorStats`: MSE, SQNR,
cosine accumulated per batch), per-channel SQNR, and the model-level metrics.

Model-level metrics (``MODEL_METRICS``) score a model's outputs against the FP32 outputs on the
evaluation set; higher is better for all of them:

``cosine``          mean over samples of the cosine between the FP32 and the model's outputs
                    (all float outputs of one sample flattened into one vector);
``top1-agreement``  fraction of samples whose arg-max of the first output equals FP32's;
``top1``            fraction of samples whose arg-max of the first output equals the label.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


def per_channel_sqnr(ref: np.ndarray, out: np.ndarray, axis: int) -> np.ndarray:
    """SQNR in dB of each slice along ``axis`` (inf where a channel is reproduced exactly)."""
    a = np.moveaxis(np.asarray(ref, np.float64), axis, 0).reshape(ref.shape[axis], -1)
    b = np.moveaxis(np.asarray(out, np.float64), axis, 0).reshape(ref.shape[axis], -1)
    err = ((a - b) ** 2).sum(1)
    sig = (a**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(sig / err)
    db[err == 0] = np.inf
    db[(err > 0) & (sig == 0)] = -np.inf
    return db


# --- model-level metrics --------------------------------------------------------------------------

def _flat_samples(outputs: list[np.ndarray]) -> np.ndarray:
    """One row per sample: every float output of that sample flattened and concatenated."""
    n = outputs[0].shape[0] if outputs[0].ndim else 1
    rows = [np.asarray(o, np.float64).reshape(n, -1) for o in outputs if np.issubdtype(o.dtype, np.floating)]
    return np.concatenate(rows, axis=1)


def _cosine(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    a, b = _flat_samples(ref), _flat_samples(out)
    num = (a * b).sum(1)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(den > 0, num / den, np.where((a == b).all(1), 1.0, 0.0))
    return cos


def _argmax(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).reshape(x.shape[0], -1).argmax(1)


def _top1_agreement(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    return (_argmax(ref[0]) == _argmax(out[0])).astype(np.float64)


def _top1(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    return (_argmax(out[0]) == labels).astype(np.float64)


# name -> per-sample scores (mean = the metric); needs_labels
MODEL_METRICS: dict[str, tuple[Callable[[list, list, Any], np.ndarray], bool]] = {
    "cosine": (_cosine, False),
    "top1-agreement": (_top1_agreement, False),
    "top1": (_top1, True),
}


def finite_or_str(x: Any) -> Any:
    """JSON has no infinities: +-inf and NaN become the strings "inf", "-inf", "nan"."""
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {k: finite_or_str(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_str(v) for v in x]
    if isinstance(x, np.ndarray):
        return [finite_or_str(v) for v in x.tolist()]
    return x
