"""The analyzer's model-level metrics (:data:`MODEL_METRICS`), defined in :mod:`converter.metrics` (one
definition, one zero-vector convention: see there), and :func:`finite_or_str` for its JSON.

Model-level metrics score a model's outputs against the FP32 outputs on the evaluation set; higher is better
for all of them:

``cosine``          mean over samples of the cosine between the FP32 and the model's outputs
                    (all float outputs of one sample flattened into one vector);
``top1-agreement``  fraction of samples whose arg-max of the first output equals FP32's;
``top1``            fraction of samples whose arg-max of the first output equals the label.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..metrics import AGREEMENT, COSINE, TOP1, sample_agreement, sample_cosines, sample_top1


def _flat_samples(outputs: list[np.ndarray]) -> np.ndarray:
    """One row per sample: every float output of that sample flattened and concatenated."""
    n = outputs[0].shape[0] if outputs[0].ndim else 1
    rows = [np.asarray(o, np.float64).reshape(n, -1) for o in outputs if np.issubdtype(o.dtype, np.floating)]
    return np.concatenate(rows, axis=1)


# name -> (per-sample scores of (FP32 outputs, the model's outputs, labels); the mean is the metric), needs_labels
MODEL_METRICS: dict[str, tuple[Callable[[list, list, Any], np.ndarray], bool]] = {
    COSINE: (lambda ref, out, labels: sample_cosines(_flat_samples(ref), _flat_samples(out)), False),
    AGREEMENT: (lambda ref, out, labels: sample_agreement(ref[0], out[0]), False),
    TOP1: (lambda ref, out, labels: sample_top1(out[0], labels), True),
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
