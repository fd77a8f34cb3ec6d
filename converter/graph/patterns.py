"""Op patterns the planner recognises, matched on a :class:`GraphIndex`.

The planner (:func:`converter.quant.plan.build_plan`) asks this module two questions:

* which *blocks* the graph holds: LayerNorm, RMSNorm, L2 normalisation, decomposed Softmax, GELU (erf, tanh and
  sigmoid forms), SiLU/Swish, HardSwish, Mish, attention scores, Softmax, residual Adds. The target preset then
  says, per block kind, what Q/DQ the block gets (``TargetPreset.patterns``); e.g. ORT CPU fuses a decomposed
  LayerNorm/GELU back into one kernel at load time, so nothing may sit inside it;
* which nodes form a *fused group* behind an anchor (Conv/ConvTranspose/Gemm/MatMul, or any other
  compute op such as a residual Add): ``anchor -> [BatchNormalization] -> [bias Add] -> [residual
  Add] -> [activation]`` (the middle steps for weighted anchors only), each step allowed by the preset.

Matchers never branch on a target name: they read the preset's data. Decomposed element-wise blocks are
recognised by their math (:mod:`.math_blocks`: the region around a Reduce*/Exp/Erf/Tanh/Sigmoid/... seed is
evaluated on a synthetic input and compared with a table of reference forms), whatever ops an exporter used
(TorchScript, torch.export, tf2onnx from Keras or jax2tf, paddle2onnx). The structural matchers here::

    LayerNorm      one LayerNormalization node (decomposed ones: math_blocks)
    SkipLayerNorm  Add(a, b) read only by a LayerNorm (a post-LN transformer's residual stream)
    attention      MatMul(q, k) -> [Mul | Div by a constant] -> [Add(mask)] -> Softmax -> MatMul(., v)
    Softmax        one Softmax node
    residual_add   Add of two activations of one shape, one made by a Conv/Gemm/MatMul

A match lists its member nodes, the activations that enter it, the tensor that leaves it and its
*internal* tensors (produced and read only by members: no Q/DQ goes there when the policy says the
block is one unit). Tensors are checked to be read by nothing outside the pattern.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from .index import GraphIndex, attr, bodies, graph_attrs
from .math_blocks import ELEMENTWISE_KINDS, MathMatch, match_at, seeds_after
from ..ops import ACTIVATION_OPS, RESHAPE_OPS, WEIGHTED_LAYER_OPS

# Single-node activations (ops.ACTIVATION_OPS): their kind is their op type; composites below have their own kind.
# Kinds of activation units (blocks of these kinds can also be fused into the op before them)
ACTIVATION_KINDS = ACTIVATION_OPS | ELEMENTWISE_KINDS | {"residual_add"}


@dataclass(frozen=True)
class Match:
    kind: str
    nodes: tuple[str, ...]  # member nodes in graph order
    inputs: tuple[str, ...]  # activation tensors entering the pattern
    output: str  # the tensor leaving the pattern
    internal: frozenset[str] = frozenset()  # tensors produced and read only inside
    side_inputs: tuple[str, ...] = ()  # non-data inputs read inside (an attention mask)
    context: tuple[str, ...] = ()  # neighbours that make the pattern (attention's MatMuls), not members

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "nodes": list(self.nodes), "inputs": list(self.inputs), "output": self.output}
        if self.context:
            d["context"] = list(self.context)
        return d


@dataclass
class _Builder:
    """Collects members of a match while a matcher walks the graph."""

    idx: GraphIndex
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def add(self, *nodes: onnx.NodeProto) -> None:
        self.nodes.extend(nodes)

    def build(self, kind: str, inputs: tuple[str, ...], output: str, side: tuple[str, ...] = (),
              context: tuple[str, ...] = ()) -> Match | None:
        members = {n.name for n in self.nodes}
        if len(members) != len(self.nodes):
            return None
        internal = {o for n in self.nodes for o in n.output if o and o != output}
        for t in internal:  # nothing outside may read an internal tensor (its shape is fine)
            if t in self.idx.graph_outputs or any(u.name not in members and u.name not in context
                                                  and u.op_type != "Shape" for u in self.idx.uses(t)):
                return None
        ordered = sorted(self.nodes, key=lambda n: self.idx.order[n.name])
        return Match(kind, tuple(n.name for n in ordered), inputs, output, frozenset(internal), side, context)


# --- small graph predicates --------------------------------------------------------------------------

def _only_user(idx: GraphIndex, tensor: str, op_types: str | tuple[str, ...]) -> onnx.NodeProto | None:
    node = idx.single_consumer(tensor)
    ops = (op_types,) if isinstance(op_types, str) else op_types
    return node if node is not None and node.op_type in ops else None


def _scalar(idx: GraphIndex, name: str) -> float | None:
    value = idx.constant(name)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.number):
        return None
    return float(value.reshape(()))


def _other(node: onnx.NodeProto, tensor: str) -> str | None:
    """The other input of a binary node that reads ``tensor`` once."""
    ins = list(node.input)
    if len(ins) != 2 or ins.count(tensor) != 1:
        return None
    return ins[1] if ins[0] == tensor else ins[0]


def _const_operand(idx: GraphIndex, node: onnx.NodeProto, tensor: str, op: str, value: float | None = None,
                   tol: float = 1e-3) -> bool:
    """``node`` is ``op(tensor, c)`` (or ``op(c, tensor)`` for commutative ops) with a constant ``c``."""
    if node.op_type != op:
        return False
    if op in ("Div", "Sub", "Pow") and (len(node.input) != 2 or node.input[0] != tensor):
        return False
    other = _other(node, tensor)
    if other is None or not idx.is_constant(other):
        return False
    if value is None:
        return True
    c = _scalar(idx, other)
    return c is not None and abs(c - value) <= tol * max(1.0, abs(value))


def _users(idx: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    return [] if tensor in idx.graph_outputs else idx.uses(tensor)


# --- activation units --------------------------------------------------------------------------------

def _math_activation(idx: GraphIndex, x: str) -> Match | None:
    """A composite activation reading ``x`` (GELU, SiLU/Swish, HardSwish, Mish), recognised by its math
    (:mod:`.math_blocks`): whatever ops an exporter spelled it with."""
    for seed in seeds_after(idx, x):
        mm = match_at(idx, seed, ELEMENTWISE_KINDS, x=x)
        if mm is not None:
            return _from_math(idx, mm)
    return None


def _from_math(idx: GraphIndex, mm: MathMatch) -> Match | None:
    b = _Builder(idx)
    b.add(*mm.nodes)
    return b.build(mm.kind, (mm.input,), mm.output)


def _single_op(idx: GraphIndex, x: str) -> Match | None:
    node = idx.single_consumer(x)
    if node is None or node.op_type not in ACTIVATION_OPS or node.input[0] != x or node.domain not in ("", "ai.onnx"):
        return None
    return Match(node.op_type, (node.name,), (x,), node.output[0])


# Composite forms first: a Sigmoid that is half of a SiLU is not a plain Sigmoid.
ACTIVATION_MATCHERS: tuple[Callable[[GraphIndex, str], Match | None], ...] = (_math_activation, _single_op)


def activation_at(idx: GraphIndex, x: str) -> Match | None:
    """The activation unit (single op or composite) reading ``x``, or None."""
    for matcher in ACTIVATION_MATCHERS:
        m = matcher(idx, x)
        if m is not None:
            return m
    return None


# --- blocks ------------------------------------------------------------------------------------------

def _layernorm(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
    if root.op_type == "LayerNormalization":
        return Match("LayerNorm", (root.name,), (root.input[0],), root.output[0])
    return None


def _math_block(kinds: frozenset[str]):
    """Blocks rooted at a seed node (a reduction, Exp, Erf, Sigmoid...) and recognised by their math."""
    def match(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
        mm = match_at(idx, root, kinds)
        return None if mm is None else _from_math(idx, mm)
    match.__name__ = f"_math_block({'/'.join(sorted(kinds))})"
    return match


def _norm_at(idx: GraphIndex, x: str) -> Match | None:
    """The LayerNorm (one node or decomposed) whose input is ``x``."""
    for u in _users(idx, x):
        if u.op_type == "LayerNormalization" and u.input[0] == x:
            return _layernorm(idx, u)
    for seed in seeds_after(idx, x, depth=2):
        mm = match_at(idx, seed, frozenset({"LayerNorm"}), x=x)
        if mm is not None:
            return _from_math(idx, mm)
    return None


NORM_KINDS = frozenset({"LayerNorm", "RMSNorm", "L2Norm", "DecomposedSoftmax"})


def _data_user(idx: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The one node reading ``tensor``'s values (Shape nodes read only its shape)."""
    users = [u for u in _users(idx, tensor) if u.op_type != "Shape"]
    return users[0] if len(users) == 1 else None


