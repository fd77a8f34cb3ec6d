"""AdaRound: each layer's weights rounded up or down by what reconstructs its output, not to the nearest level.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (2020), as AIMET runs it. Per
layer (Conv and ConvTranspose 1-D/2-D, Gemm, MatMul with a constant 2-D weight), in graph order, with the
weight's encoding fixed (the plan's per-channel or per-tensor scale ``s``, ``b`` bits; asymmetric weights: every
integer below is ``q - zero point``, bounds shifted alike)::

    W~ = s * clip(floor(W / s) + h(V), qmin, qmax)
    h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)          ZETA = 1.1, GAMMA = -0.1
    loss = mean_rows || f(W~ x_q + b) - f(W x_q + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

``V`` starts where ``h(V)`` is the fractional part of ``W / s`` (so ``W~ = W`` at first); Adam minimises the
loss (lr 1e-3 at AIMET's 10000 iterations, ``1e-3 * 10000 / N`` for fewer: :func:`learning_rate`); the regularizer (``lambda`` = 0.01) is off for the first 20% of the iterations, then
``beta`` anneals from 20 to 2 (cosine), pushing every ``h`` to 0 or 1. The result is the hard rounding
``floor(W / s) + (h >= 0.5)``. ``x_q``: the layer's input in the QDQ model built so far (earlier layers already
AdaRounded, activations quantized: what the layer will really read); the target is the layer's float weights on
that same input; ``f`` is the activation fused after the layer (Relu, Clip), as AIMET applies it to both sides.
Each layer reconstructs its own product, not what the layers before it lost: a target from another input drifts
from the QDQ model. The float model's own output of the layer (AdaRound's asymmetric form) makes each layer fit
the errors upstream of it on the calibration samples (EfficientNet-Lite0 W4A8: 527/900 against 775). The float
model with the earlier layers' rounded weights (activations float; used before) runs away where a network
amplifies its weight errors with no activation ranges to clamp them: on PP-OCRv4's recognizer the targets grew to
1e8 times the activations, the search chased them for over 25 minutes, and the model was destroyed (CER 1.0); with
the layer's own product as the target, 64 s and CER 0.016 (FP32 0.0016); on PP-OCR's direction classifier 194/198
(FP32 193; 189 before, with the output check's fallback).

**Local search** (``search``, on by default; Adam's steps may be 0, then it runs alone): from the better of
nearest and AdaRound, greedy moves of single weights by one level on the layer's quadratic loss (pre-activation,
from the cached rows' ``E[x x^T]`` and ``E[x y]``; :func:`local_search`), damped towards the float weights by
an amount cross-validated on the calibration samples. Its result is kept where its true loss (activation
applied) is the lowest of the three. Measured on EfficientNet-Lite0 with 4-bit weights, layer by layer: the
first depthwise Conv's loss 14.7 (nearest) -> 14.0 (AdaRound, 300 steps) -> 4.1 (search), a pointwise Conv's
145 -> 136 -> 14; the exhaustive optimum of the depthwise one (every floor/ceil choice of its 3x3 kernels) is
3.7. With bias correction after it, the losses compared are centered (each output's mean error is bias
correction's to remove), so the search spends its moves on what correction cannot fix. A depthwise Conv with an
activation after it weighs the rows its activation clips (target outside the clamp) by
:data:`CLIPPED_ROW_WEIGHT` (:func:`_row_weights`): an error there mostly vanishes behind the clamp. Measured on
EfficientNet-Lite0 W4A8 (asymmetric, first/last 8 bits, the search alone + bias correction): 755 -> 763/900; the
same weighting on the dense layers too (each output its own weighted moments): 761, at 1.4x the time, so not kept.

Memory is bounded per layer: for every calibration batch a random subset of output positions is kept, a Conv's
as im2col rows (the input patch each position reads, gathered at those positions only, never the whole unfolded
map), with the float weights' output there: at most :data:`MAX_ROWS` rows and :data:`CACHE_MB` MiB per layer,
one layer at a time. Each iteration takes the next :data:`MINIBATCH` of them, in an order reshuffled every epoch.
The layer inputs come from :class:`converter.calib.incremental.IncrementalCapture` over the QDQ model: it keeps
the activations at the frontier of what it has computed (at most :data:`converter.calib.incremental.LIMIT_MB`)
and runs only the nodes since, so each node runs about once over the whole pass instead of once per layer after
it (EfficientNet-Lite0 W4A8, the search + bias correction: 198 -> 102 s, the same integers).

The rounding reaches the QDQ model and the encodings file through the float model: each weight initializer is
replaced by its dequantized grid values ``s * q`` (``q`` the AdaRounded integers), and the plan freezes the
weight's encoding (frozen by :mod:`converter.techniques.adaround`), so the usual nearest rounding of those values gives ``q``
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

from .torch_device import resolve_device
from ..calib.incremental import IncrementalCapture
from ..graph.clip import clip_bounds
from ..graph.index import GraphIndex, attr
from ..ops import WEIGHTED_LAYER_OPS
from .encoding import Encoding
from .plan import WEIGHT, QuantPlan
from .control_flow import render_control_flow  # the main graph and If/Loop/Scan bodies

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
SEARCH_DAMPS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the local search's pull towards the float weights, chosen
# by cross-validation (x mean input power x weights per output / samples)
SEARCH_MIN_ROWS = 4  # the local search runs where the cached rows are at least this many times the weights per output
SEARCH_MAX_STEPS = 4096  # moves per output channel at most (each one weight by one level)
CLIPPED_ROW_WEIGHT = 0.1  # the local search's weight of a depthwise row whose float output the activation clips


@dataclass
class Rounded:
    """What AdaRound did to one layer."""

    node: str
    weight: str
    rows: int  # cached rows (output positions) it was optimized on
    seconds: float
    loss_nearest: float  # reconstruction loss (mean squared output error per row) with nearest rounding
    loss_adaround: float  # the same with the AdaRounded weights
    flipped: float  # fraction of the weights rounded otherwise than to nearest (in the result)
    kept: bool  # False: nearest rounding was better on the cached rows and stays
    loss_search: float | None = None  # the local search's result from the better of the two (None: not run)
    chosen: str = "adaround"  # "nearest", "adaround" or "search": the lowest loss of them
    centered: bool = False  # losses without each output's mean error (bias correction follows and removes it)
    search_damp: float | None = None  # the damping the search's cross-validation chose

    @property
    def loss(self) -> float:
        return {"nearest": self.loss_nearest, "adaround": self.loss_adaround}.get(self.chosen, self.loss_search)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "weight": self.weight, "rows": self.rows, "seconds": round(self.seconds, 3),
                "loss_nearest": self.loss_nearest, "loss_adaround": self.loss_adaround,
                "flipped_fraction": self.flipped, "kept": self.kept, "chosen": self.chosen,
                "centered": self.centered, "search_damp": self.search_damp,
                **({"loss_search": self.loss_search} if self.loss_search is not None else {})}


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
        if self.node.op_type == "ConvTranspose":  # weight (C_in, C_out / group, k...)
            return shape[1] * self.groups
        return shape[0] if self.node.op_type == "Conv" or attr(self.node, "transB", 0) else shape[1]


def _fused_activation(node: onnx.NodeProto, idx: GraphIndex) -> tuple[float, float] | None:
    users = idx.uses(node.output[0])
    if len(users) != 1 or node.output[0] in idx.graph_outputs:
        return None
    u = users[0]
    if u.op_type == "Relu":
        return 0.0, math.inf
    if u.op_type == "Clip":
        return clip_bounds(u, idx)
    return None


def adaround_layers(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> list[_Layer]:
    """The layers AdaRound optimizes: a quantized constant weight read by this node alone, of a supported form
    (Conv / ConvTranspose 1-D/2-D with explicit pads (ConvTranspose: and no output_shape), Gemm without
    transA/alpha/beta, MatMul with a 2-D weight)."""
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        t = plan.tensors.get(w)
        if t is None or t.role != WEIGHT or w not in plan.encodings or not idx.is_constant(w):
            continue
        if len(idx.uses(w)) != 1 or not idx.is_constant(w):
            continue
        shape = idx.constant(w).shape
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(shape) not in (3, 4) or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            if node.op_type == "ConvTranspose" and attr(node, "output_shape", None) is not None:
                continue
        elif node.op_type == "Gemm":
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
                continue
        elif len(shape) != 2:
            continue
        groups = int(attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
        layer = _Layer(node, w, plan.encodings[w], groups,
                       _fused_activation(node, idx), weight_shape=tuple(shape))
        if len(node.input) > 2 and node.input[2]:
            b = idx.constant(node.input[2])
            if b is None or b.size not in (1, layer.outputs):
                continue
            layer.bias = np.broadcast_to(b.reshape(-1), (layer.outputs,)).astype(np.float32)
        out.append(layer)
    return out


# --- the layer as a matrix product: out[n, g, o] = sum_k P[n, g, k] * W2[g, o, k] ------------------------------
# A ConvTranspose is the Conv of its input with zeros inserted between the pixels (stride - 1 of them) and padded
# by dilation * (kernel - 1) - pad on each side (+ output_padding at the end), stride 1, with the kernel flipped
# in space and its input/output axes swapped: the rows are that Conv's patches, the weight matrix that kernel.

def _weight_matrix(layer: _Layer, w):
    """The weight (torch or numpy, original layout) as [groups, out per group, k]."""
    op = layer.node.op_type
    if op == "Conv":
        return w.reshape(layer.groups, w.shape[0] // layer.groups, -1)
    if op == "ConvTranspose":  # (C_in, C_out/g, *kernel) -> (g, C_out/g, C_in/g * kernel), flipped in space
        g, nd = layer.groups, len(w.shape) - 2
        m = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        space = tuple(range(3, 3 + nd))
        if isinstance(m, np.ndarray):
            m = np.flip(m, space).transpose(0, 2, 1, *space)
        else:  # torch
            m = m.flip(space).permute(0, 2, 1, *space)
        return m.reshape(g, w.shape[1], -1)
    if op == "Gemm" and attr(layer.node, "transB", 0):
        return w[None]
    return w.T[None]


def _from_weight_matrix(layer: _Layer, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`_weight_matrix` undone: the original layout."""
    op = layer.node.op_type
    if op == "Conv":
        return m.reshape(shape)
    if op == "ConvTranspose":
        g, space = layer.groups, tuple(range(3, len(shape) + 1))
        m = m.reshape(g, shape[1], shape[0] // g, *shape[2:]).transpose(0, 2, 1, *space)
        return np.ascontiguousarray(np.flip(m, space)).reshape(shape)
    if op == "Gemm" and attr(layer.node, "transB", 0):
        return m[0].reshape(shape)
    return m[0].T.reshape(shape)


def _conv_geometry(node: onnx.NodeProto, x_shape: tuple[int, ...], kernel: tuple[int, ...]):
    nd = len(kernel)
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    pads = list(attr(node, "pads", [0] * 2 * nd))
    out = [(x_shape[2 + i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(nd)]
    return strides, dil, pads, out


def _transposed_as_conv(node: onnx.NodeProto, x: np.ndarray, kernel: tuple[int, ...]):
    """A ConvTranspose's input as the equivalent Conv's (see above): zeros inserted, padded (cropped where the
    pad is negative); that Conv's strides (1), dilations and pads (0: applied here)."""
    nd = len(kernel)
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    pads = list(attr(node, "pads", [0] * 2 * nd))
    extra = list(attr(node, "output_padding", [0] * nd))
    up = np.zeros(x.shape[:2] + tuple((x.shape[2 + i] - 1) * strides[i] + 1 for i in range(nd)), dtype=x.dtype)
    up[(slice(None), slice(None), *(slice(None, None, st) for st in strides))] = x
    cut = []
    for i in range(nd):
        lo, hi = dil[i] * (kernel[i] - 1) - pads[i], dil[i] * (kernel[i] - 1) - pads[i + nd] + extra[i]
        up = np.pad(up, [(0, 0)] * (2 + i) + [(max(lo, 0), max(hi, 0))] + [(0, 0)] * (nd - 1 - i))
        cut.append(slice(max(-lo, 0), up.shape[2 + i] - max(-hi, 0)))
    return up[(slice(None), slice(None), *cut)], [1] * nd, dil, [0] * 2 * nd


def _sample_rows(layer: _Layer, x: np.ndarray, m: int, rng: np.random.Generator,
                 kernel: tuple[int, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """``m`` random output positions of one batch: the inputs they read ([m, groups, k]) and the positions (index
    arrays into the layer's output: (items,) for a Gemm/MatMul's flattened rows, (items, x) for a 1-D Conv,
    (items, y, x) for a 2-D one)."""
    op = layer.node.op_type
    if op not in ("Conv", "ConvTranspose"):
        xr = x.reshape(-1, x.shape[-1])
        pick = np.sort(rng.choice(len(xr), size=min(m, len(xr)), replace=False))
        return xr[pick][:, None, :].astype(np.float32), (pick,)
    if op == "ConvTranspose":
        x, strides, dil, pads = _transposed_as_conv(layer.node, x, kernel)
    else:
        strides, dil, pads, _ = _conv_geometry(layer.node, x.shape, kernel)
    one_d = x.ndim == 3
    if one_d:  # 1-D as 2-D of height 1
        x, kernel = x[:, :, None, :], (1, *kernel)
        strides, dil, pads = [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
    b, c = x.shape[:2]
    ho, wo = ((x.shape[2 + i] + pads[i] + pads[i + 2] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
              for i in range(2))
    total = b * ho * wo
    pick = np.sort(rng.choice(total, size=min(m, total), replace=False))
    bi, rem = np.divmod(pick, ho * wo)
    oy, ox = np.divmod(rem, wo)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    taps = [xp[bi, :, oy * strides[0] + ky * dil[0], ox * strides[1] + kx * dil[1]]  # [m, c] each
            for ky in range(kernel[0]) for kx in range(kernel[1])]
    patches = np.stack(taps, axis=2)  # [m, c, kh*kw]; k within a group runs (channel, ky, kx) like the weight
    patches = patches.reshape(len(pick), layer.groups, -1).astype(np.float32)
    return patches, ((bi, ox) if one_d else (bi, oy, ox))


def _cache(layer: _Layer, qdq: onnx.ModelProto, w_float: np.ndarray, capture: IncrementalCapture,
           seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of (quantized-prefix input patches, the layer's float weights' output on them before the bias), bounded
    by MAX_ROWS / CACHE_MB, and the number of samples (batch items: images, sequences) they come from.
    ``capture``: the QDQ model's."""
    node = layer.node
    q_node = next(n for n in qdq.graph.node if n.name == node.name)
    q_in = q_node.input[0]
    shape = layer.weight_shape
    kernel = tuple(shape[2:]) if node.op_type in ("Conv", "ConvTranspose") else ()
    row_bytes = 4 * (int(np.prod(shape)) * layer.groups // layer.outputs + layer.outputs)
    rows = max(256, min(MAX_ROWS, (CACHE_MB << 20) // row_bytes))
    per_batch = max(1, -(-rows // max(len(capture.batches), 1)))
    rng = np.random.default_rng(seed)
    w = _weight_matrix(layer, w_float.astype(np.float32))
    xs, samples = [], 0
    for qv in capture.capture(qdq, [q_in]):
        x = qv[q_in]
        samples += x.shape[0] if x.ndim > 1 else 1
        xs.append(_sample_rows(layer, x, per_batch, rng, kernel)[0])
    x = np.concatenate(xs)
    y = np.matmul(x.transpose(1, 0, 2), w.transpose(0, 2, 1))  # [g, n, o]: W x_q per group
    return x, np.ascontiguousarray(y.transpose(1, 0, 2)).reshape(len(x), -1), samples


def learning_rate(iterations: int) -> float:
    """Adam's rate for ``iterations`` steps: 1e-3 at 10000 (the paper's and AIMET's), scaled up for fewer so
    that ``V`` can move as far (an Adam step moves each element by about the rate)."""
    return LEARNING_RATE * max(1.0, REFERENCE_ITERATIONS / iterations)


def _scale(layer: _Layer, w_float: np.ndarray) -> np.ndarray:
    """The weight encoding's scales, broadcastable to the weight (original layout)."""
    return _spread(layer, layer.enc.scale_array(), w_float.shape)


def _zero(layer: _Layer, w_float: np.ndarray) -> np.ndarray:
    """The weight encoding's zero points (0 for symmetric weights), broadcastable to the weight. The optimizers
    work on ``q - zero``, the integers the dequantized weight is ``scale`` times."""
    return _spread(layer, np.asarray(layer.enc.zero_point, dtype=np.float32), w_float.shape)


def _spread(layer: _Layer, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    enc = layer.enc
    if enc.blocked:  # one value per block: spread over the weight's shape
        return np.ascontiguousarray(enc.expanded(values, shape), dtype=np.float32)
    out = [1] * len(shape)
    if enc.axis is not None:
        out[enc.axis] = -1
    return np.asarray(values, dtype=np.float32).reshape(out)


def _product(layer: _Layer, wq, xb):
    """The layer's output (before bias) for rows ``xb`` ([g, m, k], torch) and weights ``wq``: [m, g * o]."""
    import torch

    wm = _weight_matrix(layer, wq)  # [g, o, k]
    o = torch.bmm(xb, wm.transpose(1, 2))  # [g, m, o]
    return o.transpose(0, 1).reshape(xb.shape[1], -1)


def _activate(layer: _Layer, o, b):
    if b is not None:
        o = o + b
    return o.clamp(*layer.act) if layer.act is not None else o


def _loss(layer: _Layer, wq, xt, yt, b, center: bool, chunk: int = 4096) -> float:
    """Mean over the rows of the squared output error summed over outputs, ``f`` applied to both sides;
    ``center``: each output's mean error (over the rows, before ``f``) removed first, as bias correction will."""
    import torch

    n = yt.shape[0]
    with torch.no_grad():
        shift = 0.0
        if center:
            shift = sum((_product(layer, wq, xt[:, a:a + chunk]) - yt[a:a + chunk]).sum(0)
                        for a in range(0, n, chunk)) / n
        total = 0.0
        for a in range(0, n, chunk):
            o = _product(layer, wq, xt[:, a:a + chunk]) - shift
            total += float(((_activate(layer, o, b) - _activate(layer, yt[a:a + chunk], b)) ** 2).sum())
        return total / n


def _optimize(layer: _Layer, w_float: np.ndarray, xt, yt, s, z, iterations: int, seed: int, device: str,
              bar: Any = None) -> np.ndarray:
    """The AdaRounded integer weights (original layout); ``xt`` [g, n, k], ``yt`` [n, outputs], the weight's scales
    ``s`` and zero points ``z`` broadcastable to it (torch)."""
    import torch

    enc = layer.enc
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor(w_float, dtype=torch.float32, device=device)
    n = yt.shape[0]
    b = torch.from_numpy(layer.bias.reshape(1, -1).copy()).to(device) if layer.bias is not None else None
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(0.0, 1.0)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)
    qmin, qmax = float(enc.qmin) - z, float(enc.qmax) - z  # bounds of q - zero

    def h(v):
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    opt = torch.optim.Adam([v], lr=learning_rate(iterations))
    warm = WARM_START * iterations
    m, a = min(MINIBATCH, n), n
    for it in range(iterations):
        if a + m > n:  # a new epoch: reshuffle
            perm = torch.randperm(n, generator=gen).to(device)
            xs, ys, a = xt[:, perm], yt[perm], 0
        q = torch.clamp(w_floor + h(v), min=qmin, max=qmax)
        loss = ((_activate(layer, _product(layer, q * s, xs[:, a:a + m]), b)
                 - _activate(layer, ys[a:a + m], b)) ** 2).sum(dim=1).mean()
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
        return (torch.clamp(w_floor + (h(v) >= 0.5).float(), min=qmin, max=qmax) + z).cpu().numpy()


def local_search(layer: _Layer, w_float: np.ndarray, x: np.ndarray, y: np.ndarray, q: np.ndarray, center: bool,
                 samples: int | None = None, damps: tuple[float, ...] = SEARCH_DAMPS,
                 max_steps: int = SEARCH_MAX_STEPS) -> tuple[np.ndarray, float]:
    """Integer weights (original layout) from ``q`` by greedy moves of one weight by one level, each the move that
    lowers the layer's quadratic reconstruction loss most, per output channel, until none lowers it; and the
    damping it chose.

    Per output channel with scale ``s``, rows ``x`` (its group's inputs, the quantized prefix's) and target ``y``
    (the float weights' output): ``L(q) = E[(s q.x - y)^2] + d ||s q - w||^2``, so with ``H = E[x x^T] + d I`` and
    ``B = E[x y] + d w`` the move ``q_j += e`` (e = +-1) changes ``L`` by ``2 e s (s (H q)_j - B_j) + s^2 H_jj``:
    all moves are scored at once and ``H q`` is updated in O(k) after each. The damping ``d`` keeps the result
    near the float weights where the rows leave directions unseen: rows of one image are far from independent,
    so a layer with many weights per output and few calibration samples fits them and not the next image. It
    is ``c x mean(diag H) x k / samples``, ``c`` chosen from ``damps`` by cross-validation: the search runs on
    the first half of the rows (the first half of the samples) with each ``c`` and the one with the lowest loss
    on the other half is used on all rows. ``center``: ``x``, ``y`` centered (each output's mean error is bias
    correction's to remove). The activation after the layer is not modelled (the caller compares the result
    with the true loss). The layer's integer range bounds every move; a weight may travel more than one level
    from where it started."""
    samples = samples or len(x)
    scale = np.broadcast_to(_scale(layer, w_float), w_float.shape)
    s = np.ascontiguousarray(_weight_matrix(layer, scale), dtype=np.float64)  # [g, o, k]
    w = _weight_matrix(layer, w_float).astype(np.float64)
    zero = _weight_matrix(layer, np.broadcast_to(_zero(layer, w_float), w_float.shape)).astype(np.float64)
    start = _weight_matrix(layer, q).astype(np.float64) - zero  # the search moves q - zero
    qmin, qmax = float(layer.enc.qmin) - zero, float(layer.enc.qmax) - zero
    c = damps[0]
    if len(damps) > 1 and len(x) >= 2 * SEARCH_MIN_ROWS * x.shape[2]:
        half = len(x) // 2
        h_fit, b_fit = _moments(layer, x[:half], y[:half], center)
        h_val, b_val = _moments(layer, x[half:], y[half:], center)
        held_out = []
        for c in damps:
            hd, bd = _damped(h_fit, b_fit, w, c * h_fit.shape[1] / max(samples / 2, 1))
            qq = _descend(hd, bd, s, start.copy(), qmin, qmax, max_steps)
            v = qq * s
            held_out.append(float((np.matmul(v, h_val) * v).sum() - 2 * (v * b_val).sum()))
        c = damps[int(np.argmin(held_out))]
    h, bvec = _moments(layer, x, y, center)
    h, bvec = _damped(h, bvec, w, c * h.shape[1] / samples)
    qq = _descend(h, bvec, s, start.copy(), qmin, qmax, max_steps)
    return _from_weight_matrix(layer, qq + zero, w_float.shape), c


def _moments(layer: _Layer, x: np.ndarray, y: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """``E[x x^T]`` per group [g, k, k] and ``E[x y]`` per output [g, o, k] (centered: covariances), each row
    weighted by :func:`_row_weights`."""
    n = len(x)
    xg = np.ascontiguousarray(x.astype(np.float64).transpose(1, 0, 2))  # [g, n, k]
    yg = np.ascontiguousarray(y.astype(np.float64).reshape(n, layer.groups, -1).transpose(1, 0, 2))  # [g, n, o]
    weights = _row_weights(layer, y)
    if center:
        xg, yg = xg - xg.mean(1, keepdims=True), yg - yg.mean(1, keepdims=True)
    wx = xg if weights is None else xg * weights
    return np.matmul(wx.transpose(0, 2, 1), xg) / n, np.matmul(yg.transpose(0, 2, 1), wx) / n


def _row_weights(layer: _Layer, y: np.ndarray) -> np.ndarray | None:
    """Where each group has one output (a depthwise Conv) and an activation is fused after the layer: each row's
    weight in the search's loss, 1 where the float weights' output ``y`` (before the bias) plus the bias lies
    inside the activation's range and :data:`CLIPPED_ROW_WEIGHT` where the activation clips it (an error there
    mostly vanishes behind the clamp), [g, n, 1]. None otherwise (every row counts alike: a dense layer's outputs would
    each need their own weighted ``E[x x^T]``, measured not worth its cost on EfficientNet-Lite0)."""
    if layer.act is None or layer.outputs != layer.groups:
        return None
    pre = y.astype(np.float64).reshape(len(y), layer.groups)
    if layer.bias is not None:
        pre = pre + layer.bias.reshape(1, -1)
    lo, hi = layer.act
    inside = (pre > lo) & (pre < hi)
    return np.where(inside, 1.0, CLIPPED_ROW_WEIGHT).T[:, :, None]


def _damped(h: np.ndarray, bvec: np.ndarray, w: np.ndarray, rel: float) -> tuple[np.ndarray, np.ndarray]:
    """``H + d I``, ``B + d w`` with ``d = rel x mean(diag H)`` per group."""
    k = h.shape[1]
    d = rel * np.einsum("gkk->g", h) / k
    return h + d[:, None, None] * np.eye(k), bvec + d[:, None, None] * w


def _descend(h: np.ndarray, bvec: np.ndarray, s: np.ndarray, qq: np.ndarray, qmin, qmax,
             max_steps: int) -> np.ndarray:
    """:func:`local_search`'s greedy moves from ``qq`` ([g, o, k]; the result, ``qq`` may be changed in place).

    Each output channel's loss is its own (``H`` is shared, the moves are not): a channel with no move that
    lowers its loss keeps its state, so it has none at any later step either. Each step scores only the channels
    that moved at the step before: the same moves as scoring all of them, in a time that follows the channels
    still moving (a layer whose last few channels walk many levels, as 8-bit weights do, no longer pays for all
    its channels at every step)."""
    g, o, k = qq.shape
    hq = np.matmul(qq * s, h).reshape(g * o, k)  # (H (s q))_j per output (H symmetric)
    q = qq.reshape(g * o, k)
    sf = np.ascontiguousarray(np.broadcast_to(s, qq.shape)).reshape(g * o, k)
    bf = np.ascontiguousarray(np.broadcast_to(bvec, qq.shape)).reshape(g * o, k)
    lo = np.ascontiguousarray(np.broadcast_to(qmin, qq.shape)).reshape(g * o, k)
    hi = np.ascontiguousarray(np.broadcast_to(qmax, qq.shape)).reshape(g * o, k)
    quad = sf * sf * np.repeat(np.einsum("gkk->gk", h), o, axis=0)
    tiny = 1e-12 * quad.max(axis=-1)
    group = np.repeat(np.arange(g), o)
    active = np.arange(g * o)
    for _ in range(max_steps):
        qa, sa, qd = q[active], sf[active], quad[active]
        lin = 2.0 * sa * (hq[active] - bf[active])
        up = np.where(qa + 1 <= hi[active], lin + qd, np.inf)
        down = np.where(qa - 1 >= lo[active], qd - lin, np.inf)
        j_up, j_down = up.argmin(-1), down.argmin(-1)
        rows = np.arange(len(active))
        best_up, best_down = up[rows, j_up], down[rows, j_down]
        take_up = best_up <= best_down
        move = np.minimum(best_up, best_down) < -tiny[active]
        if not move.any():
            break
        active = active[move]
        j = np.where(take_up, j_up, j_down)[move]
        e = np.where(take_up, 1.0, -1.0)[move]
        q[active, j] += e
        hq[active] += (e * sf[active, j])[:, None] * h[group[active], :, j]
    return q.reshape(g, o, k)


def adaround(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
             providers: list[str], iterations: int, seed: int = 0, threads: int = 0,
             float_weights: dict[str, np.ndarray] | None = None, search: bool = True,
             center: frozenset[str] = frozenset(), device: str = "auto") -> list[Rounded]:
    """AdaRound the planned layers of ``model`` in place (see the module doc): their weight initializers become
    the AdaRounded grid values (their encodings must then be kept: the caller freezes them, e.g.
    :mod:`converter.techniques.adaround`). ``threads``: torch's CPU
    threads while optimizing (0: torch's default). ``float_weights`` receives each replaced weight's float
    values (bias correction measures against them). ``search``: the local search after the Adam steps (module
    doc); ``center``: the layers bias correction corrects afterwards (their losses are compared centered);
    ``device``: auto | cpu | cuda (:func:`converter.quant.torch_device.resolve_device`). Returns what changed."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _adaround(model, plan, idx, batches, providers, iterations, seed,
                         {} if float_weights is None else float_weights, search, center, resolve_device(device))
    finally:
        torch.set_num_threads(before)


def _adaround(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
              providers: list[str], iterations: int, seed: int, float_weights: dict[str, np.ndarray], search: bool,
              center: frozenset[str], device: str) -> list[Rounded]:
    import torch
    from ..progress import tqdm

    layers = adaround_layers(model, plan, idx)
    if not layers:
        return []
    batches = list(batches)
    capture = IncrementalCapture(batches, providers)  # the QDQ model's
    out = []
    with tqdm(total=len(layers), desc="adaround", unit="layer", disable=None, leave=False) as progress:
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            node = layer.node
            w = idx.constant(layer.weight)
            x, y, samples = _cache(layer, render_control_flow(model, plan.encodings), w, capture, seed + i)
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))).to(device)  # [g, n, k]
            yt = torch.from_numpy(y).to(device)
            bias = torch.from_numpy(layer.bias.reshape(1, -1).copy()).to(device) if layer.bias is not None else None
            centered = node.name in center

            scale = torch.tensor(_scale(layer, w), device=device)
            zero = torch.tensor(_zero(layer, w), device=device)

            def loss(q: np.ndarray) -> float:
                return _loss(layer, (torch.from_numpy(q.astype(np.float32)).to(device) - zero) * scale, xt, yt, bias,
                             centered)

            nearest = layer.enc.quantize(w).astype(np.float32)
            q_ada = nearest
            if iterations:
                with tqdm(total=iterations, desc=f"adaround {i + 1}/{len(layers)} {node.name}", unit="it",
                          disable=None, leave=False) as bar:
                    q_ada = _optimize(layer, w, xt, yt, scale, zero, iterations, seed + i, device, bar)
            candidates = {"nearest": (nearest, loss(nearest)), "adaround": (q_ada, loss(q_ada))}
            start = min(candidates.values(), key=lambda c: c[1])[0]
            damp = None
            if search and len(x) >= SEARCH_MIN_ROWS * x.shape[2]:
                q_search, damp = local_search(layer, w, x, y, start, centered, samples)
                candidates["search"] = (q_search.astype(np.float32), loss(q_search))
            chosen = min(candidates, key=lambda c: (candidates[c][1], c != "nearest"))
            q = candidates[chosen][0]
            values = layer.enc.dequantize(q).astype(w.dtype)
            if not np.array_equal(layer.enc.quantize(values), q.astype(layer.enc.numpy_dtype)):
                raise RuntimeError(f"internal error: AdaRounded weight {layer.weight!r} does not round back to its "
                                   "integers")
            float_weights.setdefault(layer.weight, w)
            idx.initializers[layer.weight].CopyFrom(numpy_helper.from_array(values, layer.weight))
            out.append(Rounded(node.name, layer.weight, len(x), time.perf_counter() - t0, candidates["nearest"][1],
                               candidates["adaround"][1], float(np.mean(q != nearest)),
                               candidates["adaround"][1] < candidates["nearest"][1],
                               candidates["search"][1] if "search" in candidates else None, chosen, centered, damp))
            log.debug("adaround %s: %d rows, loss %s; %s chosen, %.1f s", node.name, len(x),
                      ", ".join(f"{k} {v[1]:.4g}" for k, v in candidates.items()), chosen, out[-1].seconds)
            progress.update(1)

    log.info("adaround: %d layer(s), %d iterations each; reconstruction loss (sum over layers) nearest %.4g, "
             "adaround %.4g, chosen %.4g (local search chosen in %d)", len(out), iterations,
             sum(r.loss_nearest for r in out), sum(r.loss_adaround for r in out), sum(r.loss for r in out),
             sum(r.chosen == "search" for r in out))
    log.debug("adaround capture: %d QDQ nodes run (the float model has %d), frontier at most %d MiB",
              capture.nodes_run, len(model.graph.node), capture.peak_bytes >> 20)
    return out
