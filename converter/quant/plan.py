"""The QuantPlan: which tensors are quantized, how, and with which encodings.

The plan is the single source of truth. :func:`build_plan` derives it from the graph, the rule
table (:mod:`.rules`) and the target preset; calibration fills ``plan.encodings``; the QDQ renderer
and the encodings file are both produced from it; the fallback search only edits it.

Planning runs in five small steps over a :class:`GraphIndex`:

1. choose the quantized nodes (a rule exists, the target quantizes the op type, not excluded);
2. blocks (:func:`converter.graph.patterns.find_blocks`): decomposed LayerNorm, GELU, attention
   scores... The target preset's ``patterns`` table says what each kind gets; a block that is one
   unit (``qdq_inside=False``) has no Q/DQ on its internal tensors, e.g. for ORT CPU, which fuses
   ``ReduceMean/Sub/Pow/.../Add`` back into LayerNormalization only when nothing sits inside;
3. fused groups (:func:`converter.graph.patterns.fused_group`): an anchor (Conv/ConvTranspose/
   Gemm/MatMul) followed by BatchNormalization, a bias ``Add`` with a constant, a residual Add
   (where the target joins it, TensorRT) and/or an activation the target fuses (Relu, Clip, SiLU,
   ...) forms one group with no Q/DQ inside; any other compute op followed by such an activation
   too (a residual Add -> Relu: ORT runs QLinearAdd and drops the Relu)::

       DQ(x) -> Conv -> Relu -> Q -> DQ          (not: Conv -> Q -> DQ -> Relu -> Q -> DQ)

4. declare tensor roles: activation inputs, per-channel weights, int32 biases, outputs. Each weight's width
   comes from ``weight_bits`` and ``weight_bits_overrides`` (:func:`weight_layer_bits`: a node name, then
   ``first``/``last`` -- the first and last quantized layer with a weight in graph order, of the graph planned --
   then ``op:<OpType>``); with ``weight_block_size`` a weight whose op has a block axis in the rule table (Conv,
   Gemm, 2-D MatMul: the input channels) and more input channels than one block is block-wise, others stay per
   channel (``TensorQuant.block_note`` says why). Where the target lists the op in ``block_weight_only_ops``
   (MatMul on ort-cpu) a block-wise layer is weight-only: its activation input and output get no Q/DQ for its
   sake (another quantized reader may still want them), so ONNX Runtime fuses it into MatMulNBits::

       LayerNorm -> x (float) -> MatMul(x, DQ(W int4, axis 0, block_size)) -> Add(bias) -> ...

4a. the float-tail rule (targets with ``float_tail``, ort-cpu: :func:`float_tail`): nodes after the last compute
   layer on the way to a graph output run in float (status ``float-tail``, listed in ``plan.float_tail``); the
   compute layer's own output keeps its Q, so ONNX Runtime still fuses it into an integer kernel;
5. propagate through data-movement ops (``shared`` rules) to a fixed point, so Reshape/MaxPool/
   Concat outputs reuse their input's encoding (one *scale group*, a union-find over tensors); the
   target's ``tied_op_types`` (AveragePool on ``qnn``, as AIMET and QNN tie it) join their groups too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from ..ops import OUTPUT_Q_KERNEL_OPS
from ..config import QuantConfig
from ..graph.index import GraphIndex, attr, bodies, graph_attrs
from ..graph.patterns import ACTIVATION_KINDS, COMPOUND_KINDS, Match, all_nodes, find_blocks, float_subgraphs
from ..graph.patterns import fused_group
from .encoding import Encoding
from .rules import RULES, OpRule, block_axis, node_rule, rule_op_type, weight_axis

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
    block_size: int | None = None  # block-wise weight: input channels one scale spans
    block_axis: int | None = None  # block-wise weight: the axis cut into blocks
    block_note: str | None = None  # why a weight stays per channel although block-wise weights were asked for
    layers: tuple[str, ...] = ()  # weight: the nodes reading it
    weight_only: bool = False  # block-wise weight of a layer reading float activations (block_weight_only_ops)

    def to_dict(self) -> dict[str, Any]:
        d = {"role": self.role, "bitwidth": self.bitwidth, "signed": self.signed, "symmetric": self.symmetric}
        if self.axis is not None:
            d["axis"] = self.axis
        if self.block_size is not None:
            d["block_size"], d["block_axis"] = self.block_size, self.block_axis
        if self.block_note:
            d["block_note"] = self.block_note
        if self.group and self.group != self.name:
            d["shares_encoding_with"] = self.group
        return d


@dataclass
class NodeStatus:
    op_type: str
    status: str  # quantized | fused | float-excluded | float-no-rule | float-op-type | float-tail | not-float
    group: str | None = None  # anchor of the fused group (or first node of the block) it belongs to
    pattern: str | None = None  # kind of the block or group follower (LayerNorm, GELU, residual_add, Relu...)


@dataclass
class QuantPlan:
    target: str
    tensors: dict[str, TensorQuant] = field(default_factory=dict)  # in graph order
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    encodings: dict[str, Encoding] = field(default_factory=dict)
    patterns: list[dict[str, Any]] = field(default_factory=list)  # recognised blocks, for the report
    float_subgraphs: list[dict[str, Any]] = field(default_factory=list)  # If/Loop/Scan bodies left in float
    subgraphs: list[dict[str, Any]] = field(default_factory=list)  # bodies planned (converter.quant.control_flow)
    split_groups: list[dict[str, Any]] = field(default_factory=list)  # scale groups split for their ranges
    mixed_operands: list[dict[str, Any]] = field(default_factory=list)  # Add/Mul operands of very different range
    # nodes the float-tail rule left in float (preset.float_tail): node, op_type, reason
    float_tail: list[dict[str, Any]] = field(default_factory=list)

    def by_role(self, role: str) -> list[TensorQuant]:
        return [t for t in self.tensors.values() if t.role == role]

    def group_members(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for t in self.by_role(ACTIVATION):
            groups.setdefault(t.group, []).append(t.name)
        return groups

    def layer_ops(self, t: TensorQuant) -> set[str]:
        """The op types of the layers reading weight ``t`` (empty when none is known to the plan)."""
        return {self.nodes[n].op_type for n in t.layers if n in self.nodes}

    def weight_layers(self) -> list[dict[str, Any]]:
        """Per weight, in graph order: the layers reading it, bits and granularity (per-tensor, per-channel,
        block-<size>), for the report."""
        out = []
        for t in self.by_role(WEIGHT):
            gran = f"block-{t.block_size}" if t.block_size else "per-channel" if t.axis is not None else "per-tensor"
            out.append({"weight": t.name, "layers": list(t.layers), "bits": t.bitwidth, "granularity": gran,
                        **({"activations": "float (weight-only)"} if t.weight_only else {}),
                        **({"note": t.block_note} if t.block_note else {})})
        return out

    def float_nodes(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.status.startswith("float")]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.nodes.values():
            counts[s.status] = counts.get(s.status, 0) + 1
        return {
            "target": self.target,
            "node_counts": counts,
            "nodes": {n: {"op_type": s.op_type, "status": s.status, **({"group": s.group} if s.group else {}),
                          **({"pattern": s.pattern} if s.pattern else {})}
                      for n, s in self.nodes.items()},
            "patterns": self.patterns,
            "float_subgraphs": self.float_subgraphs,
            "subgraphs": self.subgraphs,
            "split_groups": self.split_groups,
            "mixed_operands": self.mixed_operands,
            "float_tail": self.float_tail,
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


@dataclass
class _Build:
    """What the steps of :func:`build_plan` hand each other."""

    model: onnx.ModelProto
    config: QuantConfig
    idx: GraphIndex
    plan: QuantPlan
    excluded: set[str]
    quantized: list[onnx.NodeProto] = field(default_factory=list)  # step 1: nodes selected for quantization
    no_qdq: set[str] = field(default_factory=set)  # internal tensors of blocks and groups
    unit_blocks: list[Match] = field(default_factory=list)  # blocks quantized as one unit (no Q/DQ inside)
    taken: set[str] = field(default_factory=set)  # nodes claimed by a block or group (or excluded)
    group_output: dict[str, str] = field(default_factory=dict)  # group head name -> tensor that ends its group
    group_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # head -> extra inputs (a shortcut)
    tail_inputs: set[str] = field(default_factory=set)
    is_quantized: set[str] = field(default_factory=set)  # quantized nodes no block or group took
    acts: set[str] = field(default_factory=set)  # activation tensors with a Q/DQ
    uf: _UnionFind = field(default_factory=_UnionFind)  # activations sharing one encoding
    weights: dict[str, TensorQuant] = field(default_factory=dict)
    biases: dict[str, TensorQuant] = field(default_factory=dict)
    weight_only: set[str] = field(default_factory=set)  # step 4: block-wise weight layers reading float activations

    def want_activation(self, name: str) -> bool:
        idx = self.idx
        if not name or name in self.no_qdq or idx.is_constant(name) or not idx.is_float(name):
            return False
        self.acts.add(name)
        self.uf.find(name)
        return True


def build_plan(model: onnx.ModelProto, config: QuantConfig, idx: GraphIndex | None = None) -> QuantPlan:
    """The plan of the main graph: 1. which nodes are quantized, 2-3. blocks and fused groups (and the float
    tail), 4. tensor roles (activations, weights, biases), 5. shared encodings of data-movement and tied ops,
    then the plan's tensors in graph order with their groups named, 6. Q/DQ only weight-only layers would read
    dropped."""
    idx = idx or GraphIndex.build(model)
    plan = QuantPlan(target=config.target, float_subgraphs=float_subgraphs(model))
    b = _Build(model, config, idx, plan, set(config.exclude_nodes) | set(config.exclude_with_inputs))
    _select_nodes(b)
    _fuse(b)
    _assign_roles(b)
    _share_encodings(b)
    _collect_tensors(b)
    _drop_weight_only_feeds(b)
    return plan


def _drop_weight_only_feeds(b: _Build) -> None:
    """6. activations only weight-only layers read lose their Q/DQ (:func:`weight_only_feeds`: MatMulNBits fuses);
    with ``weight_only`` every activation does (weights alone quantized)."""
    if b.weight_only:
        drop_activations(b.plan, weight_only_feeds(b.plan, b.idx, b.weight_only))
    if b.config.weight_only:
        drop_activations(b.plan, {t.name for t in b.plan.by_role(ACTIVATION)})


def _select_nodes(b: _Build) -> None:
    """1. which nodes are quantized (``b.quantized``), and each node's status in the plan."""
    idx, plan, op_types = b.idx, b.plan, b.config.quantized_op_types()
    for node in b.model.graph.node:
        rule = node_rule(node, idx)
        if not any(idx.is_float(o) for o in node.output):
            plan.nodes[node.name] = NodeStatus(node.op_type, "not-float")  # shapes, indices: nothing to quantize
        elif rule is None or node.domain not in ("", "ai.onnx"):  # a custom-domain op is not the ONNX op of that name
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-no-rule")
        elif node.name in b.excluded:
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-excluded")
        elif op_types is not None and rule_op_type(node, idx) not in op_types:
            plan.nodes[node.name] = NodeStatus(node.op_type, "float-op-type")
        else:
            plan.nodes[node.name] = NodeStatus(node.op_type, "quantized")
            b.quantized.append(node)


