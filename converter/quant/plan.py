"""The QuantPlan: which tensors are quantized, how, and with which encodings.

The plan is the single source of truth. :func:`build_plan` derives it from the graph, the rule
table (:mod:`.rules`) and the target preset; calibration fills ``plan.encodings``; the QDQ renderer
and the encodings file are both produced from it; the fallback search only edits it.

Planning runs in four small steps over a :class:`GraphIndex`:

1. choose the quantized nodes (a rule exists, the target quantizes the op type, not excluded);
2. fuse groups: an anchor (Conv/ConvTranspose/Gemm/MatMul) followed by a bias ``Add`` with a constant
   and/or an activation the target fuses (Relu, Clip, ...) forms one group with no Q/DQ inside::

       DQ(x) -> Conv -> Relu -> Q -> DQ          (not: Conv -> Q -> DQ -> Relu -> Q -> DQ)

3. declare tensor roles: activation inputs, per-channel weights, int32 biases, outputs;
4. propagate through data-movement ops (``shared`` rules) to a fixed point, so Reshape/MaxPool/
   Concat outputs reuse their input's encoding (one *scale group*, a union-find over tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from ..config import QuantConfig
from ..graph.index import GraphIndex, attr
from .encoding import Encoding
from .rules import RULES, OpRule, weight_axis

ACTIVATION, WEIGHT, BIAS = "activation", "weight", "bias"


@dataclass
class TensorQuant:
    """How one tensor is quantized."""

    name: str
    role: str  # activation | weight | bias
    bitwidth: int
    signed: bool
    symmetric: bool
    axis: int | None = None  # channel axis for per-channel weights and biases
    group: str = ""  # scale-group root: activations in one group share one encoding
    bias_of: tuple[str, str] | None = None  # (activation input, weight) whose scales make the bias scale

    def to_dict(self) -> dict[str, Any]:
        d = {"role": self.role, "bitwidth": self.bitwidth, "signed": self.signed, "symmetric": self.symmetric}
        if self.axis is not None:
            d["axis"] = self.axis
        if self.group and self.group != self.name:
            d["shares_encoding_with"] = self.group
        return d


@dataclass
class NodeStatus:
    op_type: str
    status: str  # quantized | fused | float-excluded | float-no-rule | float-op-type | not-float
    group: str | None = None  # anchor of the fused group it belongs to


@dataclass
class QuantPlan:
    target: str
    tensors: dict[str, TensorQuant] = field(default_factory=dict)  # in graph order
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    encodings: dict[str, Encoding] = field(default_factory=dict)

    def by_role(self, role: str) -> list[TensorQuant]:
        return [t for t in self.tensors.values() if t.role == role]

    def group_members(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for t in self.by_role(ACTIVATION):
            groups.setdefault(t.group, []).append(t.name)
        return groups

    def float_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.status.startswith("float")]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.nodes.values():
            counts[s.status] = counts.get(s.status, 0) + 1
        return {
            "target": self.target,
            "node_counts": counts,
            "nodes": {n: {"op_type": s.op_type, "status": s.status, **({"group": s.group} if s.group else {})}
                      for n, s in self.nodes.items()},
            "tensors": {n: t.to_dict() for n, t in self.tensors.items()},
        }


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def build_plan(model: onnx.ModelProto, config: QuantConfig, idx: GraphIndex | None = None) -> QuantPlan:
    idx = idx or GraphIndex.build(model)
    preset = config.preset
    plan = QuantPlan(target=config.target)
    op_types = config.quantized_op_types()
    excluded = set(config.exclude_nodes)

    # 1. which nodes are quantized
    quantized: list[onnx.NodeProto] = []
    for node in model.graph.node:
        rule = RULES.get(node.op_type)
        if not any(idx.is_float(o) for o in node.output):
            plan.nodes[node.name] = NodeStatus(node.op_type, "not-float")  # shapes, indices: nothing to quantize
        elif rule is None:
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-no-rule")
        elif node.name in excluded:
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-excluded")
        elif op_types is not None and node.op_type not in op_types:
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-op-type")
        else:
            plan.nodes[node.name] = NodeStatus(node.op_type, "quantized")
            quantized.append(node)
    is_quantized = {n.name for n in quantized}

    # 2. fused groups: anchor -> [bias Add] -> [activation]; any other compute op -> [activation]
    #    (a residual Add -> Relu is one group too: ORT runs QLinearAdd and drops the Relu)
    group_output: dict[str, str] = {}  # group head name -> tensor that ends its group
    for node in quantized:
        rule = RULES[node.op_type]
        if rule.kind != "compute" or plan.nodes[node.name].status != "quantized":
            continue
        out = node.output[0]
        nxt = idx.single_consumer(out)
        if (rule.anchor and nxt is not None and nxt.op_type == "Add" and nxt.name not in excluded
                and _is_bias_add(nxt, out, idx)):
            plan.nodes[nxt.name] = NodeStatus(nxt.op_type, "fused", node.name)
            out = nxt.output[0]
            nxt = idx.single_consumer(out)
        if nxt is not None and nxt.op_type in preset.fusable_activations and nxt.name not in excluded:
            plan.nodes[nxt.name] = NodeStatus(nxt.op_type, "fused", node.name)
            out = nxt.output[0]
        group_output[node.name] = out
        if out != node.output[0]:
            plan.nodes[node.name].group = node.name

    # 3. tensor roles
    act_bits, act_signed, act_sym = config.activation_bits, preset.activation_signed, preset.activation_symmetric
    uf = _UnionFind()
    acts: set[str] = set()

    def want_activation(name: str) -> bool:
        if not name or idx.is_constant(name) or not idx.is_float(name):
            return False
        acts.add(name)
        uf.find(name)
        return True

    weights: dict[str, TensorQuant] = {}
    biases: dict[str, TensorQuant] = {}
    for node in quantized:
        if plan.nodes[node.name].status != "quantized":
            continue
        rule = RULES[node.op_type]
        if rule.kind == "shared":
            continue
        for slot in rule.activations:
            if slot < len(node.input) and not (slot == rule.weight and idx.is_constant(node.input[slot])):
                want_activation(node.input[slot])
        w = _weight_of(node, rule, idx)
        if w is not None:
            axis = weight_axis(node, idx) if config.per_channel else None
            prev = weights.get(w)
            if prev is not None and prev.axis != axis:
                axis = None  # shared by nodes that disagree on the channel axis: per-tensor
            weights[w] = TensorQuant(w, WEIGHT, config.weight_bits, True, True, axis)
            b = _bias_of(node, rule, idx)
            if b is not None and node.input[0] in acts:
                biases[b] = TensorQuant(b, BIAS, 32, True, True, 0 if axis is not None else None,
                                        bias_of=(node.input[0], w))
        out = group_output.get(node.name, node.output[0])
        # An output is quantized for someone: a quantized consumer or the graph's user. A node kept in
        # float therefore reads float inputs unless another quantized consumer shares the tensor.
        if preset.quantize_outputs and (out in idx.graph_outputs
                                        or any(c.name in is_quantized for c in idx.uses(out))):
            want_activation(out)

    # 4. data-movement ops share their input's encoding; iterate to a fixed point
    shared_nodes = [n for n in quantized if RULES[n.op_type].kind == "shared"]
    changed = True
    while changed:
        changed = False
        for node in shared_nodes:
            data_in = [t for t in _data_inputs(node) if t and not idx.is_constant(t) and idx.is_float(t)]
            outs = [t for t in node.output if t and idx.is_float(t)]
            tensors = data_in + outs
            if not data_in or not any(t in acts for t in tensors):
                continue
            for t in tensors:
                if t not in acts:
                    want_activation(t)
                    changed = True
                if uf.find(t) != uf.find(data_in[0]):
                    uf.union(data_in[0], t)
                    changed = True

    # Weights whose bias input is not quantized keep their own encodings; biases need a quantized input.
    ordered = sorted(acts | set(weights) | set(biases), key=lambda t: (idx.position(t), t))
    for name in ordered:
        if name in weights:
            plan.tensors[name] = weights[name]
        elif name in biases:
            if biases[name].bias_of[0] in acts:
                plan.tensors[name] = biases[name]
        else:
            plan.tensors[name] = TensorQuant(name, ACTIVATION, act_bits, act_signed, act_sym, group=uf.find(name))
    # Groups are named by their first member in graph order (deterministic, independent of union order).
    first: dict[str, str] = {}
    for t in plan.by_role(ACTIVATION):
        first.setdefault(t.group, t.name)
    for t in plan.by_role(ACTIVATION):
        t.group = first[t.group]
    return plan


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    rule: OpRule = RULES[node.op_type]
    if node.op_type == "Concat":
        return list(node.input)
    return [node.input[s] for s in rule.activations if s < len(node.input)]


def _weight_of(node: onnx.NodeProto, rule: OpRule, idx: GraphIndex) -> str | None:
    if rule.weight is None or rule.weight >= len(node.input):
        return None
    w = node.input[rule.weight]
    return w if idx.is_constant(w) and idx.is_float(w) else None


def _bias_of(node: onnx.NodeProto, rule: OpRule, idx: GraphIndex) -> str | None:
    if rule.bias is None or rule.bias >= len(node.input):
        return None
    b = node.input[rule.bias]
    if not b or not idx.is_constant(b) or not idx.is_float(b) or len(idx.shape.get(b, [])) != 1:
        return None
    if node.op_type == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0):
        return None
    return b


def _is_bias_add(add: onnx.NodeProto, tensor: str, idx: GraphIndex) -> bool:
    other = [t for t in add.input if t != tensor]
    return len(other) == 1 and idx.is_constant(other[0])
