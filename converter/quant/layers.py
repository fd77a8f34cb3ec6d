"""Layers of a QuantPlan: the units the analyzer and the fallback search score, disable and keep in float.

A *layer* is a quantized ``compute`` node of the plan, or a fused group (anchor + bias ``Add`` +
activation, or a pattern block such as a LayerNorm or a GELU, see :mod:`converter.quant.plan`) taken
as one. Data-movement ops (``shared`` rules: Reshape, MaxPool...) are not layers: they reuse their
neighbours' encodings. Keeping a layer in float means excluding all its nodes from the plan.

A layer's *quantizers* are the encodings of the tensors it reads and writes (activation inputs,
weight, bias, output), widened to whole scale groups: a Reshape output shares its input's encoding,
so disabling a layer's input quantizer also disables it on the Reshape output, otherwise the float
value would be re-quantized one op later with the same encoding and the layer would not really be
in float. Neighbouring layers share the quantizer between them (one's output is the other's input).

:func:`layer_model` cuts a layer out as a model of its own whose graph inputs are the layer's
external inputs; rendering it with :func:`~converter.quant.qdq.render_qdq` and the layer's
encodings gives the "shadow" layer: float inputs, fake-quantized at the layer's input quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from ..graph.index import GraphIndex
from .plan import ACTIVATION, WEIGHT, QuantPlan, build_plan
from .rules import node_rule


@dataclass
class Layer:
    name: str  # the anchor (first) node's name
    nodes: list[str]  # member node names in graph order
    op_types: list[str]
    position: int  # graph index of the first node
    inputs: list[str]  # tensors read from outside the layer (initializers excluded)
    constants: list[str]  # initializers the layer reads
    output: str  # tensor the layer ends with
    quantizers: list[str] = field(default_factory=list)  # tensors whose encodings belong to the layer
    weight: str | None = None
    scope: str = ""  # the If/Loop/Scan body the layer is in (its path, converter.graph.scopes); "" = main graph

    @property
    def op_type(self) -> str:
        return self.op_types[0]

    @property
    def label(self) -> str:
        return "+".join(self.op_types)


def plan_layers(plan: QuantPlan, idx: GraphIndex, scope: str = "") -> list[Layer]:
    """Every quantized compute node or fused group of ``plan`` (over the model ``idx`` indexes), in graph order.

    A body's layers come from its own plan over its wrapper model (:mod:`converter.quant.control_flow`), with
    ``scope`` the body's path; node names are unique in the whole model, so layers of every scope can be
    kept in float together through ``exclude_with_inputs``."""
    graph = idx.graph
    members: dict[str, list[onnx.NodeProto]] = {}
    by_name = {n.name: n for n in graph.node}
    for node in graph.node:
        status = plan.nodes.get(node.name)
        if status is None:
            continue
        if status.status == "quantized" and node_rule(node, idx).kind == "compute":  # a clamp moves data
            members.setdefault(node.name, []).append(node)
        elif status.status == "fused" and status.group in by_name:
            members.setdefault(status.group, []).append(node)
    groups = plan.group_members()
    weights = {t.name for t in plan.tensors.values() if t.role == WEIGHT}
    layers = []
    for anchor, nodes in members.items():
        nodes.sort(key=lambda n: idx.order[n.name])
        produced = {o for n in nodes for o in n.output}
        inputs, constants = [], []
        for n in nodes:
            for t in n.input:
                if not t or t in produced or t in inputs or t in constants:
                    continue
                (constants if idx.is_constant(t) else inputs).append(t)
        output = nodes[-1].output[0]
        quantizers: list[str] = []
        for t in inputs + constants + [output]:
            tq = plan.tensors.get(t)
            if tq is None or t not in plan.encodings:
                continue
            same = groups.get(tq.group, [t]) if tq.role == ACTIVATION else [t]
            quantizers.extend(s for s in same if s not in quantizers and s in plan.encodings)
        layers.append(Layer(anchor, [n.name for n in nodes], [n.op_type for n in nodes], idx.order[nodes[0].name],
                            inputs, constants, output, quantizers, next((c for c in constants if c in weights), None),
                            scope))
    layers.sort(key=lambda lay: lay.position)
    return layers


def unassigned_quantizers(plan: QuantPlan, layers: list[Layer]) -> list[str]:
    covered = {t for lay in layers for t in lay.quantizers}
    return [t for t in plan.encodings if t not in covered]


def layer_model(model: onnx.ModelProto, idx: GraphIndex, layer: Layer,
                input_values: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The layer's nodes as a model: its external inputs become graph inputs, its output the graph output.

    Element types come from ``input_values`` (a sample value per input) where given, else from the graph.
    """
    by_name = {n.name: n for n in model.graph.node}
    nodes = [by_name[n] for n in layer.nodes]
    values = input_values or {}

    def elem(t: str) -> int:
        if t in values:
            return helper.np_dtype_to_tensor_dtype(np.asarray(values[t]).dtype)
        return idx.elem_type.get(t, onnx.TensorProto.FLOAT)

    graph = helper.make_graph(nodes, f"layer_{layer.name}",
                              [helper.make_tensor_value_info(t, elem(t), None) for t in layer.inputs],
                              [helper.make_tensor_value_info(layer.output, elem(layer.output), None)],
                              initializer=[idx.initializers[c] for c in layer.constants])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def owned_quantizers(model: onnx.ModelProto, idx: GraphIndex, config, plan: QuantPlan,
                     layers: list[Layer]) -> dict[str, list[str]]:
    """Per layer, the encodings that keeping that layer (alone) in float removes from ``plan``.

    That is what the fallback search can change by keeping it in float: its weight and bias, an input
    no other quantized op reads, an output no quantized op reads. A tensor between two quantized layers
    belongs to its readers (the producer in float still hands a quantized tensor to them).

    ``model`` is the graph the layers are in (a body's wrapper for a body's layers); encodings of ``plan``
    that the plan of ``model`` does not hold (another body's, merged into the main plan) belong to no layer here.
    """
    here = build_plan(model, config, idx).tensors
    out = {}
    for layer in layers:
        without = build_plan(model, config.replace(exclude_with_inputs=tuple(config.exclude_with_inputs) + tuple(layer.nodes)),
                             idx)
        out[layer.name] = [t for t in plan.encodings if t in here and t not in without.tensors]
    return out
