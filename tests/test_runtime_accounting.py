"""Float counted as ONNX Runtime runs it (issue 28, points 3 and 5).

* Excluding a layer keeps its neighbours quantized: ONNX Runtime's optimized graph runs exactly that one layer in
  float, its producer and its consumer still as integer kernels.
* The report's float layers are the layer ops ORT's optimized graph runs in float, mapped back to the model's names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import onnx
from onnx import helper, numpy_helper

from converter import QuantConfig, quantize
from converter.ort_session import kernel_summary, optimized_op_counts

from .conftest import run


def conv_chain(n: int = 4, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x -> (Conv -> Relu) x n; Conv i is named conv<i>."""
    rng = np.random.default_rng(seed)
    nodes, inits, t = [], [], "x"
    for i in range(n):
        w = rng.normal(0, 1 / np.sqrt(9 * channels), (channels, channels, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [t, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}" if i < n - 1 else "y"], name=f"relu{i}")]
        t = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["N", channels, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", channels, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def gemm_chain(n: int = 4, width: int = 32, seed: int = 1) -> onnx.ModelProto:
    """x -> (Gemm(transB) -> Relu) x n; Gemm i is named fc<i>."""
    rng = np.random.default_rng(seed)
    nodes, inits, t = [], [], "x"
    for i in range(n):
        inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, width).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [t, f"w{i}", f"b{i}"], [f"g{i}"], name=f"fc{i}", transB=1),
                  helper.make_node("Relu", [f"g{i}"], [f"r{i}" if i < n - 1 else "y"], name=f"relu{i}")]
        t = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def data(shape, seed: int = 2, n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def test_excluding_one_layer_runs_exactly_that_layer_in_float(tmp_path):
    """Before: the excluded layer's producer lost its output Q (no quantized reader), so ORT ran two layers in float;
    and a float Conv/Gemm reading a per-tensor DQ would have its weight quantized per tensor by ORT's
    WeightBiasQuantization and run as an integer kernel after all. Now: exactly one float layer, the others integer."""
    cases = {"conv": (conv_chain(), (4, 8, 16, 16), "conv", "QLinearConv", {"Conv", "FusedConv"}),
             "gemm": (gemm_chain(), (4, 32), "fc", "QGemm", {"Gemm", "FusedGemm"})}
    for key, (model, shape, prefix, int_op, float_ops) in cases.items():
        counts = {}
        for excluded in ((), (f"{prefix}1",), (f"{prefix}1", f"{prefix}2")):
            r = quantize(model, data(shape), QuantConfig(exclude_nodes=excluded), output_dir=tmp_path / key /
                         str(len(excluded)), name="m")
            k = kernel_summary(optimized_op_counts(str(r.model_path)))
            counts[len(excluded)] = (k["quantized_kernels"].get(int_op, 0), k["float_layers"])
            assert set(k["float_layer_ops"]) <= float_ops, k
            # the excluded layer keeps its float weight: the rendered model has no DQ for it
            q = onnx.load(str(r.model_path))
            for name in excluded:
                node = next(n for n in q.graph.node if n.name == name)
                assert node.input[1] == f"w{name[-1]}", node
            x = data(shape, seed=7, n=1)[0]
            ref, got = run(model, x)[0], run(q, x)[0]
            assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99, key
        assert counts == {0: (4, 0), 1: (3, 1), 2: (2, 2)}, (key, counts)


def test_report_names_the_layers_ort_runs_in_float(tmp_path, capsys):
    """summary.ort_cpu_kernels names the layers ORT's optimized graph runs in float, whatever put them there: conv1
    excluded, conv3 with a packed 4-bit weight (no int4 Conv kernel: ORT dequantizes it and runs the Conv in float)
    although the plan quantized it; the fractions count those two of the four equal Convs; the CLI line names them."""
    import json

    from converter.cli import main

    model = conv_chain()
    r = quantize(model, data((4, 8, 16, 16)), QuantConfig(exclude_nodes=("conv1",), weight_bits_overrides={"conv3": 4},
                                                           weight_storage="packed"),
                 output_dir=tmp_path / "api", name="m")
    k = r.report["summary"]["ort_cpu_kernels"]
    assert r.report["summary"]["float_nodes"] == ["conv1"]  # what the plan left in float ...
    assert k["float_layer_names"] == ["conv1", "conv3"], k  # ... and what ORT runs in float
    assert k["compute_layers"] == 4 and k["float_layers"] == 2
    assert k["float_fraction"] == 0.5 and k["float_mac_fraction"] == 0.5
    assert k["quantized_kernels"] == {"QLinearConv": 2}

    onnx.save(model, tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(data((4, 8, 16, 16))):
        np.save(calib / f"{i}.npy", b["x"])
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(calib), "--exclude-nodes", "conv2",
                 "--output-dir", str(tmp_path / "cli")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "ONNX Runtime CPU runs" in x)
    assert "quantized 3 QLinearConv" in line and "1 " in line and line.split("layers in float: ")[1].startswith("1 ")
    assert ": conv2 (report" in line, line
    report = json.loads((tmp_path / "cli" / "m.report.json").read_text())
    assert report["summary"]["ort_cpu_kernels"]["float_layer_names"] == ["conv2"]


def test_layer_names_map_ort_nodes_back_to_the_model():
    """ORT renames what it fuses (QLinearConv 'conv1_token_3', NCHWc 'r0_nchwc' after the fused Relu's output,
    'fc/MatMulAddFusion'); each maps back to its layer, the longest name first."""
    from converter.ort_session import LayerNames

    model = conv_chain(3)
    model.graph.node[2].name = "conv"  # conv1 renamed: 'conv1_token_3' must not map to 'conv'
    model.graph.node[4].name = "conv1"  # conv2 renamed to conv1
    names = LayerNames(model)
    assert names.layers == ["conv0", "conv", "conv1"]
    node = helper.make_node
    assert names(node("QLinearConv", [], ["q"], name="conv1_token_3")) == "conv1"
    assert names(node("QLinearConv", [], ["q"], name="conv_token_3")) == "conv"
    assert names(node("Conv", [], ["q"], name="r0_nchwc", domain="com.microsoft.nchwc")) == "conv0"  # Relu's output
    assert names(node("FusedConv", [], ["r1"], name="Fused_1", domain="com.microsoft")) == "conv"  # by its output
    assert names(node("Conv", [], ["q"], name="other")) is None


def three_convs() -> onnx.ModelProto:
    """A wide 3x3 Conv on 64x64 (38 M MACs), a 1x1 Conv (17 M) and a 3x3 Conv back to 16 channels (38 M)."""
    rng = np.random.default_rng(3)
    shapes = {"big": (64, 16, 3, 3), "mid": (64, 64, 1, 1), "last": (16, 64, 3, 3)}
    nodes, inits, t = [], [], "x"
    for i, (name, shape) in enumerate(shapes.items()):
        out = "y" if name == "last" else f"r{i}"
        nodes += [helper.make_node("Conv", [t, f"w{i}", f"b{i}"], [f"c{i}"], name=name,
                                   pads=[shape[2] // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}")]
        inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, shape[0]).astype(np.float32), f"b{i}")]
        t = out
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["N", 16, 64, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 64, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _float_set_builder(model: onnx.ModelProto, calib: list, group: dict[str, tuple[str, ...]], out: Path):
    """``build(names)``: the model quantized with the layers ``names`` (keys of ``group``: their nodes) in float,
    each set quantized once (what :func:`converter.search.cost.runtime_costs` renders per layer)."""
    built: dict[tuple[str, ...], onnx.ModelProto] = {}

    def build(names) -> onnx.ModelProto:
        key = tuple(sorted(names))
        if key not in built:
            r = quantize(model, calib, QuantConfig(exclude_nodes=tuple(x for n in key for x in group[n]),
                                                   max_latency_ratio=float("inf")),  # slower than FP32: measured here
                         output_dir=out / ("_".join(key) or "int8"), name="m")
            built[key] = onnx.load(str(r.model_path))
        return built[key]
    return build


def test_runtime_costs_measure_what_a_float_layer_adds_on_ort(tmp_path):
    """Profiled on ONNX Runtime CPU (each kernel's fastest of 10 runs): each Conv alone in float against all-INT8.
    Every Conv costs time in float in both of two profiles (a float layer runs a float kernel and also pays the DQ
    of its input and the Q of its output), and the prediction for two non-adjacent Convs in float is the all-INT8
    time plus their two costs (no shared edge). How close two profiles and the prediction come to a profile of that
    model is a timing, which `python -m tools.runtime_cost --profiled` prints: asserted here (within 30% and 35%),
    it failed on a busy AMD EPYC one run in three."""
    from converter.search.cost import profiled_ms, runtime_costs

    model = three_convs()
    calib = data((2, 16, 64, 64), n=2)
    group = {"big": ("big", "relu0"), "mid": ("mid", "relu1"), "last": ("last", "relu2")}
    build = _float_set_builder(model, calib, group, tmp_path)
    feed = {"x": calib[0]["x"][:1]}
    runs = [runtime_costs(build([]), feed, list(group), build, runs=10, threads=1) for _ in range(2)]
    for n in group:  # every Conv costs time in float, in both profiles
        assert runs[0].cost(n) > 0.0 and runs[1].cost(n) > 0.0, (n, runs)
    rc = runs[0]
    predicted = rc.predict(rc.int8_ms, ["big", "last"])
    assert abs(predicted - (rc.int8_ms + rc.cost("big") + rc.cost("last"))) < 1e-9, (predicted, rc)
    assert profiled_ms(build(["big", "last"]), feed, 3, threads=1) > 0  # the set builds and runs on ORT


def test_give_back_order_follows_the_measured_cost():
    """Equal damage: the layer whose float costs most milliseconds comes back to INT8 first; a layer that costs
    nothing in float is tried last (quantizing it back gains nothing)."""
    from converter.search.fallback import give_back_order
    from converter.search.sensitivity import LayerScore

    scores = [LayerScore(n, "Conv", 0.99, 0.0, 0.0, (n,)) for n in ("free", "cheap", "dear")]
    order = give_back_order(scores, {"free": 0.0, "cheap": 0.12, "dear": 2.5})
    assert [s.name for s in order] == ["dear", "cheap", "free"]
    # more damage per millisecond comes back later
    scores = [LayerScore("hurts", "Conv", 0.5, 0.0, 0.0, ("hurts",)), LayerScore("mild", "Conv", 0.99, 0.0, 0.0,
                                                                                 ("mild",))]
    assert [s.name for s in give_back_order(scores, {"hurts": 1.0, "mild": 0.5})] == ["mild", "hurts"]


def test_float_island_is_costed_once_at_its_boundary(tmp_path):
    """Four Conv -> Relu in a chain, profiled on ONNX Runtime CPU (each kernel's fastest of 15 runs). Alone in float,
    a middle Conv pays a DQ (and layout change) on its input and a Q on its output; two adjacent float Convs pass
    the tensor between them in float, so that edge is paid by neither. The cost model finds each layer's sides and
    neighbours in the optimized graph of the same profiles (no extra run per set), and its prediction for an island
    (2 and 4 layers) counts each shared edge once, where the per-layer sum counts it once per layer. How close that
    comes to the island's own profile is measured by tools/runtime_cost.py, not asserted (a timing)."""
    from converter.search.cost import profiled_ms, runtime_costs

    model = conv_chain(4, channels=16)
    for v in (model.graph.input[0], model.graph.output[0]):
        for d in v.type.tensor_type.shape.dim[2:]:
            d.dim_value = 48
    calib = data((2, 16, 48, 48), n=2)
    group = {f"conv{i}": (f"conv{i}", f"relu{i}") for i in range(4)}
    build = _float_set_builder(model, calib, group, tmp_path)
    feed = {"x": calib[0]["x"][:1]}
    rc = runtime_costs(build([]), feed, list(group), build, runs=15, threads=1)
    # structure: each side's neighbours as ORT runs them; graph input/output sides are external
    assert rc.boundary["conv1"][0].layers == {"conv0"} and rc.boundary["conv1"][1].layers == {"conv2"}
    assert rc.boundary["conv0"][0].external and rc.boundary["conv3"][1].external
    assert rc.boundary["conv1"][1].ms > 0 and rc.boundary["conv2"][0].ms > 0  # the Q and DQ between them cost time
    for island in (["conv1", "conv2"], list(group)):
        summed = sum(rc.cost(x) for x in island)
        shared = sum(side.ms for x in island for side in rc.boundary[x]
                     if not side.external and side.layers <= set(island) and side.ms > 0)
        assert abs(rc.set_cost(island) - (summed - shared)) < 1e-9 and shared > 0
        assert rc.predict(rc.int8_ms, island) < rc.int8_ms + summed  # each shared edge counted once, not per layer
        # how close the prediction comes to the island's own profile is a timing: `python -m tools.runtime_cost
        # --profiled` prints it (this test asserted it and failed on busy machines: 0.306 ms predicted, 0.341
        # additive, 0.333 measured, the least of five profiles)
        assert profiled_ms(build(island), feed, 3, threads=1) > 0  # the island builds and runs on ORT
    # non-adjacent float layers share nothing: their costs add
    assert abs(rc.set_cost(["conv0", "conv2"]) - (rc.cost("conv0") + rc.cost("conv2"))) < 1e-9


def test_give_back_and_best_cost_float_sets_per_island():
    """Two adjacent float layers share the Q/DQ on the edge between them (0.4 ms each side): quantizing one of them
    back saves only what it adds with its neighbour still in float, so at equal damage the lone layer, dearer as
    part of the set, comes back first; and the search's choice among sets that met the target costs a set by its
    islands, not by its layers' sum."""
    from converter.search.cost import RuntimeCosts, Side
    from converter.search.fallback import _best, give_back_order
    from converter.search.sensitivity import LayerScore

    rc = RuntimeCosts(1.0, {n: 0.0 for n in "abcd"}, 1, local={"a": 1.0, "b": 1.0, "c": 0.9, "d": 1.5},
                      boundary={"a": (Side(0.1, frozenset(), True), Side(0.4, frozenset("b"), False)),
                                "b": (Side(0.4, frozenset("a"), False), Side(0.1, frozenset(), True)),
                                "c": (Side(0.1, frozenset(), True), Side(0.1, frozenset(), True)),
                                "d": (Side(0.1, frozenset(), True), Side(0.1, frozenset(), True))})
    costs = rc.costs()
    assert costs.set_cost(["a", "b"]) == 1.2 and costs.set_cost(["a", "c"]) == 1.9 and costs["a"] == 1.0
    scores = [LayerScore(n, "Conv", 0.99, 0.0, 0.0, (n,)) for n in "abc"]
    assert [s.name for s in give_back_order(scores, costs)] == ["c", "a", "b"]
    assert [s.name for s in give_back_order(scores, dict(costs))] == ["a", "b", "c"]  # per-layer sums: before

    class Met:
        passed, metric = True, 0.99
    results = {(("a", "b"), ()): (Met(),), (("d",), ()): (Met(),)}
    assert _best(results, costs) == (("a", "b"), ())  # 1.2 ms against 1.5 (their sum, 2.0, would pick d)
    assert _best(results, dict(costs)) == (("d",), ())


def _timed(float_ms: float, quant_ms: float):
    """paired_latency replaced by fixed timings (the warning's logic under test, not this machine's speed)."""
    from converter.timing import PairedLatency

    return lambda *a, **k: PairedLatency([float_ms] * 20, [quant_ms] * 20)


def test_a_quantized_model_slower_than_fp32_on_ort_cpu_is_no_success(tmp_path, monkeypatch, caplog, capsys):
    """On target ort-cpu a plain quantize whose model runs slower than FP32 there (the quality block's paired
    timing) writes it, marks it in the report (latency_gate) and raises SlowerThanFloatError (exit 1) naming the
    ratio, the cause and the fixes. A limit the user raised lets it through with one warning; faster models, models
    too fast to time and other targets (ORT CPU is not their runtime) pass without either."""
    import json

    import converter.report as report
    from converter.errors import EXIT_CHECK_FAILED, SlowerThanFloatError

    model, calib = conv_chain(), data((1, 8, 16, 16))
    cases = [("ort-cpu", None, 2.0, 3.0, "error"), ("ort-cpu", 2.0, 2.0, 3.0, "warning"),
             ("ort-cpu", None, 2.0, 1.2, None), ("ort-cpu", None, 0.2, 0.5, None), ("qnn", None, 2.0, 3.0, None),
             ("ort-cpu", 0.5, 2.0, 1.2, "error")]
    for i, (target, limit, f_ms, q_ms, outcome) in enumerate(cases):
        monkeypatch.setattr(report, "paired_latency", _timed(f_ms, q_ms))
        caplog.clear()
        config = QuantConfig(target=target, max_latency_ratio=limit)
        out = tmp_path / str(i)
        if outcome == "error":
            with pytest.raises(SlowerThanFloatError) as err:
                quantize(model, calib, config, output_dir=out, name="m")
            assert err.value.exit_code == EXIT_CHECK_FAILED
            r = err.value.result
            ratio = f"x{q_ms / f_ms:.2f}"
            assert ratio in err.value.message and "latency_gate" in err.value.message, err.value.message
            assert "--target" in err.value.fix and "--max-latency-ratio" in err.value.fix, err.value.fix
        else:
            r = quantize(model, calib, config, output_dir=out, name="m")
        lines = [x.getMessage() for x in caplog.records if "SLOWER than FP32" in x.getMessage()]
        assert len(lines) == int(outcome == "warning"), (target, f_ms, q_ms, lines)
        assert r.report["quality"]["latency_batch1"]["ratio"] == (None if f_ms < 1.0 else q_ms / f_ms)
        on_disk = json.loads(r.report_path.read_text())
        gated = target == "ort-cpu" and f_ms >= 1.0
        assert ("latency_gate" in on_disk) == gated, on_disk.get("latency_gate")
        if gated:
            assert on_disk["latency_gate"]["passed"] == (outcome != "error")
            assert on_disk["latency_gate"]["max_latency_ratio"] == (1.0 if limit is None else limit)
        assert r.model_path.is_file() and r.encodings_path.is_file()  # written all the same
        if outcome == "warning":
            assert "x1.50" in lines[0] and "Fix:" in lines[0] and "--target" in lines[0], lines[0]
    # the command line: exit 1 with the gate's error and fix; the files written
    from converter.cli import main

    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", np.concatenate([b["x"] for b in calib]))
    monkeypatch.setattr(report, "paired_latency", _timed(2.0, 3.0))
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "-o",
                 str(tmp_path / "cli")]) == EXIT_CHECK_FAILED
    captured = capsys.readouterr()
    err = captured.err
    assert "error: the quantized model is slower than allowed: x1.50" in err and "fix:" in err, err
    assert "latency (ORT CPU, batch 1" in captured.out and "m.qdq.onnx" in captured.out  # the summary came first
    assert (tmp_path / "cli" / "m.qdq.onnx").is_file() and (tmp_path / "cli" / "m.report.json").is_file()
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "-o",
                 str(tmp_path / "cli2"), "--max-latency-ratio", "inf"]) == 0
