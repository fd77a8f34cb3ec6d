"""What GPTQ and HQQ (:mod:`.gptq`, :mod:`.hqq`) share: the MatMul/Gemm weights they quantize, seen as a matrix of
output rows ``[N, K]`` (K: the reduced input features, the axis blocks cut), and the way back from a learned grid
(integer codes, a scale and zero point per row or per row and block) to the model: the weight's values become the
grid values and the grid becomes its :class:`~.encoding.Encoding`, laid out as
:func:`converter.quant.encode.blocked_weight_encoding` lays a block-wise one out, so the render quantizes the values
back to exactly those codes.

A weight qualifies when it is a planned constant read by this node alone as input 1 of a MatMul (2-D) or of a Gemm
without ``transA``; other planned weights (Conv, shared weights) keep their nearest rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.index import GraphIndex, attr
from .encoding import Encoding, encoding_from_range
from .plan import WEIGHT, QuantPlan, TensorQuant

MATRIX_OPS = frozenset({"MatMul", "Gemm"})


@dataclass
class MatrixWeight:
    """One MatMul/Gemm weight: ``transposed`` when its layout is ``[K, N]`` (MatMul, Gemm without transB)."""

    name: str
    node: onnx.NodeProto
    quant: TensorQuant
    transposed: bool

    def rows(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``[N, K]`` float64 rows."""
        return np.array(w.T if self.transposed else w, dtype=np.float64)

    def from_rows(self, m: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(m.T if self.transposed else m).astype(np.float32)

    @property
    def input(self) -> str:
        return self.node.input[0]

    @property
    def block(self) -> int | None:
        return self.quant.block_size


def matrix_weights(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> list[MatrixWeight]:
    """The planned MatMul/Gemm weights GPTQ/HQQ can handle, in graph order."""
    out = []
    for node in model.graph.node:
        if node.op_type not in MATRIX_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = node.input[1]
        t = plan.tensors.get(w)
        if t is None or t.role != WEIGHT or not idx.is_constant(w) or len(idx.uses(w)) != 1:
            continue
        if t.bitwidth not in (4, 8) or idx.constant(w).ndim != 2:
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        transposed = not (node.op_type == "Gemm" and attr(node, "transB", 0))
        if t.axis is None or (t.axis != (1 if transposed else 0)):  # per tensor, or an unexpected channel axis
            continue
        out.append(MatrixWeight(w, node, t, transposed))
    return out


def levels(t: TensorQuant, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the grid: the restricted signed range when symmetric, else unsigned."""
    if symmetric:
        m = 2 ** (t.bitwidth - 1) - 1
        return -m, m
    return 0, 2**t.bitwidth - 1


def group_params(rows: np.ndarray, t: TensorQuant, symmetric: bool, method: str = "minmax") -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """Scale and zero point (the encoding's integer, float64 arrays) of each row of ``rows``, as the nearest rounding
    would choose them (``method``: minmax or mse, :func:`converter.quant.encode._row_ranges`)."""
    from .encode import _row_ranges

    lo, hi = _row_ranges(rows.astype(np.float32), t.bitwidth, method, symmetric)
    enc = encoding_from_range(lo, hi, t.bitwidth, symmetric, symmetric, 0)
    return enc.scale_array().astype(np.float64), np.asarray(enc.zero_point, np.float64)


def codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Nearest codes as ONNX QuantizeLinear computes them (float32 division, round half to even, saturated)."""
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)).astype(np.float64) + zero
    return np.clip(q, qmin, qmax)


def grid_encoding(mw: MatrixWeight, scale: np.ndarray, zero: np.ndarray, symmetric: bool) -> Encoding:
    """The encoding of a learned grid: ``scale``/``zero`` of shape ``[N, G]`` (G blocks along K, 1 per channel)."""
    t = mw.quant
    signed = symmetric
    s = np.asarray(scale, np.float32)
    z = np.rint(np.asarray(zero)).astype(np.int64)
    if t.block_size is None:
        return Encoding(t.bitwidth, signed, symmetric, tuple(s[:, 0].tolist()), tuple(z[:, 0].tolist()), t.axis)
    if mw.transposed:  # [K, N] weight: block axis 0, block shape (G, N)
        s, z = s.T, z.T
    return Encoding(t.bitwidth, signed, symmetric, tuple(s.reshape(-1).tolist()), tuple(z.reshape(-1).tolist()),
                    t.block_axis, t.block_size, tuple(s.shape))


def spread(values: np.ndarray, k: int, block: int | None) -> np.ndarray:
    """Per-block ``[N, G]`` values repeated over each block's columns: ``[N, K]``."""
    if block is None:
        return np.broadcast_to(values[:, :1], (values.shape[0], k))
    return np.repeat(values, block, axis=1)[:, :k]


def grid_values(mw: MatrixWeight, enc: Encoding, q_rows: np.ndarray) -> np.ndarray:
    """The weight in its original layout holding the grid values of the codes ``q_rows`` (``[N, K]``, zero point
    included): what QuantizeLinear with ``enc`` turns back into exactly those codes."""
    q = np.ascontiguousarray(q_rows.T if mw.transposed else q_rows)
    return enc.dequantize(q.astype(enc.numpy_dtype))


def commit_grid(mw: MatrixWeight, idx: GraphIndex, plan: QuantPlan, enc: Encoding, values: np.ndarray,
                w0: np.ndarray, float_weights: dict | None, frozen: dict | None) -> None:
    """A learned grid becomes the model's: the weight holds its grid ``values``, ``enc`` is its encoding (and frozen:
    re-encoding keeps it), and the float weight ``w0`` goes to ``float_weights`` for bias correction to measure
    against."""
    from onnx import numpy_helper

    if float_weights is not None:
        float_weights.setdefault(mw.name, w0.astype(np.float32))
    idx.initializers[mw.name].CopyFrom(numpy_helper.from_array(values.astype(np.float32), mw.name))
    plan.encodings[mw.name] = enc
    if frozen is not None:
        frozen[mw.name] = enc