def _fuse(b: _Build) -> None:
    """2-3. blocks and fused groups. Order matters where both could claim a node: structural blocks
    (LayerNorm, attention) first, so no group swallows their Adds; then weighted anchors' groups,
    which take the activations they fuse (SiLU after a Conv on TensorRT); then what is left of the
    activation blocks; then other compute ops followed by an activation (Add -> Relu). Then the float tail."""
    preset, plan = b.config.preset, b.plan
    b.taken = set(b.excluded)
    blocks = find_blocks(b.idx, b.excluded, compound=set(preset.patterns) & COMPOUND_KINDS)
    _apply_blocks(b, [m for m in blocks if m.kind not in ACTIVATION_KINDS])
    _apply_groups(b, anchors=True)
    _apply_blocks(b, [m for m in blocks if m.kind in ACTIVATION_KINDS])
    _apply_groups(b, anchors=False)
    if preset.float_tail:
        b.tail_inputs = float_tail(b.idx, plan, preset.patterns)
        b.unit_blocks = [m for m in b.unit_blocks if plan.nodes[m.nodes[0]].status != "float-tail"]
    b.is_quantized = {n.name for n in b.quantized if n.name not in b.taken and plan.nodes[n.name].status == "quantized"}


def _apply_blocks(b: _Build, selected: list[Match]) -> None:
    plan = b.plan
    for m in selected:
        if set(m.nodes) & b.taken:
            continue  # fused into a group
        policy = b.config.preset.patterns.get(m.kind)
        one_unit = policy is not None and not policy.qdq_inside
        plan.patterns.append({**m.to_dict(), "qdq_inside": not one_unit})
        if not one_unit:
            continue
        b.unit_blocks.append(m)
        b.no_qdq.update(m.internal)
        b.taken.update(m.nodes)
        for name in m.nodes:
            plan.nodes[name] = NodeStatus(plan.nodes[name].op_type, "fused", m.nodes[0], m.kind)


