"""The bodies of If/Loop/Scan nodes as *scopes*, each viewable as a standalone model.

A body is a graph whose nodes may read names of the graphs around it (*captures*: the outer model's
inputs, initializers and node outputs, or tensors of an enclosing body). :func:`wrapper` turns a body
into a model of its own so the ordinary planner (:func:`converter.quant.plan.build_plan`) and renderer
(:func:`converter.quant.qdq.render_qdq`) can work on it unchanged:

* the body's inputs, nodes, outputs and initializers as they are;
* every captured *constant* (an outer initializer, e.g. a Conv weight kept at the top level) becomes an
  initializer of the wrapper, so it is recognised and quantized as a weight;
* every other capture becomes a graph input with the type the outer scope gives it (unknown when shape
  inference could not type it: such a tensor cannot be quantized, see :func:`unknown_captures`).

:func:`write_back` copies a rendered wrapper into the body again, minus the added inputs and constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import helper

from .index import graph_attrs


@dataclass
class Scope:
    """One If/Loop/Scan body: ``node`` owns it as attribute ``attr``; ``path`` names it in messages."""

    node: onnx.NodeProto
    attr: str
    graph: onnx.GraphProto
    path: str
    outer_types: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # visible from enclosing graphs
    outer_consts: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def defined(self) -> set[str]:
        """Names the body defines (inputs, initializers, node outputs)."""
        g = self.graph
        return {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output if o}

    def captures(self) -> list[str]:
        """Outer names read by the body's own nodes (in order of first use)."""
        local = self.defined()
        out: dict[str, None] = {}
        for n in self.graph.node:
            for x in n.input:
                if x and x not in local:
                    out[x] = None
        return list(out)

    def used(self) -> set[str]:
        """Tensors the body's own nodes read, and its outputs: where a Q/DQ in this body has a reader (a tensor
        read only by a nested body gets its Q/DQ there)."""
        return {x for n in self.graph.node for x in n.input if x} | {o.name for o in self.graph.output}


def _visible(g: onnx.GraphProto) -> tuple[dict[str, onnx.ValueInfoProto], dict[str, onnx.TensorProto]]:
    types = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    consts = {t.name: t for t in g.initializer}
    for t in g.initializer:
        types.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return types, consts


def scopes(model: onnx.ModelProto) -> list[Scope]:
    """Every body in the model, innermost first (a body comes before the body that contains it)."""
    out: list[Scope] = []

    def visit(g: onnx.GraphProto, types: dict, consts: dict, prefix: str) -> None:
        for node in g.node:
            for attr_name, sub in graph_attrs(node):
                path = f"{prefix}{node.name}/{attr_name}"
                scope = Scope(node, attr_name, sub, path, dict(types), dict(consts))
                inner_types, inner_consts = _visible(sub)
                visit(sub, {**types, **inner_types}, {**consts, **inner_consts}, path + "/")
                out.append(scope)

    types, consts = _visible(model.graph)
    visit(model.graph, types, consts, "")
    return out


def wrapper(scope: Scope, model: onnx.ModelProto) -> onnx.ModelProto:
    """The body as a standalone model (opsets of ``model``); see the module docstring."""
    g = onnx.GraphProto()
    g.CopyFrom(scope.graph)
    g.name = scope.path
    for name in scope.captures():
        if name in scope.outer_consts:
            g.initializer.append(scope.outer_consts[name])
        elif name in scope.outer_types:
            g.input.append(scope.outer_types[name])
        else:
            g.input.append(helper.make_empty_tensor_value_info(name))
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def unknown_captures(scope: Scope) -> list[str]:
    """Captured tensors whose element type the outer scope does not give (not calibratable, not quantizable)."""
    return [n for n in scope.captures() if n not in scope.outer_consts
            and not (n in scope.outer_types and scope.outer_types[n].type.tensor_type.elem_type)]


def write_back(scope: Scope, rendered: onnx.ModelProto) -> None:
    """Replace the body by the rendered wrapper, without the captures the wrapper added."""
    original_inputs = [i.name for i in scope.graph.input]
    added = set(scope.captures()) - set(original_inputs)
    g, r = scope.graph, rendered.graph
    inputs = {i.name: i for i in r.input}
    new_inputs = [inputs[n] for n in original_inputs]
    inits = [t for t in r.initializer if t.name not in added or t.name not in scope.outer_consts]
    for part, values in ((g.node, list(r.node)), (g.initializer, inits), (g.input, new_inputs),
                         (g.output, list(r.output))):
        del part[:]  # extend copies each message: ``rendered`` is left as it was
        part.extend(values)
    del g.value_info[:]


def all_graph_names(model: onnx.ModelProto) -> set[str]:
    """Every node and tensor name anywhere in the model (bodies included)."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output))
        for n in g.node:
            names.add(n.name)
            names.update(x for x in list(n.input) + list(n.output) if x)
            for _, sub in graph_attrs(n):
                visit(sub)

    visit(model.graph)
    return names
