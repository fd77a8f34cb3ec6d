"""Bias correction: quantized layers' mean outputs brought back to the float model's, measured (empirical) or
computed from BatchNorm statistics (analytical).

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

**Analytical** (DFQ, Nagel et al. 2019, section 4.2; AIMET's analytical bias correction): where a layer's input
comes from a BatchNorm, optionally through Relu / Clip / a clamp (``Min``/``Max`` against a constant), its
per-channel input is modelled as ``N(beta, gamma^2)`` clipped to the activation's bounds, so without any data::

    E[x_c] = E[clip(N(beta_c, gamma_c^2), lo_c, hi_c)]
           = lo Phi(a) + hi (1 - Phi(b)) + beta (Phi(b) - Phi(a)) + gamma (phi(a) - phi(b))
    a = (lo - beta) / gamma,  b = (hi - beta) / gamma
    b  <-  b - (W_q - W) E[x]      (summed over input channels and kernel positions; W_q the dequantized weight)

It corrects the weights' rounding only (not the input's), and the statistics come from the BatchNorm as the
model holds it (:func:`batchnorm_statistics`, read before preprocessing folds it into the Conv; cross-layer
equalization's per-channel scaling and absorbed bias update them: :func:`equalized_statistics`). Padding is
ignored (a padded border reads 0, not ``E[x]``).

The corrected float biases are written into the prepared float model, so the QDQ model carries them; an
encodings file applied to the original float model (``apply-encodings``) does not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.runner import iter_capture
from ..graph.clip import clip_bounds
from ..graph.index import GraphIndex, attr
from ..graph.passes import default_opset
from ..ops import BIASED_LAYER_OPS
from .plan import QuantPlan
from .control_flow import render_control_flow  # the main graph and If/Loop/Scan bodies

log = logging.getLogger("converter")

ROUNDS = 2
MODES = ("empirical", "analytical", "auto")  # auto: analytical where BatchNorm statistics reach, else empirical


@dataclass
class Corrected:
    node: str
    channels: int
    shift_before: float  # mean |E[y_q] - E[y]| over channels, before any correction
    shift_after: float | None  # the same, measured after the last round (None: not measured again: fast bias correction)
    max_correction: float
    kind: str = "empirical"  # or "analytical" (then the shifts are the computed E[(W_q - W) x], after: 0)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "channels": self.channels,
                "mean_shift_before": self.shift_before, "mean_shift_after": self.shift_after,
                "max_correction": self.max_correction}


def corrected_layers(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> list[onnx.NodeProto]:
    """Quantized layers (weight in the plan) with a constant float bias used by them alone."""
    out = []
    for node in model.graph.node:
        if node.op_type not in BIASED_LAYER_OPS or len(node.input) < 3 or not node.input[2]:
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
    """Per-channel (axis 1) means of ``tensors`` over ``batches``. The model itself sums each tensor per channel
    and the run fetches only those sums and the element counts: fetching the tensors whole would keep every
    layer's output of a batch alive at once (EfficientNet-Lite0, 100 outputs of 16 images: 3 GB). ``model`` (a
    render made for this measurement) gets the summing nodes: no second copy of a large model."""
    fetch = _add_channel_sums(model, tensors)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in iter_capture(model, [n for pair in fetch.values() for n in pair], batches, providers):
        for t, (total, size) in fetch.items():
            v = np.asarray(values[total], dtype=np.float64)
            sums[t] = sums.get(t, 0.0) + v
            counts[t] = counts.get(t, 0) + int(values[size]) // max(len(v), 1)
    return {t: sums[t] / counts[t] for t in sums}


def _add_channel_sums(out: onnx.ModelProto, tensors: list[str]) -> dict[str, tuple[str, str]]:
    """Makes ``out`` (in place) also compute, per tensor (rank >= 2, channels on axis 1), its sum per channel
    and its element count; {tensor: (sum, count)}. Reshaped to [N, C, rest], summed over ``rest`` in float32, then
    over N in float64 (a float64 copy of the whole tensor would double what the run holds)."""
    opset = default_opset(out)
    shape = "bias_correction/shape_n_c_rest"
    out.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape))
    for axis in (0, 2):
        out.graph.initializer.append(numpy_helper.from_array(np.array([axis], dtype=np.int64),
                                                             f"bias_correction/axis_{axis}"))

    def reduce_sum(x: str, y: str, axis: int) -> onnx.NodeProto:  # axes: an input from opset 13
        if opset >= 13:
            return helper.make_node("ReduceSum", [x, f"bias_correction/axis_{axis}"], [y], keepdims=0)
        return helper.make_node("ReduceSum", [x], [y], axes=[axis], keepdims=0)

    fetch = {}
    for i, t in enumerate(dict.fromkeys(tensors)):
        base = f"bias_correction/sum_{i}"
        out.graph.node.extend([
            helper.make_node("Reshape", [t, shape], [f"{base}/nc"]),
            reduce_sum(f"{base}/nc", f"{base}/n_c", 2),
            helper.make_node("Cast", [f"{base}/n_c"], [f"{base}/n_c_double"], to=onnx.TensorProto.DOUBLE),
            reduce_sum(f"{base}/n_c_double", base, 0),
            helper.make_node("Size", [t], [f"{base}/size"])])
        fetch[t] = (base, f"{base}/size")
    return fetch


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
                   rounds: int = ROUNDS, skip: set[str] | frozenset[str] = frozenset(),
                   float_weights: dict[str, np.ndarray] | None = None, measure_after: bool = True,
                   select: Callable[[onnx.NodeProto], bool] | None = None) -> list[Corrected]:
    """Correct the biases of ``model`` in place (see the module doc); ``reencode()`` recomputes
    ``plan.encodings`` from the model's current constants. Returns what changed, per layer (not those in
    ``skip``: corrected analytically). ``float_weights``: a weight's float values where the model now holds
    others (AdaRound's grid values): the float twin reads them. ``measure_after``: measure the shift left after
    the last round (for the report only: ``mean_shift_after`` is None without it, and the run costs one
    measurement less). ``select``: which of the correctable layers to correct (default: all)."""
    layers = [n for n in corrected_layers(model, plan, idx) if n.name not in skip and (select is None or select(n))]
    if not layers:
        return []
    batches = list(batches)
    weights = {n.name: (float_weights or {}).get(n.input[1], idx.constant(n.input[1])) for n in layers}
    original = {n.name: idx.constant(n.input[2]) for n in layers}
    first: dict[str, np.ndarray] = {}
    last: dict[str, np.ndarray] = {}
    for r in range(rounds + 1):
        if r == rounds and not measure_after:
            break
        measured, twins = _with_float_twins(render_control_flow(model, plan.encodings), layers, weights, original)
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
                     float(np.abs(last[n.name]).mean()) if measure_after else None,
                     float(np.abs(idx.constant(n.input[2]) - original[n.name]).max())) for n in layers]
    log.info("bias correction: %d layer(s); mean |output shift| %.3g -> %s", len(out),
             np.mean([c.shift_before for c in out]),
             f"{np.mean([c.shift_after for c in out]):.3g}" if measure_after else "(not measured again)")
    return out


Stats = dict[str, tuple[np.ndarray, np.ndarray]]  # tensor -> per-channel (mean, std) of a BatchNorm output


def batchnorm_statistics(model: onnx.ModelProto) -> Stats:
    """``{BatchNorm output: (beta, |gamma|)}`` for the BatchNorms with constant parameters (inference mode):
    what the folded Conv's output looks like per channel. Read before folding (the fold keeps the output name)."""
    idx = GraphIndex.build(model)
    out: Stats = {}
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or attr(bn, "training_mode", 0):
            continue
        gamma, beta = idx.constant(bn.input[1]), idx.constant(bn.input[2])
        if gamma is None or beta is None or gamma.ndim != 1 or gamma.shape != beta.shape:
            continue
        out[bn.output[0]] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    return out


def equalized_statistics(stats: Stats, tensor: str, scale: np.ndarray, shift: np.ndarray) -> None:
    """CLE divided channel ``c`` of ``tensor`` by ``scale[c]`` and subtracted ``shift[c]`` (absorbed bias)."""
    if tensor in stats and len(stats[tensor][0]) == len(scale):
        mean, std = stats[tensor]
        stats[tensor] = (mean / scale - shift, std / scale)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _cdf(z: np.ndarray) -> np.ndarray:
    return np.where(np.isposinf(z), 1.0, np.where(np.isneginf(z), 0.0, 0.5 * (1.0 + _erf(z / math.sqrt(2)))))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(z), np.exp(-0.5 * np.square(np.where(np.isfinite(z), z, 0.0))), 0.0) \
        / math.sqrt(2 * math.pi)


