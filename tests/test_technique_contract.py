"""The technique contract (converter/techniques): every registered technique keeps what it declares, and a new
technique is one module + one registry row (a toy one registered here at test time)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.errors import ConfigError
from converter.techniques import (ENCODED_STAGE, FLOAT_STAGE, FLOW_PROVIDES, REGISTRY, Technique, TechniqueError, get,
                                  register, unregister)

from .conftest import parse

ALL_OFF = QuantConfig(cle=False, smoothquant=False, bias_correction=False, fast_bias_correction=False, adaround=False,
                      adaround_iterations=20)
NAMES = [t.name for t in REGISTRY]


def _conv_model() -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> Relu -> 1x1 Conv -> 1x1 Conv -> Relu -> MatMul: CLE finds the Conv pairs
    (unequal channel ranges), bias correction and AdaRound the Convs (fast bias correction the depthwise one),
    rotation the stream between the two 1x1 Convs (a weight outlier per row), SmoothQuant the MatMul's input (one
    outlier channel)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w1 *= np.geomspace(0.05, 5.0, 8, dtype=np.float32)[:, None, None, None]  # channel ranges 100x apart
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,8,8] x) => (float[N,8] y) {
      h1 = Conv <pads: ints = [1, 1, 1, 1]> (x, W1, B1)
      r1 = Relu(h1)
      h2 = Conv <pads: ints = [1, 1, 1, 1], group: int = 8> (r1, W2, B2)
      r2 = Relu(h2)
      s1 = Conv (r2, W4)
      h3 = Conv (s1, W5)
      r3 = Relu(h3)
      p = GlobalAveragePool(r3)
      f = Flatten(p)
      m = Mul(f, S)
      y = MatMul(m, W3)
    }""", W1=w1, B1=rng.normal(0, 0.1, 8).astype(np.float32),
        W2=rng.laplace(0, 0.3, (8, 1, 3, 3)).astype(np.float32), B2=rng.normal(0, 0.1, 8).astype(np.float32),
        S=np.array([40.0] + [1.0] * 7, np.float32).reshape(1, 8), W3=rng.normal(0, 0.3, (8, 8)).astype(np.float32),
        W4=(rng.normal(0, 0.3, (8, 8)) + 3.0 * np.eye(8)[rng.permutation(8)]).astype(np.float32).reshape(8, 8, 1, 1),
        W5=rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32))


def _calib(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto | str, feed) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]




def _only(name: str, **extra) -> QuantConfig:
    return ALL_OFF.replace(**{**get(name).on(), **extra})


@pytest.mark.parametrize("name", NAMES)
def test_declaration_is_consistent(name):
    t = next(t for t in REGISTRY if t.name == name)
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    assert t.stage in (FLOAT_STAGE, ENCODED_STAGE) and set(t.config_fields) <= fields
    assert t.enabled(_only(name)) and not t.enabled(ALL_OFF)
    known = set(FLOW_PROVIDES) | {p for o in REGISTRY for p in o.provides + o.promises}
    assert set(t.needs) <= known, f"{name} needs what nothing provides"
    json.dumps(t.contract())


@pytest.mark.parametrize("name", NAMES)
def test_technique_keeps_its_contract(name, tmp_path):
    """On: its report entry is JSON; where it promises the FP32 outputs are kept, the float model it writes gives
    them; the float model is written exactly when it declares it changes it. Off: the outputs are byte-identical to
    a flow where the technique is not registered at all (nothing it declares leaks when it is off)."""
    t = next(t for t in REGISTRY if t.name == name)
    model, calib, x = _conv_model(), _calib(), _calib(1, 7)[0]
    res = quantize(model, calib, _only(name), tmp_path / "on", "m")
    entry = res.report.get(name)
    assert entry, f"{name} changed nothing on a model built for it"
    assert json.loads(json.dumps(entry)) == entry
    float_path = res.report["outputs"].get("float_model")
    assert bool(float_path) == t.changes_float_model
    if t.keeps_float_outputs:
        np.testing.assert_allclose(_run(float_path, x), _run(model, x), rtol=1e-4, atol=1e-4)

    off = quantize(model, calib, ALL_OFF, tmp_path / "off", "m")
    unregister(name)
    try:
        absent = quantize(model, calib, ALL_OFF, tmp_path / "absent", "m")
    finally:
        REGISTRY.insert(NAMES.index(name), t)
    assert off.model_path.read_bytes() == absent.model_path.read_bytes()
    assert off.encodings_path.read_bytes() == absent.encodings_path.read_bytes()
    assert "float_model" not in off.report["outputs"]