def _attention(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
    if root.op_type != "MatMul" or any(idx.is_constant(t) or not idx.is_float(t) for t in root.input):
        return None
    b = _Builder(idx)
    t = root.output[0]
    nxt = _data_user(idx, t)
    if nxt is not None and (_const_operand(idx, nxt, t, "Mul") or _const_operand(idx, nxt, t, "Div")):
        b.add(nxt)
        t, nxt = nxt.output[0], _data_user(idx, nxt.output[0])
    side: tuple[str, ...] = ()
    if nxt is not None and nxt.op_type == "Add" and _other(nxt, t) is not None:
        side = (_other(nxt, t),)
        b.add(nxt)
        t, nxt = nxt.output[0], _data_user(idx, nxt.output[0])
    if nxt is not None and nxt.op_type in RESHAPE_OPS:  # opset-13 Softmax converted from 11: Flatten/Softmax/Reshape
        b.add(nxt)
        nxt = _data_user(idx, nxt.output[0])
    if nxt is None or nxt.op_type != "Softmax":
        return None
    b.add(nxt)
    probs = nxt.output[0]
    after = _data_user(idx, probs)
    if after is not None and after.op_type in RESHAPE_OPS:
        b.add(after)
        probs = after.output[0]
    second = _only_user(idx, probs, "MatMul")
    if second is None or second.input[0] != probs:
        return None
    m = _Builder(idx, [root] + b.nodes).build("attention", tuple(root.input), probs, side, (root.name, second.name))
    # the MatMuls stay ordinary quantized nodes (neighbours, not members); the scores they make are internal
    return None if m is None else dataclasses.replace(m, nodes=tuple(n for n in m.nodes if n != root.name))


def _softmax(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
    if root.op_type != "Softmax":
        return None
    return Match("Softmax", (root.name,), (root.input[0],), root.output[0])


_activation_block = _math_block(ELEMENTWISE_KINDS)  # composite activations standing alone (not fused into a group)


def _residual_add(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
    if root.op_type != "Add" or len(root.input) != 2 or any(idx.is_constant(t) or not idx.is_float(t)
                                                            for t in root.input):
        return None
    if not _same_shape(idx, *root.input) or not any(anchor_of(idx, t) for t in root.input):
        return None
    return Match("residual_add", (root.name,), tuple(root.input), root.output[0])


def _skip_layernorm(idx: GraphIndex, root: onnx.NodeProto) -> Match | None:
    """A residual Add read only by a LayerNorm: ORT fuses the pair into SkipLayerNormalization, and the
    residual stream before a LayerNorm carries the outlier channels 8-bit ranges cannot hold."""
    if root.op_type != "Add" or len(root.input) != 2 or any(idx.is_constant(t) or not idx.is_float(t)
                                                            for t in root.input):
        return None
    x = root.output[0]
    ln = _norm_at(idx, x)
    if ln is None or ln.inputs != (x,) or not all(u.name in ln.nodes for u in _users(idx, x)):
        return None
    b = _Builder(idx, [root] + [n for n in idx.graph.node if n.name in ln.nodes])
    return b.build("SkipLayerNorm", tuple(root.input), ln.output)


# Block matchers in priority order (a node belongs to the first block that claims it), with the kinds
# each can produce. Compound kinds are matched only when the caller asks for them (a target that
# has no policy for SkipLayerNorm still wants the LayerNorm inside it).
BLOCK_MATCHERS: tuple[tuple[frozenset[str], Callable[[GraphIndex, onnx.NodeProto], Match | None]], ...] = (
    (frozenset({"SkipLayerNorm"}), _skip_layernorm),
    (frozenset({"LayerNorm"}), _layernorm),
    (NORM_KINDS, _math_block(NORM_KINDS)),
    (frozenset({"attention"}), _attention),
    (ELEMENTWISE_KINDS, _activation_block),
    (frozenset({"Softmax"}), _softmax),
    (frozenset({"residual_add"}), _residual_add),
)
COMPOUND_KINDS = frozenset({"SkipLayerNorm"})


def find_blocks(idx: GraphIndex, blocked: set[str] = frozenset(), compound: set[str] = frozenset()) -> list[Match]:
    """Every block, in graph order; a node belongs to one block at most; ``blocked`` nodes to none.

    ``compound``: the compound kinds (:data:`COMPOUND_KINDS`) to look for.
    """
    claimed: set[str] = set(blocked)
    found: list[Match] = []
    roots = [_input_node(name) for name in idx.graph_inputs] + list(idx.graph.node)
    for kinds, matcher in BLOCK_MATCHERS:
        if kinds & COMPOUND_KINDS and not kinds & set(compound):
            continue
        for node in roots:
            if node.name in claimed:  # every matcher's root is a member (attention's MatMul is never claimed)
                continue
            m = matcher(idx, node)
            if m is not None and not (set(m.nodes) & claimed):
                claimed.update(m.nodes)
                found.append(m)
    return sorted(found, key=lambda m: idx.order[m.nodes[0]])


def _input_node(name: str) -> onnx.NodeProto:
    """A stand-in node whose only output is a graph input (so activations on inputs are found)."""
    return onnx.helper.make_node("Identity", [], [name], name=f"<input {name}>")


# --- fused groups ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """An anchor and the followers fused into it: no Q/DQ between them."""

    anchor: str
    followers: tuple[str, ...]  # node names in order
    output: str  # tensor that ends the group
    extra_inputs: tuple[str, ...] = ()  # the skip input of a joined residual Add
    internal: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = ()  # per follower: BatchNormalization | bias_add | residual_add | the activation kind


def fused_group(idx: GraphIndex, node: onnx.NodeProto, followers: frozenset[str], join_residual: bool,
                taken: set[str], anchor_steps: bool) -> Group | None:
    """Extend ``node`` by the followers the preset allows; None when nothing follows.

    ``anchor_steps``: BatchNormalization / bias Add / residual Add may follow (weighted anchors only).
    """
    out = node.output[0]
    names: list[str] = []
    kinds: list[str] = []
    extra: list[str] = []
    internal: set[str] = set()

    def take(n: onnx.NodeProto, kind: str, new_out: str) -> None:
        nonlocal out
        internal.add(out)
        names.append(n.name)
        kinds.append(kind)
        out = new_out

    def next_free() -> onnx.NodeProto | None:
        n = idx.single_consumer(out)
        return n if n is not None and n.name not in taken else None

    if anchor_steps:
        for _ in range(2):  # BatchNormalization and bias Add, in either order
            n = next_free()
            if n is not None and "BatchNormalization" not in kinds and _is_inference_bn(idx, n, out):
                take(n, "BatchNormalization", n.output[0])
            elif n is not None and "bias_add" not in kinds and n.op_type == "Add" and _is_bias_add(idx, n, out):
                take(n, "bias_add", n.output[0])
        n = next_free()
        if join_residual and n is not None and n.op_type == "Add":
            skip = _other(n, out)
            if skip is not None and _joins_here(idx, n, out, skip):
                extra.append(skip)
                take(n, "residual_add", n.output[0])
    act = activation_at(idx, out)
    if act is not None and act.kind in followers and not (set(act.nodes) & taken) \
            and all(u.name in act.nodes for u in idx.uses(out)):
        internal.add(out)
        internal.update(act.internal)
        names.extend(act.nodes)
        kinds.extend([act.kind] * len(act.nodes))
        out = act.output
    if not names:
        return None
    return Group(node.name, tuple(names), out, tuple(extra), frozenset(internal), tuple(kinds))


def _is_inference_bn(idx: GraphIndex, n: onnx.NodeProto, tensor: str) -> bool:
    return (n.op_type == "BatchNormalization" and len(n.output) == 1 and n.input[0] == tensor
            and not attr(n, "training_mode", 0) and all(idx.is_constant(t) for t in n.input[1:]))


def _is_bias_add(idx: GraphIndex, add: onnx.NodeProto, tensor: str) -> bool:
    other = _other(add, tensor)
    return other is not None and idx.is_constant(other)


def _joins_here(idx: GraphIndex, add: onnx.NodeProto, tensor: str, skip: str) -> bool:
    """A residual Add joins the group whose output is produced last (the block's main branch);
    the earlier input (the shortcut) keeps its own Q/DQ."""
    if idx.is_constant(skip) or not idx.is_float(skip) or not _same_shape(idx, tensor, skip):
        return False
    return idx.position(skip) < idx.position(tensor)


def _same_shape(idx: GraphIndex, a: str, b: str) -> bool:
    sa, sb = idx.shape.get(a), idx.shape.get(b)
    if sa is None or sb is None:
        return True  # unknown: trust the pattern
    return len(sa) == len(sb) and all(x == y or x is None or y is None or isinstance(x, str) or isinstance(y, str)
                                      for x, y in zip(sa, sb))


def anchor_of(idx: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The weighted anchor whose output reaches ``tensor`` through BN / bias Add / an activation."""
    for _ in range(8):
        node = idx.producer.get(tensor)
        if node is None:
            return None
        if node.op_type in WEIGHTED_LAYER_OPS:
            return node
        if node.op_type in ACTIVATION_OPS or node.op_type == "BatchNormalization" or \
                (node.op_type == "Add" and any(idx.is_constant(t) for t in node.input)):
            tensor = next((t for t in node.input if not idx.is_constant(t)), "")
            continue
        return None
    return None


# --- control flow ------------------------------------------------------------------------------------

def subgraphs(g: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """Top-level control-flow nodes and their subgraph attributes (nested ones are counted inside)."""
    for node in g.node:
        for name, sub in graph_attrs(node):
            yield node, name, sub


def all_nodes(g: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in g.node:
        yield node
        for sub in bodies(node):
            yield from all_nodes(sub)


def float_subgraphs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The subgraphs left in float, for the quantization report: node, attribute, counts."""
    out = []
    for node, attr_name, sub in subgraphs(model.graph):
        ops = Counter(n.op_type for n in all_nodes(sub))
        out.append({"node": node.name, "op_type": node.op_type, "subgraph": attr_name, "nodes": sum(ops.values()),
                    "ops": dict(ops.most_common(8))})
    return out
