"""Empirical bias correction: quantized layers' mean outputs brought back to the float model's.

Rounding weights (and the activations feeding a layer) shifts the mean of its output per channel: with
per-tensor weights a depthwise channel whose weights are a few quantization steps wide is off by a constant,
and the next layers inherit that shift. For every quantized Conv/Gemm/ConvTranspose with a constant bias, on
calibration data::

    b_c  <-  b_c - (E[y_q,c] - E[y_f,c])

``y_q``: the quantized layer's output before its activation (the pre-activation) in the QDQ model (quantized
weights and bias, on the input the quantized prefix gives it); ``y_f``: the float layer (float weights and bias)
on that same input, a twin node added beside each layer for the measurement. All layers are measured in one
run; each layer's own mean shift is corrected, not what its predecessors pass on (their corrections remove
that): correcting the whole float-model difference at every layer at once overshoots, measured on
EfficientNet-Lite0 (the total shift grew, so nothing was kept). The measurement repeats on the corrected model
(:data:`ROUNDS` rounds: a layer's input mean moves as earlier layers are corrected). The bias's int32 encoding is
recomputed each round (its scale does not change: it is input scale x weight scale).

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

ROUNDS = 2
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


def _with_float_twins(qdq: onnx.ModelProto, layers: list[onnx.NodeProto], weights: dict[str, np.ndarray],
                      biases: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``qdq`` plus, after each layer, a twin with the float weight and bias reading the same (quantized) input;
    returns the model and {layer name: twin output}."""
    nodes = list(qdq.graph.node)
    by_name = {n.name: i for i, n in enumerate(nodes)}
    twins: dict[str, str] = {}
    for layer in sorted(layers, key=lambda n: by_name[n.name], reverse=True):
        q = nodes[by_name[layer.name]]
        w, b = f"{layer.name}/bias_correction_w", f"{layer.name}/bias_correction_b"
        qdq.graph.initializer.extend([numpy_helper.from_array(weights[layer.name], w),
                                      numpy_helper.from_array(biases[layer.name], b)])
        twin = onnx.NodeProto()
        twin.CopyFrom(q)
        twin.name = f"{q.name}/bias_correction_float"
        twin.input[1], twin.input[2] = w, b
        del twin.output[:]
        twin.output.append(f"{q.output[0]}/bias_correction_float")
        twins[layer.name] = twin.output[0]
        nodes.insert(by_name[layer.name] + 1, twin)
    del qdq.graph.node[:]
    qdq.graph.node.extend(nodes)
    return qdq, twins


def correct_biases(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex,
                   reencode: Callable[[], None], batches: Iterable[dict[str, np.ndarray]], providers: list[str],
                   rounds: int = ROUNDS) -> list[Corrected]:
    """Correct the biases of ``model`` in place (see the module doc); ``reencode()`` recomputes
    ``plan.encodings`` from the model's current constants. Returns what changed, per layer."""
    layers = corrected_layers(model, plan, idx)
    if not layers:
        return []
    batches = list(batches)
    weights = {n.name: idx.constant(n.input[1]) for n in layers}
    original = {n.name: idx.constant(n.input[2]) for n in layers}
    first: dict[str, np.ndarray] = {}
    last: dict[str, np.ndarray] = {}
    for r in range(rounds + 1):
        measured, twins = _with_float_twins(render_qdq(model, plan.encodings), layers, weights, original)
        got = _means(measured, [n.output[0] for n in layers] + list(twins.values()), batches, providers)
        last = {n.name: got[n.output[0]] - got[twins[n.name]] for n in layers}
        if r == 0:
            first = dict(last)
        if r == rounds:
            break
        for n in layers:
            b = numpy_helper.to_array(idx.initializers[n.input[2]])
            if b.shape == last[n.name].shape:
                idx.initializers[n.input[2]].CopyFrom(
                    numpy_helper.from_array((b - last[n.name]).astype(b.dtype), n.input[2]))
        reencode()
    out = [Corrected(n.name, len(first[n.name]), float(np.abs(first[n.name]).mean()),
                     float(np.abs(last[n.name]).mean()),
                     float(np.abs(idx.constant(n.input[2]) - original[n.name]).max())) for n in layers]
    log.info("bias correction: %d layer(s); mean |output shift| %.3g -> %.3g", len(out),
             np.mean([c.shift_before for c in out]), np.mean([c.shift_after for c in out]))
    return out