def _apply_groups(b: _Build, anchors: bool) -> None:
    preset, plan, idx = b.config.preset, b.plan, b.idx
    join_residual = preset.patterns.get("residual_add") is not None and preset.patterns["residual_add"].join_anchor
    for node in b.quantized:
        rule = node_rule(node, idx)
        if rule.kind != "compute" or rule.anchor != anchors or node.name in b.taken:
            continue
        g = fused_group(idx, node, preset.fusable_activations, join_residual, b.taken, rule.anchor)
        if g is None:
            continue
        for name, kind in zip(g.followers, g.kinds):
            plan.nodes[name] = NodeStatus(plan.nodes[name].op_type, "fused", node.name, kind)
        b.taken.update(g.followers)
        b.no_qdq.update(g.internal)
        b.group_output[node.name] = g.output
        b.group_inputs[node.name] = g.extra_inputs
        plan.nodes[node.name].group = node.name


def _assign_roles(b: _Build) -> None:
    """4. tensor roles: the activations that get a Q/DQ (``b.acts``), the weights and the biases."""
    config, idx, plan = b.config, b.idx, b.plan
    preset = config.preset
    weighted = [n for n in b.quantized if plan.nodes[n.name].status == "quantized" and node_rule(n, idx).kind != "shared"
                and _weight_of(n, node_rule(n, idx), idx) is not None]
    layer_bits = weight_layer_bits(weighted, config.weight_bits, config.weight_bits_overrides, idx)
    weight_only = {n.name for n in weighted if n.op_type in preset.block_weight_only_ops
                   and config.weight_block_size is not None and config.per_channel
                   and _block_note(n, _weight_of(n, node_rule(n, idx), idx), idx, config.weight_block_size) is None}
    b.weight_only = weight_only
    reads_quantized = b.is_quantized - weight_only

    # An excluded layer reads a quantized compute layer's (Conv, Gemm, MatMul group's) output through a Q/DQ pair:
    # without that Q, ONNX Runtime could not run the producer as an integer kernel either, and excluding one layer
    # would run two in float (EfficientNet-Lite0, one depthwise Conv excluded: 47 of 49 QLinearConv, 7.05 -> 12.55
    # ms at batch 1). Other producers (element-wise ops, blocks) run in float on ORT CPU anyway: their output keeps
    # no Q for a float reader. The renderer keeps ORT from quantizing the excluded layer's weight
    # (converter.quant.qdq._float_layer_reads).
    reads_anchor_output = reads_quantized | {n for n, s in plan.nodes.items() if s.status == "float-excluded"
                                             and n not in config.exclude_with_inputs}

    def want_output(out: str, anchor: bool = False) -> None:
        # An output is quantized for someone: a quantized consumer, an excluded layer (above) or the graph's user.
        readers = reads_anchor_output if anchor else reads_quantized
        if preset.quantize_outputs and (out in idx.graph_outputs or any(c.name in readers for c in idx.uses(out))):
            b.want_activation(out)

    for node in b.quantized:
        if plan.nodes[node.name].status != "quantized":
            continue
        rule = node_rule(node, idx)
        if rule.kind == "shared":
            continue
        for slot in () if node.name in weight_only else rule.activations:
            if slot < len(node.input) and not (slot == rule.weight and idx.is_constant(node.input[slot])):
                b.want_activation(node.input[slot])
        _add_weight(b, node, rule, layer_bits, weight_only)
        if node.name in weight_only:
            continue
        for t in b.group_inputs.get(node.name, ()):
            b.want_activation(t)
        out = b.group_output.get(node.name, node.output[0])
        want_output(out, rule.anchor)
        if rule.anchor and preset.quantize_outputs and _integer_kernel_needs_output_q(node, out, idx) \
                and not any(c.name in config.exclude_with_inputs for c in idx.uses(out)):
            b.want_activation(out)  # read by float ops (a LayerNorm/GELU block) only: the Q makes the layer QGemm
    for t in b.tail_inputs:  # the last compute layers keep their output Q: ORT fuses DQ -> Conv -> Q only
        p = idx.producer[t]
        if (plan.nodes[p.name].group or p.name) not in weight_only:
            b.want_activation(t)
    for m in b.unit_blocks:
        which = preset.patterns[m.kind].inputs
        for t in m.inputs:
            if which == "all" or (which == "after-anchor" and _anchor_head(idx, plan, t, b.is_quantized)):
                b.want_activation(t)
        want_output(m.output)


