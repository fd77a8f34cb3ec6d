"""Reconstruction beyond AdaRound's single layers: AdaQuant and block-wise reconstruction (BRECQ / QDrop).

Both optimize a *unit* of the float graph in torch against its float output, on inputs taken from the quantized
prefix (the QDQ model built so far: earlier units already reconstructed, activations quantized), one unit at a time
in graph order. The target is the unit's float weights and activations on that same input, as AdaRound's is (a
float model's input with the earlier units' weights replaced drifts from the QDQ model where a network amplifies
its weight errors: :mod:`converter.quant.adaround`):

* **AdaQuant** (Hubara et al., "Accurate Post Training Quantization With Small Calibration Sets", 2021; AMD Quark's
  ``AdaQuant``): the unit is one layer (Conv / Gemm / MatMul with its fused Relu/Clip); the weight, its bias and its
  per-channel (or per-tensor) scale are learned with the straight-through estimator::

      W~ = s' * clip(round(W' / s'), qmin, qmax)      W' = W + s * D,  s' = s * exp(g)

  (``D`` in units of the starting scale ``s``, ``g`` one log-factor per scale: both start at 0, so ``W~`` starts
  at nearest rounding). The weight's encoding takes the learned scale ``s'`` (zero points kept).
* **Block reconstruction** (Li et al., "BRECQ", 2021; Wei et al., "QDrop", 2022): the unit is a *block*: the
  graph is cut where a single activation tensor crosses (every path from the input passes through it), and
  consecutive pieces are merged until the block ends in a linear output (a layer with no activation after it: an
  inverted-residual block's project Conv) or a residual ``Add``, or holds :data:`MAX_BLOCK_LAYERS` layers. Every
  layer of the block learns its weight rounding as AdaRound does (soft rounding ``h(V)``, the rounding regularizer
  with ``beta`` annealed, :mod:`converter.quant.adaround`'s constants and learning rate), all together against the block's float
  output. The activations inside the block are fake-quantized as the QDQ model quantizes them (the tensors a
  QuantizeLinear reads in the rendered model, their plan encodings, straight-through gradient); **QDrop**: in
  training each activation element the block quantizes keeps its unquantized value with probability
  :data:`QDROP_P`, so the weights do not overfit to one noise draw.
  With ``adaquant`` on too, the block's layers learn weights and scales (AdaQuant's parameters) instead.

After the steps the learned result is kept only where its loss on all cached samples (activations quantized, no
drop) is lower than nearest rounding's (else nearest stays; the report says which). Like AdaRound, the result reaches
the QDQ model through the float model: each weight initializer is replaced by its grid values ``s' * (q - z)`` and
its encoding frozen, so nearest rounding gives ``q`` back.

Memory is bounded per unit: the unit's input (from the quantized prefix) is cached whole per sample for at most
:data:`CACHE_MB` MiB (the samples subsampled to fit, at least :data:`MIN_SAMPLES`), plus the float target, one
unit at a time; each step reads :data:`MINIBATCH` of them. Units with an op the torch table (:data:`OPS`) does not
have are left to nearest rounding (logged), as are models with control flow.

The torch work runs on ``device`` (:func:`resolve_device`: ``auto`` takes CUDA when torch sees a GPU); ONNX Runtime
keeps its own providers for the captures.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.incremental import IncrementalCapture
from ..graph.index import GraphIndex, attr
from .adaround import (BETA_RANGE, GAMMA, REG_PARAM, WARM_START, ZETA, _fused_activation, _Layer,
                       adaround_layers, learning_rate)
from .control_flow import has_control_flow, render_control_flow
from .encoding import Encoding
from .plan import QuantPlan
from .torch_device import resolve_device  # noqa: F401 (the techniques and tests read it here too)

log = logging.getLogger("converter")

MAX_BLOCK_LAYERS = 4  # layers per block at most
CACHE_MB = 512  # cached unit inputs (quantized + float) and targets, one unit at a time
MIN_SAMPLES = 8  # cached samples at least (a bigger unit input exceeds CACHE_MB then)
MINIBATCH = 8  # samples per step
QDROP_P = 0.5  # QDrop: probability an activation element keeps its float value while training
WEIGHT_LR = 1e-2  # AdaQuant: for D (the weight's offset, in units of the starting scale)
SCALE_LR = 1e-3  # AdaQuant: for g (the scale's log-factor)
BIAS_LR = 1e-3  # AdaQuant: for the bias (relative to the mean output magnitude; see _Unit.optimize)
DEVICES = ("auto", "cpu", "cuda")


# --- the float graph's ops in torch --------------------------------------------------------------------------------

def _conv(node, x, w, b=None):
    import torch.nn.functional as F

    nd = w.dim() - 2
    pads = list(attr(node, "pads", [0] * 2 * nd))
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    groups = int(attr(node, "group", 1))
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
        pads = [0] * 2 * nd
    fn = F.conv1d if nd == 1 else F.conv2d if nd == 2 else F.conv3d
    return fn(x, w, b, strides, pads[:nd], dil, groups)


def _gemm(node, a, w, b=None):
    if attr(node, "transA", 0):
        a = a.transpose(-1, -2)
    w = w.transpose(0, 1) if attr(node, "transB", 0) else w
    y = (a @ w) * float(attr(node, "alpha", 1.0))
    return y + float(attr(node, "beta", 1.0)) * b if b is not None else y


def _fold(fn, xs):
    """n-ary Min/Max as pairwise ``fn`` (broadcasting)."""
    y = xs[0]
    for x in xs[1:]:
        y = fn(y, x)
    return y


def _clip(node, x, lo=None, hi=None):
    lo = float(lo) if lo is not None else float(attr(node, "min", -math.inf))
    hi = float(hi) if hi is not None else float(attr(node, "max", math.inf))
    return x.clamp(lo if lo > -math.inf else None, hi if hi < math.inf else None)


def _pool(kind):
    def run(node, x):
        import torch.nn.functional as F

        nd = x.dim() - 2
        k = list(attr(node, "kernel_shape"))
        pads = list(attr(node, "pads", [0] * 2 * nd))
        strides = list(attr(node, "strides", [1] * nd))
        if pads[:nd] != pads[nd:] or attr(node, "ceil_mode", 0):
            raise _Unsupported(node.op_type)
        if kind == "max":
            return (F.max_pool1d if nd == 1 else F.max_pool2d)(x, k, strides, pads[:nd])
        return (F.avg_pool1d if nd == 1 else F.avg_pool2d)(x, k, strides, pads[:nd],
                                                          count_include_pad=bool(attr(node, "count_include_pad", 0)))
    return run


def _reshape(node, x, shape):
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    if not attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node, x):
    a = int(attr(node, "axis", 1)) % x.dim() if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:a])), -1)


def _reduce_mean(node, x, axes=None):
    axes = attr(node, "axes", None) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    axes = list(range(x.dim())) if axes is None else list(axes)
    return x.mean(dim=axes, keepdim=bool(attr(node, "keepdims", 1)))


def _t():
    import torch

    return torch


OPS: dict[str, Callable[..., Any]] = {  # op type -> fn(node, *inputs) on torch tensors (constants as numpy)
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda node, a, b: a @ b,
    "Relu": lambda node, x: x.clamp(min=0),
    "Clip": _clip,
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": lambda node, a, b: a / b,
    "Min": lambda node, *xs: _fold(_t().minimum, xs),  # CLE's per-channel ReLU6 bound (Relu then Min)
    "Max": lambda node, *xs: _fold(_t().maximum, xs),
    "Sigmoid": lambda node, x: x.sigmoid(),
    "Tanh": lambda node, x: x.tanh(),
    "HardSigmoid": lambda node, x: (float(attr(node, "alpha", 0.2)) * x + float(attr(node, "beta", 0.5))).clamp(0, 1),
    "HardSwish": lambda node, x: x * (x / 6 + 0.5).clamp(0, 1),
    "LeakyRelu": lambda node, x: _t().nn.functional.leaky_relu(x, float(attr(node, "alpha", 0.01))),
    "GlobalAveragePool": lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda node, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "ReduceMean": _reduce_mean,
    "Identity": lambda node, x: x,
    "Transpose": lambda node, x: x.permute(*(attr(node, "perm", None) or range(x.dim() - 1, -1, -1))),
    "Softmax": lambda node, x: x.softmax(int(attr(node, "axis", -1))),
    "Concat": lambda node, *xs: _t().cat(xs, int(attr(node, "axis"))),
}


class _Unsupported(Exception):
    pass


# --- units: single layers (AdaQuant) or blocks --------------------------------------------------------------------

@dataclass
class Unit:
    """A piece of the graph with one activation input and one activation output."""

    nodes: list[onnx.NodeProto]
    input: str
    output: str
    layers: list[_Layer] = field(default_factory=list)  # its quantized layers (those that learn)

    @property
    def name(self) -> str:
        return self.layers[0].node.name if len(self.layers) == 1 else f"{self.nodes[0].name}..{self.nodes[-1].name}"


def _segments(model: onnx.ModelProto, idx: GraphIndex) -> list[tuple[list[onnx.NodeProto], str, str]]:
    """The graph cut where exactly one activation tensor crosses: (nodes, input tensor, output tensor) pieces in
    graph order. Empty where the graph has more than one activation input or output."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    inputs = [i.name for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        return []
    last_use: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            if t and t not in inits and t not in consts:
                last_use[t] = i
    for o in g.output:
        last_use[o.name] = len(g.node)
    live = {inputs[0]}
    out, start, cur_in = [], 0, inputs[0]
    for i, n in enumerate(g.node):
        live |= {o for o in n.output if o and o not in consts}
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1 and n.op_type != "Constant":
            (t,) = live
            nodes = [m for m in g.node[start:i + 1] if m.op_type != "Constant"]
            out.append((nodes, cur_in, t))
            start, cur_in = i + 1, t
    return out


