"""Scale groups that respect ranges: a Concat of a 0..1 tensor and a 0..300 tensor keeps both resolutions."""

from __future__ import annotations

import numpy as np
import pytest

from converter import QuantConfig
from converter.pipeline import calibrate, prepare
from converter.quant.encode import activation_tensors, compute_encodings
from converter.quant.plan import build_plan
from converter.quant.qdq import render_qdq
from converter.quant.scale_groups import loss_bits

from .conftest import parse, run


def head_model(consumer: bool = False):
    """A YOLO-style head: boxes (0..~300, a scaled Relu) and class probabilities (Sigmoid) joined by a Concat.

    With ``consumer`` a MatMul reads the Concat output (so it must stay quantized, with its own encoding).
    """
    rng = np.random.default_rng(0)
    tail = "y = MatMul(cat, Wy)" if consumer else "y = Identity(cat)"
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,{6 if consumer else 12}] y) {{
      h = MatMul(x, W1)
      r = Relu(h)
      b = MatMul(r, Wb)
      boxes = Relu(b)
      s = MatMul(r, Ws)
      scores = Sigmoid(s)
      cat = Concat <axis = 1> (boxes, scores)
      {tail}
    }}""", W1=rng.normal(0, 0.5, (16, 32)).astype(np.float32),
        Wb=rng.normal(0, 30, (32, 4)).astype(np.float32), Ws=rng.normal(0, 0.3, (32, 8)).astype(np.float32),
        **({"Wy": rng.normal(0, 0.1, (12, 6)).astype(np.float32)} if consumer else {}))


@pytest.fixture()
def quantized_tail(monkeypatch):
    """ort-cpu with its float-tail rule off: these graphs end in the Concat/Add under test, which the rule would
    leave in float (the mechanisms still apply to such ops inside a network and on targets that quantize tails)."""
    import dataclasses

    from converter.config import TARGETS
    monkeypatch.setitem(TARGETS, "ort-cpu", dataclasses.replace(TARGETS["ort-cpu"], float_tail=False))


def calib(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(n)]


def quantized(model, config):
    prepared = prepare(model)
    plan = build_plan(prepared.model, config, prepared.idx)
    res = calibrate(prepared, activation_tensors(plan), calib(), config)
    compute_encodings(plan, prepared.idx, res.observers, res.methods, config)
    return prepared, plan, render_qdq(prepared.model, plan.encodings)


def test_loss_bits_is_log2_of_the_range_ratio():
    assert loss_bits((0, 256), (0, 1)) == pytest.approx(8.0)
    assert loss_bits((0, 1), (0, 1)) == 0.0
    assert loss_bits((-1, 1), (0, 0)) == float("inf")


@pytest.mark.parametrize("target", ["ort-cpu", "qnn"])  # TensorRT quantizes op inputs only: no Concat encoding
def test_concat_of_probabilities_and_boxes_keeps_both_resolutions(target, quantized_tail):
    model = head_model()
    x = calib(1, seed=7)[0]
    ref = run(model, x)[0]
    assert ref[:, :4].max() > 100 and ref[:, 4:].max() <= 1  # the two ranges really differ

    _, _, whole = quantized(model, QuantConfig(target=target, max_shared_scale_loss_bits=None))
    _, plan, split = quantized(model, QuantConfig(target=target))
    scores_whole, scores_split = run(whole, x)[0][:, 4:], run(split, x)[0][:, 4:]
    ref_scores = ref[:, 4:]
    # one shared encoding: the probabilities fall on a grid of step ~1 (0 or ~1.2), i.e. nearly all resolution lost
    assert len(np.unique(np.round(scores_whole, 5))) <= 3
    assert np.abs(scores_whole - ref_scores).max() > 0.3
    # split: each probability on its own 0..1 grid
    assert np.abs(scores_split - ref_scores).max() < 0.03
    np.testing.assert_allclose(run(split, x)[0][:, :4], ref[:, :4], rtol=0.05, atol=2.0)
    [finding] = plan.split_groups
    assert finding["worst_member"] == "scores" and finding["loss_bits"] > 6
    # nothing quantized reads the Concat: it and the Identity after it run in float on the dequantized inputs
    assert [n.split("_")[0] for n in finding["float_nodes"]] == ["Concat", "Identity"]
    assert "cat" not in plan.encodings and "y" not in plan.encodings


def test_concat_read_by_a_quantized_op_keeps_its_own_encoding():
    model = head_model(consumer=True)
    _, plan, qdq = quantized(model, QuantConfig())
    [finding] = plan.split_groups
    assert finding["float_nodes"] == []
    enc = plan.encodings
    assert "cat" in enc and enc["scores"].scale[0] < enc["cat"].scale[0] / 50
    assert enc["boxes"].scale != enc["scores"].scale


def test_groups_of_one_tensor_moved_around_are_never_split(quantized_tail):
    """Reshape/MaxPool members carry the same values: one encoding, whatever the ranges say."""
    rng = np.random.default_rng(0)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,2,16] y) {
      h = MatMul(x, W1)
      shape = Constant <value = int64[3] {0, 2, 16}> ()
      y0 = Reshape(h, shape)
      y = Relu(y0)
    }""", W1=rng.normal(0, 0.5, (16, 32)).astype(np.float32))
    _, plan, _ = quantized(model, QuantConfig(max_shared_scale_loss_bits=0.0))
    assert plan.split_groups == []
    assert plan.encodings["h"] == plan.encodings["y0"]


def test_validate_names_a_concat_of_probabilities_and_boxes(tmp_path, quantized_tail):
    from converter.validation import validate_onnx

    findings = [f for f in validate_onnx(head_model()) if f.code == "mixed-range-concat"]
    assert len(findings) == 1 and findings[0].severity == "warning" and findings[0].node.startswith("Concat")
    assert "Sigmoid" in findings[0].message and "Relu" in findings[0].message
    rng = np.random.default_rng(0)
    same = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,64] y) {
      a = MatMul(x, W1)
      b = MatMul(x, W2)
      y = Concat <axis = 1> (a, b)
    }""", W1=rng.normal(0, 0.5, (16, 32)).astype(np.float32), W2=rng.normal(0, 0.5, (16, 32)).astype(np.float32))
    assert not [f for f in validate_onnx(same) if f.code == "mixed-range-concat"]


def test_add_of_operands_with_very_different_ranges_is_reported(quantized_tail):
    rng = np.random.default_rng(0)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,8] y) {
      a = MatMul(x, Wa)
      b = MatMul(x, Wb)
      y = Add(a, b)
    }""", Wa=rng.normal(0, 50, (16, 8)).astype(np.float32), Wb=rng.normal(0, 0.05, (16, 8)).astype(np.float32))
    _, plan, _ = quantized(model, QuantConfig())
    [m] = plan.mixed_operands
    assert m["op_type"] == "Add" and m["small_operand"] == "b" and m["loss_bits"] > 8
    assert plan.encodings["b"].scale[0] < plan.encodings["a"].scale[0] / 100  # each operand keeps its own
