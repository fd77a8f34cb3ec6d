"""Blocks recognised by what they compute, not by how an exporter spelled them.

A decomposed LayerNorm arrives as ``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div`` from
TorchScript, as ``ReduceSum -> Mul(1/N) ... Max(var, eps) -> Sqrt -> Reciprocal -> Mul`` from jax2tf, as the
batch-norm form ``x * r + (beta - mean * r)`` from Keras through tf2onnx, ... Rather than one matcher per
spelling, :func:`match_at` finds the *region* of element-wise / reduction nodes around a seed node that
reads one activation ``x`` and leaves one tensor ``y``, evaluates that region on a synthetic ``x`` (a tiny
numpy interpreter, :data:`_EVAL`), and compares ``y`` with each row of :data:`MATH_FORMS`
(``y = LayerNorm(x) * gamma + beta`` with ``gamma``/``beta`` fitted per normalised element, ``y = x * sigmoid(b x)``
with ``b`` fitted, ``y = GELU(x)``, ...). A form matches when the region's output equals the reference within
a relative tolerance: operand constants are checked numerically, operands of commutative ops may come in any
order, axes may be attributes or inputs (any opset), ``x^3`` may be ``Pow(x, 3)`` or ``x * x * x``.

Regions: starting from a seed (a nonlinear or reducing op), each tensor behind it (up to a few element-wise
steps back) is tried as ``x``, nearest first; the nodes between ``x`` and the seed form the region, which then
grows forward one node at a time (a node joins when every non-constant input is ``x`` or made in the region;
a node made only from ``x`` is pulled in when a later node needs it). Each time the region is *closed* (one
tensor leaves it, nothing else is read outside) it is a candidate; the largest candidate that matches a form
wins. Everything is deterministic (fixed synthetic inputs, graph order).

Adding a form is one row of :data:`MATH_FORMS`: a kind, the op types one of which must be present, and a
function ``(x, y, axes) -> prediction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from ..ops import MATH_BLOCK_OPS, MATH_BLOCK_SEEDS, NORM_REDUCE_OPS, REDUCE_OPS
from .index import GraphIndex, attr

# inputs that carry structure, not data (Expand's target shape, often Shape(x) made outside the block)
_SHAPE_INPUTS = {"Expand": (1,)}
_FLOAT_TO = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_MAX_BACK = 6  # element-wise steps from the seed back to the block's input
_MAX_NODES = 24  # nodes in one region


# --- references: (x, y, axes) -> what y should be if the region computes this form ------------------------

def _normalized(x: np.ndarray, axes: tuple[int, ...], center: bool) -> np.ndarray:
    mu = x.mean(axis=axes, keepdims=True) if center else 0.0
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5)


def _affine_fit(n: np.ndarray, y: np.ndarray, axes: tuple[int, ...], shift: bool) -> np.ndarray | None:
    """``gamma * n + beta`` with gamma (and beta) fitted per normalised element over the other axes."""
    if n.shape != y.shape:
        return None
    other = tuple(a for a in range(n.ndim) if a not in axes)
    if not other or int(np.prod([n.shape[a] for a in other])) < 3:
        return None
    nm = n.mean(axis=other, keepdims=True) if shift else 0.0
    ym = y.mean(axis=other, keepdims=True) if shift else 0.0
    dn, dy = n - nm, y - ym
    gamma = (dn * dy).sum(axis=other, keepdims=True) / np.maximum((dn * dn).sum(axis=other, keepdims=True), 1e-12)
    return gamma * dn + ym if shift else gamma * n


def _layernorm(x, y, axes):
    return _affine_fit(_normalized(x, axes, True), y, axes, shift=True) if axes else None


def _rmsnorm(x, y, axes):
    return _affine_fit(_normalized(x, axes, False), y, axes, shift=True) if axes else None


def _l2norm(x, y, axes):
    """x / |x| exactly (no fitted scale: with one it would be any RMSNorm)."""
    return x / np.sqrt((x * x).sum(axis=axes, keepdims=True)) if axes else None


def _softmax(x, y, axes):
    if not axes:
        return None
    e = np.exp(x - x.max(axis=axes, keepdims=True))
    return e / e.sum(axis=axes, keepdims=True)


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _gelu_erf(x, y, axes):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x, y, axes):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_sigmoid(x, y, axes):
    return x * _sigmoid(1.702 * x)


def _swish(x, y, axes):
    """x * sigmoid(b x), b fitted (SiLU: b = 1)."""
    if y.shape != x.shape:
        return None
    sel = (np.abs(x) > 0.5) & (np.abs(x) < 4.0)
    r = np.clip(y[sel] / x[sel], 1e-6, 1 - 1e-6)
    if r.size < 4:
        return None
    b = float(np.median(np.log(r / (1 - r)) / x[sel]))
    return x * _sigmoid(b * x) if b > 0.05 else None


def _hardswish(x, y, axes):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hardsigmoid_gate(x, y, axes):
    """x * HardSigmoid(x) with any slope: x * clip(a x + b, 0, 1)."""
    if y.shape != x.shape:
        return None
    sel = (np.abs(x) > 1e-3) & (np.abs(y / np.where(x == 0, 1, x) - 0.5) < 0.45)
    if sel.sum() < 4:
        return None
    a, b = np.polyfit(x[sel], y[sel] / x[sel], 1)
    return x * np.clip(a * x + b, 0.0, 1.0) if a > 0 else None


def _mish(x, y, axes):
    return x * np.tanh(np.log1p(np.exp(x)))


@dataclass(frozen=True)
class MathForm:
    kind: str
    any_of: frozenset[str]  # the region holds at least one of these op types
    predict: Callable[[np.ndarray, np.ndarray, tuple[int, ...]], np.ndarray | None]
    tol: float = 2e-3  # max |y - prediction| / max |y|


# Order matters where two forms could both fit (a region is the first form it matches).
MATH_FORMS: tuple[MathForm, ...] = (
    MathForm("LayerNorm", NORM_REDUCE_OPS, _layernorm),
    MathForm("L2Norm", NORM_REDUCE_OPS | {"LpNormalization"}, _l2norm),  # before RMSNorm: x/|x| is an RMSNorm too
    MathForm("RMSNorm", NORM_REDUCE_OPS, _rmsnorm),
    MathForm("DecomposedSoftmax", frozenset({"Exp"}), _softmax),
    MathForm("GELU", frozenset({"Erf"}), _gelu_erf),
    MathForm("GELU", frozenset({"Tanh"}), _gelu_tanh),
    MathForm("GELU", frozenset({"Sigmoid"}), _gelu_sigmoid),
    MathForm("SiLU", frozenset({"Sigmoid"}), _swish),
    MathForm("Mish", frozenset({"Tanh"}), _mish),
    MathForm("HardSwish", frozenset({"Clip", "Relu", "Min", "Max", "HardSigmoid", "HardSwish"}), _hardswish),
    MathForm("HardSwish", frozenset({"HardSigmoid"}), _hardsigmoid_gate, tol=1e-4),
)
MATH_KINDS = frozenset(f.kind for f in MATH_FORMS)
ELEMENTWISE_KINDS = frozenset({"GELU", "SiLU", "Mish", "HardSwish"})


# --- a tiny interpreter for the region's ops ----------------------------------------------------------

def _axes(node: onnx.NodeProto, ins: list, rank: int) -> tuple[int, ...] | None:
    axes = attr(node, "axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in np.asarray(ins[1]).ravel()]
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        return tuple(range(rank))
    return tuple(sorted(int(a) % rank for a in axes))


def _reduce(fn):
    def run(node, ins):
        x = ins[0]
        axes = _axes(node, ins, x.ndim)
        if axes is None:
            return x
        return fn(x, axis=axes, keepdims=bool(attr(node, "keepdims", 1)))
    return run


def _clip(node, ins):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else attr(node, "min", -np.inf)
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else attr(node, "max", np.inf)
    return np.clip(ins[0], lo, hi)


def _nary(fn):
    def run(node, ins):
        out = ins[0]
        for v in ins[1:]:
            out = fn(out, v)
        return out
    return run


def _lpnorm(node, ins):
    x, p, axis = ins[0], attr(node, "p", 2), attr(node, "axis", -1)
    norm = np.abs(x).sum(axis=axis, keepdims=True) if p == 1 else np.sqrt((x * x).sum(axis=axis, keepdims=True))
    return x / norm


_EVAL: dict[str, Callable] = {
    "Add": lambda n, i: i[0] + i[1], "Sub": lambda n, i: i[0] - i[1], "Mul": lambda n, i: i[0] * i[1],
    "Div": lambda n, i: i[0] / i[1], "Pow": lambda n, i: np.power(i[0], i[1]), "Sqrt": lambda n, i: np.sqrt(i[0]),
    "Reciprocal": lambda n, i: 1.0 / i[0], "Neg": lambda n, i: -i[0], "Abs": lambda n, i: np.abs(i[0]),
    "Exp": lambda n, i: np.exp(i[0]), "Log": lambda n, i: np.log(i[0]), "Erf": lambda n, i: _erf(i[0]),
    "Tanh": lambda n, i: np.tanh(i[0]), "Sigmoid": lambda n, i: _sigmoid(i[0]),
    "HardSigmoid": lambda n, i: np.clip(attr(n, "alpha", 0.2) * i[0] + attr(n, "beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda n, i: _hardswish(i[0], None, ()), "Softplus": lambda n, i: np.log1p(np.exp(i[0])),
    "Relu": lambda n, i: np.maximum(i[0], 0.0), "Clip": _clip, "Min": _nary(np.minimum), "Max": _nary(np.maximum),
    "ReduceMean": _reduce(np.mean), "ReduceSum": _reduce(np.sum), "ReduceMax": _reduce(np.max),
    "ReduceL2": _reduce(lambda x, axis, keepdims: np.sqrt((x * x).sum(axis=axis, keepdims=keepdims))),
    "ReduceSumSquare": _reduce(lambda x, axis, keepdims: (x * x).sum(axis=axis, keepdims=keepdims)),
    "LpNormalization": _lpnorm, "Identity": lambda n, i: i[0], "Cast": lambda n, i: i[0],
    "Expand": lambda n, i: i[0],  # the broadcast the next element-wise op does anyway
}


def _evaluate(idx: GraphIndex, x: str, nodes: list[onnx.NodeProto], out: str, xv: np.ndarray) -> np.ndarray | None:
    vals: dict[str, np.ndarray] = {x: xv}
    with np.errstate(all="ignore"):
        for n in nodes:
            ins = []
            for k, t in enumerate(n.input):
                if not t or k in _SHAPE_INPUTS.get(n.op_type, ()):
                    ins.append(None)
                elif t in vals:
                    ins.append(vals[t])
                else:
                    c = idx.constant(t)
                    if c is None:
                        return None
                    ins.append(c.astype(np.float64) if np.issubdtype(c.dtype, np.floating) else c)
            try:
                vals[n.output[0]] = np.asarray(_EVAL[n.op_type](n, ins), dtype=np.float64)
            except (ValueError, TypeError, IndexError, np.AxisError):
                return None
    y = vals.get(out)
    return y if y is not None and np.all(np.isfinite(y)) else None


# --- regions ------------------------------------------------------------------------------------------

def _block_op(idx: GraphIndex, node: onnx.NodeProto | None) -> bool:
    if node is None or node.op_type not in MATH_BLOCK_OPS or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return False
    if node.op_type == "Cast" and attr(node, "to") not in _FLOAT_TO:
        return False
    return True


def _dynamic_inputs(idx: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """Inputs carrying data (not constants -- a reduction's axes input is one -- nor a target shape)."""
    skip = _SHAPE_INPUTS.get(node.op_type, ())
    return [t for i, t in enumerate(node.input) if t and not idx.is_constant(t) and i not in skip]


def _candidate_inputs(idx: GraphIndex, seed: onnx.NodeProto) -> list[str]:
    """Tensors behind ``seed`` that may be the block's input, nearest first."""
    out: list[str] = []
    frontier = _dynamic_inputs(idx, seed)
    for _ in range(_MAX_BACK):
        nxt: list[str] = []
        for t in frontier:
            if t in out:
                continue
            out.append(t)
            p = idx.producer.get(t)
            if _block_op(idx, p):
                nxt.extend(_dynamic_inputs(idx, p))
        frontier = nxt
    return [t for t in out if idx.is_float(t) or t not in idx.elem_type]


def _cone(idx: GraphIndex, x: str, seed: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Nodes on the paths from ``x`` to ``seed`` (all made from ``x`` and constants), in graph order."""
    anc: dict[str, onnx.NodeProto] = {}
    stack = [seed]
    while stack:
        n = stack.pop()
        if n.name in anc or len(anc) > _MAX_NODES:
            continue
        anc[n.name] = n
        for t in _dynamic_inputs(idx, n):
            p = idx.producer.get(t)
            if t != x and _block_op(idx, p):
                stack.append(p)
    made = {x}
    region = []
    for n in sorted(anc.values(), key=lambda n: idx.order[n.name]):
        if all(t in made for t in _dynamic_inputs(idx, n)):
            region.append(n)
            made.update(n.output)
    return region if any(n.name == seed.name for n in region) else None


def _exits(idx: GraphIndex, names: set[str], nodes: list[onnx.NodeProto]) -> list[str]:
    out = []
    for n in nodes:
        for t in n.output:
            if t and (t in idx.graph_outputs or any(u.name not in names and u.op_type != "Shape" for u in idx.uses(t))):
                out.append(t)
    return out


def _pull(idx: GraphIndex, t: str, made: set[str], blocked: set[str], depth: int = 3) -> list[onnx.NodeProto] | None:
    """Nodes (in order) that make ``t`` from tensors already ``made`` and constants, or None."""
    if t in made:
        return []
    p = idx.producer.get(t)
    if depth == 0 or not _block_op(idx, p) or p.name in blocked:
        return None
    out: list[onnx.NodeProto] = []
    for s in _dynamic_inputs(idx, p):
        sub = _pull(idx, s, made | {o for n in out for o in n.output}, blocked, depth - 1)
        if sub is None:
            return None
        out.extend(n for n in sub if n not in out)
    return out + [p]


def _closures(idx: GraphIndex, x: str, region: list[onnx.NodeProto], blocked: set[str]):
    """The closed regions reached by growing ``region`` forward, smallest first: (nodes, exit tensor)."""
    nodes = list(region)
    names = {n.name for n in nodes}
    made = {x} | {o for n in nodes for o in n.output}
    while True:
        ex = _exits(idx, names, nodes)
        if len(ex) == 1:
            yield list(nodes), ex[0]
        if len(nodes) >= _MAX_NODES:
            return
        grown = None
        for t in sorted(made - {x}, key=idx.position):
            for u in idx.uses(t):
                if u.name in names or u.name in blocked or not _block_op(idx, u):
                    continue
                need: list[onnx.NodeProto] = []
                ok = True
                for s in _dynamic_inputs(idx, u):
                    sub = _pull(idx, s, made | {o for n in need for o in n.output}, blocked | names)
                    if sub is None:
                        ok = False
                        break
                    need.extend(n for n in sub if n not in need)
                if ok and (grown is None or idx.order[u.name] < idx.order[grown[-1].name]):
                    grown = need + [u]
        if grown is None:
            return
        for n in grown:
            nodes.append(n)
            names.add(n.name)
            made.update(n.output)
        nodes.sort(key=lambda n: idx.order[n.name])


def _guess_shape(idx: GraphIndex, nodes: list[onnx.NodeProto]) -> list[int | None]:
    """A shape for an input shape inference could not type (a dynamic Reshape before it): the rank the reduction
    axes and constants need, plus a leading axis for rows; sizes unknown (filled by :func:`_eval_shape`)."""
    rank = 2
    for n in nodes:
        raw = attr(n, "axes") if n.op_type in REDUCE_OPS else None
        if raw is None and n.op_type in REDUCE_OPS and len(n.input) > 1 and idx.is_constant(n.input[1]):
            raw = idx.constant(n.input[1]).ravel().tolist()
        for a in raw or ():
            rank = max(rank, a + 1 if a >= 0 else -a + 1)
        for t in n.input:
            if t and idx.is_constant(t) and n.op_type not in REDUCE_OPS:
                rank = max(rank, idx.constant(t).ndim + 1)
    return [None] * rank


def _mean_size(idx: GraphIndex, nodes: list[onnx.NodeProto]) -> int | None:
    """N of a mean written as ReduceSum(.) * 1/N or / N, from its constant (an unknown reduced size)."""
    for n in nodes:
        if n.op_type not in ("Mul", "Div") or not any(idx.producer.get(t) is not None and
                                                      idx.producer[t].op_type == "ReduceSum" for t in n.input):
            continue
        for t in n.input:
            c = idx.constant(t) if t and idx.is_constant(t) else None
            if c is not None and c.size == 1 and float(c.ravel()[0]) != 0:
                v = float(c.ravel()[0])
                size = 1 / v if n.op_type == "Mul" else v
                if size > 1.5 and abs(size - round(size)) < 1e-3 * size:
                    return int(round(size))
    return None


def _eval_shape(idx: GraphIndex, x: str, nodes: list[onnx.NodeProto], axes: tuple[int, ...]) -> list[int] | None:
    shape = idx.shape.get(x)
    if shape is None:
        shape = _guess_shape(idx, nodes) if axes else [None]
    rank = len(shape)
    fixed = {a: None for a in axes}  # reduced axes keep their size; so do axes a constant broadcasts along
    for n in nodes:
        for t in n.input:
            c = idx.constant(t) if t and idx.is_constant(t) and n.op_type not in REDUCE_OPS else None
            if c is not None and c.ndim <= rank:
                for i, d in enumerate(c.shape):
                    if d > 1:
                        fixed[rank - c.ndim + i] = d
    dims: list[int] = []
    rows = 16 if axes else 64
    for a, d in enumerate(shape):
        if a in fixed:
            if not isinstance(d, int) or d <= 0:  # unknown: the size a constant gives it, or N of a 1/N mean
                d = fixed[a] or _mean_size(idx, nodes) or 8
            dims.append(d)
        else:
            dims.append(rows)
            rows = 1
    if int(np.prod(dims)) > 1 << 20:
        return None
    return dims


def _region_axes(idx: GraphIndex, nodes: list[onnx.NodeProto], rank: int) -> tuple[int, ...]:
    for n in nodes:
        if n.op_type in REDUCE_OPS:
            axes = _axes(n, [None] + [idx.constant(t) for t in n.input[1:]], rank)
            return axes or ()
        if n.op_type == "LpNormalization":
            return (attr(n, "axis", -1) % rank,)
    return ()


def _identify(idx: GraphIndex, x: str, nodes: list[onnx.NodeProto], out: str, kinds: frozenset[str]) -> str | None:
    ops = {n.op_type for n in nodes}
    forms = [f for f in MATH_FORMS if f.kind in kinds and ops & f.any_of]
    if not forms or len(nodes) < 2 and not ops & {"LpNormalization"}:
        return None
    rank = len(idx.shape[x]) if idx.shape.get(x) is not None else len(_guess_shape(idx, nodes))
    axes = _region_axes(idx, nodes, rank)
    shape = _eval_shape(idx, x, nodes, axes)
    if shape is None:
        return None
    rng = np.random.default_rng(0)
    xv = rng.normal(0.0, 2.5, shape)
    if axes:  # rows with different offsets and scales tell a LayerNorm from an RMSNorm
        other = tuple(a for a in range(len(shape)) if a not in axes)
        xv = xv * rng.uniform(0.5, 2.0, [1 if a in axes else shape[a] for a in range(len(shape))]) \
            + rng.normal(0.0, 2.0, [1 if a in axes else shape[a] for a in range(len(shape))]) if other else xv
    y = _evaluate(idx, x, nodes, out, xv)
    if y is None or y.shape != xv.shape:
        return None
    scale = float(np.abs(y).max()) or 1.0
    for f in forms:
        pred = f.predict(xv, y, axes)
        if pred is not None and pred.shape == y.shape and float(np.abs(pred - y).max()) <= f.tol * scale:
            return f.kind
    return None


@dataclass(frozen=True)
class MathMatch:
    kind: str
    nodes: tuple[onnx.NodeProto, ...]
    input: str
    output: str


def match_at(idx: GraphIndex, seed: onnx.NodeProto, kinds: frozenset[str] = MATH_KINDS, x: str | None = None,
             blocked: frozenset[str] = frozenset()) -> MathMatch | None:
    """The largest closed region around ``seed`` computing one of ``kinds`` (read from ``x`` when given)."""
    if seed.op_type not in MATH_BLOCK_SEEDS or not _block_op(idx, seed) or seed.name in blocked:
        return None
    cache = idx.__dict__.setdefault("_math_blocks", {})
    key = (seed.name, kinds, x, blocked)
    if key in cache:
        return cache[key]
    found = None
    for cand in [x] if x is not None else _candidate_inputs(idx, seed):
        region = _cone(idx, cand, seed)
        if region is None or {n.name for n in region} & blocked:
            continue
        for nodes, out in reversed(list(_closures(idx, cand, region, set(blocked)))):
            kind = _identify(idx, cand, nodes, out, kinds)
            if kind is not None:
                found = MathMatch(kind, tuple(nodes), cand, out)
                break
        if found is not None:
            break
    cache[key] = found
    return found


def seeds_after(idx: GraphIndex, x: str, depth: int = 4) -> list[onnx.NodeProto]:
    """Seed nodes reachable from ``x`` through block ops within ``depth`` steps, in graph order."""
    seen: dict[str, onnx.NodeProto] = {}
    frontier = [x]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for u in idx.uses(t):
                if u.name not in seen and _block_op(idx, u):
                    seen[u.name] = u
                    nxt.extend(o for o in u.output if o)
        frontier = nxt
    return sorted((n for n in seen.values() if n.op_type in MATH_BLOCK_SEEDS), key=lambda n: idx.order[n.name])