def find_units(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, blocks: bool) -> list[Unit]:
    """The units to reconstruct, in graph order: blocks (module doc), or every layer alone (its fused activation
    with it)."""
    if has_control_flow(model):
        log.info("reconstruction: the model has control flow (If/Loop/Scan): left to nearest rounding")
        return []
    layers = {lay.node.name: lay for lay in adaround_layers(model, plan, idx) if not lay.enc.blocked}
    if not blocks:  # each layer with its fused activation
        out = []
        for lay in layers.values():
            nodes = [lay.node]
            if lay.act is not None:
                nodes.append(idx.uses(lay.node.output[0])[0])
            out.append(Unit(nodes, lay.node.input[0], nodes[-1].output[0], [lay]))
        return out
    segments = _segments(model, idx)
    if not segments:
        log.info("reconstruction: the graph has no single-tensor cuts (several inputs or outputs): left to nearest")
        return []
    units: list[Unit] = []
    cur: Unit | None = None
    for nodes, t_in, t_out in segments:
        if cur is None:
            cur = Unit([], t_in, t_out)
        cur.nodes += nodes
        cur.output = t_out
        cur.layers += [layers[n.name] for n in nodes if n.name in layers]
        last = nodes[-1]
        residual = any(n.op_type == "Add" and all(not idx.is_constant(t) for t in n.input) for n in nodes)
        linear = last.op_type in ("Conv", "Gemm", "MatMul") and _fused_activation(last, idx) is None
        if (residual or linear) and cur.layers or len(cur.layers) >= MAX_BLOCK_LAYERS:
            units.append(cur)
            cur = None
    if cur is not None and cur.layers:
        units.append(cur)
    return units


