"""Multiply-accumulates per sample of a graph's layer nodes (Conv, ConvTranspose, Gemm, MatMul).

From the shapes the tensors really have on a sample batch where ``values`` holds them (dynamic sequence lengths
included), else from the static shapes shape inference gave (a symbolic or unknown dimension counts 1): ``Conv``
output elements times ``C_in / group * k_h * k_w``; ``ConvTranspose`` input elements times ``C_out / group * k``;
``MatMul``/``Gemm`` output elements times the reduced dimension. Any other node counts one per output element.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..ops import CONV_OPS
from .index import GraphIndex, attr


def node_macs(idx: GraphIndex, node: onnx.NodeProto, values: Mapping[str, np.ndarray] | None = None) -> float:
    """Per-sample MACs of one node (see the module doc); 0.0 when its output shape is unknown."""
    values = values or {}
    y = values.get(node.output[0])
    if y is not None:
        batch = max(int(y.shape[0]), 1) if y.ndim else 1
        elems = float(y.size) / batch
    else:
        static = idx.shape.get(node.output[0])
        if static is None:
            return 0.0
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in static]
        elems = float(np.prod(dims[1:])) if len(dims) > 1 else 1.0

    def shape(t: str) -> tuple:
        if t in values:
            return values[t].shape
        if t in idx.initializers:
            return tuple(idx.initializers[t].dims)
        return tuple(d if isinstance(d, int) and d > 0 else 1 for d in idx.shape.get(t) or ())
    if node.op_type in CONV_OPS and len(node.input) > 1:
        w = shape(node.input[1])
        k = float(np.prod(w[1:])) if len(w) > 1 else 1.0
        if node.op_type == "ConvTranspose":  # weight (C_in, C_out/g, k...): MACs = input elements * C_out/g * k
            x = shape(node.input[0])
            elems = float(np.prod(x[1:])) if len(x) > 1 else elems
        return elems * k
    if node.op_type == "MatMul":
        a = shape(node.input[0])
        return elems * float(a[-1] if len(a) else 1)
    if node.op_type == "Gemm":
        a = shape(node.input[0])
        k = a[0] if attr(node, "transA", 0) else a[-1] if len(a) else 1
        return elems * float(k)
    return elems
