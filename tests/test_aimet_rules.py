"""Our encodings files against AIMET's quantizer placement (converter/quant/aimet_rules.py), no aimet-onnx needed.

The model is ResNet-8's tail in small: Conv(+bias) -> Relu -> AveragePool -> Transpose -> Reshape -> Gemm(+bias).
aimet-onnx 2.42's strict load rejected exactly these kinds of entries of ours (int32 biases, the Transpose and
Reshape outputs) and silently overwrote the Relu range with the AveragePool one.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from converter import QuantConfig, apply_encodings, quantize
from converter.graph.index import GraphIndex
from converter.quant.aimet_rules import (BIASES_IN_FILE, DATA_MOVEMENT_IN_FILE, OUTPUT_NOT_QUANTIZED, TIED_OP_TYPES, aimet_quantizers,
                                         tie_conflicts)
from converter.pipeline import prepare
from converter.quant.control_flow import render_control_flow
from converter.quant.encodings_io import FloatEncoding, read_encodings

from .conftest import parse, run, float_of


def tail_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] y) {
      c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
      r = Relu(c)
      p = AveragePool <kernel_shape = [4, 4], strides = [4, 4]> (r)
      t = Transpose <perm = [0, 2, 3, 1]> (p)
      shape = Constant <value = int64[2] {-1, 32}> ()
      f = Reshape(t, shape)
      y = Gemm <transB = 1> (f, W2, B2)
    }
    """, W=rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), B=rng.normal(0, 0.1, 8).astype(np.float32),
                 W2=rng.normal(0, 0.3, (10, 32)).astype(np.float32), B2=rng.normal(0, 0.1, 10).astype(np.float32))


