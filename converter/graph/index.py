"""A producer/consumer index over an ONNX graph, built once per pass.

Passes read the graph through a :class:`GraphIndex` instead of scanning node lists per query. The
index is a snapshot: a pass that edits the graph builds a new one afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class GraphIndex:
    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    elem_type: dict[str, int] = field(default_factory=dict)
    shape: dict[str, list[int | str | None]] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: set[str] = field(default_factory=set)
    order: dict[str, int] = field(default_factory=dict)  # node name -> position

    @classmethod
    def build(cls, model: onnx.ModelProto) -> "GraphIndex":
        g = model.graph
        idx = cls(graph=g)
        idx.initializers = {t.name: t for t in g.initializer}
        idx.graph_inputs = [i.name for i in g.input if i.name not in idx.initializers]
        idx.graph_outputs = {o.name for o in g.output}
        for pos, node in enumerate(g.node):
            idx.order[node.name] = pos
            for name in node.input:
                if name:
                    idx.consumers.setdefault(name, []).append(node)
            for name in node.output:
                if name:
                    idx.producer[name] = node
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                idx.elem_type[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                idx.shape[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                ]
        for name, t in idx.initializers.items():
            idx.elem_type[name] = t.data_type
            idx.shape[name] = list(t.dims)
        return idx

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def constant(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name) in FLOAT_TYPES

    def uses(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        """The only node reading ``name`` when it is not also a graph output, else None."""
        users = self.uses(name)
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def position(self, tensor: str) -> tuple[int, int]:
        """Sort key that follows the graph: graph inputs first, then by producer position."""
        if tensor in self.graph_inputs:
            return (-1, self.graph_inputs.index(tensor))
        node = self.producer.get(tensor)
        if node is None:  # initializer
            return (-2, 0)
        return (self.order[node.name], list(node.output).index(tensor))


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def graph_attrs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The bodies of a control-flow node (If/Loop/Scan), named by attribute (``else_branch``, ``body``, ``x[i]``
    for a list of graphs)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for _, g in graph_attrs(node)]