# --- the unit in torch ---------------------------------------------------------------------------------------------

def _fake_quant(x, enc: Encoding, device: str):
    """QuantizeLinear + DequantizeLinear (per-tensor activations), straight-through gradient."""
    s, z = float(enc.scale[0]), float(enc.zero_point[0])
    q = (x / s).round().add(z).clamp(enc.qmin, enc.qmax).sub(z).mul(s)
    return x + (q - x).detach()


class _Unit:
    """One unit as a torch function of its input, the learned layers' weights given per call."""

    def __init__(self, unit: Unit, idx: GraphIndex, act_encodings: dict[str, Encoding], device: str):
        import torch

        self.unit, self.device = unit, device
        self.act = act_encodings
        self.consts: dict[str, Any] = {}
        for n in unit.nodes:
            if n.op_type not in OPS:
                raise _Unsupported(n.op_type)
            for t in n.input:
                if t and idx.is_constant(t) and t not in self.consts:
                    v = idx.constant(t)
                    self.consts[t] = (torch.from_numpy(np.array(v, dtype=np.float32)).to(device)
                                      if v.dtype.kind == "f" else np.asarray(v))
        for lay in unit.layers:
            if lay.node.op_type == "Conv" and len(lay.weight_shape) not in (3, 4):
                raise _Unsupported("Conv of this rank")
            if lay.node.op_type not in ("Conv", "Gemm", "MatMul"):
                raise _Unsupported(lay.node.op_type)

    def __call__(self, x, weights: dict[str, Any] | None = None, biases: dict[str, Any] | None = None,
                 quant: bool = False, drop: float = 0.0, gen=None):
        """The unit's output for input ``x``. ``quant``: activations fake-quantized where the QDQ model quantizes
        them (the input too); ``drop``: QDrop's probability of keeping an element's float value."""
        import torch

        def q(name, v):
            if not quant or name not in self.act:
                return v
            vq = _fake_quant(v, self.act[name], self.device)
            if drop > 0:
                keep = torch.rand(v.shape, generator=gen, device="cpu").to(self.device) < drop
                return torch.where(keep, v, vq)
            return vq

        env = {self.unit.input: q(self.unit.input, x)}
        for n in self.unit.nodes:
            args = []
            for i, t in enumerate(n.input):
                if not t:
                    args.append(None)
                elif weights is not None and t in weights:
                    args.append(weights[t])
                elif biases is not None and t in biases:
                    args.append(biases[t])
                elif t in self.consts:
                    args.append(self.consts[t])
                else:
                    args.append(env[t])
            if n.op_type in ("Clip",):
                args = [args[0], *[None if a is None else float(np.asarray(a.cpu() if hasattr(a, "cpu") else a))
                                   for a in args[1:]]]
            y = OPS[n.op_type](n, *args)
            env[n.output[0]] = y if n.output[0] == self.unit.output else q(n.output[0], y)
        return env[self.unit.output]


