"""Quantization inside If/Loop bodies (converter.quant.control_flow, converter.calib.subgraphs): a model
built with onnx.helper, real ONNX Runtime sessions, measured numbers."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.calib.subgraphs import collect_subgraph_ranges
from converter.config import QuantConfig
from converter.graph.passes import preprocess
from converter.graph.scopes import scopes
from converter.encodings_file import apply_encodings
from converter.pipeline import quantize
from converter.quant.control_flow import quantized_nodes_in_bodies

from .conftest import float_of

F = TensorProto.FLOAT


def _branch(name: str, conv_w: str, mm_w: str, nested: bool = False) -> onnx.GraphProto:
    """Conv(h captured from the main graph) -> Relu -> GlobalAveragePool -> Flatten -> MatMul. Both branches use
    the same local tensor names (as exporters do), which preprocessing must make unique. ``nested``: the MatMul
    is in a nested If (on hm > 0.24, hm captured from the main graph) whose branches capture ``f``."""
    nodes = [helper.make_node("Conv", ["h", conv_w, conv_w + "_b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"])]
    if nested:
        def inner(w):
            return helper.make_graph([helper.make_node("MatMul", ["f", w], ["ny"])], "inner", [],
                                     [helper.make_tensor_value_info("ny", F, ["N", 16])])
        nodes += [helper.make_node("Greater", ["hm", "thr_n"], ["cond_n"]),
                  helper.make_node("If", ["cond_n"], ["y"], name="nested", then_branch=inner(mm_w),
                                   else_branch=inner("Mc"))]
    else:
        nodes.append(helper.make_node("MatMul", ["f", mm_w], ["y"]))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("y", F, ["N", 16])])


def _loop_body() -> onnx.GraphProto:
    """s <- Tanh(MatMul(s, Wl) + bl): the weight is captured from the main graph; s is the carried state."""
    nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("MatMul", ["s_in", "Wl"], ["lm"]),
             helper.make_node("Add", ["lm", "bl"], ["la"]),
             helper.make_node("Tanh", ["la"], ["s_out"])]
    return helper.make_graph(nodes, "loop_body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("s_in", F, ["N", 16])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("s_out", F, ["N", 16])])


def control_flow_model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> Relu = h; If(mean(h) > 0.5): branch A / branch B (Conv + MatMul each, on the captured h; B's
    MatMul inside a nested If);
    then a 3-iteration Loop with a MatMul body; output = the loop's final state."""
    rng = np.random.default_rng(seed)
    inits = {
        "W0": rng.normal(0, 0.4, (8, 3, 3, 3)), "W0_b": rng.normal(0, 0.1, 8),
        "Wa": rng.normal(0, 0.2, (8, 8, 3, 3)), "Wa_b": rng.normal(0, 0.1, 8),
        "Wb": rng.normal(0, 0.2, (8, 8, 3, 3)), "Wb_b": rng.normal(0, 0.1, 8),
        "Ma": rng.normal(0, 0.5, (8, 16)), "Mb": rng.normal(0, 0.5, (8, 16)), "Mc": rng.normal(0, 0.5, (8, 16)),
        "Wl": rng.normal(0, 0.3, (16, 16)), "bl": rng.normal(0, 0.1, 16),
        "thr": np.array(0.5), "thr_n": np.array(0.24), "trips": np.array(3, np.int64), "true": np.array(True),
    }
    inits = [numpy_helper.from_array(np.asarray(v, np.float32) if np.asarray(v).dtype == np.float64 else v, k)
             for k, v in inits.items()]
    nodes = [helper.make_node("Conv", ["x", "W0", "W0_b"], ["h0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["hm"], keepdims=0),
             helper.make_node("Greater", ["hm", "thr"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=_branch("A", "Wa", "Ma"),
                              else_branch=_branch("B", "Wb", "Mb", nested=True)),
             helper.make_node("Loop", ["trips", "true", "z"], ["out"], name="loop", body=_loop_body())]
    g = helper.make_graph(nodes, "control_flow", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("out", F, ["N", 16])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(n: int, seed: int, scale: float) -> list[dict[str, np.ndarray]]:
    """Inputs of std ``scale``: 1.5 takes the then-branch (mean(h) > 0.5), 0.3 the else-branch."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(0, scale, (1, 3, 8, 8))).astype(np.float32)} for _ in range(n)]


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _branch_taken(model, sample) -> bool:
    h = np.maximum(0, _run(_prefix(model), sample))
    return bool(h.mean() > 0.5)


def _prefix(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("h0", F, None))
    return m


def _body_qdq(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in scopes(model):
        q = sum(n.op_type == "QuantizeLinear" for n in s.graph.node)
        counts[s.path] = q
    return counts


def test_if_and_loop_bodies_are_quantized_and_close_to_fp32(tmp_path):
    model = control_flow_model()
    # calibration reaches both branches
    calib = _data(24, 1, 1.5) + _data(24, 2, 0.3) + _data(24, 4, 0.42)  # 0.3: nested else, 0.42: nested then
    assert {_branch_taken(model, s) for s in calib[:24:6] + calib[24::6]} == {True, False}
    res = quantize(model, calib, QuantConfig(batch_size=8), tmp_path, "cf")
    qdq = onnx.load(res.model_path)
    onnx.checker.check_model(qdq, full_check=True)
    subs = {s["subgraph"]: s for s in res.report["summary"]["subgraphs"]}
    # both branches: Conv(+Relu fused), GlobalAveragePool, MatMul quantized; the loop body: MatMul (+ Add, Tanh)
    assert subs["branch/then_branch"]["quantized_nodes"] >= 4 and subs["branch/else_branch"]["quantized_nodes"] >= 4
    assert subs["loop/body"]["quantized_nodes"] >= 2
    assert res.report["summary"]["float_subgraphs"] == []
    q_in_bodies = _body_qdq(qdq)
    assert all(q_in_bodies[p] >= 3 for p in ("branch/then_branch", "branch/else_branch", "loop/body")), q_in_bodies
    assert q_in_bodies["branch/else_branch/nested/then_branch"] >= 1  # the nested If's MatMul inputs/outputs
    assert q_in_bodies["branch/else_branch/nested/else_branch"] >= 1
    assert res.report["summary"]["subgraph_qdq_ops"]["QuantizeLinear"] == sum(q_in_bodies.values())
    reading = res.report["summary"]["subgraph_nodes_reading_dq"]  # Conv, GAP, MatMul / nested MatMul / MatMul...
    assert reading["branch/then_branch"] >= 3 and reading["loop/body"] >= 2, reading
    # every Q/DQ anywhere has a reader (a tensor read only inside a body gets its Q/DQ there, not outside)
    for g in [qdq.graph] + [s.graph for s in scopes(qdq)]:
        read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        read |= {x for s in scopes(qdq) for n in s.graph.node for x in n.input}
        assert all(n.output[0] in read for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    # one encoding per tensor name: every Q of a tensor, in the main graph or any body (the captured h is
    # quantized in the main graph for ReduceMean and at the top of each branch), has the same scale
    scales: dict[str, set[float]] = {}
    graphs = [qdq.graph] + [sc.graph for sc in scopes(qdq)]
    inits = {t.name: numpy_helper.to_array(t) for g in graphs for t in g.initializer}
    for g in graphs:
        for n in g.node:
            if n.op_type == "QuantizeLinear":
                scales.setdefault(n.input[0].removesuffix("_float"), set()).add(float(inits[n.input[1]]))
    assert len(scales["h"]) == 1 and sum(n.input[0] == "h" for g in graphs for n in g.node
                                         if n.op_type == "QuantizeLinear") >= 3
    assert all(len(v) == 1 for v in scales.values()), scales
    # outputs close to FP32 on held-out data through either branch
    for scale, seed in ((1.5, 10), (0.3, 11), (0.42, 13)):
        held = _data(16, seed, scale)
        x = np.concatenate([s["x"] for s in held])
        for xi in np.split(x, 4):
            ref, got = _run(model, {"x": xi}), _run(qdq, {"x": xi})
            assert _cos(ref, got) > 0.99, (scale, _cos(ref, got))
    # encodings: body tensors under unique names (the branches' local "c"/"y" became c/c__1 ...), re-applicable
    enc = json.loads(res.encodings_path.read_text())
    names = [e["name"] for e in enc["activation_encodings"]] + [e["name"] for e in enc["param_encodings"]]
    assert len(names) == len(set(names))
    assert {"y__1", "ny", "ny__1", "r", "r__1", "s_in", "Wl", "Wa", "Wb", "Mc"} <= set(names), names
    again = apply_encodings(float_of(res, model), res.encodings_path, tmp_path / "again.onnx")
    assert again.SerializeToString() == qdq.SerializeToString()


def test_loop_range_covers_every_iteration():
    """One encoding for all iterations: the calibrated range of the body's MatMul output is the min/max over
    every iteration of every sample (checked against the unrolled computation in numpy)."""
    model = control_flow_model()
    preprocess(model)
    data = _data(6, 3, 1.5)
    observers, unreached, samples = collect_subgraph_ranges(model, ["lm", "s_in"], data, ["CPUExecutionProvider"])
    assert unreached == [] and samples == 6
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    z_model = onnx.ModelProto()
    z_model.CopyFrom(model)
    del z_model.graph.output[:]
    z_model.graph.output.append(helper.make_tensor_value_info("z", F, None))
    lo, hi, s_lo, s_hi = np.inf, -np.inf, np.inf, -np.inf
    for d in data:
        s = _run(z_model, d)
        for _ in range(3):
            s_lo, s_hi = min(s_lo, s.min()), max(s_hi, s.max())
            lm = s @ inits["Wl"]
            lo, hi = min(lo, lm.min()), max(hi, lm.max())
            s = np.tanh(lm + inits["bl"])
    assert np.allclose(observers["lm"].range(), (lo, hi), rtol=1e-5, atol=1e-6)
    assert np.allclose(observers["s_in"].range(), (s_lo, s_hi), rtol=1e-5, atol=1e-6)


def test_branch_never_taken_is_named_and_the_rest_quantizes(tmp_path, caplog):
    model = control_flow_model()
    calib = _data(24, 1, 1.5)  # every sample takes the then-branch
    assert all(_branch_taken(model, s) for s in calib[::4])
    with caplog.at_level(logging.WARNING, logger="converter"):
        res = quantize(model, calib, QuantConfig(), tmp_path, "cf")
    text = caplog.text
    assert "branch/else_branch: 3 tensor(s) got no calibration values" in text and "'r', 'p', 'f'" in text, text
    # the nested If's branches name the tensor they capture from the enclosing (never run) branch
    assert "branch/else_branch/nested/then_branch: 2 tensor(s)" in text, text
    assert "captured from the enclosing graph: 'f'" in text, text
    subs = {s["subgraph"]: s for s in res.report["summary"]["subgraphs"]}
    assert subs["branch/then_branch"]["quantized_tensors"] >= 4
    assert subs["loop/body"]["quantized_tensors"] >= 2
    qdq = onnx.load(res.model_path)
    q = _body_qdq(qdq)
    assert q["branch/then_branch"] >= 3 and q["loop/body"] >= 2
    # the never-run else-branch quantizes only what has a range: its weights and the captured (calibrated) h
    else_branch = next(s for s in scopes(qdq) if s.path == "branch/else_branch").graph
    assert [n.input[0] for n in else_branch.node if n.op_type == "QuantizeLinear"] == ["h"]
    held = _data(8, 12, 0.3)  # through the float else-branch: still runs, still close
    for d in held:
        assert _cos(_run(model, d), _run(qdq, d)) > 0.99


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """A Scan over time: s_t = Tanh(MatMul(s_{t-1}, Ws) + MatMul(x_t, Wx)); scan output y_t = s_t."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_prev", "Ws"], ["ms"]),
         helper.make_node("MatMul", ["x_t", "Wx"], ["mx"]),
         helper.make_node("Add", ["ms", "mx"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["s_next"]),
         helper.make_node("Identity", ["s_next"], ["y_t"])],
        "scan_body",
        [helper.make_tensor_value_info("s_prev", F, [1, 16]), helper.make_tensor_value_info("x_t", F, [1, 8])],
        [helper.make_tensor_value_info("s_next", F, [1, 16]), helper.make_tensor_value_info("y_t", F, [1, 16])])
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "Ws"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "Wx")]
    g = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_last", "ys"], name="scan", num_scan_inputs=1, body=body)],
        "scan", [helper.make_tensor_value_info("s0", F, [1, 16]), helper.make_tensor_value_info("xs", F, [6, 1, 8])],
        [helper.make_tensor_value_info("s_last", F, [1, 16]), helper.make_tensor_value_info("ys", F, [6, 1, 16])],
        inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_scan_body_is_quantized(tmp_path):
    model = scan_model()
    rng = np.random.default_rng(5)

    def sample():
        return {"s0": rng.normal(0, 0.5, (1, 16)).astype(np.float32),
                "xs": rng.normal(0, 1.0, (6, 1, 8)).astype(np.float32)}

    res = quantize(model, [sample() for _ in range(32)], QuantConfig(batch_size=1), tmp_path, "scan")
    qdq = onnx.load(res.model_path)
    reading = res.report["summary"]["subgraph_nodes_reading_dq"]
    assert reading["scan/body"] >= 3, reading  # both MatMuls and the Add (or its fused successors)
    assert "ms" in res.plan.encodings or "pre" in res.plan.encodings
    sess_f = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_q = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(8):
        feeds = sample()
        for ref, got in zip(sess_f.run(None, feeds), sess_q.run(None, feeds)):
            assert _cos(ref, got) > 0.99


