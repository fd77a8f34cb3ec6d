"""GPTQ (Frantar et al., 2022) for MatMul/Gemm weights: each weight's columns (input features) rounded one at a time,
the rounding error of each spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's
squared output error ``H = 2 X^T X`` (X: the layer's float inputs on calibration data).

Per channel the grid (one scale, zero point per output row) is chosen before any rounding, from the float weight
(as nearest rounding chooses it: ``weight_calib`` minmax or mse, symmetric or not); block-wise each block's grid is
chosen when its first column is reached, from the block's columns as the earlier errors left them (GPTQ's
``groupsize``), or, with ``act_order`` (the default), every block's grid first from the float weights ("static
groups") and the columns then taken in order of decreasing ``H`` diagonal (the inputs of most energy first), as
they are per channel. Damping: 1% of the mean diagonal; dead inputs (diagonal 0) are zeroed.

Memory: one ``K x K`` Hessian per distinct layer input, accumulated batch by batch (float64), not the inputs; the
capture keeps one calibration batch's layer inputs at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import onnx

from ..calib.runner import iter_capture
from ..graph.index import GraphIndex
from .plan import QuantPlan
from .weight_grid import (MatrixWeight, codes, commit_grid, grid_encoding, grid_values, group_params, levels,
                          matrix_weights)

log = logging.getLogger("converter")

DAMP = 0.01  # of the mean Hessian diagonal, added to it
LAZY = 128  # columns updated together (GPTQ's lazy batch); a multiple of every block size


@dataclass
class LayerResult:
    weight: str
    node: str
    granularity: str
    rtn_error: float  # tr((W - Q) H (W - Q)^T) / tr(W H W^T), nearest rounding
    error: float  # the same for GPTQ's grid

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "node": self.node, "granularity": self.granularity,
                "relative_output_error_rtn": round(self.rtn_error, 6), "relative_output_error": round(self.error, 6)}


def hessians(model: onnx.ModelProto, inputs: list[str], batches: Iterable[dict[str, np.ndarray]],
             providers: list[str], progress: Any = None) -> tuple[dict[str, np.ndarray], int]:
    """``{input: X^T X / rows}`` of each layer input (its last axis the features), one batch at a time; and the
    rows (tokens, samples) it averaged."""
    acc: dict[str, np.ndarray] = {}
    rows = 0
    for values in iter_capture(model, inputs, batches, providers):
        n = 0
        for name in inputs:
            x = np.asarray(values[name], np.float64)
            x = x.reshape(-1, x.shape[-1])
            n = len(x)
            acc[name] = acc.get(name, 0.0) + x.T @ x
        rows += n
        if progress is not None:
            progress()
    return {k: v / max(rows, 1) for k, v in acc.items()}, rows


def _output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = w - q
    den = float(np.einsum("ij,jk,ik->", w, h, w))
    return float(np.einsum("ij,jk,ik->", d, h, d)) / max(den, 1e-30)


def gptq_rows(w: np.ndarray, h: np.ndarray, mw: MatrixWeight, symmetric: bool, method: str = "minmax",
              act_order: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``w`` (``[N, K]`` rows) against ``h`` (``[K, K]``): the codes ``[N, K]`` (zero point included), and the
    scale and zero point ``[N, G]``."""
    t = mw.quant
    qmin, qmax = levels(t, symmetric)
    n, k = w.shape
    block = mw.block
    groups = 1 if block is None else -(-k // block)
    w = w.copy()
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = np.ones((n, groups)), np.zeros((n, groups))
    static = act_order and block is not None  # grids first (from the float blocks), then columns in act order
    if block is None:
        scale[:, 0], zero[:, 0] = group_params(w, t, symmetric, method)
    elif static:
        for g in range(groups):
            scale[:, g], zero[:, g] = group_params(w[:, g * block:(g + 1) * block], t, symmetric, method)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    hinv = _inverse_cholesky_upper(h)
    group_of = perm // block if block is not None else np.zeros(k, np.int64)
    q_out = np.zeros((n, k))
    for a in range(0, k, LAZY):
        b = min(a + LAZY, k)
        w1 = w[:, a:b].copy()
        err = np.zeros_like(w1)
        for i in range(b - a):
            col = a + i
            if block is not None and not static and col % block == 0:
                scale[:, col // block], zero[:, col // block] = group_params(w1[:, i:i + block], t, symmetric, method)
            g = group_of[col]
            s, z = scale[:, g], zero[:, g]
            q = codes(w1[:, i], s, z, qmin, qmax)
            q_out[:, col] = q
            deq = (q - z) * s
            e = (w1[:, i] - deq) / hinv[col, col]
            w1[:, i + 1:] -= np.outer(e, hinv[col, col + 1:b])
            err[:, i] = e
        w[:, b:] -= err @ hinv[a:b, b:]
    inv = np.argsort(perm)
    return q_out[:, inv], scale, zero


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``h``'s inverse (GPTQ's ``Hinv``), with more damping where ``h`` is not positive
    definite in float64."""
    eye = np.eye(len(h))
    extra = 0.0
    for _ in range(8):
        try:
            inv = np.linalg.inv(np.linalg.cholesky(h + extra * eye))
            return np.linalg.cholesky(inv.T @ inv).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise np.linalg.LinAlgError("GPTQ: the layer's input Hessian stays singular after damping")


def gptq(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
         providers: list[str], method: str = "minmax", float_weights: dict[str, np.ndarray] | None = None,
         frozen: dict | None = None, act_order: bool = True) -> list[LayerResult]:
    """GPTQ of every MatMul/Gemm weight of the plan (:func:`.weight_grid.matrix_weights`): the model's values become
    the grid values (the float ones kept in ``float_weights``), the grids their encodings (``frozen`` and
    ``plan.encodings``)."""
    from ..progress import tqdm

    layers = matrix_weights(model, plan, idx)
    if not layers:
        return []
    batches = list(batches)
    inputs = list(dict.fromkeys(mw.input for mw in layers))
    with tqdm(total=len(batches) + len(layers), desc="GPTQ", unit="step") as bar:
        hs, _ = hessians(model, inputs, batches, providers, bar.update)
        out = []
        for mw in layers:
            out.append(_apply(mw, idx, hs[mw.input], method, float_weights, frozen, plan, act_order))
            bar.update()
    return out


def _apply(mw: MatrixWeight, idx: GraphIndex, h: np.ndarray, method: str, float_weights, frozen, plan,
           act_order: bool) -> LayerResult:
    t = mw.quant
    w0 = idx.constant(mw.name)
    rows = mw.rows(w0)
    q, s, z = gptq_rows(rows, h, mw, t.symmetric, method, act_order)
    enc = grid_encoding(mw, s, z, t.symmetric)
    values = grid_values(mw, enc, q)
    rtn = plan.encodings.get(mw.name)
    rtn_rows = mw.rows(rtn.fake_quantize(w0)) if rtn is not None else rows
    res = LayerResult(mw.name, mw.node.name, enc.granularity(), _output_error(rows, rtn_rows, h),
                      _output_error(rows, mw.rows(values), h))
    commit_grid(mw, idx, plan, enc, values, w0, float_weights, frozen)
    return res
