"""Fill ``plan.encodings`` from calibration statistics (activations) and values (weights, biases).

* Activations: one encoding per scale group, from the union of its members' ranges. The input of a clamp
  (``Min``/``Max`` against a constant, :func:`converter.quant.rules.node_rule`) in its output's group counts
  only up to the output's max (``Min``; down to its min for ``Max``): values past it are clamped anyway, so the
  Q saturating them first changes nothing on the calibration data (``min(min(x, M), B) = min(x, B)`` while
  ``min(x, B) <= M``), and a Relu output that a per-channel bound cuts does not widen the group's scale.
* Weights: symmetric int8, per channel along the rule's axis (or per tensor), from max |w|
  (``minmax``) or from the clipping bound that minimises each channel's quantization MSE (``mse``). With
  ``weight_symmetric: false``, asymmetric (unsigned, a zero point per channel, AIMET's asymmetric params):
  ``[min, max]`` of each channel, or its two ends clipped where that lowers the MSE. Every level is then used
  on skewed channels: a 3x3 depthwise kernel (one large centre tap) at 4 bits loses half the squared error.
  Without bias correction, a Conv weight's ``mse`` counts the squared *sum* of each channel's errors too
  (:data:`COHERENT_ERROR_WEIGHT`): see below.
* Biases: int32, zero point 0, ``scale = input_scale * weight_scale`` (per output channel), as
  ONNX Runtime's QLinearConv/QGemm expect. If a bias would not fit in int32 (a channel whose weights
  are almost zero but whose bias is not), that channel's weight scale is raised until it fits.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ..calib.observers import observer_range
from ..graph.index import GraphIndex
from ..ops import CONV_OPS
from .encoding import RANGE_LIMIT, Encoding, encoding_from_range
from .plan import ACTIVATION, BIAS, WEIGHT, QuantPlan
from .rules import clamp_input
from .scale_groups import mixed_operands, split_mixed_groups

_INT32_MAX = 2**31 - 1
log = logging.getLogger("converter")


_MSE_RATIOS = np.linspace(0.3, 1.0, 71, dtype=np.float32)  # clipping bounds tried, as fractions of max |w|
# A Conv output channel's error is sum_k e_k x_k over its input window. Its inputs are strongly correlated
# (neighbouring pixels, and post-Relu/Clip means well above zero): for inputs of mean mu, spread sigma and
# correlation rho its expected square is about sigma^2 (1 - rho) ||e||^2 + (rho sigma^2 + mu^2) (sum e)^2, so
# clipping one tail (every clipped error of one sign) costs far more than its squared error says. ``mse`` on a
# Conv weight then minimises ||e||^2 + COHERENT_ERROR_WEIGHT (sum e)^2 per channel (rho 0.9 and mu = sigma would
# give 19). Not with bias correction, which removes each channel's mean error itself: there the plain MSE stays.
# Measured, nearest rounding, top-1 (tools/ptq_techniques.py data; weight 0 -> 10): EfficientNet-Lite0 /900 W4
# first/last 8 symmetric 219 -> 316, asymmetric 70 -> 503 (weight 1: 411, 3: 417, 30: 551, 100: 523, 1000: 360);
# W8 per-tensor 717 -> 743, per-channel 793 -> 788; ResNet-8 /2000 W4 symmetric 1203 -> 1423, asymmetric 596 ->
# 1413. With the local search + bias correction it would cost EfficientNet 754 -> 742 (ResNet-8 1528 -> 1532).
# MatMul/Gemm weights (token features, no window) keep the plain MSE: unmeasured there. Unseen model (PP-OCR
# direction classifier, /198, FP32 193): symmetric 162 -> 185, asymmetric 186 -> 175: not a gain everywhere.
COHERENT_ERROR_WEIGHT = 10.0
_MSE_CHUNK = 1 << 22  # weight values per vectorised step of the MSE search (bounds its temporaries)


def weight_encoding(w: np.ndarray, bits: int, axis: int | None, method: str = "minmax",
                    block_size: int | None = None, block_axis: int | None = None, symmetric: bool = True,
                    coherent: float = 0.0) -> Encoding:
    """Encoding of a weight tensor (symmetric, or asymmetric unsigned): per channel along ``axis``, or per tensor;
    block-wise when ``block_size`` is given (one scale per ``block_size`` elements of ``block_axis`` and channel of
    ``axis``). ``coherent``: with ``mse``, the weight of each row's squared error sum beside its squared error (see
    :data:`COHERENT_ERROR_WEIGHT`)."""
    if block_size is not None:
        return blocked_weight_encoding(w, bits, axis, block_size, block_axis, method, symmetric)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
    lo, hi = _row_ranges(rows, bits, method, symmetric, coherent)
    if axis is None:
        return encoding_from_range(float(lo[0]), float(hi[0]), bits, symmetric, symmetric)
    return encoding_from_range(lo, hi, bits, symmetric, symmetric, axis)


def _row_ranges(rows: np.ndarray, bits: int, method: str, symmetric: bool,
                coherent: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row (channel, or channel and block), the range its encoding covers: ``+-max|w|`` (or the MSE clipping
    bound) when symmetric, else :func:`weight_range`."""
    if not symmetric:
        return weight_range(rows, bits, method, coherent)
    amax = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows))
    if method == "mse":
        amax = mse_weight_absmax(rows, amax, 2 ** (bits - 1) - 1, coherent)
    return -amax, amax


