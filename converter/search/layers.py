"""Layers: the units the sensitivity analysis scores and the fallback search keeps in float.

A layer is a quantized compute node together with the nodes fused into it (a Conv with its bias Add
and Relu is one layer). Data-movement nodes (Reshape, MaxPool...) are not layers: they follow their
neighbours. Keeping a layer in float means excluding all its nodes from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph.index import GraphIndex
from ..quant.plan import QuantPlan
from ..quant.rules import RULES


@dataclass(frozen=True)
class Layer:
    name: str  # the anchor node's name
    op_type: str
    nodes: tuple[str, ...]  # anchor first, then fused members in graph order
    inputs: tuple[str, ...]  # tensors read from outside the layer (activations and constants)
    output: str  # the tensor the layer hands on


def plan_layers(plan: QuantPlan, idx: GraphIndex) -> list[Layer]:
    members: dict[str, list[str]] = {}
    for name, status in plan.nodes.items():
        if status.status == "fused" and status.group:
            members.setdefault(status.group, []).append(name)
    by_name = {n.name: n for n in idx.graph.node}
    layers = []
    for node in idx.graph.node:
        status = plan.nodes.get(node.name)
        if status is None or status.status != "quantized" or RULES[node.op_type].kind != "compute":
            continue
        names = [node.name] + sorted(members.get(node.name, []), key=lambda n: idx.order[n])
        produced = {o for n in names for o in by_name[n].output}
        inputs: list[str] = []
        for n in names:
            for t in by_name[n].input:
                if t and t not in produced and t not in inputs:
                    inputs.append(t)
        layers.append(Layer(node.name, node.op_type, tuple(names), tuple(inputs), by_name[names[-1]].output[0]))
    return layers
