"""Preprocessing passes run on the float model before planning.

Each pass takes a ModelProto, edits it in place and returns the number of changes it made, so the
caller can log what happened. The same sequence runs before ``quantize`` and ``apply-encodings``:
that is what makes an encodings file re-applied to the float model give the same QDQ model.

Batch-norm folding (Conv followed by BatchNormalization in inference mode)::

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * k) + (b - mean) * k + beta          with k = gamma / sqrt(var + eps)

``k`` scales each output channel, i.e. axis 0 of a Conv weight (axis 1 of a ConvTranspose one,
per group).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from ..errors import ModelError
from .index import GraphIndex, attr

log = logging.getLogger("converter")

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every node a unique, stable name (``<OpType>_<position>`` where missing or repeated)."""
    seen: set[str] = set()
    changed = 0
    for pos, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{pos}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            changed += 1
        seen.add(node.name)
    return changed


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Replace top-level Constant nodes by initializers so weights in Constant nodes are found."""
    g = model.graph
    keep, moved = [], 0
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            a = node.attribute[0]
            value = None
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
            elif a.name == "value_float":
                value = np.array(a.f, dtype=np.float32)
            elif a.name == "value_floats":
                value = np.array(list(a.floats), dtype=np.float32)
            elif a.name == "value_int":
                value = np.array(a.i, dtype=np.int64)
            elif a.name == "value_ints":
                value = np.array(list(a.ints), dtype=np.int64)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    return moved


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> int:
    """Convert the model to ``target`` opset if it is older (QDQ per-channel needs 13)."""
    current = default_opset(model)
    if current >= target:
        return 0
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {current}; quantization needs opset >= {target} and the automatic "
            f"upgrade failed ({type(exc).__name__}: {exc})",
            f"re-export the model with opset_version={target} or newer",
        ) from None
    model.CopyFrom(converted)
    log.info("upgraded the model from opset %d to %d (per-channel QDQ needs %d)", current, target, target)
    return 1


def infer_shapes(model: onnx.ModelProto) -> int:
    """Run ONNX shape inference so every tensor has a known element type where possible."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # a broken model; the checker in load gives the clearer message
        log.warning("shape inference failed (%s); tensors without a known type are left in float", exc)
        return 0
    model.CopyFrom(inferred)
    return 1


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold BatchNormalization into a preceding Conv/ConvTranspose with constant weights."""
    idx = GraphIndex.build(model)
    g = model.graph
    removed: set[str] = set()
    folded = 0
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = idx.producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose"):
            continue
        if idx.single_consumer(conv.output[0]) is not bn or not idx.is_constant(conv.input[1]):
            continue
        params = [idx.constant(n) for n in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        if len(idx.uses(conv.input[1])) != 1 or (len(conv.input) > 2 and len(idx.uses(conv.input[2])) != 1):
            continue  # shared weights: folding would change the other user
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        w = idx.constant(conv.input[1])
        if conv.op_type == "Conv":
            w_new = w * k.reshape(-1, *([1] * (w.ndim - 1)))
        else:  # ConvTranspose: weight (C_in, C_out/group, ...); output channel o = grp*C_out/group + j
            group = attr(conv, "group", 1)
            cpg = w.shape[1]
            kk = k.reshape(group, 1, cpg, *([1] * (w.ndim - 2)))
            w_new = (w.reshape(group, -1, cpg, *w.shape[2:]) * kk).reshape(w.shape)
        b = idx.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(k)
        b_new = (b - mean) * k + beta
        _replace_initializer(g, conv.input[1], w_new.astype(w.dtype))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.name}.bias"
        if len(conv.input) > 2 and conv.input[2]:
            _replace_initializer(g, bias_name, b_new.astype(w.dtype))
        else:
            g.initializer.append(numpy_helper.from_array(b_new.astype(w.dtype), bias_name))
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        removed.add(bn.name)
        folded += 1
    if folded:
        keep = [n for n in g.node if n.name not in removed]
        del g.node[:]
        g.node.extend(keep)
        _drop_unused_initializers(model)
    return folded


def _replace_initializer(g: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    used |= _subgraph_inputs(g)
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names read from inside If/Loop/Scan bodies (they may refer to outer-scope tensors)."""
    names: set[str] = set()
    for node in g.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                names |= {n for sn in sub.node for n in sn.input}
                names |= _subgraph_inputs(sub)
    return names


PREPROCESS = (name_nodes, constants_to_initializers, upgrade_opset, fold_batchnorm, infer_shapes)


def preprocess(model: onnx.ModelProto) -> dict[str, int]:
    """Run every preprocessing pass in order; returns {pass name: changes made}."""
    done = {}
    for p in PREPROCESS:
        done[p.__name__] = p(model)
    return done
