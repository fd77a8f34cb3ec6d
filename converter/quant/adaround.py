"""AdaRound: each layer's weights rounded up or down by what reconstructs its output, not to the nearest level.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (2020), as AIMET runs it. Per
layer (Conv 1-D/2-D, Gemm, MatMul with a constant 2-D weight), in graph order, with the weight's encoding fixed
(the plan's per-channel or per-tensor scale ``s``, symmetric, ``b`` bits)::

    W~ = s * clip(floor(W / s) + h(V), qmin, qmax)
    h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)          ZETA = 1.1, GAMMA = -0.1
    loss = mean_rows || f(W~ x_q + b) - f(W x_f + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

``V`` starts where ``h(V)`` is the fractional part of ``W / s`` (so ``W~ = W`` at first); Adam minimises the
loss (lr 1e-3 at AIMET's 10000 iterations, ``1e-3 * 10000 / N`` for fewer: :func:`learning_rate`); the regularizer (``lambda`` = 0.01) is off for the first 20% of the iterations, then
``beta`` anneals from 20 to 2 (cosine), pushing every ``h`` to 0 or 1. The result is the hard rounding
``floor(W / s) + (h >= 0.5)``. ``x_q``: the layer's input in the QDQ model built so far (earlier layers already
AdaRounded, activations quantized: what the layer will really read); the target is the float model's output of
that layer (float input, float weights); ``f`` is the activation fused after the layer (Relu, Clip), as AIMET
applies it to both sides.

Memory is bounded per layer: for every calibration batch a random subset of output positions is kept, a Conv's
as im2col rows (the input patch each position reads, gathered at those positions only, never the whole unfolded
map), with the float output there: at most :data:`MAX_ROWS` rows and :data:`CACHE_MB` MiB per layer, one layer
at a time. Each iteration takes the next :data:`MINIBATCH` of them, in an order reshuffled every epoch.

The rounding reaches the QDQ model and the encodings file through the float model: each weight initializer is
replaced by its dequantized grid values ``s * q`` (``q`` the AdaRounded integers), and the plan freezes the
weight's encoding (:attr:`QuantPlan.frozen_weights`), so the usual nearest rounding of those values gives ``q``
back exactly (``rint((s * q) / s) = q`` in float32 for ``|q| <= 2**15``; checked). The changed float model is
written beside the QDQ model, as CLE and bias correction do; the encodings apply to it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.runner import iter_capture
from ..graph.index import GraphIndex, attr
from .encoding import Encoding
from .plan import WEIGHT, QuantPlan
from .qdq import render_qdq

log = logging.getLogger("converter")

ZETA, GAMMA = 1.1, -0.1
REG_PARAM = 0.01  # lambda: weight of the rounding regularizer
BETA_RANGE = (20.0, 2.0)  # beta annealed from the first to the second
WARM_START = 0.2  # fraction of the iterations without the regularizer
LEARNING_RATE = 1e-3  # Adam's at REFERENCE_ITERATIONS (AIMET: torch's default, with 10000 iterations)
REFERENCE_ITERATIONS = 10000  # fewer iterations get a proportionally larger rate: V must travel as far
MAX_ROWS = 16384  # cached rows (output positions) per layer
CACHE_MB = 64  # bound on a layer's cached inputs + targets
MINIBATCH = 1024  # rows per iteration
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Rounded:
    """What AdaRound did to one layer."""

    node: str
    weight: str
    rows: int  # cached rows (output positions) it was optimized on
    seconds: float
    loss_nearest: float  # reconstruction loss (mean squared output error per row) with nearest rounding
    loss_adaround: float  # the same with the AdaRounded weights (kept only when lower)
    flipped: float  # fraction of the weights rounded the other way than nearest
    kept: bool  # False: nearest rounding was better on the cached rows and stays

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "weight": self.weight, "rows": self.rows, "seconds": round(self.seconds, 3),
                "loss_nearest": self.loss_nearest, "loss_adaround": self.loss_adaround,
                "flipped_fraction": self.flipped, "kept": self.kept}


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight: str
    enc: Encoding
    groups: int = 1  # Conv groups
    act: tuple[float, float] | None = None  # clamp bounds of the fused activation (Relu: (0, inf))
    bias: np.ndarray | None = None  # constant bias, one value per output
    weight_shape: tuple[int, ...] = ()  # the weight's shape

    @property
    def outputs(self) -> int:
        shape = self.weight_shape
        return shape[0] if self.node.op_type == "Conv" or attr(self.node, "transB", 0) else shape[1]


def _fused_activation(node: onnx.NodeProto, idx: GraphIndex) -> tuple[float, float] | None:
    users = idx.uses(node.output[0])
    if len(users) != 1 or node.output[0] in idx.graph_outputs:
        return None
    u = users[0]
    if u.op_type == "Relu":
        return 0.0, math.inf
    if u.op_type == "Clip":
        bounds = []
        for i, default in ((1, -math.inf), (2, math.inf)):
            if len(u.input) > i and u.input[i]:
                v = idx.constant(u.input[i])
                if v is None:
                    return None
                bounds.append(float(v))
            else:
                bounds.append(default)
        return bounds[0], bounds[1]
    return None


def adaround_layers(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> list[_Layer]:
    """The layers AdaRound optimizes: a quantized constant weight read by this node alone, of a supported form
    (Conv 1-D/2-D with explicit pads, Gemm without transA/alpha/beta, MatMul with a 2-D weight)."""
    out = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        t = plan.tensors.get(w)
        if t is None or t.role != WEIGHT or w not in plan.encodings or not idx.is_constant(w):
            continue
        if len(idx.uses(w)) != 1 or not idx.is_constant(w):
            continue
        shape = idx.constant(w).shape
        if node.op_type == "Conv":
            if len(shape) not in (3, 4) or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
        elif node.op_type == "Gemm":
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
                continue
        elif len(shape) != 2:
            continue
        layer = _Layer(node, w, plan.encodings[w], int(attr(node, "group", 1)) if node.op_type == "Conv" else 1,
                       _fused_activation(node, idx), weight_shape=tuple(shape))
        if len(node.input) > 2 and node.input[2]:
            b = idx.constant(node.input[2])
            if b is None or b.size not in (1, layer.outputs):
                continue
            layer.bias = np.broadcast_to(b.reshape(-1), (layer.outputs,)).astype(np.float32)
        out.append(layer)
    return out


# --- the layer as a matrix product: out[n, g, o] = sum_k P[n, g, k] * W2[g, o, k] ------------------------------

def _weight_matrix(layer: _Layer, w):
    """The weight (torch, original layout) as [groups, out per group, k]."""
    op = layer.node.op_type
    if op == "Conv":
        o = w.shape[0]
        return w.reshape(layer.groups, o // layer.groups, -1)
    if op == "Gemm" and attr(layer.node, "transB", 0):
        return w.unsqueeze(0)
    return w.t().unsqueeze(0)


def _conv_geometry(node: onnx.NodeProto, x_shape: tuple[int, ...], kernel: tuple[int, ...]):
    nd = len(kernel)
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    pads = list(attr(node, "pads", [0] * 2 * nd))
    out = [(x_shape[2 + i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(nd)]
    return strides, dil, pads, out


def _sample_rows(layer: _Layer, x: np.ndarray, y: np.ndarray, m: int, rng: np.random.Generator,
                 kernel: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``m`` random output positions of one batch: the inputs they read ([m, groups, k]) and the float outputs
    there ([m, out])."""
    op = layer.node.op_type
    if op != "Conv":
        xr = x.reshape(-1, x.shape[-1])
        yr = y.reshape(-1, y.shape[-1])
        pick = np.sort(rng.choice(len(xr), size=min(m, len(xr)), replace=False))
        return xr[pick][:, None, :].astype(np.float32), yr[pick].astype(np.float32)
    if x.ndim == 3:  # Conv1d as a 2-D one of height 1
        x, y, kernel = x[:, :, None, :], y[:, :, None, :], (1, *kernel)
        strides, dil, pads, _ = _conv_geometry(layer.node, x.shape[:2] + x.shape[3:], kernel[1:])
        strides, dil, pads = [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
    else:
        strides, dil, pads, _ = _conv_geometry(layer.node, x.shape, kernel)
    b, c = x.shape[:2]
    ho, wo = y.shape[2], y.shape[3]
    total = b * ho * wo
    pick = np.sort(rng.choice(total, size=min(m, total), replace=False))
    bi, rem = np.divmod(pick, ho * wo)
    oy, ox = np.divmod(rem, wo)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    taps = [xp[bi, :, oy * strides[0] + ky * dil[0], ox * strides[1] + kx * dil[1]]  # [m, c] each
            for ky in range(kernel[0]) for kx in range(kernel[1])]
    patches = np.stack(taps, axis=2)  # [m, c, kh*kw]; k within a group runs (channel, ky, kx) like the weight
    patches = patches.reshape(len(pick), layer.groups, -1).astype(np.float32)
    return patches, y[bi, :, oy, ox].astype(np.float32)


def _prefix(model: onnx.ModelProto, wanted: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``wanted`` (its outputs left to the capture): each layer's capture
    then runs only the layers before it, not the whole model. Models with If/Loop/Scan are returned whole."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    keep: set[int] = set()
    stack = list(wanted)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(t for t in g.node[i].input if t)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(n for i, n in enumerate(g.node) if i in keep)
    used = {t for n in out.graph.node for t in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    del out.graph.output[:]
    return out


def _cache(layer: _Layer, qdq: onnx.ModelProto, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
           providers: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (quantized-prefix input patches, float layer outputs), bounded by MAX_ROWS / CACHE_MB."""
    node = layer.node
    q_node = next(n for n in qdq.graph.node if n.name == node.name)
    q_in, f_out = q_node.input[0], node.output[0]
    shape = layer.weight_shape
    kernel = tuple(shape[2:]) if node.op_type == "Conv" else ()
    row_bytes = 4 * (int(np.prod(shape)) * layer.groups // layer.outputs + layer.outputs)
    rows = max(256, min(MAX_ROWS, (CACHE_MB << 20) // row_bytes))
    per_batch = max(1, -(-rows // max(len(batches), 1)))
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for qv, fv in zip(iter_capture(_prefix(qdq, [q_in]), [q_in], batches, providers),
                      iter_capture(_prefix(model, [f_out]), [f_out], batches, providers)):
        x, y = qv[q_in], fv[f_out]
        px, py = _sample_rows(layer, x, y, per_batch, rng, kernel)
        xs.append(px)
        ys.append(py)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if layer.bias is not None:  # the target without the bias (the optimized product is compared before it)
        y = y - layer.bias.reshape(1, -1)
    return x, y


def learning_rate(iterations: int) -> float:
    """Adam's rate for ``iterations`` steps: 1e-3 at 10000 (the paper's and AIMET's), scaled up for fewer so
    that ``V`` can move as far (an Adam step moves each element by about the rate)."""
    return LEARNING_RATE * max(1.0, REFERENCE_ITERATIONS / iterations)


def _optimize(layer: _Layer, w_float: np.ndarray, x: np.ndarray, y: np.ndarray, iterations: int, seed: int, device: str, bar: Any = None) -> tuple[np.ndarray, float, float]:
    """The AdaRounded integer weights (original layout), and the reconstruction loss of nearest and of them."""
    import torch

    enc = layer.enc
    if enc.blocked:  # one scale per block: spread over the weight's shape
        scale = np.ascontiguousarray(enc.expanded(enc.scale_array(), w_float.shape), dtype=np.float32)
    else:
        shape = [1] * w_float.ndim
        if enc.axis is not None:
            shape[enc.axis] = -1
        scale = enc.scale_array().reshape(shape)
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(scale, device=device)
    w = torch.tensor(w_float, dtype=torch.float32, device=device)
    # rows as [groups, n, k] (one batched matmul per step, grouped/depthwise too), shuffled once per epoch so that
    # each step reads a contiguous slice instead of gathering rows
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))).to(device)
    yt = torch.from_numpy(y).to(device)
    n = yt.shape[0]
    b = torch.from_numpy(layer.bias.reshape(1, -1).copy()).to(device) if layer.bias is not None else None
    lo, hi = (layer.act if layer.act is not None else (-math.inf, math.inf))
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(0.0, 1.0)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)
    qmin, qmax = float(enc.qmin), float(enc.qmax)

    def out(q, xb):  # xb: [g, m, k] -> [m, g * o]
        wm = _weight_matrix(layer, q * s)  # [g, o, k]
        o = torch.bmm(xb, wm.transpose(1, 2))  # [g, m, o]
        return o.transpose(0, 1).reshape(xb.shape[1], -1)

    def act(o):
        if b is not None:
            o = o + b
        return o.clamp(lo, hi) if layer.act is not None else o

    def recon(q, xb, yb):
        return ((act(out(q, xb)) - act(yb)) ** 2).sum(dim=1).mean()

    def h(v):
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def full_loss(q):
        with torch.no_grad():
            total = 0.0
            for a in range(0, n, 4096):
                total += float(recon(q, xt[:, a:a + 4096], yt[a:a + 4096])) * len(yt[a:a + 4096])
            return total / n

    nearest = torch.clamp(torch.round(w / s), qmin, qmax)
    opt = torch.optim.Adam([v], lr=learning_rate(iterations))
    warm = WARM_START * iterations
    m, a = min(MINIBATCH, n), n
    for it in range(iterations):
        if a + m > n:  # a new epoch: reshuffle
            perm = torch.randperm(n, generator=gen).to(device)
            xs, ys, a = xt[:, perm], yt[perm], 0
        q = torch.clamp(w_floor + h(v), qmin, qmax)
        loss = recon(q, xs[:, a:a + m], ys[a:a + m])
        a += m
        if it >= warm:
            rel = (it - warm) / max(iterations - warm, 1)
            beta = BETA_RANGE[1] + 0.5 * (BETA_RANGE[0] - BETA_RANGE[1]) * (1 + math.cos(rel * math.pi))
            loss = loss + REG_PARAM * (1 - (2 * h(v) - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        hard = torch.clamp(w_floor + (h(v) >= 0.5).float(), qmin, qmax)
    return hard.cpu().numpy(), full_loss(nearest), full_loss(hard)


def adaround(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
             providers: list[str], iterations: int, seed: int = 0, threads: int = 0,
             float_weights: dict[str, np.ndarray] | None = None) -> list[Rounded]:
    """AdaRound the planned layers of ``model`` in place (see the module doc): their weight initializers become
    the AdaRounded grid values and ``plan.frozen_weights`` keeps their encodings. ``threads``: torch's CPU
    threads while optimizing (0: torch's default). ``float_weights`` receives each replaced weight's float
    values (bias correction measures against them). Returns what changed."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _adaround(model, plan, idx, batches, providers, iterations, seed,
                         {} if float_weights is None else float_weights)
    finally:
        torch.set_num_threads(before)


def _adaround(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
              providers: list[str], iterations: int, seed: int, float_weights: dict[str, np.ndarray]) -> list[Rounded]:
    import torch
    from tqdm import tqdm

    layers = adaround_layers(model, plan, idx)
    if not layers:
        return []
    batches = list(batches)
    device = "cuda" if torch.cuda.is_available() and "CUDAExecutionProvider" in providers else "cpu"
    out = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        node = layer.node
        x, y = _cache(layer, render_qdq(model, plan.encodings), model, batches, providers, seed + i)
        w = idx.constant(layer.weight)
        with tqdm(total=iterations, desc=f"adaround {i + 1}/{len(layers)} {node.name}", unit="it", disable=None,
                  leave=False) as bar:
            q, loss_nearest, loss_ada = _optimize(layer, w, x, y, iterations, seed + i, device, bar)
        nearest = layer.enc.quantize(w)
        kept = loss_ada < loss_nearest
        if not kept:
            q = nearest.astype(np.float32)
        values = layer.enc.dequantize(q).astype(w.dtype)
        if not np.array_equal(layer.enc.quantize(values), q.astype(layer.enc.numpy_dtype)):
            raise RuntimeError(f"internal error: AdaRounded weight {layer.weight!r} does not round back to its "
                               "integers")
        float_weights.setdefault(layer.weight, w)
        idx.initializers[layer.weight].CopyFrom(numpy_helper.from_array(values, layer.weight))
        plan.frozen_weights.add(layer.weight)
        out.append(Rounded(node.name, layer.weight, len(x), time.perf_counter() - t0, loss_nearest, loss_ada,
                           float(np.mean(q != nearest)), kept))
        log.debug("adaround %s: %d rows, loss %.4g -> %.4g (%s), %.1f s", node.name, len(x), loss_nearest, loss_ada,
                  "kept" if kept else "nearest kept", out[-1].seconds)
    log.info("adaround: %d layer(s), %d iterations each; reconstruction loss %.4g -> %.4g (sum over layers)",
             len(out), iterations, sum(r.loss_nearest for r in out), sum(r.loss_adaround for r in out))
    return out
