"""Cross-layer equalization (CLE) with high-bias absorption, on the float model (Nagel et al., DFQ 2019).

Per-tensor weight quantization gives every output channel of a Conv the step of its largest channel; depthwise
convolutions, whose channels' ranges differ by 100x and more after BatchNorm folding, lose most of their
channels to that. For two layers joined by a positively homogeneous activation ``f`` (``f(x / s) = f(x) / s``
for ``s > 0``: none, Relu, PRelu) ::

    W2 f(W1 x + b1) = (W2 S) f(S^-1 (W1 x + b1))          S = diag(s) over the channels between them

so dividing output channel ``i`` of the first layer (weights and bias) by ``s_i`` and multiplying input channel
``i`` of the second by ``s_i`` leaves the function unchanged. ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: max |w| of
the first layer's output channel ``i``, ``r2_i``: of the second's input channel ``i``) makes both ranges
``sqrt(r1_i r2_i)``. Chains (Conv -> depthwise -> Conv) are equalized pair by pair until the scales settle.
Pairs: Conv (regular or depthwise) -> [Relu | PRelu | Clip(0, inf) | Clip(0, 6)] -> Conv (regular or
depthwise), where each tensor between them has that one reader and the weights are not shared.

**ReLU6** (``Clip(0, 6)``) is not homogeneous: ``clip(x / s, 0, 6) != clip(x, 0, 6) / s``; keeping it would need
a per-channel upper bound ``6 / s_i``, which Clip cannot hold. Three ways (``relu6``):

* ``"min"``: the Clip becomes ``Relu`` followed by ``Min`` with the per-channel constant ``6 / s_i``: exact
  (FP32 unchanged). The plan treats that ``Min`` as a clamp sharing its input's encoding
  (:func:`converter.quant.rules.node_rule`), so the Relu output gets its Q/DQ and ORT fuses Conv + Relu into a
  QLinearConv; the renderer runs the ``Min`` on uint8 (:mod:`converter.quant.qdq`). EfficientNet-Lite0: all 49
  Convs QLinearConv (before this, 32 ran as float FusedConv, batch-1 latency 5.4 -> 25.8 ms).
* ``"replace"`` (AIMET's choice): the Clip becomes a Relu; FP32 outputs change (activations above 6 pass) and
  the report lists the replaced nodes.
* ``"keep"`` (default): pairs joined by a ReLU6 are skipped (FP32 unchanged; on models built of ReLU6 blocks little is
  equalized).

Measured on EfficientNet-Lite0 (every activation a ReLU6), per-tensor W8A8, top-1 of 900 held-out ImageNet
samples (FP32 799, per-channel 789): no CLE 729, keep 733 (2 pairs), replace 553 (the FP32 model itself breaks:
77% top-1 agreement with the original on 64 images), min 788 (34 pairs, with high-bias absorption, every Conv
integer); tools/ptq_techniques.py has the rows.

**High-bias absorption**: after scaling, a channel whose pre-activation never falls below ``c_i > 0`` (Relu,
PRelu, or Relu + Min where the Min's bound becomes ``6 / s_i - c_i``, between the layers) carries a constant
``c_i`` that only widens the activation range. With
``c_i = max(0, min(observed min, mean - 3 std))`` on calibration data, ``b1_i -= c_i`` and the second layer's
bias gains ``sum_k W2[:, i, k] c_i``; exact whenever the pre-activation stays >= ``c_i``. Done only where the
second layer has no padding (a padded border would see ``0``, not ``c_i``).

BatchNorm is folded first (:func:`converter.graph.passes.fold_batchnorm`, which preprocessing already runs, so
the count is usually 0: the exporter or preprocessing folded it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.runner import iter_capture
from ..graph.clip import clip_bounds
from ..graph.index import GraphIndex, attr
from ..graph.passes import fold_batchnorm

log = logging.getLogger("converter")

RELU6_MODES = ("min", "replace", "keep")
MAX_ITERATIONS = 50
TOLERANCE = 1e-4  # stop when no scale moves by more than this (relative)


@dataclass
class Pair:
    first: str  # Conv node names
    second: str
    activation: str  # op type between them ("" for none), after any ReLU6 replacement
    channels: int
    scale: np.ndarray = field(repr=False)  # accumulated per-channel s (first layer divided, second multiplied)
    range_ratio_before: float = 0.0  # first layer: max over min per-channel weight range
    range_ratio_after: float = 0.0
    absorbed: float = 0.0  # mean absorbed bias over the channels
    absorbed_channels: int = 0
    shift: np.ndarray | None = field(default=None, repr=False)  # per-channel bias absorbed from the first layer

    def __post_init__(self) -> None:
        if self.shift is None:
            self.shift = np.zeros(self.channels)

    def to_dict(self) -> dict[str, Any]:
        s = self.scale
        return {"first": self.first, "second": self.second, "activation": self.activation or "none",
                "channels": self.channels, "scale_min": float(s.min()), "scale_median": float(np.median(s)),
                "scale_max": float(s.max()), "first_range_ratio_before": round(self.range_ratio_before, 2),
                "first_range_ratio_after": round(self.range_ratio_after, 2),
                "absorbed_channels": self.absorbed_channels, "absorbed_mean": self.absorbed}


@dataclass
class CleResult:
    batchnorm_folded: int
    relu6: str
    relu6_replaced: list[str]
    iterations: int
    pairs: list[Pair]
    skipped_relu6_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"batchnorm_folded": self.batchnorm_folded, "relu6": self.relu6,
                "relu6_replaced": self.relu6_replaced, "fp32_changed": bool(self.relu6_replaced),
                "skipped_relu6_pairs": self.skipped_relu6_pairs, "iterations": self.iterations,
                "pairs": [p.to_dict() for p in self.pairs]}


def _conv_kind(node: onnx.NodeProto, idx: GraphIndex) -> str | None:
    """'conv' (group 1), 'depthwise' (one input channel per group) or None (anything else)."""
    if node.op_type != "Conv" or len(node.input) < 2 or not idx.is_constant(node.input[1]):
        return None
    if len(idx.uses(node.input[1])) != 1:
        return None
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and (not idx.is_constant(bias) or len(idx.uses(bias)) != 1):
        return None
    w = idx.initializers[node.input[1]]
    group = attr(node, "group", 1)
    if group == 1:
        return "conv"
    if w.dims[1] == 1 and group == w.dims[0]:
        return "depthwise"
    return None


def find_pairs(model: onnx.ModelProto, idx: GraphIndex, relu6: str) -> tuple[list[tuple], int]:
    """[(first, activation node or None, second, kind of activation)], and how many ReLU6 pairs were skipped."""
    pairs, skipped = [], 0
    for a in model.graph.node:
        if _conv_kind(a, idx) is None:
            continue
        act = idx.single_consumer(a.output[0])
        if act is None:
            continue
        kind = ""
        b = act
        if act.op_type in ("Relu", "PRelu", "Clip"):
            kind = act.op_type
            if act.op_type == "PRelu" and (not idx.is_constant(act.input[1]) or idx.constant(act.input[1]).ndim > 3):
                continue
            if act.op_type == "Clip":
                bounds = clip_bounds(act, idx)
                if bounds is None or bounds[0] != 0.0:
                    continue
                if np.isfinite(bounds[1]):
                    if relu6 == "keep":
                        skipped += 1 if _conv_kind(idx.single_consumer(act.output[0]) or act, idx) else 0
                        continue
                    kind = "ReLU6"
                else:
                    kind = "Relu"
            b = idx.single_consumer(act.output[0])
            if b is None:
                continue
        if _conv_kind(b, idx) is None or b.input[0] != (act.output[0] if kind else a.output[0]):
            continue
        pairs.append((a, act if kind else None, b, kind))
    return pairs, skipped


def _out_ranges(w: np.ndarray) -> np.ndarray:
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def _in_ranges(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "depthwise":
        return _out_ranges(w)
    return np.abs(w).transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1).max(axis=1)


def _ratio(r: np.ndarray) -> float:
    r = r[r > 0]
    return float(r.max() / r.min()) if r.size else 1.0


def equalize(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]] | None = None,
             providers: list[str] | None = None, relu6: str = "keep", absorb: bool = True) -> CleResult:
    """Equalize ``model`` in place (see the module doc). ``batches``: calibration inputs for bias absorption
    (None skips it)."""
    if relu6 not in RELU6_MODES:
        raise ValueError(f"relu6 must be one of {RELU6_MODES}, got {relu6!r}")
    folded = fold_batchnorm(model)
    idx = GraphIndex.build(model)
    found, skipped = find_pairs(model, idx, relu6)
    replaced, bounds = [], {}
    for a, act, _, kind in found:
        if kind == "ReLU6" and act.op_type == "Clip":
            bounds[a.name] = (act, clip_bounds(act, idx)[1])
            act.op_type = "Relu"
            del act.input[1:]
            del act.attribute[:]
            if relu6 == "replace":
                replaced.append(act.name)
    weights: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for a, _, b, _ in found:
        for n in (a, b):
            if n.name not in weights:
                weights[n.name] = idx.constant(n.input[1]).astype(np.float64)
                c = weights[n.name].shape[0]
                has_bias = len(n.input) > 2 and n.input[2]
                biases[n.name] = idx.constant(n.input[2]).astype(np.float64) if has_bias else np.zeros(c)
                kinds[n.name] = _conv_kind(n, idx)
    joined = "Relu+Min" if relu6 == "min" else "Relu"
    pairs = [Pair(a.name, b.name, joined if kind == "ReLU6" else kind, weights[a.name].shape[0],
                  np.ones(weights[a.name].shape[0]), _ratio(_out_ranges(weights[a.name]))) for a, _, b, kind in found]
    pairs = [p for p in pairs if _in_ranges(weights[p.second], kinds[p.second]).shape[0] == p.channels]
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):
        moved = 0.0
        for p in pairs:
            w1, w2 = weights[p.first], weights[p.second]
            r1, r2 = _out_ranges(w1), _in_ranges(w2, kinds[p.second])
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            weights[p.first] = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            biases[p.first] = biases[p.first] / s
            if kinds[p.second] == "depthwise":
                weights[p.second] = w2 * s.reshape(-1, *([1] * (w2.ndim - 1)))
            else:
                weights[p.second] = w2 * s.reshape(1, -1, *([1] * (w2.ndim - 2)))
            p.scale = p.scale * s
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < TOLERANCE:
            break
    for p in pairs:
        p.range_ratio_after = _ratio(_out_ranges(weights[p.first]))
    _write(model, idx, weights, biases)
    if relu6 == "min":
        _per_channel_min(model, pairs, bounds, weights)
    if absorb and batches is not None and pairs:
        _absorb_high_bias(model, pairs, kinds, batches, providers or ["CPUExecutionProvider"])
    if pairs:
        log.info("CLE: %d layer pair(s) equalized in %d iteration(s)%s", len(pairs), iterations,
                 f"; {len(replaced)} ReLU6 replaced by Relu (FP32 outputs change)" if replaced else "")
    return CleResult(folded, relu6, replaced, iterations, pairs, skipped)


def _per_channel_min(model: onnx.ModelProto, pairs: list[Pair], bounds: dict[str, tuple], weights) -> None:
    """Each ReLU6 of an equalized pair became Relu; ``Min`` by the per-channel bound ``6 / s_i`` restores the clip
    exactly (``clip(x / s, 0, 6 / s) = clip(x, 0, 6) / s``)."""
    nodes = list(model.graph.node)
    for p in pairs:
        if p.first not in bounds:
            continue
        act, hi = bounds[p.first]
        rank = weights[p.first].ndim
        bound = f"{act.name}/ClipBound"
        model.graph.initializer.append(numpy_helper.from_array(
            (hi / p.scale).astype(np.float32).reshape(1, -1, *([1] * (rank - 2))), bound))
        out = act.output[0]
        act.output[0] = f"{out}/relu"
        typed = [vi for vi in model.graph.value_info if vi.name == out]  # the Relu output keeps the type/shape
        if typed:
            model.graph.value_info.append(onnx.helper.make_value_info(act.output[0], typed[0].type))
        nodes.insert(nodes.index(act) + 1, onnx.helper.make_node("Min", [act.output[0], bound], [out],
                                                                 name=f"{act.name}/ClipMin"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _write(model: onnx.ModelProto, idx: GraphIndex, weights: dict[str, np.ndarray],
           biases: dict[str, np.ndarray]) -> None:
    nodes = {n.name: n for n in model.graph.node}
    for name, w in weights.items():
        node = nodes[name]
        dtype = numpy_helper.to_array(idx.initializers[node.input[1]]).dtype
        idx.initializers[node.input[1]].CopyFrom(numpy_helper.from_array(w.astype(dtype), node.input[1]))
        if (len(node.input) > 2 and node.input[2]) or np.any(biases[name]):
            _set_bias(model, idx, node, biases[name].astype(dtype))


def _set_bias(model: onnx.ModelProto, idx: GraphIndex, node: onnx.NodeProto, b: np.ndarray) -> None:
    if len(node.input) > 2 and node.input[2]:
        idx.initializers[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
        return
    name = f"{node.name}.bias"
    model.graph.initializer.append(numpy_helper.from_array(b, name))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    idx.initializers[name] = model.graph.initializer[-1]


def _absorb_high_bias(model: onnx.ModelProto, pairs: list[Pair], kinds: dict[str, str],
                      batches: Iterable[dict[str, np.ndarray]], providers: list[str]) -> None:
    nodes = {n.name: n for n in model.graph.node}
    todo = [p for p in pairs if p.activation in ("Relu", "PRelu", "Relu+Min")
            and not any(attr(nodes[p.second], "pads", [0]) or [0])
            and attr(nodes[p.second], "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID")]
    if not todo:
        return
    tensors = [nodes[p.first].output[0] for p in todo]
    stats: dict[str, list] = {}  # tensor -> per channel [count, sum, sum of squares, min], batch by batch
    for values in iter_capture(model, tensors, batches, providers):
        for t in tensors:
            v = values[t]
            x = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).astype(np.float64)
            n, s, sq, mn = x.shape[1], x.sum(1), np.square(x).sum(1), x.min(1)
            c = stats.get(t)
            stats[t] = [n, s, sq, mn] if c is None else [c[0] + n, c[1] + s, c[2] + sq, np.minimum(c[3], mn)]
    if not stats:
        return
    idx = GraphIndex.build(model)
    for p in todo:
        a, b = nodes[p.first], nodes[p.second]
        n, s, sq, mn = stats[a.output[0]]
        mean = s / n
        std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
        c = np.maximum(0.0, np.minimum(mn, mean - 3 * std))
        if not np.any(c > 0):
            continue
        w2 = idx.constant(b.input[1]).astype(np.float64)
        if kinds[p.second] == "depthwise":
            shift = w2.reshape(w2.shape[0], -1).sum(1) * c
        else:
            shift = (w2.sum(axis=tuple(range(2, w2.ndim))) * c[None, :]).sum(1)
        dtype = idx.constant(a.input[1]).dtype
        has_b1 = len(a.input) > 2 and a.input[2]
        b1 = idx.constant(a.input[2]).astype(np.float64) if has_b1 else np.zeros(len(c))
        has_b2 = len(b.input) > 2 and b.input[2]
        b2 = idx.constant(b.input[2]).astype(np.float64) if has_b2 else np.zeros(w2.shape[0])
        _set_bias(model, idx, a, (b1 - c).astype(dtype))
        if p.activation == "Relu+Min":  # min(relu(x), B) = min(relu(x - c), B - c) + c for x >= c
            mn = idx.single_consumer(idx.single_consumer(a.output[0]).output[0])
            bound = idx.constant(mn.input[1])
            idx.initializers[mn.input[1]].CopyFrom(numpy_helper.from_array(
                (bound - c.reshape(bound.shape)).astype(bound.dtype), mn.input[1]))
        _set_bias(model, idx, b, (b2 + shift).astype(dtype))
        p.absorbed = float(c.mean())
        p.absorbed_channels = int((c > 0).sum())
        p.shift = c