def test_061_encodings_and_16_bit_bodies(tmp_path):
    """0.6.1 files carry no channel axis: a weight read only inside a body finds it from the body's node; 16-bit
    activations lift the whole model (bodies included) to opset 21."""
    model = control_flow_model()
    calib = _data(24, 1, 1.5) + _data(24, 2, 0.3) + _data(24, 4, 0.42)
    res = quantize(model, calib, QuantConfig(batch_size=8, encodings_version="0.6.1"), tmp_path / "a", "cf")
    again = apply_encodings(float_of(res, model), res.encodings_path, tmp_path / "a" / "again.onnx")
    assert again.SerializeToString() == onnx.load(res.model_path).SerializeToString()
    res16 = quantize(model, calib, QuantConfig(batch_size=8, activation_bits=16), tmp_path / "b", "cf")
    q16 = onnx.load(res16.model_path)
    assert q16.opset_import[0].version == 21
    assert any(n.op_type == "QuantizeLinear" for s in scopes(q16) for n in s.graph.node)
    x = _data(1, 9, 0.42)[0]
    assert _cos(_run(model, x), _run(q16, x)) > 0.999
    # 4-bit weights (inside the bodies too) need opset 21 as well, and re-apply to the same model
    res4 = quantize(model, calib, QuantConfig(batch_size=8, weight_bits=4, weight_storage="packed"), tmp_path / "c", "cf")
    q4 = onnx.load(res4.model_path)
    assert q4.opset_import[0].version == 21
    assert any(t.data_type == onnx.TensorProto.INT4 for s in scopes(q4) for t in s.graph.initializer) or \
        any(t.data_type == onnx.TensorProto.INT4 for t in q4.graph.initializer)
    again4 = apply_encodings(float_of(res4, model), res4.encodings_path, tmp_path / "c" / "again.onnx")
    assert again4.SerializeToString() == q4.SerializeToString()
    assert _cos(_run(model, x), _run(q4, x)) > 0.95
    # stored as int8 (ort-cpu's default), bodies included: no INT4 left, the same values, re-applied alike
    res8 = quantize(model, calib, QuantConfig(batch_size=8, weight_bits=4), tmp_path / "d", "cf")
    q8 = onnx.load(res8.model_path)
    assert not any(t.data_type == onnx.TensorProto.INT4 for s in scopes(q8) for t in s.graph.initializer)
    assert _cos(_run(q4, x), _run(q8, x)) > 0.999
    again8 = apply_encodings(float_of(res8, model), res8.encodings_path, tmp_path / "d" / "again.onnx")
    assert again8.SerializeToString() == q8.SerializeToString()