def clipped_normal_mean(mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``E[clip(X, lo, hi)]``, ``X ~ N(mean, std^2)`` per channel (module doc); ``lo``/``hi`` may be infinite."""
    mean, std = np.asarray(mean, np.float64), np.maximum(np.asarray(std, np.float64), 1e-12)
    lo, hi = np.broadcast_to(lo, mean.shape).astype(np.float64), np.broadcast_to(hi, mean.shape).astype(np.float64)
    a, b = (lo - mean) / std, (hi - mean) / std
    ca, cb = _cdf(a), _cdf(b)
    low = np.where(np.isfinite(lo), lo, 0.0) * ca  # an infinite bound contributes nothing
    high = np.where(np.isfinite(hi), hi, 0.0) * (1.0 - cb)
    return low + high + mean * (cb - ca) + std * (_pdf(a) - _pdf(b))


def _bounds(node: onnx.NodeProto, idx: GraphIndex, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (lo, hi) that ``node`` clips its data input to, or None when it is no clip."""
    lo, hi = np.full(channels, -np.inf), np.full(channels, np.inf)
    if node.op_type == "Relu":
        return np.zeros(channels), hi
    if node.op_type == "Clip":
        b = clip_bounds(node, idx)
        return None if b is None else (np.full(channels, b[0]), np.full(channels, b[1]))
    if node.op_type in ("Min", "Max") and len(node.input) == 2:
        const = [idx.constant(t) if idx.is_constant(t) else None for t in node.input]
        c = next((v for v in const if v is not None), None)
        if c is None or all(v is not None for v in const):
            return None
        if c.size == 1:
            c = np.full(channels, float(c))
        elif c.size == channels and c.ndim >= 2 and c.shape[1] == channels:
            c = c.reshape(-1).astype(np.float64)
        else:
            return None
        return (lo, c) if node.op_type == "Min" else (c, hi)
    return None


def expected_input(idx: GraphIndex, tensor: str, stats: Stats) -> np.ndarray | None:
    """Per-channel ``E[tensor]`` from the BatchNorm statistics it comes from, through Relu / Clip / clamps; None
    where no BatchNorm statistics reach it."""
    clips = []
    while tensor not in stats:
        node = idx.producer.get(tensor)
        if node is None or node.op_type not in ("Relu", "Clip", "Min", "Max"):
            return None
        data = next((t for t in node.input if t and not idx.is_constant(t)), None)
        if data is None:
            return None
        clips.append(node)
        tensor = data
    mean, std = stats[tensor]
    lo, hi = np.full(len(mean), -np.inf), np.full(len(mean), np.inf)
    for node in reversed(clips):  # innermost first: clip(clip(x, a), b) = clip(x, max(lo)/min(hi))
        b = _bounds(node, idx, len(mean))
        if b is None:
            return None
        lo, hi = np.maximum(lo, b[0]), np.minimum(hi, b[1])
    return clipped_normal_mean(mean, std, lo, hi)


def _weight_error_times(w: np.ndarray, wq: np.ndarray, node: onnx.NodeProto, ex: np.ndarray) -> np.ndarray | None:
    """``(W_q - W) E[x]`` per output channel for a Conv (regular or depthwise) or Gemm, else None."""
    e = (wq.astype(np.float64) - w.astype(np.float64))
    if node.op_type == "Gemm":
        e = e if attr(node, "transB", 0) else e.T  # (out, in)
        return e @ ex if e.shape[1] == len(ex) else None
    if node.op_type != "Conv":
        return None
    group = attr(node, "group", 1)
    per_in = e.reshape(e.shape[0], e.shape[1], -1).sum(axis=2)  # (out, in per group)
    if group == 1:
        return per_in @ ex if per_in.shape[1] == len(ex) else None
    cin = per_in.shape[1]
    if cin * group != len(ex):
        return None
    outs_per_group = e.shape[0] // group
    xs = ex.reshape(group, cin)[np.arange(e.shape[0]) // outs_per_group]  # (out, in per group)
    return (per_in * xs).sum(axis=1)


def correct_analytically(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, stats: Stats,
                         reencode: Callable[[], None],
                         float_weights: dict[str, np.ndarray] | None = None) -> list[Corrected]:
    """Analytical bias correction (module doc) of the quantized layers whose input BatchNorm statistics reach;
    no data. ``reencode()`` recomputes ``plan.encodings`` afterwards (the bias encodings follow the biases).
    ``float_weights``: as in :func:`correct_biases` (``W`` of ``W_q - W``)."""
    out = []
    for node in corrected_layers(model, plan, idx):
        ex = expected_input(idx, node.input[0], stats)
        w_name, b_name = node.input[1], node.input[2]
        if ex is None or w_name not in plan.encodings:
            continue
        wq = plan.encodings[w_name].fake_quantize(idx.constant(w_name))
        w = (float_weights or {}).get(w_name, idx.constant(w_name))
        shift = _weight_error_times(w, wq, node, ex)
        b = numpy_helper.to_array(idx.initializers[b_name])
        if shift is None or shift.shape != b.shape:
            continue
        idx.initializers[b_name].CopyFrom(numpy_helper.from_array((b - shift).astype(b.dtype), b_name))
        out.append(Corrected(node.name, len(b), float(np.abs(shift).mean()), 0.0, float(np.abs(shift).max()),
                             "analytical"))
    if out:
        reencode()
        log.info("analytical bias correction: %d layer(s) from BatchNorm statistics; mean |E[(W_q - W) x]| %.3g",
                 len(out), np.mean([c.shift_before for c in out]))
    return out