def _row_errors(x: np.ndarray, q: np.ndarray, coherent: float) -> np.ndarray:
    """Per row and candidate (``x``: rows x 1 x values, ``q``: rows x candidates x values): the squared error, plus
    ``coherent`` times the squared sum of the errors."""
    e = q - x
    err = np.square(e).sum(axis=2)
    return err + coherent * np.square(e.sum(axis=2)) if coherent else err


def blocked_weight_encoding(w: np.ndarray, bits: int, axis: int, block_size: int, block_axis: int,
                            method: str = "minmax", symmetric: bool = True) -> Encoding:
    """Block-wise encoding (symmetric, or asymmetric unsigned): the weight's ``block_axis`` cut into blocks of ``block_size`` (the last one
    ragged where the axis does not divide), each block of each channel (``axis``) its own max |w| (or MSE
    clipping); dims other than these two are covered whole (a Conv kernel's). Scale array shape: 1 on the other
    dims, ceil(D / block_size) on ``block_axis``, the channel count on ``axis``."""
    d = w.shape[block_axis]
    blocks = -(-d // block_size)
    pad = [(0, 0)] * w.ndim
    pad[block_axis] = (0, blocks * block_size - d)  # zeros: they change neither the max nor the MSE's choice
    x = np.pad(w.astype(np.float32), pad)
    x = np.moveaxis(x, (axis, block_axis), (0, 1))  # channels, K (padded), rest...
    x = x.reshape(x.shape[0], blocks, block_size, -1).reshape(x.shape[0] * blocks, -1)  # (channel, block) rows
    lo, hi = _row_ranges(x, bits, method, symmetric)  # padding zeros: inside every range (which includes 0)
    shape = [1] * w.ndim
    shape[axis], shape[block_axis] = w.shape[axis], blocks
    lo, hi = lo.reshape(w.shape[axis], blocks), hi.reshape(w.shape[axis], blocks)
    if axis > block_axis:
        lo, hi = lo.T, hi.T
    enc = encoding_from_range(lo.reshape(-1), hi.reshape(-1), bits, symmetric, symmetric, block_axis)
    return Encoding(bits, symmetric, symmetric, enc.scale, enc.zero_point, block_axis, block_size, tuple(shape))


def weight_range(rows: np.ndarray, bits: int, method: str = "minmax",
                 coherent: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the asymmetric range ``(lo <= 0, hi >= 0)``: min and max (``minmax``), or each end pulled in by
    a ratio in ``_MSE_RATIOS`` where that lowers the squared error of ``2**bits`` levels (``mse``: the two ends
    chosen in turn, twice; ``coherent``: see :func:`_row_errors`)."""
    rows = rows.astype(np.float32, copy=False)
    lo = np.minimum(rows.min(axis=1), 0.0) if rows.size else np.zeros(len(rows), np.float32)
    hi = np.maximum(rows.max(axis=1), 0.0) if rows.size else np.zeros(len(rows), np.float32)
    if method != "mse" or not rows.size:
        return lo, hi
    levels = 2**bits - 1
    lo0, hi0 = lo.copy(), hi.copy()
    per_chunk = max(1, _MSE_CHUNK // max(rows.shape[1] * len(_MSE_RATIOS), 1))
    for _ in range(2):
        for end in (0, 1):
            for a in range(0, len(rows), per_chunk):
                x = rows[a:a + per_chunk, None, :]
                if end == 0:
                    lo_c, hi_c = lo0[a:a + per_chunk, None] * _MSE_RATIOS[None, :], hi[a:a + per_chunk, None]
                else:
                    lo_c, hi_c = lo[a:a + per_chunk, None], hi0[a:a + per_chunk, None] * _MSE_RATIOS[None, :]
                lo_c, hi_c = np.broadcast_arrays(lo_c, hi_c)
                scale = np.where(hi_c > lo_c, (hi_c - lo_c) / levels, 1.0)[:, :, None]
                zp = np.rint(-lo_c[:, :, None] / scale)
                q = (np.clip(np.rint(x / scale) + zp, 0, levels) - zp) * scale
                err = _row_errors(x, q, coherent)
                pick = len(_MSE_RATIOS) - 1 - np.argmin(err[:, ::-1], axis=1)  # ties: the widest range
                chosen = (lo_c if end == 0 else hi_c)[np.arange(len(x)), pick]
                (lo if end == 0 else hi)[a:a + per_chunk] = chosen
    return lo, hi


def mse_weight_absmax(rows: np.ndarray, amax: np.ndarray, levels: int, coherent: float = 0.0) -> np.ndarray:
    """Per row, the clipping bound ``r * max|w|`` (``r`` in ``_MSE_RATIOS``) minimising the squared error of
    symmetric quantization with ``levels`` positive levels (AIMET's / pytorch-quantization's MSE for weights;
    ``coherent``: see :func:`_row_errors`)."""
    rows = rows.astype(np.float32, copy=False)
    best = np.asarray(amax, dtype=np.float32).copy()
    per_chunk = max(1, _MSE_CHUNK // max(rows.shape[1] * len(_MSE_RATIOS), 1))
    for a in range(0, len(rows), per_chunk):
        x = rows[a:a + per_chunk]  # channels x values
        bound = best[a:a + per_chunk, None] * _MSE_RATIOS[None, :]  # channels x ratios
        scale = np.where(bound > 0, bound / levels, 1.0)[:, :, None]
        q = np.clip(np.rint(x[:, None, :] / scale), -levels, levels) * scale
        err = _row_errors(x[:, None, :], q, coherent)  # channels x ratios
        pick = len(_MSE_RATIOS) - 1 - np.argmin(err[:, ::-1], axis=1)  # ties: the widest range
        best[a:a + per_chunk] = bound[np.arange(len(x)), pick]
    return best


def bias_encoding(b: np.ndarray, input_enc: Encoding, weight_enc: Encoding) -> tuple[Encoding, Encoding]:
    """Bias encoding, and the weight encoding (raised where a channel's bias would overflow int32)."""
    s_in = np.float32(input_enc.scale[0])
    if weight_enc.blocked:
        return _blocked_bias_encoding(b, s_in, weight_enc)
    s_w = weight_enc.scale_array()
    need = (np.abs(b.astype(np.float64)) / (float(s_in) * _INT32_MAX)).astype(np.float32)
    # s_in * s_w must also stay a normal float32 (16-bit activations times near-zero weight channels underflow)
    need = np.maximum(need, np.float32(2 * np.finfo(np.float32).tiny / float(s_in)))
    if np.any(need > s_w):
        s_w = np.maximum(s_w, need * np.float32(1.0001)).astype(np.float32)
        weight_enc = Encoding(weight_enc.bitwidth, weight_enc.signed, weight_enc.symmetric, tuple(s_w.tolist()),
                              weight_enc.zero_point, weight_enc.axis)
    scale = (s_in * s_w).astype(np.float32)
    if weight_enc.axis is None:
        scale = scale[:1]
    axis = 0 if weight_enc.axis is not None else None
    return Encoding(32, True, True, tuple(scale.tolist()), (0,) * len(scale), axis), weight_enc


def _blocked_bias_encoding(b: np.ndarray, s_in: np.float32, weight_enc: Encoding) -> tuple[Encoding, Encoding]:
    """Beside a block-wise weight the bias has one scale per output channel: the input scale times the channel's
    largest block scale (no one product fits every block; ONNX Runtime adds the bias in float after the blocked
    MatMul/Conv anyway). Block scales of a channel whose bias would overflow int32 are raised to fit."""
    need = (np.abs(b.astype(np.float64)) / (float(s_in) * _INT32_MAX)).astype(np.float32)
    need = np.maximum(need, np.float32(2 * np.finfo(np.float32).tiny / float(s_in)))
    chan = weight_enc.channel_scales()
    if np.any(need > chan):
        blocks = weight_enc.scale_array().reshape(weight_enc.block_shape)
        floor = np.expand_dims((need * np.float32(1.0001)).reshape(
            [n for i, n in enumerate(weight_enc.block_shape) if i != weight_enc.axis]), weight_enc.axis)
        blocks = np.where(np.expand_dims(need > chan, weight_enc.axis).reshape(floor.shape),
                          np.maximum(blocks, floor), blocks).astype(np.float32)
        weight_enc = Encoding(weight_enc.bitwidth, weight_enc.signed, weight_enc.symmetric,
                              tuple(blocks.reshape(-1).tolist()),
                              weight_enc.zero_point, weight_enc.axis, weight_enc.block_size, weight_enc.block_shape)
        chan = weight_enc.channel_scales()
    scale = (s_in * chan).astype(np.float32)
    return Encoding(32, True, True, tuple(scale.tolist()), (0,) * len(scale), 0), weight_enc


def compute_encodings(plan: QuantPlan, idx: GraphIndex, observers: dict, method: str | Mapping[str, str],
                      config: Any, frozen: Mapping[str, Encoding] | None = None, centered: bool = False) -> None:
    """``method``: one calibration method for every activation, or a mapping tensor -> method (the
    calibration's ``methods``); ``config`` (a QuantConfig) gives ``percentile`` and ``weight_calib``.
    ``frozen``: weight -> the encoding its values were rounded onto (AdaRound), kept instead of derived from the
    values; ``centered``: each channel's mean error is removed later (bias correction's promise), so a Conv weight's
    ``mse`` range does not count it (:data:`COHERENT_ERROR_WEIGHT`)."""
    frozen = frozen or {}
    percentile, weight_method = config.percentile, config.weight_calib
    ranges = {t.name: observer_range(observers[t.name], method.get(t.name, "minmax") if isinstance(method, Mapping)
                                     else method, percentile, t.symmetric, t.bitwidth)
              for t in plan.by_role(ACTIVATION)}
    _cap_clamp_inputs(plan, idx, ranges)
    max_loss = getattr(config, "max_shared_scale_loss_bits", None)
    plan.split_groups = split_mixed_groups(plan, idx, ranges, max_loss) if max_loss is not None else []
    plan.mixed_operands = mixed_operands(plan, idx, ranges, max_loss if max_loss is not None else 3.0)
    for root, members in plan.group_members().items():
        t = plan.tensors[root]
        lo, hi = min(ranges[m][0] for m in members), max(ranges[m][1] for m in members)
        if max(-lo, hi) > RANGE_LIMIT:
            log.warning("tensor %r: calibrated range [%.3g, %.3g] reaches past float32's useful range (a mask "
                        "sentinel such as finfo.min?); its encoding is clipped to +/-%.3g", root, lo, hi, RANGE_LIMIT)
        enc = encoding_from_range(lo, hi, t.bitwidth, t.signed, t.symmetric)
        for m in members:
            plan.encodings[m] = enc
    for t in plan.by_role(WEIGHT):
        if t.name in frozen:
            plan.encodings[t.name] = plan.encodings.get(t.name, frozen[t.name])  # raised for its bias: kept so
            continue
        ops = plan.layer_ops(t)
        conv = bool(ops) and ops <= CONV_OPS
        plan.encodings[t.name] = weight_encoding(idx.constant(t.name), t.bitwidth, t.axis, weight_method,
                                                 t.block_size, t.block_axis, t.symmetric,
                                                 COHERENT_ERROR_WEIGHT if conv and not centered else 0.0)
    for t in plan.by_role(BIAS):
        act, w = t.bias_of
        if act not in plan.encodings or w not in plan.encodings:
            continue
        plan.encodings[t.name], raised = bias_encoding(idx.constant(t.name), plan.encodings[act], plan.encodings[w])
        if raised != plan.encodings[w] and w in frozen:
            log.warning("weight %r: its bias needs a larger weight scale to fit int32, which moves the grid its "
                        "values were AdaRounded on (they are rounded to the nearest level of the new one)", w)
        plan.encodings[w] = raised
    # keep the plan's order (graph order) in the encodings dict
    plan.encodings = {n: plan.encodings[n] for n in plan.tensors if n in plan.encodings}


def _cap_clamp_inputs(plan: QuantPlan, idx: GraphIndex, ranges: dict[str, tuple[float, float]]) -> None:
    """The range of a clamp's input cut at its output's bound, where both share one encoding (module doc)."""
    for t in plan.by_role(ACTIVATION):
        node = idx.producer.get(t.name)
        slot = clamp_input(node, idx) if node is not None else None
        x = node.input[slot] if slot is not None else None
        if x not in ranges or plan.tensors[x].group != t.group:
            continue
        (lo, hi), (out_lo, out_hi) = ranges[x], ranges[t.name]
        ranges[x] = (lo, min(hi, out_hi)) if node.op_type == "Min" else (max(lo, out_lo), hi)


def activation_tensors(plan: QuantPlan) -> list[str]:
    return [t.name for t in plan.by_role(ACTIVATION)]
