"""SmoothQuant: move activation outliers into the weights of the layers that read them.

Transformers carry a few activation channels hundreds of times larger than the rest (MiniLM's
LayerNorm outputs reach -14..29 where most channels stay within +/-1, its GELU outputs 0..25). One
per-tensor activation scale set by those channels leaves the others a handful of levels: the error
arises there, at the layer's input quantizer, and keeping layers in float only hides it.

For a layer ``Y = X W`` with a constant weight ``W`` (MatMul with a 2-D initializer, Gemm with a constant
``B``; ``K`` input channels), per input channel ``k``::

    s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)        Y = (X / s) (s W)

``X / s`` has flat channels (one activation scale fits them all), ``s W`` is still quantized per output
channel. Every layer reading ``X`` shares one ``s`` (``max|W_k|`` over all their weights: a LayerNorm
feeding the Q, K and V projections gets one factor, as SmoothQuant's reference does for qkv); each
weight's rows are multiplied by ``s``. ``X / s`` is then produced one of two ways:

* **folded** into ``X``'s producer when the smoothed layers are ``X``'s only readers::

      LayerNormalization(z, g, b)      -> LayerNormalization(z, g / s, b / s)
      Mul(z, c)   (c constant)         -> Mul(z, c / s)
      Add(y, b)   (b constant)         -> Add(y / s, b / s), y's producer folded the same way
                                          (the decomposed LayerNorm ``Div -> Mul(g) -> Add(b)``)
      MatMul(z, V) / Gemm(z, V, c)     -> V's output columns (and c) divided by s
      Reshape/Flatten/Squeeze/...(y)   -> y's producer folded, when the channels stay the last axis
                                          (GPT-2's Conv1D: LayerNorm -> Reshape -> Gemm)

  No node is added; FP32 outputs are unchanged up to float rounding.
* otherwise an explicit ``Mul`` by the constant ``1 / s`` before the smoothed layers, kept in float so its
  input is never quantized: the producer is not scale-equivariant (GELU before a transformer's FFN
  fc2) or ``X`` has other readers (a post-LN transformer's LayerNorm output also feeds the residual Add,
  and the LayerNorm after that Add mixes channels, so ``1 / s`` cannot be folded there either).

``alpha``: a number (default 0.5, the paper's), or ``"auto"`` to pick it per tensor from :data:`ALPHAS` by
the quantized layers' own output error (fake-quantized ``X / s`` times fake-quantized ``s W`` against the
float product). The error is measured on held-out rows: ``s`` and the activation range come from the first
half of the captured rows (whole samples), the error from the second half, so an alpha that flattens
the channels so far that unseen data clips in many of them at once is not chosen. A tensor is smoothed
only where its alpha lowers that error by at least ``min_gain`` times, and only inputs with outlier
channels (:data:`MIN_OUTLIER_RATIO`): elsewhere nothing changes.

Measured (tools/smoothquant_bench.py, all-INT8, no float layer; MiniLM: 200 held-out STS-B sentences padded to
128 tokens, 92% of the positions padding): MiniLM output cosine 0.969 -> 0.984 with alpha 0.5 (attended tokens
0.984 -> 0.995; STS-B Spearman 0.8172 -> 0.8192, FP32 0.8205), 12 Muls, none foldable (post-LN: every
smoothed LayerNorm output also feeds the residual), latency unchanged (the Muls cost nothing measurable).
``auto`` picks 0.6-0.8, smooths fc2's GELU input too: attended tokens 0.994, Spearman 0.8201, but the padding
positions fall (all-position cosine 0.960). Where the rest of the error is (each quantized tensor of the
alpha-0.5 model put back to float, all-position cosine 0.983): fc2's input (GELU output, 0..25) -> 0.994, the
smoothed LayerNorm outputs -> 0.985, everything else (Q/K/V, scores, softmax, embeddings) < 0.001.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.runner import capture
from ..graph.index import GraphIndex
from ..ops import SHAPE_READER_OPS

log = logging.getLogger("converter")

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
AUTO = "auto"
MUL_SUFFIX = "/SmoothQuant_Mul"
SMOOTHED_SUFFIX = "_smoothed"  # initializers SmoothQuant rescaled
_MAX_ROWS = 4096  # activation rows (tokens) used per tensor to choose alpha (half to fit, half to measure)
# Only inputs with outlier channels are smoothed: the largest channel's max |x| at least this many times the
# median channel's. Without outliers a smoothed tensor has every channel near its range's edge, so unseen data
# clips in many channels at once: on a random attention block (ratio 1.8) smoothing lowered the layer's error on
# the calibration rows 1.6x but the held-out output cosine fell from 0.996 to 0.982.
MIN_OUTLIER_RATIO = 5.0
# Gemm readers are smoothed only where 1 / s folds: a Gemm is mostly a CNN's classifier head (pooled features ->
# Flatten -> Gemm, nothing to fold into), where a float Mul would be a new float op in a graph SmoothQuant left
# alone before, unmeasured there; MatMul readers (transformers) get the Mul.
GEMM_NEEDS_FOLD = True


@dataclass
class Reader:
    """A layer reading the smoothed tensor: ``weight`` holds its input channels on ``axis`` (0 or 1)."""
    node: onnx.NodeProto
    weight: str
    axis: int

    def matrix(self, idx: GraphIndex) -> np.ndarray:
        """The weight as (input channels, outputs)."""
        w = numpy_helper.to_array(idx.initializers[self.weight]).astype(np.float32)
        return w if self.axis == 0 else w.T


@dataclass
class Fold:
    """Where ``1 / s`` goes when no Mul is inserted: constants divided along their channel axis."""
    node: str  # the producer (LayerNormalization, Mul, Add chain, MatMul, Gemm)
    # (initializer, its channel axis (-1: last, broadcast), the node whose copy of it changes)
    constants: list[tuple[str, int, onnx.NodeProto]] = field(default_factory=list)


@dataclass
class Smoothed:
    tensor: str
    matmuls: list[str]
    alpha: float
    error_before: float  # relative output error (held-out rows) of the quantized layers without smoothing
    error_after: float
    mul_node: str | None  # the inserted Mul, None when folded
    outlier_ratio: float  # max channel range / median channel range of the input
    folded_into: str | None = None  # the producer that took 1 / s
    why_not_folded: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "matmuls": self.matmuls, "alpha": self.alpha,
                "error_before": self.error_before, "error_after": self.error_after, "mul_node": self.mul_node,
                "folded_into": self.folded_into, "why_not_folded": self.why_not_folded,
                "outlier_ratio": round(self.outlier_ratio, 1)}


def _reader(node: onnx.NodeProto, idx: GraphIndex) -> Reader | None:
    """``node`` as a smoothable layer: a MatMul/Gemm whose activation input 0 meets a constant 2-D weight."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or idx.is_constant(node.input[0]):
        return None
    w = node.input[1]
    if w not in idx.initializers or not idx.is_float(w) or len(idx.initializers[w].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return Reader(node, w, 0)
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return Reader(node, w, 1 if attrs.get("transB", 0) else 0)
    return None


def candidates(model: onnx.ModelProto, idx: GraphIndex) -> dict[str, list[Reader]]:
    """Activation tensor -> the MatMul/Gemm layers reading it as input 0 with a constant 2-D float weight."""
    out: dict[str, list[Reader]] = {}
    for node in model.graph.node:
        r = _reader(node, idx)
        if r is not None:
            out.setdefault(node.input[0], []).append(r)
    return out


def _channel_const(idx: GraphIndex, name: str, channels: int) -> bool:
    """``name`` is a float per-channel constant along the last axis (``channels`` values, other dims 1).

    Scalars do not count: ``1 / s`` would make them per-channel, and a scalar constant is what fused blocks match
    (GELU's ``Mul(0.5)``: ONNX Runtime's GELU fusion and the plan's GELU block both want it scalar, so folding
    there would leave a slower, quantized-inside GELU)."""
    if name not in idx.initializers or not idx.is_float(name):
        return False
    dims = list(idx.initializers[name].dims)
    return bool(dims) and all(d == 1 for d in dims[:-1]) and dims[-1] == channels


def find_fold(tensor: str, readers: list[Reader], idx: GraphIndex, channels: int) -> tuple[Fold | None, str]:
    """Where ``1 / s`` of ``tensor`` folds (see the module doc), or None and why not."""
    if tensor in idx.graph_outputs:
        return None, "a graph output"
    reading = {id(r.node) for r in readers}
    others = [n for n in _value_readers(idx, tensor) if id(n) not in reading]
    if others:
        return None, "also read by " + ", ".join(sorted({n.op_type for n in others}))
    fold = Fold("")
    if not _fold_producer(tensor, idx, channels, fold):
        p = idx.producer.get(tensor)
        return None, (f"producer {p.op_type} has no per-channel constant or weight to take 1 / s" if p else
                      "a graph input")
    return fold, ""




def _value_readers(idx: GraphIndex, name: str) -> list[onnx.NodeProto]:
    return [n for n in idx.uses(name) if n.op_type not in SHAPE_READER_OPS]  # 1 / s does not change a shape


def _only_reader(idx: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
    """``node`` is the only reader of ``name``'s values (shape readers aside) and it is no graph output."""
    readers = _value_readers(idx, name)
    return len(readers) == 1 and readers[0] is node and name not in idx.graph_outputs


def _last_dim(idx: GraphIndex, name: str, channels: int) -> bool:
    shape = idx.shape.get(name)
    return bool(shape) and shape[-1] == channels


def _fold_producer(tensor: str, idx: GraphIndex, channels: int, fold: Fold) -> bool:
    p = idx.producer.get(tensor)
    if p is None or p.domain not in ("", "ai.onnx"):
        return False
    fold.node = fold.node or p.name
    attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
    if p.op_type == "LayerNormalization":
        rank = len(idx.shape.get(p.input[0]) or [])
        if attrs.get("axis", -1) not in (-1, rank - 1) or len(p.output) > 1 and any(p.output[1:]):
            return False
        consts = [i for i in p.input[1:3] if i]
        if not all(_channel_const(idx, c, channels) for c in consts):
            return False
        fold.constants += [(c, -1, p) for c in consts]
        return True
    if p.op_type == "Mul":
        const = [i for i in p.input if _channel_const(idx, i, channels)]
        if len(const) != 1 or p.input[0] == p.input[1]:
            return False
        fold.constants.append((const[0], -1, p))
        return True
    if p.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
        # channels kept as the last axis (GPT-2's Conv1D: Reshape (B, T, C) -> (B*T, C) before its Gemm)
        src = p.input[0]
        if not _only_reader(idx, src, p) or not _last_dim(idx, src, channels) or \
                not _last_dim(idx, p.output[0], channels):
            return False
        fold.node = idx.producer[src].name if src in idx.producer else fold.node
        return _fold_producer(src, idx, channels, fold)
    if p.op_type == "Add":
        const = [i for i in p.input if _channel_const(idx, i, channels)]
        if len(const) != 1 or p.input[0] == p.input[1]:
            return False
        other = p.input[1] if p.input[0] == const[0] else p.input[0]
        if not _only_reader(idx, other, p):
            return False
        fold.constants.append((const[0], -1, p))
        return _fold_producer(other, idx, channels, fold)
    r = _reader(p, idx) if p.op_type in ("MatMul", "Gemm") else None
    if r is None:
        return False
    if (idx.initializers[r.weight].dims[1 - r.axis]) != channels:
        return False
    fold.constants.append((r.weight, 1 - r.axis, p))  # output channels of the producer's weight
    if p.op_type == "Gemm" and len(p.input) > 2 and p.input[2]:
        if not _channel_const(idx, p.input[2], channels):
            return False
        fold.constants.append((p.input[2], -1, p))
    return True


def _fake_quant_act(x: np.ndarray, bits: int, symmetric: bool, ref: np.ndarray) -> np.ndarray:
    """``x`` fake-quantized with the range of ``ref`` (the calibration rows): values outside it clip."""
    if symmetric:
        amax = float(np.abs(ref).max()) or 1.0
        scale = amax / (2 ** (bits - 1) - 1)
        return np.clip(np.rint(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    lo, hi = min(float(ref.min()), 0.0), max(float(ref.max()), 0.0)
    scale = (hi - lo) / (2**bits - 1) or 1.0
    zp = np.rint(-lo / scale)
    return (np.clip(np.rint(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def _fake_quant_weight(w: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(amax > 0, amax / levels, 1.0)
    return np.clip(np.rint(w / scale), -levels, levels) * scale


def _scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(xmax, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1 - alpha)
    s = np.where((xmax > 0) & (wmax > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _error(fit: np.ndarray, held: np.ndarray, ws: list[np.ndarray], refs: list[np.ndarray], s: np.ndarray | None,
           bits: int, symmetric: bool, per_channel: bool) -> float:
    """Relative output error on ``held`` rows of the quantized layers, activation range from ``fit`` rows."""
    fs, hs = (fit, held) if s is None else (fit / s, held / s)
    xq = _fake_quant_act(hs, bits, symmetric, fs)
    err = power = 0.0
    for w, ref in zip(ws, refs):
        wq = _fake_quant_weight(w if s is None else w * s[:, None], 8, per_channel)
        err += float(np.square(xq @ wq - ref).sum())
        power += float(np.square(ref).sum())
    return err / max(power, 1e-30)


def smoothquant(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], providers: list[str],
                alpha: float | str | None = 0.5, min_gain: float = 1.5, activation_bits: int = 8,
                symmetric: bool = False, per_channel: bool = True, fold: bool = True) -> list[Smoothed]:
    """Smooth ``model`` in place (see the module doc); returns what was changed, per activation tensor.

    ``alpha``: a number in (0, 1), or ``"auto"`` (also ``None``) to pick it per tensor. ``fold=False`` always
    inserts the Mul (for comparison)."""
    idx = GraphIndex.build(model)
    cands = candidates(model, idx)
    if not cands:
        return []
    values = _capture(model, list(cands), batches, providers)
    changes: list[Smoothed] = []
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for tensor, readers in cands.items():
        if tensor not in values:
            continue
        x = values[tensor].astype(np.float32)
        if len(x) > _MAX_ROWS:
            x = x[np.linspace(0, len(x) - 1, _MAX_ROWS).astype(np.int64)]
        ws = [r.matrix(idx) for r in readers]
        if any(w.shape[0] != x.shape[1] for w in ws) or len(x) < 2:
            continue
        fit, held = x[: len(x) // 2], x[len(x) // 2:]
        refs = [held @ w for w in ws]
        xmax = np.abs(fit).max(axis=0)
        ratio = float(np.abs(x).max(axis=0).max()) / max(float(np.median(np.abs(x).max(axis=0))), 1e-30)
        if ratio < MIN_OUTLIER_RATIO:
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        before = _error(fit, held, ws, refs, None, activation_bits, symmetric, per_channel)
        tried = list(ALPHAS) if alpha in (None, AUTO) else [float(alpha)]
        errs = {a: _error(fit, held, ws, refs, _scales(xmax, wmax, a), activation_bits, symmetric, per_channel)
                for a in tried}
        best = min(errs, key=lambda a: (errs[a], a))
        if errs[best] * min_gain > before:
            continue
        where, why = find_fold(tensor, readers, idx, x.shape[1]) if fold else (None, "folding off")
        if where is None and GEMM_NEEDS_FOLD and any(r.node.op_type == "Gemm" for r in readers):
            continue  # see GEMM_NEEDS_FOLD
        s = _scales(np.abs(x).max(axis=0), wmax, best)
        for r in readers:
            _scale_constant(model, idx, r.weight, r.axis, s, r.node)
        if where is not None:
            for name, axis, node in where.constants:
                _scale_constant(model, idx, name, axis, 1.0 / s, node)
            changes.append(Smoothed(tensor, [r.node.name for r in readers], best, before, errs[best], None, ratio,
                                    where.node))
            continue
        mul_name = f"{tensor}{MUL_SUFFIX}"
        inv = f"{tensor}/SmoothQuant_inv_scale"
        out = f"{tensor}/SmoothQuant_out"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        for r in readers:
            r.node.input[0] = out
        inserts.append((min(idx.order[r.node.name] for r in readers),
                        helper.make_node("Mul", [tensor, inv], [out], name=mul_name)))
        model.graph.value_info.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                                                    idx.shape.get(tensor)))
        changes.append(Smoothed(tensor, [r.node.name for r in readers], best, before, errs[best], mul_name, ratio,
                                None, why))
    if inserts:
        nodes = list(model.graph.node)
        for pos, node in sorted(inserts, key=lambda p: p[0], reverse=True):
            nodes.insert(pos, node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    if changes:
        log.info("SmoothQuant: %d activation tensor(s) smoothed before %d layer(s): %d folded into their producer, "
                 "%d Mul(s) inserted", len(changes), sum(len(c.matmuls) for c in changes),
                 sum(c.mul_node is None for c in changes), len(inserts))
    return changes


def _scale_constant(model: onnx.ModelProto, idx: GraphIndex, name: str, axis: int, factor: np.ndarray,
                    node: onnx.NodeProto) -> None:
    """Multiply initializer ``name`` by ``factor`` along ``axis`` (-1: the last, a scalar or per-channel constant
    broadcast to per-channel) where ``node`` reads it, as a new initializer ``<name>_smoothed`` (the old one dropped
    when nothing else reads it)."""
    value = numpy_helper.to_array(idx.initializers[name])
    if axis == -1:
        value = value.reshape([1] * (value.ndim - 1) + [value.shape[-1]]) if value.ndim else value.reshape(1)
        scaled = value * factor.reshape([1] * (value.ndim - 1) + [-1])
    else:
        scaled = value * np.expand_dims(factor, 1 - axis)
    scaled = scaled.astype(value.dtype)
    # always a new name: encodings computed on the smoothed model then name tensors the original lacks, so applying
    # them to the original fails loudly instead of quantizing unsmoothed weights with smoothed ranges
    only = len(idx.uses(name)) == 1 and idx.uses(name)[0] is node
    new = name if only and name.endswith(SMOOTHED_SUFFIX) else name + SMOOTHED_SUFFIX
    while new != name and new in idx.initializers:
        new += "_"
    t = numpy_helper.from_array(scaled, new)
    if new == name:
        idx.initializers[name].CopyFrom(t)
        return
    model.graph.initializer.append(t)
    idx.initializers[new] = t
    for i, inp in enumerate(node.input):
        if inp == name:
            node.input[i] = new
    idx.consumers[name] = [u for u in idx.uses(name) if u is not node]
    idx.consumers[new] = [node]
    if not idx.consumers[name] and name not in idx.graph_outputs:
        _drop_initializer(model, idx, name)


def _drop_initializer(model: onnx.ModelProto, idx: GraphIndex, name: str) -> None:
    if any(i.name == name for i in model.graph.input):
        return
    kept = [t for t in model.graph.initializer if t.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del idx.initializers[name]


def _capture(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
             providers: list[str]) -> dict[str, np.ndarray]:
    """Each tensor's values over ``batches``, as rows of its last dimension."""
    parts: dict[str, list[np.ndarray]] = {}
    for values in capture(model, tensors, batches, providers):
        for t in tensors:
            if t in values and np.ndim(values[t]):
                parts.setdefault(t, []).append(values[t].reshape(-1, values[t].shape[-1]))
    return {t: np.concatenate(v) for t, v in parts.items()}