def test_captured_activation_keeps_the_outer_encoding_and_its_biases_follow(tmp_path):
    """h is calibrated once (by the main pass, percentile here; bodies do not observe it again), has one encoding
    wherever it is quantized, and the bias of each branch's Conv on h is s_h * s_w with that encoding."""
    model = control_flow_model()
    calib = _data(24, 1, 1.5) + _data(24, 2, 0.3) + _data(24, 4, 0.42)
    res = quantize(model, calib, QuantConfig(batch_size=8, calib_method="percentile"), tmp_path, "cf")
    enc = res.plan.encodings
    assert res.report["tensors"]["h"]["calib_method"] == "percentile"
    for w, b in (("Wa", "Wa_b"), ("Wb", "Wb_b")):
        expected = np.float32(enc["h"].scale[0]) * np.asarray(enc[w].scale, np.float32)
        assert np.allclose(enc[b].scale, expected, rtol=1e-6), (b, enc[b].scale[:3], expected[:3])
    qdq = onnx.load(res.model_path)
    x = _data(1, 9, 1.5)[0]
    assert _cos(_run(model, x), _run(qdq, x)) > 0.99


def _sensitive_if_model() -> onnx.ModelProto:
    """All compute inside the then-branch of an If (taken whenever max(x) > -1e9, i.e. always): four MatMuls
    whose second writes one huge outlier channel that the third ignores (tiny weights on it). Quantizing that
    tensor with the outlier's range wipes out its other channels, so only ``mm3`` (which reads it: keeping it
    in float removes that quantizer) needs float. The else-branch (never taken) is one MatMul."""
    rng = np.random.default_rng(0)
    w2 = rng.normal(0, 0.5, (32, 32)).astype(np.float32)
    w2[:, 0] *= 2000
    w3 = rng.normal(0, 0.5, (32, 32)).astype(np.float32)
    w3[0, :] = 1e-5
    inits = {"W1": rng.normal(0, 0.5, (16, 32)), "W2": w2, "W3": w3, "W4": rng.normal(0, 0.5, (32, 10)),
             "W5": rng.normal(0, 0.5, (16, 10)), "low": np.array(-1e9)}
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
                              helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
                              helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="mm2"),
                              helper.make_node("MatMul", ["h2", "W3"], ["h3"], name="mm3"),
                              helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
                              helper.make_node("MatMul", ["r3", "W4"], ["yt"], name="mm4")], "then", [],
                             [helper.make_tensor_value_info("yt", F, ["N", 10])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W5"], ["ye"], name="mm5")], "else", [],
                              [helper.make_tensor_value_info("ye", F, ["N", 10])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["xm"], keepdims=0, name="xmax"),
             helper.make_node("Greater", ["xm", "low"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "sensitive_if", [helper.make_tensor_value_info("x", F, ["N", 16])],
                          [helper.make_tensor_value_info("y", F, ["N", 10])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _matmul_data(seed: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(n)]


def test_search_keeps_the_sensitive_layer_inside_an_if_body_in_float(tmp_path, caplog):
    from converter.search import AccuracyTarget, BuiltinEvaluator, auto_quantize

    model = _sensitive_if_model()
    evaluate = BuiltinEvaluator("cosine", model, _matmul_data(2))
    with caplog.at_level(logging.WARNING, logger="converter"):
        res = auto_quantize(model, _matmul_data(1), evaluate, AccuracyTarget(max_drop=0.001),
                            QuantConfig(smoothquant=False), output_dir=tmp_path, latency_runs=3, max_latency_ratio=1e6)
    assert "plans the main graph only" not in caplog.text
    s = res.report["search"]
    body = "branch/then_branch"
    # mm5's output is never calibrated (its branch is never taken), its input x and weight are
    assert s["subgraph_layers"] == {body: ["mm1", "mm2", "mm3", "mm4"], "branch/else_branch": ["mm5"]}
    assert s["evaluations"][1]["metric"] < s["threshold"]  # all INT8 misses the target
    assert s["ranking"][0]["name"] == "mm3" and s["ranking"][0]["subgraph"] == body
    assert s["ranking"][0]["cosine"] < 0.5 < s["ranking"][1]["cosine"]  # propagated through the If
    # the search's float mm3 reads h2 in float (exclude_with_inputs), as its ranking measured
    assert s["met"] and [(x["name"], x["subgraph"]) for x in s["fallback_layers"]] == [("mm3", body)]
    assert all(x["macs"] > 0 for x in s["ranking"])  # estimated from static shapes inside the body
    assert s["float_layers_runtime"] is None  # bodies: not counted on ORT's optimized graph (main graph only)
    # the written model: measured again in ONNX Runtime, it meets the target, with the body quantized but mm2, mm3
    assert evaluate(str(res.model_path)) == pytest.approx(s["final_metric"]) and s["final_metric"] >= s["threshold"]
    written = onnx.load(str(res.model_path))
    assert quantized_nodes_in_bodies(written)[body] == 3  # mm1, mm4 and the float mm2 read dequantized inputs
    then = next(sc.graph for sc in scopes(written) if sc.path == body)
    mm3 = next(n for n in then.node if n.name == "mm3")
    dq_out = {o for n in then.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not set(mm3.input) & dq_out  # mm3 reads h2 and W3 in float


def test_search_honours_quantize_subgraphs_off(tmp_path):
    from converter.search import AccuracyTarget, BuiltinEvaluator, auto_quantize

    model = _sensitive_if_model()
    res = auto_quantize(model, _matmul_data(1), BuiltinEvaluator("cosine", model, _matmul_data(2)),
                        AccuracyTarget(max_drop=0.001), QuantConfig(smoothquant=False, quantize_subgraphs=False),
                        output_dir=tmp_path, latency=False)
    s = res.report["search"]
    assert s["subgraph_layers"] == {} and s["ranking"] == [] and s["met"]
    assert sum(_body_qdq(onnx.load(str(res.model_path))).values()) == 0


def _body_local_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The then-branch's Conv weight and bias moved from the main graph into the branch (as Silero VAD holds its
    weights: initializers of the bodies)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    branch = next(n for n in m.graph.node if n.op_type == "If")
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    for name in ("Wa", "Wa_b"):
        init = next(t for t in m.graph.initializer if t.name == name)
        then.initializer.append(init)
        m.graph.initializer.remove(init)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_weight_techniques_on_a_model_with_quantized_bodies(tmp_path):
    """AdaRound and bias correction recompute the encodings after editing the main graph's weights; a body's own
    weights, merged into the plan when it was first encoded, have no values in the main graph (this crashed with
    an AxisError on Silero VAD, whose weights are the bodies' initializers). The main graph's layer is rounded and
    corrected, the body keeps its weight encodings, and the model stays close to FP32."""
    model = _body_local_weights(control_flow_model())
    calib = _data(24, 1, 1.5) + _data(24, 2, 0.3) + _data(16, 4, 0.42)
    plain = quantize(model, calib, QuantConfig(batch_size=8, weight_bits=4), tmp_path / "plain", "cf")
    res = quantize(model, calib, QuantConfig(batch_size=8, weight_bits=4, adaround=True, adaround_iterations=0,
                                             bias_correction=True), tmp_path / "tech", "cf")
    assert res.report["adaround"]["check"]["output_error"], res.report["adaround"]  # the main Conv was rounded
    assert [c["node"] for c in res.report["bias_correction"]["layers"]] == ["Conv_0"], res.report["bias_correction"]
    body = [n for n in plain.plan.encodings if plain.plan.tensors[n].role == "weight" and n != "W0"]
    assert len(body) >= 5 and any("Wa" in n for n in body), body
    assert all(res.plan.encodings[n] == plain.plan.encodings[n] for n in body), body
    held_out = _data(8, 9, 1.5) + _data(8, 10, 0.3)
    cos = {k: np.mean([_cos(_run(model, s), _run(onnx.load(r.model_path), s)) for s in held_out])
           for k, r in (("plain", plain), ("techniques", res))}
    assert cos["techniques"] > 0.9 and cos["techniques"] >= cos["plain"] - 0.005, cos
