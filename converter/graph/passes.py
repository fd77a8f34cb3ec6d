"""Preprocessing passes run on the float model before planning.

Each pass takes a ModelProto, edits it in place and returns the number of changes it made, so the
caller can log what happened. The same sequence runs before ``quantize`` and ``apply-encodings``:
that is what makes an encodings file re-applied to the float model give the same QDQ model.

Batch-norm folding (Conv followed by BatchNormalization in inference mode; :func:`fold_affine` does
the same for a Conv followed by a constant Mul/Add)::

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
from ..ops import CONV_OPS, FOLDABLE_OPS
from .index import GraphIndex, attr, bodies, graph_attrs
from .model_io import is_large, skeleton

log = logging.getLogger("converter")

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every node a unique, stable name (``<OpType>_<position>`` where missing or repeated).

    Nodes inside If/Loop/Scan bodies are named too (``<OpType>_<position>`` prefixed by the control-flow
    node and attribute), unique over the whole model: the plan and the report key nodes by name."""
    seen: set[str] = set()
    changed = _name_graph_nodes(model.graph.node, "", seen)
    for node in list(model.graph.node):
        changed += _name_subgraph_nodes(node, seen)
    return changed


def _name_graph_nodes(nodes, prefix: str, seen: set[str]) -> int:
    """Name the unnamed or repeated ``nodes`` ``<prefix><OpType>_<position>`` (suffixed until unique)."""
    changed = 0
    for pos, node in enumerate(nodes):
        if not node.name or node.name in seen:
            base = f"{prefix}{node.op_type}_{pos}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            changed += 1
        seen.add(node.name)
    return changed


def _name_subgraph_nodes(parent: onnx.NodeProto, seen: set[str]) -> int:
    changed = 0
    for attr_name, sub in graph_attrs(parent):
        changed += _name_graph_nodes(sub.node, f"{parent.name}/{attr_name}/", seen)
        for node in sub.node:
            changed += _name_subgraph_nodes(node, seen)
    return changed


def unique_subgraph_names(model: onnx.ModelProto) -> int:
    """Rename tensors defined inside If/Loop/Scan bodies whose name is also defined elsewhere in the model
    (sibling branches may reuse names; the encodings file keys tensors by name, so each must be unique).

    A tensor defined in a body (node output, body input, body initializer) that clashes gets
    ``<name>__<n>``; every read of it in that body and in bodies nested inside it follows."""
    g = model.graph
    seen = {i.name for i in g.input} | {t.name for t in g.initializer}
    seen |= {o for n in g.node for o in n.output if o}
    renamed = 0

    def defined(sub: onnx.GraphProto) -> list[str]:
        return [i.name for i in sub.input] + [t.name for t in sub.initializer] + \
            [o for n in sub.node for o in n.output if o]

    def apply(sub: onnx.GraphProto, mapping: dict[str, str]) -> None:
        for n in sub.node:
            for i, x in enumerate(n.input):
                if x in mapping:
                    n.input[i] = mapping[x]
            for i, x in enumerate(n.output):
                if x in mapping:
                    n.output[i] = mapping[x]
            for inner in bodies(n):
                local = set(defined(inner))  # a nested body's own names shadow nothing (SSA), but be safe
                apply(inner, {k: v for k, v in mapping.items() if k not in local})
        for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
            if vi.name in mapping:
                vi.name = mapping[vi.name]
        for t in sub.initializer:
            if t.name in mapping:
                t.name = mapping[t.name]

    def visit(graph: onnx.GraphProto) -> None:
        nonlocal renamed
        for node in graph.node:
            for sub in bodies(node):
                mapping = {}
                for name in defined(sub):
                    if name in seen:
                        k = 1
                        while f"{name}__{k}" in seen:
                            k += 1
                        mapping[name] = f"{name}__{k}"
                    seen.add(mapping.get(name, name))
                if mapping:
                    apply(sub, mapping)
                    renamed += len(mapping)
                visit(sub)

    visit(g)
    return renamed


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Replace Constant nodes by initializers so weights in Constant nodes are found (inside If/Loop/Scan
    bodies too: they become the body's initializers)."""
    return _constants_to_initializers(model.graph, top=True)


def _constants_to_initializers(g: onnx.GraphProto, top: bool) -> int:
    moved = 0
    for node in g.node:
        for sub in bodies(node):
            moved += _constants_to_initializers(sub, top=False)
    outputs = set() if top else {o.name for o in g.output}  # a body output stays a node's output
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.output[0] not in outputs:
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


# Cheap, deterministic ops worth evaluating when every input is a constant (Paddle exports reshape
# each bias at run time: Reshape(Constant, Constant) -> Add).
_FOLD_LIMIT = 1 << 24  # elements


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace top-level FOLDABLE_OPS nodes whose inputs are all initializers by initializers."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    values = {t.name: t for t in g.initializer}
    keep, folded = [], 0
    for node in g.node:
        if (node.op_type in FOLDABLE_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1
                and node.input and all(i in values for i in node.input)
                and sum(int(np.prod(values[i].dims)) for i in node.input) <= _FOLD_LIMIT):
            sub = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_value_info(node.output[0], onnx.TypeProto())],
                                         [values[i] for i in dict.fromkeys(node.input)])
            try:
                (out,) = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})
            except Exception:  # leave the node to the runtime
                keep.append(node)
                continue
            t = numpy_helper.from_array(np.asarray(out), node.output[0])
            g.initializer.append(t)
            values[t.name] = t
            folded += 1
            continue
        keep.append(node)
    if folded:
        del g.node[:]
        g.node.extend(keep)
        _drop_unused_initializers(model)
    return folded


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET, level: int = logging.INFO) -> int:
    """Convert the model to ``target`` opset if it is older (QDQ per-channel needs 13); logged at ``level``."""
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
    log.log(level, "upgraded the model from opset %d to %d (%s)", current, target,
             "4-bit, 16-bit or block-wise QuantizeLinear/DequantizeLinear" if target >= 21 else "per-channel QDQ")
    return 1


