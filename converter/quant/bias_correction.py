"""Empirical bias correction: quantized layers' mean outputs brought back to the float model's.

Rounding weights (and the activations feeding a layer) shifts the mean of its output per channel: with
per-tensor weights a depthwise channel whose weights are a few quantization steps wide is off by a constant,
and the next layers inherit that shift. For every quantized Conv/Gemm/ConvTranspose with a constant bias, on
calibration data::

    b_c  <-  b_c - (E[y_q,c] - E[y_c])

``y``: the layer's output before its activation (the pre-activation), in the float model; ``y_q``: the same
tensor in the QDQ model (quantized weights, bias, and all quantized layers before it). All layers are
measured in one run of the QDQ model and corrected together; a layer's measured shift includes what its
predecessors' shifts propagate, which their own corrections remove, so the measurement repeats
(:data:`ROUNDS` rounds, each on the corrected model) until the shifts stop shrinking. The bias's int32
encoding is recomputed each round (its scale does not change: it is input scale x weight scale).

The corrected float biases are written into the prepared float model, so the QDQ model carries them; an
encodings file applied to the original float model (``apply-encodings``) does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.runner import iter_capture
from ..graph.index import GraphIndex
from .plan import QuantPlan
from .qdq import render_qdq

log = logging.getLogger("converter")

ROUNDS = 3
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class Corrected:
    node: str
    channels: int
    shift_before: float  # mean |E[y_q] - E[y]| over channels, before any correction
    shift_after: float  # the same, measured after the last round
    max_correction: float

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "channels": self.channels, "mean_shift_before": self.shift_before,
                "mean_shift_after": self.shift_after, "max_correction": self.max_correction}


def corrected_layers(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> list[onnx.NodeProto]:
    """Quantized layers (weight in the plan) with a constant float bias used by them alone."""
    out = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        w, b = node.input[1], node.input[2]
        if w not in plan.encodings or not idx.is_constant(b) or len(idx.uses(b)) != 1:
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        out.append(node)
    return out


def _means(model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]],
           providers: list[str]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of ``tensors`` over ``batches``, reduced batch by batch."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in iter_capture(model, tensors, batches, providers):
        for t in tensors:
            v = np.asarray(values[t], dtype=np.float64)
            x = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)
            sums[t] = sums.get(t, 0.0) + x.sum(axis=1)
            counts[t] = counts.get(t, 0) + x.shape[1]
    return {t: sums[t] / counts[t] for t in sums}


def correct_biases(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex,
                   reencode: Callable[[], None], batches: Iterable[dict[str, np.ndarray]], providers: list[str],
                   rounds: int = ROUNDS) -> list[Corrected]:
    """Correct the biases of ``model`` in place (see the module doc); ``reencode()`` recomputes
    ``plan.encodings`` from the model's current constants. Returns what changed, per layer."""
    layers = corrected_layers(model, plan, idx)
    if not layers:
        return []
    batches = list(batches)
    tensors = [n.output[0] for n in layers]
    ref = _means(model, tensors, batches, providers)
    first: dict[str, np.ndarray] = {}
    total = {n.name: np.zeros(len(ref[n.output[0]])) for n in layers}
    last: dict[str, np.ndarray] = {}
    saved: dict[str, np.ndarray] = {}
    prev = np.inf
    for r in range(rounds + 1):
        got = _means(render_qdq(model, plan.encodings), tensors, batches, providers)
        shifts = {n.name: got[n.output[0]] - ref[n.output[0]] for n in layers}
        size = sum(float(np.abs(v).mean()) for v in shifts.values())
        if r == 0:
            first = dict(shifts)
        if size > prev:  # the last round made it worse (rounding noise, not a mean shift): undo it
            for n in layers:
                idx.initializers[n.input[2]].CopyFrom(numpy_helper.from_array(saved[n.name], n.input[2]))
                total[n.name] += last[n.name]
            reencode()
            break
        last = shifts
        if r == rounds or size > prev * 0.9:
            break
        prev = size
        for n in layers:
            shift = last[n.name]
            b = numpy_helper.to_array(idx.initializers[n.input[2]])
            saved[n.name] = b
            if b.shape != shift.shape:
                last[n.name] = np.zeros_like(b)  # nothing applied: nothing to undo
                continue
            total[n.name] -= shift
            idx.initializers[n.input[2]].CopyFrom(numpy_helper.from_array((b - shift).astype(b.dtype), n.input[2]))
        reencode()
    out = [Corrected(n.name, len(total[n.name]), float(np.abs(first[n.name]).mean()),
                     float(np.abs(last[n.name]).mean()), float(np.abs(total[n.name]).max())) for n in layers]
    log.info("bias correction: %d layer(s); mean |output shift| %.3g -> %.3g", len(out),
             np.mean([c.shift_before for c in out]), np.mean([c.shift_after for c in out]))
    return out