def _integer_kernel_needs_output_q(node: onnx.NodeProto, out: str, idx: GraphIndex) -> bool:
    """Whether ONNX Runtime CPU runs the compute group of ``node`` (its output ``out``) on integers only when ``out``
    is quantized (:data:`converter.ops.OUTPUT_Q_KERNEL_OPS`; a 2-D MatMul whose group ends in its bias Add, which ORT
    fuses into a Gemm). Without that Q a Gemm reading DQ inputs runs in float, slower than FP32 (a jax2tf MLP: 3 of
    its 4 Dense layers before LayerNorm/GELU blocks)."""
    if node.op_type in OUTPUT_Q_KERNEL_OPS:
        return True
    shape = idx.shape.get(node.input[0])
    return node.op_type == "MatMul" and out != node.output[0] and shape is not None and len(shape) == 2


def _add_weight(b: _Build, node: onnx.NodeProto, rule: OpRule, layer_bits: dict[str, int],
                weight_only: set[str]) -> None:
    """The weight of a quantized node (the wider width and per-tensor where layers sharing it disagree), and its
    bias when the node's data input is quantized."""
    config, idx = b.config, b.idx
    w = _weight_of(node, rule, idx)
    if w is None:
        return
    axis = weight_axis(node, idx) if config.per_channel else None
    prev = b.weights.get(w)
    bits = max(layer_bits[node.name], prev.bitwidth if prev is not None else 0)  # shared: the wider
    if prev is not None and prev.axis != axis:
        axis = None  # shared by nodes that disagree on the channel axis: per-tensor
    symmetric = config.weight_symmetric or (bits == 8 and config.preset.symmetric_8bit_depthwise
                                            and is_depthwise(node, idx))
    b.weights[w] = TensorQuant(w, WEIGHT, bits, symmetric, symmetric, axis,
                               layers=(prev.layers if prev is not None else ()) + (node.name,))
    if config.weight_block_size is not None:
        _choose_blocks(b.weights[w], prev, node, idx, config.weight_block_size)
        b.weights[w].weight_only = node.name in weight_only and b.weights[w].block_size is not None
    bias = _bias_of(node, rule, idx)
    if bias is not None and node.input[0] in b.acts:
        b.biases[bias] = TensorQuant(bias, BIAS, 32, True, True, 0 if axis is not None else None,
                                     bias_of=(node.input[0], w))