@pytest.mark.parametrize("name", [t.name for t in REGISTRY if t.samples])
def test_missing_calibration_data_is_one_error_naming_the_technique(name, tmp_path):
    with pytest.raises(ConfigError) as exc:
        quantize(_conv_model(), None, _only(name), tmp_path, "m")
    assert exc.value.message.startswith(f"{name} needs calibration data") and "--calib" in exc.value.fix
    assert not any(tmp_path.iterdir())  # nothing written


def test_flow_leaves_the_float_model_untouched_with_every_technique_off(tmp_path):
    from converter.pipeline import prepare, run_flow

    state = prepare(_conv_model())
    before = state.model.SerializeToString()
    run_flow(state, _calib(), ALL_OFF)
    assert state.model.SerializeToString() == before and state.entries == {} and state.ran == []


# --- adding a technique: one module (here: these functions) + one registry row ---------------------------------

def _halve_biases(state):
    """A toy encoded-stage technique: halves every planned bias, encodings recomputed."""
    changed = []
    for t in state.plan.tensors.values():
        if t.role == "bias":
            init = state.idx.initializers[t.name]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / 2, t.name))
            changed.append(t.name)
    state.reencode()
    return {"biases": changed, "after": list(state.ran)}


TOY = Technique("toy_halve_bias", ENCODED_STAGE, _halve_biases, enabled=lambda c: True, samples=0,
                changes_float_model=True, searchable=True, needs=("float_weights",))


@pytest.fixture
def toy():
    register(TOY, before="bias_correction")
    yield TOY
    unregister(TOY.name)


def test_a_technique_registered_at_test_time_runs_in_quantize(toy, tmp_path):
    model = _conv_model()
    res = quantize(model, _calib(), ALL_OFF.replace(cle=True), tmp_path, "m")
    assert res.report[toy.name] == {"biases": ["B1", "B2"], "after": ["cle"]}
    assert res.report["outputs"]["float_model"]  # declared: it changes the float model, so it is written
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(res.report["outputs"]["float_model"]).graph.initializer}
    # CLE rescaled B1 (its float outputs kept); the toy halved what CLE left: the written value is half CLE's
    unregister(toy.name)
    cle_only = quantize(model, _calib(), ALL_OFF.replace(cle=True), tmp_path / "cle", "m")
    register(toy, before="bias_correction")
    ref = {i.name: numpy_helper.to_array(i) for i in onnx.load(cle_only.report["outputs"]["float_model"]).graph.initializer}
    np.testing.assert_allclose(written["B1"], ref["B1"] / 2, rtol=1e-6)
    np.testing.assert_allclose(written["B2"], ref["B2"] / 2, rtol=1e-6)


def test_an_error_inside_a_technique_names_it_and_what_ran_before(tmp_path):
    def broken(state):
        raise ValueError("shapes do not fit")

    register(Technique("toy_broken", ENCODED_STAGE, broken, enabled=lambda c: True))
    try:
        with pytest.raises(TechniqueError) as exc:
            quantize(_conv_model(), _calib(), ALL_OFF.replace(cle=True), tmp_path, "m")
    finally:
        unregister("toy_broken")
    msg = str(exc.value)
    assert "'toy_broken'" in msg and "shapes do not fit" in msg and "run before it: cle" in msg
    assert isinstance(exc.value.__cause__, ValueError)
    assert not any(tmp_path.iterdir())


# --- analyze is the same flow ------------------------------------------------------------------------------------

def test_analyze_plans_control_flow_bodies_and_runs_the_techniques(tmp_path):
    """analyze quantizes as quantize does: If/Loop bodies planned and encoded (they were left in float before),
    the encoded-stage techniques run (bias correction here), and its all-quantized render is quantize's model."""
    from converter.analysis import AnalysisConfig, analyze

    from .test_control_flow import _data, control_flow_model

    model = control_flow_model()
    calib = _data(24, 1, 1.5) + _data(24, 2, 0.3) + _data(24, 4, 0.42)
    config = QuantConfig(batch_size=8, bias_correction=True)
    res = analyze(model, calib, config, tmp_path / "a", analysis=AnalysisConfig(eval_samples=16, layer_samples=4,
                                                                                  steps=("sanity", "split")))
    bodies = {s["subgraph"]: s["quantized_nodes"] for s in res.report["calibration"]["subgraphs"]}
    assert bodies["branch/then_branch"] >= 4 and bodies["branch/else_branch"] >= 4 and bodies["loop/body"] >= 2
    assert "bias_correction" in res.report["calibration"]["techniques"]
    assert res.report["sanity"]["passed"]  # the FP32 rows read the float model, not the corrected biases
    q = quantize(model, calib, config, tmp_path / "q", "cf")
    x = _data(4, 9, 1.5)[0]
    from converter.analysis.analyzer import prepare as analyze_prepare

    prep = analyze_prepare(model, calib, config)
    np.testing.assert_array_equal(_run(prep.render(), x), _run(str(q.model_path), x))