def infer_shapes(model: onnx.ModelProto) -> int:
    """Run ONNX shape inference so every tensor has a known element type where possible."""
    large = is_large(model)
    try:
        # a model over the protobuf limit: inferred on its skeleton (large weights as external references,
        # only their dims and types count), the inferred value_info copied back
        inferred = onnx.shape_inference.infer_shapes(skeleton(model) if large else model, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # a broken model; the checker in load gives the clearer message
        log.warning("shape inference failed (%s); tensors without a known type are left in float", exc)
        return 0
    if large:
        for field in ("input", "output", "value_info"):
            target = getattr(model.graph, field)
            del target[:]
            target.extend(getattr(inferred.graph, field))
    else:
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
        if conv is None or conv.op_type not in CONV_OPS:
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


def fold_affine(model: onnx.ModelProto) -> int:
    """Fold ``Conv -> Mul(k) -> Add(d)`` with per-channel or scalar constants into the Conv.

    PaddlePaddle's "learnable affine blocks" (PP-LCNet/PPHGNet) put a scalar scale and shift after
    every Conv; folded, the Conv's output is the tensor that gets quantized (one Q/DQ, not three)::

        y = k * (conv(x, W) + b) + d = conv(x, W * k) + (b * k + d)      (k, d per output channel)
    """
    idx = GraphIndex.build(model)
    g = model.graph
    steps = [s for s in (_affine_after(idx, n) for n in g.node if n.op_type == "Conv") if s]
    for conv, nodes, k, d in steps:  # independent: each Conv's weights, bias and followers are its own
        w = idx.constant(conv.input[1])
        _replace_initializer(g, conv.input[1], (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        has_bias = len(conv.input) > 2 and conv.input[2]
        b = idx.constant(conv.input[2]) if has_bias else np.zeros_like(k)
        bias = (b * k + d).astype(w.dtype)
        if has_bias:
            _replace_initializer(g, conv.input[2], bias)
        else:
            g.initializer.append(numpy_helper.from_array(bias, f"{conv.name}.bias"))
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = f"{conv.name}.bias"
        conv.output[0] = nodes[-1].output[0]
    if steps:
        gone = {n.name for _, nodes, _, _ in steps for n in nodes}
        keep = [n for n in g.node if n.name not in gone]
        del g.node[:]
        g.node.extend(keep)
        _drop_unused_initializers(model)
    return len(steps)


def _affine_after(idx: GraphIndex, conv: onnx.NodeProto):
    """(conv, [Mul, Add] nodes, k, d) when a per-channel affine follows ``conv`` and can fold into it."""
    if len(conv.input) < 2 or not idx.is_constant(conv.input[1]) or len(idx.uses(conv.input[1])) != 1:
        return None
    if len(conv.input) > 2 and conv.input[2] and (not idx.is_constant(conv.input[2]) or len(idx.uses(conv.input[2])) != 1):
        return None
    w = idx.constant(conv.input[1])
    channels = w.shape[0]
    nodes, k, d = [], np.ones(channels, np.float64), np.zeros(channels, np.float64)
    out = conv.output[0]
    for op in ("Mul", "Add"):
        nxt = idx.single_consumer(out)
        if nxt is None or nxt.op_type != op or len(nxt.input) != 2 or list(nxt.input).count(out) != 1:
            continue
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        c = _per_channel(idx.constant(other), channels, w.ndim)
        if c is None:
            continue
        if op == "Mul":
            k = c
        else:
            d = c
        nodes.append(nxt)
        out = nxt.output[0]
    return (conv, nodes, k, d) if nodes else None


def _per_channel(c: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as one value per output channel of an [N, C, ...] tensor, or None if it varies otherwise."""
    if c is None or not np.issubdtype(c.dtype, np.floating) or c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()


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
        for sub in bodies(node):
            names |= {n for sn in sub.node for n in sn.input}
            names |= _subgraph_inputs(sub)
    return names


# The opset upgrade runs first: the version converter adds nodes (Softmax-13 reshapes, Squeeze axes
# Constants) that must be named and folded like the model's own.
PREPROCESS = (upgrade_opset, name_nodes, unique_subgraph_names, constants_to_initializers, fold_constants,
              fold_batchnorm, fold_affine, infer_shapes)


def preprocess(model: onnx.ModelProto) -> dict[str, int]:
    """Run every preprocessing pass in order; returns {pass name: changes made}."""
    done = {}
    for p in PREPROCESS:
        done[p.__name__] = p(model)
    return done