def activation_encodings(qdq: onnx.ModelProto, plan: QuantPlan, weights: set[str]) -> dict[str, Encoding]:
    """The per-tensor encodings of the tensors a QuantizeLinear of the rendered ``qdq`` reads, ``weights`` aside:
    what :class:`_Unit` fake-quantizes to run as the QDQ model does."""
    quantized = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    return {t: plan.encodings[t] for t in quantized if t in plan.encodings and plan.encodings[t].axis is None
            and t not in weights}


def _batches_rows(samples: int, m: int, gen) -> Iterable[Any]:
    import torch

    while True:
        perm = torch.randperm(samples, generator=gen)
        for a in range(0, samples - m + 1, m):
            yield perm[a:a + m]


@dataclass
class Reconstructed:
    """What reconstruction did to one unit."""

    unit: str
    layers: list[str]
    samples: int
    seconds: float
    loss_nearest: float  # mean squared output error (per element) on the cached samples, activations quantized
    loss_learned: float
    kept: bool  # the learned weights replaced nearest rounding
    scale_change: float | None = None  # AdaQuant: mean |s'/s - 1| over the scales

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "layers": self.layers, "samples": self.samples, "seconds": round(self.seconds, 3),
                "loss_nearest": self.loss_nearest, "loss_learned": self.loss_learned, "kept": self.kept,
                **({"scale_change": self.scale_change} if self.scale_change is not None else {})}


