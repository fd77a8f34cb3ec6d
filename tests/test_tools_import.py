"""tools/benchlib and tools/any_model_bench: every module imports (run as modules, no sys.path edits), and the
library's pieces measure what they say on small models built here (no assets)."""

from __future__ import annotations

import importlib
import json
import pkgutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tools.benchlib
from tools import any_model_bench
from tools.benchlib import (
    AssetsError,
    ListReader,
    assets_root,
    compare_latency,
    compute_int8_share,
    ort_quantize_static,
)

MODULES = sorted(m.name for m in pkgutil.walk_packages(tools.benchlib.__path__, "tools.benchlib."))


def test_every_module_imports():
    assert {"tools.benchlib.assets", "tools.benchlib.measure", "tools.benchlib.ort_baseline",
            "tools.benchlib.tasks"} <= set(MODULES)
    for name in MODULES + ["tools.any_model_bench"]:
        module = importlib.import_module(name)
        assert module.__doc__, f"{name} has no docstring"


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.normal(size=8 * 27).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 16, 16])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calib(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_assets_root_is_required(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVERTER_ASSETS", raising=False)
    with pytest.raises(AssetsError) as exc:
        assets_root(None)
    assert "CONVERTER_ASSETS" in exc.value.fix and "--assets" in exc.value.fix
    with pytest.raises(AssetsError):
        assets_root(tmp_path / "missing")
    assert assets_root(tmp_path) == tmp_path
    monkeypatch.setenv("CONVERTER_ASSETS", str(tmp_path))
    assert assets_root(None) == tmp_path


def test_cli_errors_are_one_message_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CONVERTER_ASSETS", raising=False)
    assert any_model_bench.main(["--models", "resnet8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no assets folder given\nfix: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the check
    assert any_model_bench.main(["--models", "digits_cnn,nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err


def test_ort_baseline_and_int8_share(tmp_path):
    float_path = tmp_path / "conv.onnx"
    onnx.save(_conv_model(), str(float_path))
    before = float_path.read_bytes()
    seconds = ort_quantize_static(float_path, _calib(), tmp_path / "conv.ort.onnx")
    assert seconds > 0 and float_path.read_bytes() == before  # the input is not touched
    qdq = onnx.load(str(tmp_path / "conv.ort.onnx"))
    ops = [n.op_type for n in qdq.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    dq_w = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
            [c.input[1] for c in qdq.graph.node if c.op_type == "Conv"]]
    assert len(dq_w) == 1 and helper.get_attribute_value(dq_w[0].attribute[0]) == 0  # per-channel, axis 0

    expected = {"int8": 0, "float": 1, "share": 0.0, "int8_ops": {}, "float_ops": {"FusedConv": 1},  # Conv + Relu
                "float_layers": ["conv"]}
    assert compute_int8_share(float_path) == {**expected, "counted": "optimized graph"}
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    assert compute_int8_share(float_path, feed) == {**expected, "counted": "profiled run"}
    for share in (compute_int8_share(tmp_path / "conv.ort.onnx"), compute_int8_share(tmp_path / "conv.ort.onnx", feed)):
        assert (share["int8"], share["float"], share["int8_ops"], share["share"]) == (1, 0, {"QLinearConv": 1}, 1.0)


def test_int8_share_counts_inside_if_bodies():
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])])

    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    share = compute_int8_share(model)  # the graph: both branches
    assert share["float"] == 2 and share["int8"] == 0 and sorted(share["float_layers"]) == ["else_mm", "then_mm"]
    x = np.ones((1, 4), np.float32)
    for cond, taken in ((True, "then_mm"), (False, "else_mm")):  # a run: the branch it took
        share = compute_int8_share(model, {"c": np.array(cond), "x": x})
        assert (share["float"], share["float_layers"]) == (1, [taken])


def test_compare_latency_times_every_model(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_model(0), str(a))
    onnx.save(_conv_model(1), str(b))
    lat = compare_latency({"a": a, "b": b}, {"x": np.zeros((1, 3, 16, 16), np.float32), "unused": np.zeros(1)},
                          runs=5, warmup=1, threads=1)
    assert set(lat) == {"a", "b"} and all(0 < v < 1000 for v in lat.values())


def test_list_reader_is_the_get_next_protocol():
    reader = ListReader(_calib(2))
    assert reader.get_next()["x"].shape == (2, 3, 16, 16) and reader.get_next() is not None
    assert reader.get_next() is None


def test_bench_digits_cnn_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert any_model_bench.main(["--models", "digits_cnn", "--runs", "3", "--json", str(out),
                                 "--out", str(tmp_path / "models")]) == 0
    data = json.loads(out.read_text())["models"]["digits_cnn"]
    rows = data["rows"]
    assert set(rows) == {"fp32", "ours_default", "ours_search", "ort_quantize_static"}
    fp32, default = rows["fp32"], rows["ours_default"]
    assert fp32["metrics"]["agreement"] == 1.0 and fp32["metrics"]["top1"] > 0.9  # bundled weights: 0.97
    assert fp32["int8"]["share"] == 0.0 and fp32["int8"]["float"] == 6 and fp32["x_fp32"] == 1.0
    assert default["int8"]["int8"] > 0 and default["metrics"]["agreement"] > 0.9
    assert rows["ort_quantize_static"]["int8"]["int8"] > 0
    s = rows["ours_search"]["search"]
    assert s["evaluator_calls"] >= 1 and "met" in s
    assert all(r["latency_ms"] > 0 for r in rows.values())
    assert "ours default (all-INT8)" in capsys.readouterr().out
