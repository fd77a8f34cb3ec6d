"""HQQ (Badri & Shaji, 2023: Half-Quadratic Quantization) for MatMul/Gemm weights: no data; each row's (per channel)
or each row-block's (block-wise) scale and zero point are fitted to the weights under an ``l_p`` error (p < 1:
outliers are let go instead of widening the grid), by half-quadratic splitting:

    W_e  <- shrink_p(W - dequant(quant(W)))            (the outlier part, a generalised soft threshold)
    z, s <- least squares of (W - W_e) ~ s (W_q - z)    (HQQ proper fits the zero point only; the scale is fitted
                                                         too here, one closed form per group)

``beta`` (the splitting weight) grows by ``kappa`` each step; the step of lowest ``l_p`` error is kept. ONNX
DequantizeLinear takes an integer zero point (HQQ's own is a float): the zero point is then rounded and the scale
refitted by least squares for the codes it gives, in turn, a few times. The grid is asymmetric (unsigned, a zero
point per row or block, as ``weight_symmetric: false`` is): ONNX Runtime CPU's MatMulNBits takes the zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..graph.index import GraphIndex
from .plan import QuantPlan
from .weight_grid import MatrixWeight, commit_grid, grid_encoding, grid_values, matrix_weights

LP = 0.7  # HQQ's defaults (hqq.core.optimize): l_p norm, initial beta, its growth, steps
BETA = 10.0
KAPPA = 1.01
ITERS = 20
REFITS = 3  # integer zero point, scale refitted: rounds


@dataclass
class LayerResult:
    weight: str
    node: str
    granularity: str
    rtn_mse: float  # mean squared weight error of nearest rounding (the plan's encoding)
    mse: float  # HQQ's

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "node": self.node, "granularity": self.granularity,
                "weight_mse_rtn": float(f"{self.rtn_mse:.6g}"), "weight_mse": float(f"{self.mse:.6g}")}


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    ax = np.abs(x)
    return np.sign(x) * np.maximum(ax - np.power(np.maximum(ax, 1e-12), p - 1) / beta, 0.0)


def _fit(target: np.ndarray, q: np.ndarray, keep_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``target ~ s (q - z)``: least squares (s, z) (s > 0); with ``keep_scale``, z alone."""
    mq, mt = q.mean(axis=1), target.mean(axis=1)
    if keep_scale is None:
        var = ((q - mq[:, None]) ** 2).mean(axis=1)
        cov = ((q - mq[:, None]) * (target - mt[:, None])).mean(axis=1)
        s = np.where((var > 0) & (cov > 0), cov / np.maximum(var, 1e-30), np.nan)
    else:
        s = keep_scale
    z = mq - mt / s
    return s, z


def hqq_groups(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ of each row of ``x`` (``[R, B]``, one group a row): integer codes ``[R, B]``, scale ``[R]`` and integer
    zero point ``[R]`` of an unsigned ``bits``-bit grid."""
    x = np.asarray(x, np.float64)
    top = 2**bits - 1
    lo, hi = np.minimum(x.min(axis=1), 0.0), np.maximum(x.max(axis=1), 0.0)
    s0 = np.where(hi > lo, (hi - lo) / top, 1.0)
    s, z = s0.copy(), -lo / s0

    def lp_err(s, z):
        q = np.clip(np.rint(x / s[:, None] + z[:, None]), 0, top)
        return (np.abs(x - (q - z[:, None]) * s[:, None]) ** LP).mean(axis=1)

    best_s, best_z, best = s.copy(), z.copy(), lp_err(s, z)
    beta = BETA
    for _ in range(ITERS):
        q = np.clip(np.rint(x / s[:, None] + z[:, None]), 0, top)
        e = _shrink(x - (q - z[:, None]) * s[:, None], beta, LP)
        s_new, z_new = _fit(x - e, q)
        ok = np.isfinite(s_new) & (s_new > 0)
        s, z = np.where(ok, s_new, s), np.where(ok, z_new, z)
        z = np.clip(z, 0, top)
        err = lp_err(s, z)
        better = err < best
        best_s, best_z, best = np.where(better, s, best_s), np.where(better, z, best_z), np.where(better, err, best)
        beta *= KAPPA
    # integer zero point: rounded, the scale refitted for the codes it gives
    s, z = best_s, np.clip(np.rint(best_z), 0, top)
    for _ in range(REFITS):
        q = np.clip(np.rint(x / s[:, None] + z[:, None]), 0, top)
        d = q - z[:, None]
        den = (d * d).sum(axis=1)
        s_new = np.where(den > 0, (d * x).sum(axis=1) / np.maximum(den, 1e-30), s)
        s = np.where(s_new > 0, s_new, s)
    s = s.astype(np.float32).astype(np.float64)
    q = np.clip(np.rint(x.astype(np.float32) / s.astype(np.float32)[:, None]).astype(np.float64) + z[:, None], 0, top)
    return q, s, z


def hqq_rows(w: np.ndarray, mw: MatrixWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ of ``w`` (``[N, K]`` rows): codes ``[N, K]`` (zero point included), scale and zero point ``[N, G]``."""
    n, k = w.shape
    block = mw.block
    if block is None:
        q, s, z = hqq_groups(w, mw.quant.bitwidth)
        return q, s[:, None], z[:, None]
    groups = -(-k // block)
    pad = groups * block - k
    # a ragged last block: padded with copies of its own values' mean would bias it; zeros are what
    # blocked_weight_encoding pads with too (inside every range)
    x = np.pad(w, ((0, 0), (0, pad))).reshape(n * groups, block)
    q, s, z = hqq_groups(x, mw.quant.bitwidth)
    return q.reshape(n, groups * block)[:, :k], s.reshape(n, groups), z.reshape(n, groups)


def hqq(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, float_weights: dict[str, np.ndarray] | None = None,
        frozen: dict | None = None) -> list[LayerResult]:
    """HQQ of every MatMul/Gemm weight of the plan (:func:`.weight_grid.matrix_weights`): the model's values become
    the grid values (the float ones kept in ``float_weights``), the grids their encodings (``frozen`` and
    ``plan.encodings``)."""
    from ..progress import tqdm

    layers = matrix_weights(model, plan, idx)
    out = []
    for mw in tqdm(layers, desc="HQQ", unit="weight"):
        w0 = idx.constant(mw.name)
        rows = mw.rows(w0)
        q, s, z = hqq_rows(rows, mw)
        enc = grid_encoding(mw, s, z, symmetric=False)
        values = grid_values(mw, enc, q)
        rtn = plan.encodings.get(mw.name)
        rtn_mse = float(np.mean((rtn.fake_quantize(w0) - w0) ** 2)) if rtn is not None else float("nan")
        out.append(LayerResult(mw.name, mw.node.name, enc.granularity(), rtn_mse, float(np.mean((values - w0) ** 2))))
        commit_grid(mw, idx, plan, enc, values, w0, float_weights, frozen)
    return out
