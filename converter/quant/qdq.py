"""Render a QDQ model from a float model and a ``{tensor: Encoding}`` map.

The output depends on nothing else: ``quantize`` and ``apply-encodings`` both call
:func:`render_qdq`, which is why an encodings file re-applied to the float model gives a
byte-identical model.

Activations (tensors produced by nodes or graph inputs) get a QuantizeLinear/DequantizeLinear pair
right after their producer, and every consumer reads the dequantized tensor::

    producer -> x -> Q -> x_quantized -> DQ -> x_dequantized -> consumers

A graph output keeps its name: the producer's output is renamed ``<x>_float`` and the DQ writes
``x`` (ONNX Runtime fuses ``op -> Q`` only when the op's output feeds nothing else).

A clamp (``Min``/``Max`` against a constant, :func:`converter.quant.rules.node_rule`) whose input and output
share one 8-bit encoding runs on the integers, the bound quantized with that encoding (exact:
``Q(min(DQ(q), B)) = min(q, Q(B))``, rounding being monotone); ONNX Runtime CPU has int8/uint8 Min/Max, and the
float ``DQ -> Min -> Q`` it replaces cost EfficientNet-Lite0 (32 of them after CLE) about half its latency::

    Conv -> Relu -> Q -> Min(q, Q(B)) -> DQ -> ...      (not: Conv -> Relu -> Q -> DQ -> Min(B) -> Q -> DQ -> ...)

Weights and biases (initializers) are stored already quantized (int8 / int32) and read through a
DequantizeLinear placed before their first consumer; the float initializer is dropped unless a
subgraph still refers to it.

A block-wise weight (``Encoding.blocked``) gets an opset 21 blocked DequantizeLinear (``axis`` = the blocked
axis, ``block_size``) whose scale has the weight's rank: the weight's shape with the blocked axis divided,
rounded up (ONNX Runtime runs a ragged last block). A Conv block spans the whole kernel, so its scale
(``[O, I/B, 1, 1]`` in the encoding) is repeated over the kernel dims: ONNX Runtime does not broadcast them::

    W_quantized (int4 [K, N]) -> DequantizeLinear(axis=0, block_size=B; scale [K/B, N]) -> MatMul
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.index import GraphIndex
from ..graph.passes import _subgraph_inputs, default_opset, name_nodes, upgrade_opset
from ..graph.scopes import all_graph_names
from .encoding import Encoding


class _Names:
    """Allocates names that do not clash with anything in the model (bodies of If/Loop/Scan included), nor
    with ``reserved`` (shared by the renders of one model's bodies; new names are added to it)."""

    def __init__(self, model: onnx.ModelProto, reserved: set[str] | None = None) -> None:
        self.used = all_graph_names(model) if reserved is None else reserved
        if reserved is not None:
            reserved |= all_graph_names(model)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def ensure_opset(model: onnx.ModelProto, encodings: dict[str, Encoding]) -> None:
    """Convert ``model`` to the opset its Q/DQ need: 13 (per-channel), 21 for 4- and 16-bit. The graph is
    converted, not just relabelled: ops whose signature changed on the way (ReduceMean/Split/Squeeze axes
    became inputs in 13/18) are rewritten. Logged at debug level: a render runs per search trial and per AdaRound
    layer; ``quantize`` says once which opset the written model has."""
    needs_opset = 21 if any(e.bitwidth in (4, 16) or e.blocked for e in encodings.values()) else 13
    if default_opset(model) < needs_opset:
        upgrade_opset(model, needs_opset, logging.DEBUG)
        name_nodes(model)


def render_qdq(float_model: onnx.ModelProto, encodings: dict[str, Encoding],
               reserved: set[str] | None = None, low_bit_as_int8: bool = False) -> onnx.ModelProto:
    """The QDQ model of one graph (bodies of If/Loop/Scan are left as they are: see
    :func:`converter.quant.control_flow.render_control_flow`). ``reserved``: names to avoid (updated).
    ``low_bit_as_int8``: weights below 8 bits that are not block-wise are written as int8 (:func:`as_int8`)."""
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    ensure_opset(model, encodings)
    g = model.graph
    idx = GraphIndex.build(model)
    names = _Names(model, reserved)

    order = sorted(encodings, key=lambda t: (idx.position(t), t))
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> DQ nodes of its weights
    after: dict[str, list[onnx.NodeProto]] = {}  # node name ("" = graph inputs) -> Q/DQ of its outputs
    rename: dict[str, str] = {}  # tensor -> what consumers read instead
    drop_inits: set[str] = set()
    new_inits: list[onnx.TensorProto] = []

    def params(tensor: str, enc: Encoding, shape: tuple[int, ...] = ()) -> tuple[str, str]:
        scale, zp = names(f"{tensor}_scale"), names(f"{tensor}_zero_point")
        shape_scale = enc.scale_array() if enc.per_channel else enc.scale_array().reshape(())
        shape_zp = enc.zero_point_array() if enc.per_channel else enc.zero_point_array().reshape(())
        if enc.blocked:  # the scale of a blocked DQ: the weight's rank, kernel dims repeated
            full = enc.onnx_block_shape(shape)
            shape_scale = np.ascontiguousarray(np.broadcast_to(shape_scale.reshape(enc.block_shape), full))
            shape_zp = np.ascontiguousarray(np.broadcast_to(shape_zp.reshape(enc.block_shape), full))
        new_inits.append(numpy_helper.from_array(shape_scale, scale))
        new_inits.append(int_tensor(shape_zp, zp, enc))
        return scale, zp

    def axis_attr(enc: Encoding) -> dict:
        if enc.blocked:
            return {"axis": enc.axis, "block_size": enc.block_size}
        return {"axis": enc.axis} if enc.per_channel else {}

    for tensor in order:
        enc = encodings[tensor]
        if idx.is_constant(tensor):
            values = idx.constant(tensor)
            q_name = names(f"{tensor}_quantized")
            q = enc.quantize(values)
            if low_bit_as_int8 and enc.bitwidth < 8 and not enc.blocked:
                q, enc = as_int8(q, enc)
            new_inits.append(int_tensor(q, q_name, enc))
            scale, zp = params(tensor, enc, values.shape)
            dq_out = names(f"{tensor}_dequantized")
            dq = helper.make_node("DequantizeLinear", [q_name, scale, zp], [dq_out],
                                  name=names(f"{tensor}_DequantizeLinear"), **axis_attr(enc))
            users = idx.uses(tensor)
            if users:
                before.setdefault(users[0].name, []).append(dq)
            rename[tensor] = dq_out
            drop_inits.add(tensor)
            continue
        producer = idx.producer.get(tensor)
        anchor = producer.name if producer is not None else ""
        scale, zp = params(tensor, enc)
        q_out = names(f"{tensor}_quantized")
        if tensor in idx.graph_outputs and producer is not None:
            src, dq_out = names(f"{tensor}_float"), tensor
            for i, o in enumerate(producer.output):
                if o == tensor:
                    producer.output[i] = src
            # other consumers of the graph output read the DQ output, which keeps the name
        else:
            src, dq_out = tensor, names(f"{tensor}_dequantized")
            rename[tensor] = dq_out
        q = helper.make_node("QuantizeLinear", [src, scale, zp], [q_out], name=names(f"{tensor}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                              name=names(f"{tensor}_DequantizeLinear"))
        after.setdefault(anchor, []).extend([q, dq])

    qdq_nodes = {n.name for ns in list(before.values()) + list(after.values()) for n in ns}
    nodes: list[onnx.NodeProto] = list(after.get("", []))
    for node in g.node:
        nodes.extend(before.get(node.name, []))
        nodes.append(node)
        nodes.extend(after.get(node.name, []))
    for node in nodes:
        if node.name in qdq_nodes:
            continue
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(nodes)

    keep_float = _subgraph_inputs(g) | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name not in drop_inits or t.name in keep_float]
    del g.initializer[:]
    g.initializer.extend(inits + new_inits)
    _float_layer_reads(g, names)
    _integer_clamps(g)
    # stale shape information of renamed tensors would mislead the checker; let ORT infer it
    del g.value_info[:]
    return model


def _float_weight_channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """(axis, size) of the reduced channel axis of a Conv/ConvTranspose/Gemm's input 0 whose weight is a float
    initializer (the layer is kept in float); None for any other node."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ("", "ai.onnx") \
            or len(node.input) < 2 or node.input[1] not in inits \
            or inits[node.input[1]].data_type != onnx.TensorProto.FLOAT or len(inits[node.input[1]].dims) < 2:
        return None
    dims = list(inits[node.input[1]].dims)
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":
        return 1, dims[1] * attrs.get("group", 1)
    if node.op_type == "ConvTranspose":
        return 1, dims[0]
    return (0 if attrs.get("transA", 0) else 1), (dims[1] if attrs.get("transB", 0) else dims[0])


def _float_layer_reads(g: onnx.GraphProto, names: _Names) -> None:
    """A Conv/ConvTranspose/Gemm kept in float (excluded: its weight stays a float initializer) that reads a
    quantized activation reads it through a DequantizeLinear of its own, the per-tensor scale repeated along the
    channel axis (the same values)::

        producer -> Q -> DQ -> (quantized consumers)
                       `-> DQ(axis=1, scale repeated C times) -> Conv (float weight)

    Why: ONNX Runtime's ``WeightBiasQuantization`` (1.2x+, every optimization level from basic up) quantizes the
    float weight of such a layer *per tensor* to int8 when its input comes from a per-tensor DQ, so an excluded
    layer would run as a QLinearConv with a per-tensor weight (the opposite of what excluding it asked for);
    it does not touch a layer whose input DQ is per channel. A reduced axis of one channel cannot be told apart
    from per tensor and is left as it is."""
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    producer_params: set[str] = set()  # scales and zero points of the DQs that may now be unread
    for node in g.node:
        spec = _float_weight_channels(node, inits)
        dq = producer.get(node.input[0]) if spec is not None and node.input[0] else None
        if dq is not None and dq.op_type == "DequantizeLinear" and spec[1] > 1 \
                and not any(a.name in ("axis", "block_size") for a in dq.attribute) \
                and all(t in inits for t in dq.input[1:]) and len(dq.input) == 3 \
                and all(int(np.prod(inits[t].dims)) == 1 for t in dq.input[1:]):
            axis, channels = spec
            producer_params.update(dq.input[1:])
            params = []
            for t in dq.input[1:]:
                value = numpy_helper.to_array(inits[t]).reshape(())
                params.append(names(f"{t}_per_channel"))
                g.initializer.append(numpy_helper.from_array(np.full(channels, value, value.dtype), params[-1]))
            out = names(f"{node.input[0]}_per_channel")
            nodes.append(helper.make_node("DequantizeLinear", [dq.input[0], *params], [out], axis=axis,
                                          name=names(f"{node.name}_input_DequantizeLinear")))
            node.input[0] = out
        nodes.append(node)
    if len(nodes) != len(g.node):
        read = {t for n in nodes for t in n.input} | {o.name for o in g.output} | _subgraph_inputs(g)
        nodes = [n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] in read]  # now unread
        del g.node[:]
        g.node.extend(nodes)
        read = {t for n in nodes for t in n.input}
        kept = [t for t in g.initializer if t.name in read or t.name not in producer_params]
        del g.initializer[:]
        g.initializer.extend(kept)


def _integer_clamps(g: onnx.GraphProto) -> None:
    """``DQ -> Min/Max(B) -> Q`` of one 8-bit scale and zero point becomes ``Min/Max(q, Q(B))`` (module doc)."""
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    dropped: set[int] = set()
    candidates: set[str] = set()  # initializers the rewrite may leave unused
    for node in g.node:
        if node.op_type not in ("Min", "Max") or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            continue
        const = [t in inits for t in node.input]
        if const.count(True) != 1:
            continue
        k = const.index(True)
        dq = producer.get(node.input[1 - k])
        q = users.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(q) != 1 or q[0].op_type != "QuantizeLinear":
            continue
        q = q[0]
        if node.output[0] in outputs or len(users.get(dq.output[0], [])) != 1 or dq.output[0] in outputs:
            continue
        params = [[numpy_helper.to_array(inits[t]) if t in inits else None for t in n.input[1:3]] for n in (dq, q)]
        if any(len(p) != 2 or p[0] is None or p[1] is None for p in params) \
                or any(a.name == "axis" for n in (dq, q) for a in n.attribute):
            continue
        (s1, z1), (s2, z2) = params
        if s1.size != 1 or z1.dtype not in (np.uint8, np.int8) or z1.dtype != z2.dtype \
                or not (np.array_equal(s1, s2) and np.array_equal(z1, z2)):
            continue
        info = np.iinfo(z1.dtype)
        bound_name = node.input[k]
        bound = numpy_helper.to_array(inits[bound_name]).astype(np.float64)
        qb = np.clip(np.rint(bound / float(s1.reshape(()))) + int(z1.reshape(())), info.min, info.max).astype(z1.dtype)
        name = f"{node.input[k]}_quantized"
        while name in inits or name in producer:
            name += "_"
        g.initializer.append(numpy_helper.from_array(qb, name))
        inits[name] = g.initializer[-1]
        node.input[1 - k], node.input[k] = dq.input[0], name
        node.output[0] = q.output[0]
        dropped.update((id(dq), id(q)))
        candidates.update([*dq.input[1:], *q.input[1:], bound_name])
    if dropped:
        kept = [n for n in g.node if id(n) not in dropped]
        del g.node[:]
        g.node.extend(kept)
        used = {t for n in g.node for t in n.input} | outputs | _subgraph_inputs(g)
        kept_inits = [t for t in g.initializer if t.name in used or t.name not in candidates]
        del g.initializer[:]
        g.initializer.extend(kept_inits)


def as_int8(q: np.ndarray, enc: Encoding) -> tuple[np.ndarray, Encoding]:
    """A low-bit weight's integers ``q`` (``enc``: per tensor or per channel) as int8 with zero point 0 and the same
    scales, ``q - zero point``: the same dequantized values (4-bit asymmetric: -15..15), which a runtime with 8-bit
    kernels and none for 4 bits runs on its integer kernels (ONNX Runtime CPU: QLinearConv, QGemm)."""
    zero = enc.zero_point_array().astype(np.int16)
    if enc.per_channel:
        shape = [1] * q.ndim
        shape[enc.axis] = -1
        zero = zero.reshape(shape)
    wide = Encoding(8, True, True, enc.scale, (0,) * len(enc.scale), enc.axis)
    return (q.astype(np.int16) - zero).astype(np.int8), wide


def int_tensor(values: np.ndarray, name: str, enc: Encoding) -> onnx.TensorProto:
    """An initializer of the encoding's integer type; 4-bit values packed two to a byte (ONNX INT4/UINT4)."""
    if enc.bitwidth == 4:
        return helper.make_tensor(name, enc.onnx_dtype, values.shape, values.astype(np.int64).ravel().tolist())
    return numpy_helper.from_array(values, name)


def quantized_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def dequantized_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float values the QDQ model really uses for each quantized initializer (for tests/analysis)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = inits[n.input[0]].astype(np.float32)
            s = inits[n.input[1]]
            z = inits[n.input[2]].astype(np.float32)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            if block:  # blocked: each scale repeated over its block (the last one ragged)
                s = np.take(np.repeat(s, block, axis=axis), np.arange(q.shape[axis]), axis=axis)
                z = np.take(np.repeat(z, block, axis=axis), np.arange(q.shape[axis]), axis=axis)
            elif s.ndim == 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            out[n.output[0]] = ((q - z) * s).astype(np.float32)
    return out