def _weight_tensors(lay: _Layer, w: np.ndarray, enc: Encoding, device: str):
    """Scale and zero point of ``enc`` broadcastable to the weight, torch."""
    import torch

    shape = [1] * w.ndim
    if enc.axis is not None:
        shape[enc.axis] = -1
    s = torch.tensor(np.asarray(enc.scale, np.float32).reshape(shape), device=device)
    z = torch.tensor(np.asarray(enc.zero_point, np.float32).reshape(shape), device=device)
    return s, z


def reconstruct(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
                providers: list[str], *, blocks: bool, adaquant: bool, iterations: int, qdrop: bool = True,
                seed: int = 0, threads: int = 0, device: str = "auto",
                float_weights: dict[str, np.ndarray] | None = None,
                frozen: dict[str, Encoding] | None = None, learn_bias: bool | None = None) -> list[Reconstructed]:
    """Reconstruct the units of ``model`` in place (module doc): blocks (``blocks``) or single layers, learning the
    rounding, or weights + scales (+ biases) with ``adaquant``. Weight initializers become grid values; their
    encodings go into ``frozen`` (and the plan: an AdaQuant scale is new); ``float_weights`` receives each replaced
    weight's float values."""
    import torch

    float_weights = {} if float_weights is None else float_weights
    frozen = {} if frozen is None else frozen
    learn_bias = adaquant if learn_bias is None else learn_bias
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
        return _reconstruct(model, plan, idx, list(batches), providers, blocks, adaquant, iterations, qdrop, seed,
                            dev, float_weights, frozen, learn_bias)
    finally:
        torch.set_num_threads(before)


def _reconstruct(model, plan, idx, batches, providers, blocks, adaquant, iterations, qdrop, seed, device,
                 float_weights, frozen, learn_bias) -> list[Reconstructed]:
    import torch

    units = find_units(model, plan, idx, blocks)
    out: list[Reconstructed] = []
    what = "block reconstruction" if blocks else "adaquant"
    capture = IncrementalCapture(batches, providers)  # the QDQ model's
    for ui, unit in enumerate(units):
        t0 = time.perf_counter()
        qdq = render_control_flow(model, plan.encodings)
        act = activation_encodings(qdq, plan, {lay.weight for lay in unit.layers})
        try:
            fn = _Unit(unit, idx, act, device)
            xq = _cache_inputs(unit, qdq, model, capture, seed + ui)
            n = len(xq)
            xq_t = torch.from_numpy(xq).to(device)
            with torch.no_grad():  # the unit's float weights and activations on the same input (AdaRound's target)
                target = torch.cat([fn(xq_t[a:a + 64]) for a in range(0, n, 64)])
        except _Unsupported as e:
            log.info("%s: %s left to nearest rounding (op %s has no torch form here)", what, unit.name, e)
            continue
        result = _optimize_unit(fn, unit, idx, xq_t, target, adaquant, iterations, qdrop, seed + ui, device,
                                learn_bias, desc=f"{what} {ui + 1}/{len(units)}")
        loss_near, loss_learned, weights, encs, biases, scale_change = result
        kept = loss_learned < loss_near
        for lay in unit.layers:
            w = idx.constant(lay.weight)
            enc = encs[lay.weight] if kept else lay.enc
            values = weights[lay.weight] if kept else enc.dequantize(enc.quantize(w))
            values = values.astype(w.dtype)
            if not np.array_equal(enc.quantize(values), enc.quantize(enc.dequantize(enc.quantize(values)))):
                raise RuntimeError(f"internal error: reconstructed weight {lay.weight!r} does not round back")
            float_weights.setdefault(lay.weight, w)
            idx.initializers[lay.weight].CopyFrom(numpy_helper.from_array(values, lay.weight))
            frozen[lay.weight] = enc
            plan.encodings[lay.weight] = enc
            lay.enc = enc
            if kept and lay.weight in biases and lay.bias is not None:
                b_name = lay.node.input[2]
                b_old = idx.constant(b_name)
                b_new = biases[lay.weight].reshape(b_old.shape).astype(b_old.dtype)
                idx.initializers[b_name].CopyFrom(numpy_helper.from_array(b_new, b_name))
                lay.bias = b_new.reshape(-1).astype(np.float32)
        out.append(Reconstructed(unit.name, [lay.node.name for lay in unit.layers], n, time.perf_counter() - t0,
                                 loss_near, loss_learned, kept, scale_change))
        log.debug("%s %s: %d samples, loss nearest %.4g learned %.4g (%s), %.1f s", what, unit.name, n, loss_near,
                  loss_learned, "kept" if kept else "nearest stays", out[-1].seconds)
    if out:
        log.info("%s: %d unit(s), %d steps each on %s; output loss (sum) nearest %.4g, learned %.4g (kept in %d)",
                 what, len(out), iterations, device, sum(r.loss_nearest for r in out),
                 sum(min(r.loss_learned, r.loss_nearest) for r in out), sum(r.kept for r in out))
    return out


