"""graph.clip: the one reader of a Clip's bounds, in every form a model can hold them (attributes before
opset 11, initializers, Constant nodes, absent), checked against what ONNX Runtime clamps to, and the passes
that read bounds (AIMET rules, bias correction, calibration) agreeing with it."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from converter.graph.clip import clip_bounds, constant_value, graph_constants
from converter.graph.index import GraphIndex

from .conftest import run


def _clip_model(opset: int, inputs: list[str], attrs: dict | None = None, nodes: list | None = None,
                inits: dict | None = None, extra_inputs: list | None = None) -> onnx.ModelProto:
    clip = helper.make_node("Clip", inputs, ["y"], name="clip", **(attrs or {}))
    graph = helper.make_graph(
        (nodes or []) + [clip], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])] + (extra_inputs or []),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Clip")


X = np.linspace(-10, 10, 16, dtype=np.float32).reshape(2, 8)

CASES = {
    "attributes (opset 10)": (_clip_model(10, ["x"], {"min": 0.0, "max": 6.0}), (0.0, 6.0)),
    "attribute min only (opset 10)": (_clip_model(10, ["x"], {"min": -1.5}), (-1.5, math.inf)),
    "initializers": (_clip_model(13, ["x", "lo", "hi"], inits={"lo": -2.0, "hi": 3.0}), (-2.0, 3.0)),
    "Constant nodes": (_clip_model(13, ["x", "lo", "hi"], nodes=[
        helper.make_node("Constant", [], ["lo"], value=onnx.numpy_helper.from_array(np.array(-0.5, np.float32))),
        helper.make_node("Constant", [], ["hi"], value_float=4.0)]), (-0.5, 4.0)),
    "missing min (empty name)": (_clip_model(13, ["x", "", "hi"], inits={"hi": 1.0}), (-math.inf, 1.0)),
    "missing max (absent)": (_clip_model(13, ["x", "lo"], inits={"lo": 0.0}), (0.0, math.inf)),
    "no bounds": (_clip_model(13, ["x"]), (-math.inf, math.inf)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_clip_bounds_every_form(case):
    """Each form read through a GraphIndex and through graph_constants gives the bounds ONNX Runtime clamps to."""
    model, expected = CASES[case]
    assert clip_bounds(_node(model), GraphIndex.build(model)) == expected
    assert clip_bounds(_node(model), graph_constants(model.graph)) == expected
    y = run(model, {"x": X})[0]
    lo, hi = expected
    assert y.min() == pytest.approx(max(lo, float(X.min()))) and y.max() == pytest.approx(min(hi, float(X.max())))


def test_computed_or_non_scalar_bound_is_unknown():
    """A bound from a graph input (computed at run time) or a non-scalar one: None, never a guess."""
    computed = _clip_model(13, ["x", "lo"], extra_inputs=[helper.make_tensor_value_info("lo", TensorProto.FLOAT, [])])
    assert clip_bounds(_node(computed), GraphIndex.build(computed)) is None
    assert clip_bounds(_node(computed), graph_constants(computed.graph)) is None
    node = helper.make_node("Clip", ["x", "lo"], ["y"])
    assert clip_bounds(node, {"lo": np.zeros(2, np.float32)}) is None
    assert constant_value("lo", {}) is None


def test_passes_read_the_same_bounds():
    """AIMET's bounded-activation rule, bias correction's per-channel clamp and calibration's non-negative
    tensors read the Clip through the same reader: the Constant-node form included."""
    from converter.calib.runner import _nonnegative_tensors
    from converter.quant.aimet_rules import bounds
    from converter.quant.bias_correction import _bounds

    for case, (model, expected) in CASES.items():
        idx = GraphIndex.build(model)
        assert bounds(_node(model), idx) == expected, case
        lo, hi = _bounds(_node(model), idx, 3)
        assert lo.tolist() == [expected[0]] * 3 and hi.tolist() == [expected[1]] * 3, case
        assert ("y" in _nonnegative_tensors(model)) == (expected[0] >= 0), case