def _share_encodings(b: _Build) -> None:
    """5. data-movement ops share their input's encoding, and so do the compute ops the target ties (AveragePool on
    qnn: AIMET ties its quantizers, QNN wants one encoding); iterate to a fixed point."""
    idx, uf, acts = b.idx, b.uf, b.acts
    tied = b.config.preset.tied_op_types
    shared_nodes = [n for n in b.quantized if (node_rule(n, idx).kind == "shared" or n.op_type in tied)
                    and n.name in b.is_quantized]
    changed = True
    while changed:
        changed = False
        for node in shared_nodes:
            data_in = [t for t in _data_inputs(node, idx) if t and not idx.is_constant(t) and idx.is_float(t)]
            outs = [t for t in node.output if t and idx.is_float(t)]
            tensors = data_in + outs
            if not data_in or not any(t in acts for t in tensors):
                continue
            for t in tensors:
                if t not in acts:
                    if not b.want_activation(t):
                        continue
                    changed = True
                if uf.find(t) != uf.find(data_in[0]):
                    uf.union(data_in[0], t)
                    changed = True


def _collect_tensors(b: _Build) -> None:
    """The plan's tensors in graph order. Weights whose bias input is not quantized keep their own encodings;
    biases need a quantized input. Activation groups are named by their first member in graph order
    (deterministic, independent of union order)."""
    config, idx, plan, uf, acts = b.config, b.idx, b.plan, b.uf, b.acts
    preset = config.preset
    act_bits, act_signed, act_sym = config.activation_bits, preset.activation_signed, preset.activation_symmetric
    ordered = sorted(acts | set(b.weights) | set(b.biases), key=lambda t: (idx.position(t), t))
    wide_groups = {uf.find(t) for t in _int16_tensors(b.model, plan, set(config.int16_nodes)) if t in acts}
    for name in ordered:
        if name in b.weights:
            plan.tensors[name] = b.weights[name]
        elif name in b.biases:
            if b.biases[name].bias_of[0] in acts:
                plan.tensors[name] = b.biases[name]
        else:
            bits = 16 if uf.find(name) in wide_groups else act_bits
            plan.tensors[name] = TensorQuant(name, ACTIVATION, bits, act_signed, act_sym, group=uf.find(name))
    first: dict[str, str] = {}
    for t in plan.by_role(ACTIVATION):
        first.setdefault(t.group, t.name)
    for t in plan.by_role(ACTIVATION):
        t.group = first[t.group]


