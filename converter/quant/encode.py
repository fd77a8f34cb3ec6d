"""Fill ``plan.encodings`` from calibration statistics (activations) and values (weights, biases).

* Activations: one encoding per scale group, from the union of its members' ranges.
* Weights: symmetric int8, per channel along the rule's axis (or per tensor), from max |w|.
* Biases: int32, zero point 0, ``scale = input_scale * weight_scale`` (per output channel), as
  ONNX Runtime's QLinearConv/QGemm expect. If a bias would not fit in int32 (a channel whose weights
  are almost zero but whose bias is not), that channel's weight scale is raised until it fits.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..calib.observers import observer_range
from ..graph.index import GraphIndex
from .encoding import Encoding, encoding_from_range
from .plan import ACTIVATION, BIAS, WEIGHT, QuantPlan

_INT32_MAX = 2**31 - 1


def weight_encoding(w: np.ndarray, bits: int, axis: int | None) -> Encoding:
    if axis is None:
        return encoding_from_range(float(w.min()), float(w.max()), bits, True, True)
    red = tuple(i for i in range(w.ndim) if i != axis)
    return encoding_from_range(w.min(axis=red), w.max(axis=red), bits, True, True, axis)


def bias_encoding(b: np.ndarray, input_enc: Encoding, weight_enc: Encoding) -> tuple[Encoding, Encoding]:
    """Bias encoding, and the weight encoding (raised where a channel's bias would overflow int32)."""
    s_in = np.float32(input_enc.scale[0])
    s_w = weight_enc.scale_array()
    need = (np.abs(b.astype(np.float64)) / (float(s_in) * _INT32_MAX)).astype(np.float32)
    # s_in * s_w must also stay a normal float32 (16-bit activations times near-zero weight channels underflow)
    need = np.maximum(need, np.float32(2 * np.finfo(np.float32).tiny / float(s_in)))
    if np.any(need > s_w):
        s_w = np.maximum(s_w, need * np.float32(1.0001)).astype(np.float32)
        weight_enc = Encoding(weight_enc.bitwidth, True, True, tuple(s_w.tolist()), weight_enc.zero_point,
                              weight_enc.axis)
    scale = (s_in * s_w).astype(np.float32)
    if weight_enc.axis is None:
        scale = scale[:1]
    axis = 0 if weight_enc.axis is not None else None
    return Encoding(32, True, True, tuple(scale.tolist()), (0,) * len(scale), axis), weight_enc


def compute_encodings(plan: QuantPlan, idx: GraphIndex, observers: dict, method: str | Mapping[str, str],
                      percentile: float) -> None:
    """``method``: one calibration method for every activation, or a mapping tensor -> method."""
    for root, members in plan.group_members().items():
        t = plan.tensors[root]
        ranges = [observer_range(observers[m], method.get(m, "minmax") if isinstance(method, Mapping) else method,
                                 percentile, t.symmetric, t.bitwidth) for m in members]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        enc = encoding_from_range(lo, hi, t.bitwidth, t.signed, t.symmetric)
        for m in members:
            plan.encodings[m] = enc
    for t in plan.by_role(WEIGHT):
        plan.encodings[t.name] = weight_encoding(idx.constant(t.name), t.bitwidth, t.axis)
    for t in plan.by_role(BIAS):
        act, w = t.bias_of
        if act not in plan.encodings or w not in plan.encodings:
            continue
        plan.encodings[t.name], plan.encodings[w] = bias_encoding(idx.constant(t.name), plan.encodings[act],
                                                                   plan.encodings[w])
    # keep the plan's order (graph order) in the encodings dict
    plan.encodings = {n: plan.encodings[n] for n in plan.tensors if n in plan.encodings}


def activation_tensors(plan: QuantPlan) -> list[str]:
    return [t.name for t in plan.by_role(ACTIVATION)]