def calib(n: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def names_in(path) -> tuple[dict, set[str]]:
    doc = json.loads(path.read_text())
    if doc["version"] == "2.0.0":
        return doc, {e["name"] for e in doc["encodings"]}
    sections = [doc["activation_encodings"], doc["param_encodings"]]
    if doc["version"] == "1.0.0":
        return doc, {e["name"] for s in sections for e in s}
    return doc, {n for s in sections for n in s}


@pytest.mark.parametrize("target", ["ort-cpu", "qnn"])
@pytest.mark.parametrize("version", ["1.0.0", "0.6.1", "2.0.0"])
def test_file_names_what_aimet_quantizes_and_applies_byte_identical(tmp_path, target, version):
    model = tail_model()
    res = quantize(model, calib(), QuantConfig(target=target, encodings_version=version), output_dir=tmp_path,
                   name="tail")
    idx = GraphIndex.build(onnx.shape_inference.infer_shapes(model))
    doc, named = names_in(res.encodings_path)
    acts, params = aimet_quantizers(idx)
    biases = {"B", "B2"}
    movers = {"t", "f"}  # Transpose, Reshape outputs
    assert biases <= set(res.plan.encodings) and movers <= set(res.plan.encodings)  # the QDQ model has them
    if BIASES_IN_FILE[version]:
        # 2.0.0 mirrors the QDQ graph as AIMET's 2.0.0 export does: int32 biases and data-movement outputs
        assert DATA_MOVEMENT_IN_FILE[version] and named == acts | params | biases | movers
        assert {e["output_dtype"] for e in doc["encodings"] if e["name"] in biases} == {"int32"}
        assert res.report["encodings_file"]["omitted_data_movement_outputs"] == 0
    else:
        # exactly the sim's quantizers: a strict load finds no unknown name and no quantizer without an encoding
        assert named == acts | params and not named & movers
        assert res.report["encodings_file"]["omitted_biases"] == 2
        assert res.report["encodings_file"]["omitted_data_movement_outputs"] == 2
    out = tmp_path / "applied.onnx"
    apply_encodings(float_of(res, model), res.encodings_path, out)
    assert out.read_bytes() == res.model_path.read_bytes()


def test_average_pool_tied_on_qnn_as_aimet_ties_it(tmp_path):
    """ort-cpu keeps AveragePool's own (smaller) output range, which an AIMET sim would let overwrite the Relu
    range before it; qnn gives both one encoding (the Relu's range), and the output stays as accurate."""
    model = tail_model()
    idx = GraphIndex.build(onnx.shape_inference.infer_shapes(model))
    ort = quantize(model, calib(), QuantConfig(), output_dir=tmp_path / "o", name="tail")
    qnn = quantize(model, calib(), QuantConfig(target="qnn"), output_dir=tmp_path / "q", name="tail")
    e_ort, e_qnn = ort.plan.encodings, qnn.plan.encodings
    assert e_ort["r"].scale[0] > 1.5 * e_ort["p"].scale[0]  # the ranges really differ
    assert [c[1:] for c in tie_conflicts(idx, e_ort)] == [("r", "p")]
    assert ort.report["encodings_file"]["aimet_tie_conflicts"]
    assert tie_conflicts(idx, e_qnn) == [] and qnn.report["encodings_file"]["aimet_tie_conflicts"] == []
    assert e_qnn["p"] == e_qnn["r"] and e_qnn["r"].scale[0] == pytest.approx(e_ort["r"].scale[0])
    assert qnn.plan.tensors["p"].group == "r"
    # what an AIMET sim does with the ort-cpu file (one quantizer, the AveragePool encoding loaded last):
    # the Relu output clips. Measured: the fraction of Relu values beyond the AveragePool range.
    x = calib(4, seed=9)
    relu = np.concatenate([run(_with_output(model, "r"), b)[1] for b in x])
    p_max = max(e_ort["p"].maxs())
    assert (relu > p_max).mean() > 0.05
    # the tie costs the qnn model nothing measurable: both within a few percent of FP32
    for b in x:
        ref = run(model, b)[0]
        for res in (ort, qnn):
            q = run(res.model_path, b)[0]
            assert np.linalg.norm(q - ref) / np.linalg.norm(ref) < 0.1


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_all_tensors_option_writes_biases_and_data_movement_outputs(tmp_path):
    model = tail_model()
    res = quantize(model, calib(), QuantConfig(encodings_all_tensors=True), output_dir=tmp_path, name="tail")
    _, named = names_in(res.encodings_path)
    assert named == set(res.plan.encodings) and {"B", "B2", "t", "f"} <= named
    out = tmp_path / "applied.onnx"
    apply_encodings(float_of(res, model), res.encodings_path, out)
    assert out.read_bytes() == res.model_path.read_bytes()


def test_tensorrt_keeps_unquantized_data_movement_float_in_the_file(tmp_path):
    """TensorRT quantizes op inputs only: a Transpose after a quantized tensor stays float, and the file says so
    (a float entry), so apply-encodings does not derive an encoding for it."""
    model = tail_model()
    res = quantize(model, calib(), QuantConfig(target="tensorrt"), output_dir=tmp_path, name="tail")
    enc = read_encodings(res.encodings_path)
    floats = {n for s in (enc.activations, enc.params) for n, e in s.items() if isinstance(e, FloatEncoding)}
    assert floats == set(res.report["encodings_file"]["marked_float"])
    assert not floats & set(res.plan.encodings)
    out = tmp_path / "applied.onnx"
    apply_encodings(float_of(res, model), res.encodings_path, out)
    assert out.read_bytes() == res.model_path.read_bytes()


def test_rules_table_matches_aimet_defaults():
    """The table's AIMET facts (aimet_onnx quantsim.py / default_config.json), and the qnn preset follows them."""
    from converter.config import TARGETS
    from converter.quant.rules import RULES

    assert {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Split", "Identity"} <= \
        OUTPUT_NOT_QUANTIZED
    assert "MaxPool" not in OUTPUT_NOT_QUANTIZED and "Concat" not in OUTPUT_NOT_QUANTIZED
    assert BIASES_IN_FILE == DATA_MOVEMENT_IN_FILE == {"0.6.1": False, "1.0.0": False, "2.0.0": True}
    # every tied op is tied on qnn: data movement always, compute ops through the preset; a Relu's input has no
    # encoding of its own on qnn (fused), and where AIMET does not fuse, the file writes the Relu's encoding for it
    qnn = TARGETS["qnn"]
    for op in TIED_OP_TYPES:
        assert op not in RULES or RULES[op].kind == "shared" or op in qnn.tied_op_types or op in qnn.fusable_activations
    assert "MaxPool" not in TIED_OP_TYPES  # aimet-onnx 2.42 ties multi-input grid-equivariant ops only


def relu6_model() -> onnx.ModelProto:
    """EfficientNet's pattern in small: Conv -> Clip(0, 6), a depthwise Conv -> Clip, a grouped (2 channels a
    group) Conv -> Relu, a depthwise Conv -> Relu; the Clips share their bound constants as in prepared models."""
    rng = np.random.default_rng(0)
    return onnx.shape_inference.infer_shapes(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,8,8] x) => (float[N,4,8,8] y) {
      a = Conv <pads = [1, 1, 1, 1]> (x, W, B)
      b = Clip(a, lo, hi)
      c = Conv <pads = [1, 1, 1, 1], group = 4> (b, D, BD)
      d = Clip(c, lo, hi)
      e = Conv <pads = [1, 1, 1, 1], group = 2> (d, G)
      f = Relu(e)
      g = Conv <pads = [1, 1, 1, 1], group = 4> (f, D2)
      y = Relu(g)
    }
    """, W=rng.normal(0, 0.6, (4, 4, 3, 3)).astype(np.float32), B=rng.normal(0, 0.2, 4).astype(np.float32),
                 D=rng.normal(0, 0.6, (4, 1, 3, 3)).astype(np.float32), BD=rng.normal(0, 0.2, 4).astype(np.float32),
                 G=rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32), D2=rng.normal(0, 0.6, (4, 1, 3, 3)).astype(np.float32),
                 lo=np.array(0, np.float32), hi=np.array(6, np.float32)))


def test_aimet_quantizers_depthwise_clip_and_clip_constants():
    """aimet-onnx 2.42 (its sim's quantizers, listed with enabled state): a depthwise Conv keeps its output quantizer
    before a Clip or Relu (AIMET rejects supergroups starting at one), a regular or grouped (2 channels a group) Conv
    does not; Clip's min/max constants get activation quantizers (asymmetric, like any non-param constant)."""
    acts, params = aimet_quantizers(GraphIndex.build(relu6_model()))
    assert acts == {"x", "b", "c", "d", "f", "g", "y", "lo", "hi"}
    assert params == {"W", "D", "G", "D2"}


@pytest.mark.parametrize("target", ["ort-cpu", "qnn"])
@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_depthwise_relu6_file_names_aimets_quantizers_with_encodings_that_change_nothing(tmp_path, target, version):
    """Our plan fuses every Conv with its Relu/Clip; AIMET does not fuse a depthwise one. The 1.0.0 file names the
    depthwise outputs with the activation's encoding and Clip's bounds with encodings that hold them exactly, so a
    strict load finds exactly its quantizers, and the QDQ model an AIMET sim then amounts to (Q/DQ on those
    tensors too) computes bit for bit what ours does; apply-encodings drops the additions again. 2.0.0 also names
    the regular Conv's output before its Clip with the Clip's encoding, as AIMET's own 2.0.0 export derives it."""
    model = relu6_model()
    idx = GraphIndex.build(model)
    res = quantize(model, calib_relu6(), QuantConfig(target=target, encodings_version=version), output_dir=tmp_path,
                   name="m")
    doc, named = names_in(res.encodings_path)
    acts, params = aimet_quantizers(idx)
    enc = res.plan.encodings
    assert not {"a", "c", "e", "g", "lo", "hi"} & set(enc)  # fused in our plan, bounds never quantized
    if version == "2.0.0":
        assert named == acts | params | {"a", "B", "BD"}  # + int32 biases
        assert res.report["encodings_file"]["added_for_aimet"] == ["a", "c", "g", "hi", "lo"]
    else:
        assert named == acts | params
        assert res.report["encodings_file"]["added_for_aimet"] == ["c", "g", "hi", "lo"]
    file = {**read_encodings(res.encodings_path).activations, **read_encodings(res.encodings_path).params}
    assert file["c"] == enc["d"] and file["g"] == enc["y"]
    assert file["lo"].fake_quantize(np.zeros(1, np.float32))[0] == 0
    assert abs(file["hi"].fake_quantize(np.full(1, 6, np.float32))[0] - 6) < 1e-6
    # what an AIMET sim loaded with this file computes: Q/DQ on every named tensor
    sim = render_control_flow(prepare(float_of(res, model)).model, {**enc, **{n: file[n] for n in ("c", "g", "lo", "hi")}})
    for b in calib_relu6(3, seed=5):
        assert np.array_equal(run(sim, b)[0], run(res.model_path, b)[0])
    out = tmp_path / "applied.onnx"
    apply_encodings(float_of(res, model), res.encodings_path, out)
    assert out.read_bytes() == res.model_path.read_bytes()


def calib_relu6(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 2, (2, 4, 8, 8)).astype(np.float32)} for _ in range(n)]