def weight_only_feeds(plan: QuantPlan, idx: GraphIndex, weight_only: set[str]) -> set[str]:
    """Activation groups whose only readers are weight-only layers, through data-movement ops of the group (an
    attention context ``MatMul -> Transpose -> Reshape -> output projection``): their Q/DQ are there for those
    layers alone, and a DQ in front of a blocked-weight MatMul keeps ONNX Runtime from fusing it into MatMulNBits
    (MiniLM W4 block-32: 6 of 36 MatMuls ran unfused, their weights dequantized each run). The producer still runs
    on integers where its inputs are quantized (``MatMulIntegerToFloat``)."""
    members = plan.group_members()
    out = set()
    for root, names in members.items():
        group = set(names)
        if any(n in idx.graph_outputs for n in names):
            continue
        outside = {c.name for n in names for c in idx.uses(n)  # readers other than the group's data movement
                   if not all(o in group for o in c.output if o and idx.is_float(o)) or not c.output}
        if outside and outside <= weight_only:
            out.add(root)
    return out


_BODY_ATTRS = ("then_branch", "else_branch", "body")
TAIL_REASON = ("after the last compute layer on the way to a graph output: no integer kernel reads its Q/DQ "
               "(quantizing it costs accuracy, buys no speed)")


def float_tail(idx: GraphIndex, plan: QuantPlan, patterns: dict | None = None) -> set[str]:
    """The float-tail rule (``TargetPreset.float_tail``): quantized nodes that come after a quantized compute
    layer (Conv/ConvTranspose/Gemm/MatMul, the rule table's anchors) and reach a graph output without passing
    another one -- a detector's decode, DFL Softmax, score Sigmoids and Concats, an embedding's normalisation --
    run in float: status ``float-tail``, listed in ``plan.float_tail`` with the reason. A fused group headed by a
    compute layer stays whole, and its output keeps its Q (ONNX Runtime fuses ``DQ -> Conv -> Q`` into a
    QLinearConv only when the Conv's output is quantized): those tensors are returned, except where the tail node
    is a block whose policy (``patterns``) never quantized its inputs (a LayerNorm reading a MatMul's output)."""
    patterns = patterns or {}
    if idx.graph.name.rsplit("/", 1)[-1] in _BODY_ATTRS:
        return set()  # a control-flow body planned on its own (graph.scopes.wrapper): its outputs are not the model's

    def is_anchor(name: str) -> bool:
        st = plan.nodes.get(name)
        rule = RULES.get(st.op_type) if st is not None else None
        return rule is not None and rule.anchor and st.status == "quantized"

    def computes_later(node: onnx.NodeProto) -> bool:  # a quantized compute layer, or a body that may hold one
        return is_anchor(node.name) or any(True for _ in graph_attrs(node))

    def head(name: str) -> str:
        st = plan.nodes[name]
        return st.group if st.status == "fused" and st.group else name

    nodes = list(idx.graph.node)
    after: set[str] = set()  # nodes with a quantized compute layer before them
    made_after: set[str] = set()
    for n in nodes:
        if any(t in made_after for t in n.input):
            after.add(n.name)
        if n.name in after or is_anchor(n.name):
            made_after.update(o for o in n.output if o)
    captured = {t for n in nodes for body in bodies(n) for m in all_nodes(body) for t in m.input}  # read in a body
    before: set[str] = set()  # nodes with a quantized compute layer after them
    for n in reversed(nodes):
        if any(t in captured for t in n.output) or \
                any(computes_later(u) or u.name in before for t in n.output if t for u in idx.uses(t)):
            before.add(n.name)
    tail = [n for n in nodes if n.name in after and n.name not in before
            and plan.nodes[n.name].status in ("quantized", "fused") and not is_anchor(head(n.name))]
    inputs: set[str] = set()
    for n in tail:
        st = plan.nodes[n.name]
        plan.nodes[n.name] = NodeStatus(st.op_type, "float-tail", st.group, st.pattern)
        plan.float_tail.append({"node": n.name, "op_type": n.op_type, **({"pattern": st.pattern} if st.pattern else {}),
                                "reason": TAIL_REASON})
        policy = patterns.get(st.pattern) if st.status == "fused" and st.pattern else None
        if policy is not None and not policy.qdq_inside and policy.inputs == "none":
            continue  # a block that never had its inputs quantized (LayerNorm): nothing to keep
        for t in n.input:
            p = idx.producer.get(t)
            if p is not None and is_anchor(head(p.name)) and idx.is_float(t):
                inputs.add(t)
    return inputs


