"""Per-op quantization rules: one row per ONNX op type.

A rule only *declares* tensor roles; :mod:`converter.quant.plan` turns the declarations into a
QuantPlan and :mod:`converter.quant.qdq` writes the Q/DQ nodes. Adding an op is one row here.

kinds
    ``compute``  the op does arithmetic: its activation inputs are quantized and its output gets
                 its own encoding (where the target quantizes outputs).
    ``shared``   the op only moves or selects data (Reshape, MaxPool, Concat...): its output is
                 quantized with the *same* encoding as its data inputs, so a runtime can run it on
                 the integers directly. It is quantized only where a neighbour is.

A ``Min`` or ``Max`` against a constant is a *clamp* (:func:`node_rule`): each output value is its input's
or the bound's, so it is data movement too and shares its input's encoding (as ``Clip`` would, it counts as
``Clip`` for a target's op types). CLE writes one for a ReLU6 whose channels it scaled (``Relu`` then ``Min``
by the per-channel bound ``6 / s``): as a shared op the ``Relu`` output gets its Q/DQ, so ORT fuses
``DQ -> Conv -> Relu -> Q`` into a QLinearConv instead of running the Conv in float.

Where a quantizer pays (the rules that decide, in order): a Q/DQ is placed on the inputs and output of an op the
target runs as an integer kernel (the rows below, filtered by the preset's ``op_types``: on ort-cpu the ops with a
QLinear*/QGemm/MatMulInteger kernel or that move integers); element-wise chains between quantized layers are
quantized inside only where every op has such a kernel (an op outside ``op_types`` runs in float between a DQ and
a Q); a recognised block (:mod:`converter.graph.patterns`) follows its ``PatternPolicy`` (one unit: Q/DQ at its
boundary only, because the target fuses it or runs it in float); and the ops after the last compute layer
(``anchor`` rows) on the way to a graph output stay float where the preset sets ``float_tail``
(:func:`converter.quant.plan.float_tail`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from ..graph.index import GraphIndex, attr
from ..ops import CLAMP_OPS


@dataclass(frozen=True)
class OpRule:
    kind: str  # "compute" | "shared"
    activations: tuple[int, ...] = (0,)  # input slots quantized as activations
    weight: int | None = None  # input slot of a weight (quantized per channel when constant)
    weight_axis: Callable[[onnx.NodeProto, GraphIndex], int | None] | None = None
    bias: int | None = None  # input slot of a bias (int32, scale = input scale * weight scale)
    anchor: bool = False  # starts a fused group (Conv -> bias Add -> activation)
    # block-wise weights: the axis cut into blocks (the input channels a dot product runs over), None: not blocked
    block_axis: Callable[[onnx.NodeProto, GraphIndex], int | None] | None = None


def _conv_transpose_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    # Weight (C_in, C_out/group, k...). With groups, axis 1 holds only C_out/group channels.
    return 1 if attr(node, "group", 1) == 1 else None


def _gemm_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    return 0 if attr(node, "transB", 0) else 1


def _matmul_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    shape = idx.shape.get(node.input[1])
    return len(shape) - 1 if shape and len(shape) >= 2 else None


def _gemm_block_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    return 1 if attr(node, "transB", 0) else 0


def _matmul_block_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    # K of a 2-D [K, N] weight: the layout ONNX Runtime fuses (blocked DQ -> MatMul into MatMulNBits); batched
    # 3-D weights stay per channel
    shape = idx.shape.get(node.input[1])
    return 0 if shape and len(shape) == 2 else None


_SHARED = OpRule("shared")
_UNARY = OpRule("compute")
_BINARY = OpRule("compute", activations=(0, 1))

RULES: dict[str, OpRule] = {
    # blocks of a Conv weight [O, I/group, k...] run along I (a block: block_size input channels x the whole kernel);
    # ConvTranspose weights stay per channel
    "Conv": OpRule("compute", weight=1, weight_axis=lambda n, i: 0, bias=2, anchor=True, block_axis=lambda n, i: 1),
    "ConvTranspose": OpRule("compute", weight=1, weight_axis=_conv_transpose_axis, bias=2, anchor=True),
    "Gemm": OpRule("compute", weight=1, weight_axis=_gemm_axis, bias=2, anchor=True, block_axis=_gemm_block_axis),
    "MatMul": OpRule("compute", activations=(0, 1), weight=1, weight_axis=_matmul_axis, anchor=True,
                     block_axis=_matmul_block_axis),
    "Add": _BINARY,
    "Mul": _BINARY,
    "AveragePool": _UNARY,
    "GlobalAveragePool": _UNARY,
    "ReduceMean": _UNARY,
    "Relu": _UNARY,
    "Clip": _UNARY,
    "LeakyRelu": _UNARY,
    "PRelu": _UNARY,
    "HardSigmoid": _UNARY,
    "HardSwish": _UNARY,
    "Sigmoid": _UNARY,
    "Tanh": _UNARY,
    "Softmax": _UNARY,
    # Rows below run in float on ONNX Runtime CPU (not in its preset's op types); QNN quantizes every activation.
    "Sub": _BINARY,
    "Div": _BINARY,
    "Min": _BINARY,
    "Max": _BINARY,
    "Pow": _UNARY,  # exponent: a constant
    "Sqrt": _UNARY,
    "Reciprocal": _UNARY,
    "Neg": _UNARY,
    "Abs": _UNARY,
    "Exp": _UNARY,
    "Log": _UNARY,
    "Erf": _UNARY,
    "Elu": _UNARY,
    "Selu": _UNARY,
    "Softplus": _UNARY,
    "Gelu": _UNARY,
    "ReduceSum": _UNARY,
    "ReduceMax": _UNARY,
    "ReduceMin": _UNARY,
    "LayerNormalization": _UNARY,  # scale/bias stay float
    "InstanceNormalization": _UNARY,
    "BatchNormalization": _UNARY,  # one not folded into a Conv
    "MaxPool": _SHARED,
    "Reshape": _SHARED,
    "Transpose": _SHARED,
    "Flatten": _SHARED,
    "Squeeze": _SHARED,
    "Unsqueeze": _SHARED,
    "Concat": OpRule("shared", activations=()),  # every input: see plan._data_inputs
    "Split": _SHARED,
    "Slice": _SHARED,
    "Gather": _SHARED,
    "Pad": _SHARED,
    "Resize": _SHARED,
    "DepthToSpace": _SHARED,
    "SpaceToDepth": _SHARED,
    "Identity": _SHARED,
    "Expand": _SHARED,
    "Tile": _SHARED,
}


def clamp_input(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    """Slot of the data input of a clamp (``Min``/``Max`` of one tensor and one constant), else None."""
    if node.op_type not in CLAMP_OPS or len(node.input) != 2 or not all(node.input):
        return None
    const = [idx.is_constant(t) for t in node.input]
    if const.count(True) != 1:
        return None
    return const.index(False)


_CLAMPS = {slot: OpRule("shared", activations=(slot,)) for slot in (0, 1)}


def node_rule(node: onnx.NodeProto, idx: GraphIndex) -> OpRule | None:
    """The rule of one node: its op type's row, or the shared row of a clamp (see the module doc)."""
    slot = clamp_input(node, idx)
    return _CLAMPS[slot] if slot is not None else RULES.get(node.op_type)


def rule_op_type(node: onnx.NodeProto, idx: GraphIndex) -> str:
    """The op type a target's op-type list is checked against: ``Clip`` for a clamp."""
    return "Clip" if clamp_input(node, idx) is not None else node.op_type


def rule_for(op_type: str) -> OpRule | None:
    return RULES.get(op_type)


def weight_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    """Channel axis of ``node``'s weight for per-channel quantization, or None for per-tensor."""
    rule = RULES.get(node.op_type)
    if rule is None or rule.weight_axis is None:
        return None
    return rule.weight_axis(node, idx)


def block_axis(node: onnx.NodeProto, idx: GraphIndex) -> int | None:
    """Axis of ``node``'s weight that block-wise quantization cuts into blocks, or None where the op has none."""
    rule = RULES.get(node.op_type)
    if rule is None or rule.block_axis is None:
        return None
    return rule.block_axis(node, idx)
