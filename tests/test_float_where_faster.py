"""Float where faster (converter.search.speed): a plain quantize on ort-cpu whose all-INT8 model breaks its latency
limit keeps in float the layers ONNX Runtime CPU runs faster in float, and only when the model gets faster.

The timings and the per-layer profile are injected (this machine's speed is not under test: the guide keeps timings
out of pass/fail tests); the models are rendered, written and run on ONNX Runtime for real."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import converter.report as report
import converter.search.speed as speed
from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import EXIT_CHECK_FAILED, SlowerThanFloatError
from converter.search.cost import RuntimeCosts
from converter.timing import PairedLatency

from .conftest import run
from .test_runtime_accounting import conv_chain, data


def _timings(*pairs):
    """paired_latency returning (float ms, quantized ms) pairs in turn, the last one from then on."""
    left = list(pairs)

    def timed(*a, **k):
        f, q = left.pop(0) if len(left) > 1 else left[0]
        return PairedLatency([f] * 20, [q] * 20)
    return timed


def _profile(deltas: dict[str, float], profiled: list):
    """runtime_costs with these per-layer deltas (float minus INT8, ms); it renders each layer's float model as the
    real one does, and records which layers it was asked for."""
    def costs(int8, feed, layers, build, runs=20, threads=0):
        profiled.append(list(layers))
        for name in layers:
            assert isinstance(build([name]), onnx.ModelProto)
        return RuntimeCosts(1.0, {n: 1.0 for n in layers}, runs, local={n: deltas.get(n, 0.5) for n in layers})
    return costs


def test_layers_faster_in_float_are_kept_in_float_when_the_model_gets_faster(tmp_path, monkeypatch):
    """All-INT8 at x1.5 FP32 (limit 1.0): conv1 and conv3 profile faster in float; the model with both in float
    runs x0.8 the all-INT8 time, so it is written (exit 0: x0.9 FP32 in the quality block), with those two layers
    in float in ORT, closer to FP32 than all-INT8, bias correction's edits kept for the layers still quantized and
    dropped for the float ones (the written float model holds their original bias)."""
    model, calib = conv_chain(), data((1, 8, 16, 16))
    profiled: list = []
    monkeypatch.setattr(speed, "runtime_costs", _profile({"conv1": -0.2, "conv3": -0.05}, profiled))
    monkeypatch.setattr(report, "paired_latency", _timings((2.0, 3.0), (2.0, 1.8)))  # all-INT8, then the one written
    monkeypatch.setattr(speed, "paired_latency", _timings((3.0, 2.4)))
    config = QuantConfig(bias_correction=True, fast_bias_correction=False)
    r = quantize(model, calib, config, output_dir=tmp_path / "fwf", name="m")
    entry = r.report["float_where_faster"]
    assert entry["ratio_before"] == 1.5 and entry["float_layers"] == ["conv1", "conv3"], entry
    assert entry["vs_all_int8"] == 0.8 and entry["rounds"][0]["profiled"] == 4 and entry["profile_runs"] == 20, entry
    # the second round profiles only the neighbours of the float layers (none known to this fake profile): stop
    assert len(profiled) == 1, profiled
    assert sorted(entry["technique_edits_dropped"]) == ["b1", "b3"], entry
    assert r.report["latency_gate"]["passed"] and r.report["latency_gate"]["ratio"] == 0.9
    kernels = r.report["summary"]["ort_cpu_kernels"]
    assert kernels["float_layers"] == 2 and kernels["quantized_kernels"]["QLinearConv"] == 2, kernels
    on_disk = json.loads(r.report_path.read_text())
    assert on_disk["float_where_faster"]["float_layers"] == ["conv1", "conv3"]
    # the float layers read their original weights and biases; the quantized ones keep bias correction's
    prepared = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(r.prepared_path)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(prepared["b1"], original["b1"]) and np.array_equal(prepared["b3"], original["b3"])
    assert not np.array_equal(prepared["b0"], original["b0"])
    # closer to FP32 than the all-INT8 model (the same calibration, the gate lifted)
    plain = quantize(model, calib, config.replace(float_where_faster=False, max_latency_ratio=float("inf")),
                     output_dir=tmp_path / "int8", name="m")
    held_out = data((4, 8, 16, 16), seed=9, n=1)[0]
    ref = run(model, held_out)[0]
    err = {k: float(np.mean((run(p.model_path, held_out)[0] - ref) ** 2)) for k, p in (("fwf", r), ("int8", plain))}
    assert err["fwf"] < err["int8"], err
    assert "float_where_faster" not in plain.report


def test_nothing_changes_when_no_faster_model_is_found_or_the_step_does_not_apply(tmp_path, monkeypatch):
    """The repaired model not measurably faster (x0.99 the all-INT8 time): the all-INT8 model is written, byte for
    byte the one --no-float-where-faster writes, technique edits all kept, and the gate fails as before, saying so.
    Within the limit, with no limit (inf), on another target or with the option off, nothing is profiled."""
    model, calib = conv_chain(), data((1, 8, 16, 16))
    profiled: list = []
    monkeypatch.setattr(speed, "runtime_costs", _profile({"conv2": -0.3}, profiled))
    monkeypatch.setattr(report, "paired_latency", _timings((2.0, 5.0)))
    config = QuantConfig(bias_correction=True, fast_bias_correction=False, max_latency_ratio=2.0)
    monkeypatch.setattr(speed, "paired_latency", _timings((3.0, 2.97)))
    with pytest.raises(SlowerThanFloatError) as err:
        quantize(model, calib, config, output_dir=tmp_path / "slow", name="m")
    assert "no layer runs measurably faster in float" in err.value.message, err.value.message
    r = err.value.result
    entry = r.report["float_where_faster"]
    assert entry["float_layers"] == [] and entry["rounds"][0]["vs_before"] == 0.99, entry
    assert "technique_edits_dropped" not in entry and len(profiled) == 1
    with pytest.raises(SlowerThanFloatError) as err:
        quantize(model, calib, config.replace(float_where_faster=False), output_dir=tmp_path / "off", name="m")
    off = err.value.result
    assert r.model_path.read_bytes() == off.model_path.read_bytes()
    assert r.prepared_path.read_bytes() == off.prepared_path.read_bytes()
    cases = {"within": (config, (2.0, 3.0)), "inf": (config.replace(max_latency_ratio=float("inf")), (2.0, 9.0)),
             "qnn": (config.replace(target="qnn", max_latency_ratio=None), (2.0, 9.0))}
    for key, (cfg, pair) in cases.items():
        monkeypatch.setattr(report, "paired_latency", _timings(pair))
        res = quantize(model, calib, cfg, output_dir=tmp_path / key, name="m")
        assert "float_where_faster" not in res.report, key
    assert len(profiled) == 1


def test_cli_float_where_faster_flag(tmp_path, monkeypatch, capsys):
    """--no-float-where-faster writes the all-INT8 model (exit 1 at x1.5); by default the faster model is written
    and the summary says which layers float where faster kept in float."""
    model, calib = conv_chain(), data((1, 8, 16, 16))
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", np.concatenate([b["x"] for b in calib]))
    monkeypatch.setattr(speed, "runtime_costs", _profile({"conv0": -0.2}, []))
    monkeypatch.setattr(speed, "paired_latency", _timings((3.0, 2.4)))
    monkeypatch.setattr(report, "paired_latency", _timings((2.0, 3.0)))
    args = ["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib")]
    assert main(args + ["-o", str(tmp_path / "off"), "--no-float-where-faster"]) == EXIT_CHECK_FAILED
    assert "float where faster" not in capsys.readouterr().out
    monkeypatch.setattr(report, "paired_latency", _timings((2.0, 3.0), (2.0, 1.8)))
    assert main(args + ["-o", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    assert "float where faster (the all-INT8 model ran x1.50 FP32's time): conv0 kept in float" in out, out