def drop_activations(plan: QuantPlan, names: set[str]) -> list[str]:
    """Leave the activations ``names`` in float: with their scale groups and the biases built on them (an int32 bias
    needs its input's scale). Returns every tensor dropped. For a plan made again after calibration (the accuracy
    search's tries): a tensor calibration never saw gets no encoding instead of a made-up one."""
    groups = {t.group for t in plan.by_role(ACTIVATION) if t.name in names}
    gone = {t.name for t in plan.by_role(ACTIVATION) if t.group in groups}
    gone |= {t.name for t in plan.by_role(BIAS) if t.bias_of[0] in gone}
    for n in gone:
        del plan.tensors[n]
    return sorted(gone)


def weight_layer_bits(nodes: list[onnx.NodeProto], default: int, overrides: dict[str, int],
                      idx: GraphIndex | None = None) -> dict[str, int]:
    """Weight width of each layer (``nodes``: the quantized layers with a weight, in graph order): ``overrides``
    keyed by node name, then ``first``/``last`` (the first/last of ``nodes``), then ``depthwise`` (a Conv with one
    input channel per group; needs ``idx``), then ``op:<OpType>``, else ``default``. Names of nodes not among
    ``nodes`` are checked by the pipeline (they may sit in another graph)."""
    by_op = {k[3:]: v for k, v in overrides.items() if k.startswith("op:")}
    out = {n.name: overrides.get(n.name, by_op.get(n.op_type, default)) for n in nodes}
    if "depthwise" in overrides and idx is not None:
        for n in nodes:
            if n.name not in overrides and is_depthwise(n, idx):
                out[n.name] = overrides["depthwise"]
    for key, node in (("last", nodes[-1:]), ("first", nodes[:1])):
        if key in overrides and node and node[0].name not in overrides:
            out[node[0].name] = overrides[key]
    return out


