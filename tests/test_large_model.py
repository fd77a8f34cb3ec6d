"""Models over the protobuf limit, end to end, on a small model: the 2 GiB limit is lowered
(converter.graph.model_io.PROTOBUF_LIMIT) so the model cannot be "one protobuf" for converter.
tools/large_model.py runs the same on a real model over 2 GiB."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import QuantConfig, apply_encodings, quantize
from converter.cli import main
from converter.graph import model_io
from converter.verify import Thresholds, verify

from .conftest import op_counts

WIDTH = 64


def matmul_stack(layers: int = 4, width: int = WIDTH, seed: int = 0) -> onnx.ModelProto:
    """x -> (MatMul W_i, Add b_i, Relu) x layers -> MatMul head; each W is width x width float32."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        w = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(size=width).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"/layer{i}/MatMul"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"/layer{i}/Add"),
                  helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"/layer{i}/Relu")]
        x = f"relu{i}"
    inits.append(numpy_helper.from_array((rng.normal(size=(width, 10)) / np.sqrt(width)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["output"], name="/head/MatMul"))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def session_sources(monkeypatch):
    """What every ONNX Runtime session in converter is created from: a path (str) or serialized bytes."""
    import converter.ort_session as ort_session

    seen = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        seen.append(type(source).__name__)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort_session.ort, "InferenceSession", spy)
    yield seen
    monkeypatch.setattr(ort_session.ort, "InferenceSession", real)


def external_tensors(path) -> int:
    light = onnx.load(str(path), load_external_data=False)
    return sum(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)


def test_over_the_limit_model_quantizes_applies_verifies_and_compares_with_external_data(
        tmp_path, monkeypatch, session_sources, capsys):
    float_path = tmp_path / "stack.onnx"
    model = matmul_stack()
    rng = np.random.default_rng(1)
    calib = [{"input": rng.normal(size=(1, WIDTH)).astype(np.float32)} for _ in range(32)]
    # the reference: the same model as one protobuf
    model_io.save_model(model, tmp_path / "one.onnx")
    one = quantize(tmp_path / "one.onnx", calib, QuantConfig(), output_dir=tmp_path / "one", name="stack")
    assert set(session_sources) == {"bytes"}
    session_sources.clear()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 20_000)  # the model (~70 KB) is now "over the limit"
    model_io.save_model(model, float_path)
    # written as <name>.onnx + <name>.onnx.data; the caller's model keeps its weights
    assert (tmp_path / "stack.onnx.data").is_file() and external_tensors(float_path) == 5
    assert float_path.stat().st_size < 20_000 and len(model.graph.initializer[0].raw_data) == WIDTH * WIDTH * 4

    res = quantize(float_path, calib, QuantConfig(), output_dir=tmp_path / "out")
    qdq_path = tmp_path / "out" / "stack.qdq.onnx"
    assert res.model_path == qdq_path
    # the QDQ model went to external data too, and loads in ONNX Runtime from its path
    assert (tmp_path / "out" / "stack.qdq.onnx.data").is_file() and external_tensors(qdq_path) == 4  # int8 64x64 weights; the 640-byte head stays inline
    # every session (calibration, the output check) was made from a path with external data, never bytes
    assert session_sources and set(session_sources) == {"str"}, session_sources
    # the same encodings as through one protobuf (shape inference ran on the skeleton: activations typed)
    assert res.encodings_path.read_text() == one.encodings_path.read_text()
    # ... and the same summary, but for ORT CPU's kernel counts: over the limit they are not taken (the optimized
    # graph would be written out again, weights and all)
    summary = dict(one.report["summary"])
    assert summary.pop("ort_cpu_kernels")["float_layers"] == 0
    assert res.report["summary"] == summary
    assert res.report["summary"]["quantized_tensors"]["weight"] == 5
    assert res.report["summary"]["quantized_tensors"]["activation"] == 6  # input, 4 Relu outputs, output
    assert res.report["summary"]["float_nodes"] == []
    # loaded with its external data, the QDQ model is the one-protobuf one
    loaded = onnx.load(str(qdq_path))
    for t in loaded.graph.initializer:
        t.ClearField("data_location")  # onnx.load sets it to DEFAULT explicitly
    assert op_counts(loaded)["MatMul"] == 5 and op_counts(loaded) == op_counts(onnx.load(str(one.model_path)))
    assert loaded.SerializeToString(deterministic=True) == one.model_path.read_bytes()

    x = rng.normal(size=(64, WIDTH)).astype(np.float32)
    f = ort.InferenceSession(str(float_path)).run(None, {"input": x})[0]
    q = ort.InferenceSession(str(qdq_path)).run(None, {"input": x})[0]
    cos = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.mean() > 0.99, cos.mean()

    # apply-encodings: the same two files, byte for byte
    applied = tmp_path / "applied.qdq.onnx"
    apply_encodings(float_path, res.encodings_path, applied)
    assert (tmp_path / "applied.qdq.onnx.data").read_bytes() == (tmp_path / "out" / "stack.qdq.onnx.data").read_bytes()
    applied_model = onnx.load(str(applied), load_external_data=False)
    for t in applied_model.graph.initializer:  # the references name their own data file
        for e in t.external_data:
            if e.key == "location":
                assert e.value == "applied.qdq.onnx.data"

    # verify (paths) and compare (CLI) on the external-data models
    result = verify(float_path, qdq_path, [{"input": x[i:i + 8]} for i in range(0, 64, 8)],
                    thresholds=Thresholds(min_cosine=0.99, min_agreement=0.9, max_top1_drop=None))
    assert result.passed, result.summary
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        np.save(data / f"{i:03d}.npy", x[i])
    capsys.readouterr()
    assert main(["compare", str(float_path), str(qdq_path), "--data", str(data), "--json",
                 str(tmp_path / "cmp.json")]) == 0
    table = json.loads((tmp_path / "cmp.json").read_text())
    assert "relu3" in json.dumps(table)


def test_under_the_limit_stays_one_file(tmp_path):
    model_io.save_model(matmul_stack(layers=1), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists() and external_tensors(tmp_path / "m.onnx") == 0
