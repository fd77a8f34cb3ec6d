"""Incremental capture (converter.calib.incremental): layer-by-layer captures of a model that changes between them
equal running the whole changed model, and run each node about once, not once per layer. Real ONNX Runtime
sessions on a residual model built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.calib.incremental import IncrementalCapture
from converter.calib.runner import capture

F = TensorProto.FLOAT
LAYERS = ["c0", "c1", "c2", "c3", "c4", "c5"]


def _model(seed: int = 0) -> onnx.ModelProto:
    """x -> c0 -> Relu -> [c1 -> Relu -> c2] + skip -> c3 -> Relu -> [c4 -> Relu -> c5] + skip -> y."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, out):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.4, (8, 8 if name != "c0" else 3, 3, 3))
                                             .astype(np.float32), name + "_w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), name + "_b"))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [out], name=name, pads=[1, 1, 1, 1]))

    def conv_relu(k, x):  # c<k> -> Relu r<k>
        conv(f"c{k}", x, f"a{k}")
        nodes.append(helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"r{k}"))

    def residual(k, x, out):  # c<k> -> Relu -> c<k+1>, plus x
        conv_relu(k, x)
        conv(f"c{k + 1}", f"r{k}", f"a{k + 1}")
        nodes.append(helper.make_node("Add", [f"a{k + 1}", x], [out], name=f"add{k}"))

    conv_relu(0, "x")
    residual(1, "r0", "s0")
    conv_relu(3, "s0")
    residual(4, "r3", "y")
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", F, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", F, ["N", 8, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (4, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _round_weights(model: onnx.ModelProto, layer: str) -> None:
    """What a layer-wise technique does after capturing a layer: its weight replaced (here: coarsely rounded)."""
    t = next(t for t in model.graph.initializer if t.name == layer + "_w")
    t.CopyFrom(numpy_helper.from_array(np.round(numpy_helper.to_array(t) * 4) / 4, t.name))


def test_layer_by_layer_captures_equal_the_changed_models_and_run_each_node_once():
    model, batches = _model(), _batches()
    inc = IncrementalCapture(batches, ["CPUExecutionProvider"])
    nodes = {n.name: n for n in model.graph.node}
    for layer in LAYERS:
        node = nodes[layer]
        # the layer's input as AdaRound's search reads it, then the layer's weights change
        got = list(inc.capture(model, [node.input[0]]))
        want = capture(model, [node.input[0]], batches, ["CPUExecutionProvider"])
        assert len(got) == len(want) == len(batches)
        for g_in, w in zip(got, want):
            np.testing.assert_allclose(g_in[node.input[0]], w[node.input[0]], rtol=1e-5, atol=1e-5)
        _round_weights(model, layer)  # the next captures must see the new weights of this layer
    # the last output, through every changed layer
    got = list(inc.capture(model, ["y"]))
    want = capture(model, ["y"], batches, ["CPUExecutionProvider"])
    assert all(np.allclose(g["y"], w["y"], rtol=1e-5, atol=1e-5) for g, w in zip(got, want))
    # the prefixes from the inputs the same captures ran before: each layer's input, every node above it
    prefixes = sum(_ancestors(model, nodes[layer].input[0]) for layer in LAYERS) + len(model.graph.node)
    assert inc.nodes_run == len(model.graph.node) < prefixes, (inc.nodes_run, prefixes)  # each node once


def test_a_capture_left_half_way_drops_the_frontier_and_the_next_is_right():
    model, batches = _model(3), _batches(3)
    inc = IncrementalCapture(batches, ["CPUExecutionProvider"])
    list(inc.capture(model, ["r0"]))
    next(inc.capture(model, ["s0"]))  # one batch of three read, then left
    got = list(inc.capture(model, ["r3"]))
    want = capture(model, ["r3"], batches, ["CPUExecutionProvider"])
    assert all(np.allclose(g["r3"], w["r3"], rtol=1e-5, atol=1e-5) for g, w in zip(got, want))


def _ancestors(model: onnx.ModelProto, tensor: str) -> int:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), [tensor]
    while stack:
        n = producer.get(stack.pop())
        if n is not None and n.name not in seen:
            seen.add(n.name)
            stack.extend(n.input)
    return len(seen)


def test_a_frontier_over_its_limit_is_dropped_and_captures_stay_right():
    model, batches = _model(2), _batches(2)
    inc = IncrementalCapture(batches, ["CPUExecutionProvider"], limit_mb=0)  # every frontier is over 0 MiB
    prefixes = 0
    for layer in LAYERS:
        x = next(n for n in model.graph.node if n.name == layer).input[0]
        got = list(inc.capture(model, [x]))
        want = capture(model, [x], batches, ["CPUExecutionProvider"])
        assert len(got) == len(want) and all(np.allclose(g[x], w[x], rtol=1e-5, atol=1e-5) for g, w in zip(got, want))
        assert not inc.values  # nothing kept: each capture ran its prefix from the inputs
        prefixes += _ancestors(model, x)
        _round_weights(model, layer)
    assert inc.nodes_run == prefixes > len(model.graph.node)


def test_a_capture_of_the_graph_input_runs_nothing():
    model, batches = _model(), _batches(1)
    inc = IncrementalCapture(batches, ["CPUExecutionProvider"])
    got = list(inc.capture(model, ["x"]))
    assert inc.nodes_run == 0 and np.array_equal(got[0]["x"], batches[0]["x"])