def is_depthwise(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """A Conv whose groups each read one input channel (weight shape ``[C_out, 1, ...]``, ``group > 1``)."""
    if node.op_type != "Conv" or int(attr(node, "group", 1)) <= 1 or len(node.input) < 2:
        return False
    w = idx.constant(node.input[1])
    shape = list(w.shape) if w is not None else (idx.shape.get(node.input[1]) or [])
    return len(shape) >= 2 and shape[1] == 1


def _choose_blocks(t: TensorQuant, prev: TensorQuant | None, node: onnx.NodeProto, idx: GraphIndex,
                   size: int) -> None:
    """Make weight ``t`` of ``node`` block-wise where the rule table gives its op a block axis and the axis is
    longer than one block; else leave it per channel with a note saying why."""
    note = "per-tensor (no channel axis)" if t.axis is None else _block_note(node, t.name, idx, size)
    baxis = block_axis(node, idx)
    if note is None and prev is not None and (prev.block_axis, prev.block_size) != (baxis, size):
        note = "shared by layers that disagree on the block axis"
    if note is not None:
        t.block_note = note
        return
    t.block_size, t.block_axis = size, baxis


def _block_note(node: onnx.NodeProto, weight: str, idx: GraphIndex, size: int) -> str | None:
    """Why ``node``'s weight cannot be block-wise (None: it can)."""
    baxis = block_axis(node, idx)
    shape = idx.shape.get(weight) or []
    if baxis is None or weight_axis(node, idx) is None:
        return f"{node.op_type}: no block axis (Conv, Gemm and 2-D MatMul weights have one)"
    if baxis >= len(shape) or shape[baxis] <= size:
        return f"{shape[baxis] if baxis < len(shape) else '?'} input channels: one block, same as per channel"
    return None


def _int16_tensors(model: onnx.ModelProto, plan: QuantPlan, nodes: set[str]) -> set[str]:
    """Tensors read or written by ``nodes`` (a fused group counts as its anchor): they get 16 bits."""
    if not nodes:
        return set()
    out: set[str] = set()
    for node in model.graph.node:
        status = plan.nodes.get(node.name)
        if node.name in nodes or (status is not None and status.group in nodes):
            out.update(t for t in list(node.input) + list(node.output) if t)
    return out


def _data_inputs(node: onnx.NodeProto, idx: GraphIndex) -> list[str]:
    rule: OpRule = node_rule(node, idx)
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


def _anchor_head(idx: GraphIndex, plan: QuantPlan, tensor: str, quantized: set[str]) -> bool:
    """``tensor`` ends a quantized Conv/Gemm/MatMul group (whose integer kernel wants a Q after it)."""
    node = idx.producer.get(tensor)
    if node is None:
        return False
    head = plan.nodes[node.name].group or node.name
    return head in quantized and RULES[plan.nodes[head].op_type].anchor