def _cache_inputs(unit: Unit, qdq: onnx.ModelProto, model: onnx.ModelProto, capture: IncrementalCapture,
                  seed: int) -> np.ndarray:
    """The unit's input from the quantized prefix (``capture``: the QDQ model's; units come in graph order, so
    nothing it computed changes later), whole samples, at most CACHE_MB."""
    t = unit.input
    batches = capture.batches
    if not batches:
        raise ValueError("reconstruction needs calibration batches")
    if t in {i.name for i in model.graph.input}:  # the graph's input: the samples themselves
        xq = [b[t] for b in batches]
    else:
        xq = [v[t] for v in capture.capture(qdq, [t])]
    xq = np.concatenate(xq).astype(np.float32)
    per_sample = 2 * xq[0].nbytes + 1  # the input + about the target
    keep = max(MIN_SAMPLES, (CACHE_MB << 20) // per_sample)
    if keep < len(xq):
        xq = xq[np.sort(np.random.default_rng(seed).choice(len(xq), size=keep, replace=False))]
    return np.ascontiguousarray(xq)


def _optimize_unit(fn: _Unit, unit: Unit, idx: GraphIndex, xq, target, adaquant: bool, iterations: int,
                   qdrop: bool, seed: int, device: str, learn_bias: bool, desc: str):
    """Adam on the unit's learned parameters; returns (loss nearest, loss learned, grid weights, encodings, biases,
    mean scale change)."""
    import torch
    from ..progress import tqdm

    gen = torch.Generator().manual_seed(seed)
    n = len(xq)
    params, state = [], {}
    for lay in unit.layers:
        w = idx.constant(lay.weight).astype(np.float32)
        s, z = _weight_tensors(lay, w, lay.enc, device)
        wt = torch.from_numpy(w).to(device)
        lo, hi = float(lay.enc.qmin) - z, float(lay.enc.qmax) - z
        st = {"w": wt, "s": s, "lo": lo, "hi": hi, "z": z}
        if adaquant:
            st["d"] = torch.zeros_like(wt, requires_grad=True)
            st["g"] = torch.zeros_like(s, requires_grad=True)
            params += [{"params": [st["d"]], "lr": WEIGHT_LR}, {"params": [st["g"]], "lr": SCALE_LR}]
            if learn_bias and lay.bias is not None and len(idx.uses(lay.node.input[2])) == 1:
                b0 = torch.from_numpy(idx.constant(lay.node.input[2]).astype(np.float32).reshape(-1)).to(device)
                st["b0"], st["db"] = b0, torch.zeros_like(b0, requires_grad=True)
                st["bscale"] = float(target.abs().mean()) + 1e-8
                params.append({"params": [st["db"]], "lr": BIAS_LR})
        else:
            floor = torch.floor(wt / s)
            rest = (wt / s - floor).clamp(0.0, 1.0)
            st["floor"] = floor
            st["v"] = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)
            params.append({"params": [st["v"]], "lr": learning_rate(iterations)})
        state[lay.weight] = st

    def h(v):
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def weights(mode: str):
        """mode: nearest | soft (training) | hard (the result)."""
        ws, bs = {}, {}
        for name, st in state.items():
            if mode == "nearest":
                qv = torch.clamp(torch.round(st["w"] / st["s"]), st["lo"], st["hi"])
                ws[name] = qv * st["s"]
            elif adaquant:
                s = st["s"] * torch.exp(st["g"])
                wv = st["w"] + st["s"] * st["d"]
                r = wv / s
                r = r + (torch.round(r) - r).detach()
                ws[name] = torch.clamp(r, st["lo"], st["hi"]) * s
                if "db" in st:
                    bs[name] = st["b0"] + st["bscale"] * st["db"]
            else:
                hv = h(st["v"]) if mode == "soft" else (h(st["v"]) >= 0.5).float()
                ws[name] = torch.clamp(st["floor"] + hv, st["lo"], st["hi"]) * st["s"]
        return ws, bs

    def call(x, ws, bs, **kw):
        layer_of = {lay.weight: lay for lay in unit.layers}
        wmap = dict(ws)
        bmap = {layer_of[k].node.input[2]: v for k, v in bs.items()}
        return fn(x, wmap, bmap, **kw)

    def full_loss(ws, bs) -> float:
        with torch.no_grad():
            total = 0.0
            for a in range(0, n, 64):
                total += float(((call(xq[a:a + 64], ws, bs, quant=True) - target[a:a + 64]) ** 2).sum())
            return total / target.numel()

    loss_near = full_loss(*weights("nearest"))
    if params and iterations:
        opt = torch.optim.Adam(params)
        m = min(MINIBATCH, n)
        rows = _batches_rows(n, m, gen)
        warm = WARM_START * iterations
        with tqdm(total=iterations, desc=desc, unit="it", disable=None, leave=False) as bar:
            for it in range(iterations):
                pick = next(rows).to(device)
                ws, bs = weights("soft")
                y = call(xq[pick], ws, bs, quant=True, drop=QDROP_P if qdrop else 0.0, gen=gen)
                loss = ((y - target[pick]) ** 2).sum(1).mean()  # BRECQ's: summed over channels, mean elsewhere
                if not adaquant and it >= warm:
                    rel = (it - warm) / max(iterations - warm, 1)
                    beta = BETA_RANGE[1] + 0.5 * (BETA_RANGE[0] - BETA_RANGE[1]) * (1 + math.cos(rel * math.pi))
                    loss = loss + REG_PARAM * sum((1 - (2 * h(st["v"]) - 1).abs().pow(beta)).sum()
                                                  for st in state.values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)

    ws, bs = weights("hard")
    loss_learned = full_loss(ws, bs)
    grid, encs, biases, changes = {}, {}, {}, []
    layer_of = {lay.weight: lay for lay in unit.layers}
    with torch.no_grad():
        for name, st in state.items():
            enc = layer_of[name].enc
            if adaquant:
                s_new = (st["s"] * torch.exp(st["g"])).cpu().numpy().reshape(-1)
                changes += list(np.abs(s_new / np.asarray(enc.scale, np.float32) - 1))
                enc = Encoding(enc.bitwidth, enc.signed, enc.symmetric, tuple(float(v) for v in s_new),
                               enc.zero_point, enc.axis)
            q = np.rint(ws[name].cpu().numpy() / _weight_tensors(layer_of[name], st["w"], enc, "cpu")[0].numpy())
            q = q + _weight_tensors(layer_of[name], st["w"], enc, "cpu")[1].numpy()
            q = np.clip(q, enc.qmin, enc.qmax).astype(enc.numpy_dtype)
            grid[name] = enc.dequantize(q)
            encs[name] = enc
            if name in bs:
                biases[name] = bs[name].cpu().numpy()
    return loss_near, loss_learned, grid, encs, biases, (float(np.mean(changes)) if changes else None)
