"""The bounds a ``Clip`` node clamps to: the one reader every pass uses (CLE's ReLU6 handling, bias
correction's clipped means, AdaRound's fused activation, AIMET's bounded-activation rules, calibration's
non-negative tensors).

Where a bound lives, by opset:

* opset < 11: attributes ``min`` / ``max`` (floats);
* opset >= 11: inputs 1 (``min``) and 2 (``max``), optional (absent or named ""), each a scalar that is an
  initializer or the output of a ``Constant`` node.

A missing bound is -inf / +inf. A bound computed at run time (any other producer, or a graph input), or one
that is not a single value, makes the bounds unknown: None.
"""

from __future__ import annotations

from typing import Mapping, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .index import GraphIndex, attr

Constants = Union[GraphIndex, Mapping[str, np.ndarray]]


def constant_value(name: str, constants: Constants) -> np.ndarray | None:
    """The value of ``name`` when it is constant: an initializer or a ``Constant`` node's output (a
    :class:`GraphIndex`), or an entry of ``constants`` (a mapping, e.g. :func:`graph_constants`); else None."""
    if not isinstance(constants, GraphIndex):
        value = constants.get(name)
        return None if value is None else np.asarray(value)
    if constants.is_constant(name):
        return constants.constant(name)
    node = constants.producer.get(name)
    return _constant_node_value(node) if node is not None and node.op_type == "Constant" else None


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of ``graph`` (not its bodies), by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _constant_node_value(node)
            if value is not None:
                out[node.output[0]] = value
    return out


def clip_bounds(node: onnx.NodeProto, constants: Constants) -> tuple[float, float] | None:
    """(min, max) of a ``Clip`` node (see the module docstring); None when a bound is not a constant scalar."""
    lo, hi = float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))  # opset < 11
    for pos in (1, 2):
        if len(node.input) > pos and node.input[pos]:
            value = constant_value(node.input[pos], constants)
            if value is None or value.size != 1:
                return None
            if pos == 1:
                lo = float(value.reshape(-1)[0])
            else:
                hi = float(value.reshape(-1)[0])
    return lo, hi


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    if len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_float", "value_int"):
        return np.asarray(onnx.helper.get_attribute_value(a))
    if a.name in ("value_floats", "value_ints"):
        return np.asarray(list(onnx.helper.get_attribute_value(a)))
    return None
