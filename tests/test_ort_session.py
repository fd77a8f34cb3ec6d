"""The ONNX Runtime session helper: 16-bit QDQ MatMuls under full optimization, and the guard."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from converter import QuantConfig, quantize
from converter.ort_session import SESSION_CONFIG, compare_outputs, create_session, session_options
from converter.search import BuiltinEvaluator
from converter.verify import format_report, verify

from .test_search import data, sensitive_model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def a16_model(tmp_path_factory):
    """The four-MatMul model at 16-bit activations / int8 per-channel weights (opset 21)."""
    model = sensitive_model()
    res = quantize(model, data(1), QuantConfig(target="qnn", activation_bits=16),
                   output_dir=tmp_path_factory.mktemp("a16"))
    assert any(i.data_type == 4 for i in res.model.graph.initializer)  # uint16 zero points
    return model, res.model


def test_16bit_matmul_model_same_with_all_optimizations(a16_model):
    """ORT 1.32 rewrites DQ(W) + MatMul into MatMulNBits(accuracy_level=4), int8 compute: cosine vs FP32
    0.38 instead of 0.999. With the helper's session options every level gives the unoptimized result."""
    float_model, qdq = a16_model
    x = data(2)[0]
    ref = create_session(float_model, optimization="off").run(None, x)[0]
    outs = {level: create_session(qdq, optimization=level).run(None, x)[0] for level in ("off", "basic", "all")}
    assert _cosine(outs["off"], ref) > 0.99
    for level in ("basic", "all"):
        assert compare_outputs(["y"], [outs[level]], [outs["off"]]).agree, level
        assert _cosine(outs[level], ref) == pytest.approx(_cosine(outs["off"], ref), abs=1e-4), level


def test_session_config_is_applied():
    so = session_options("all")
    assert all(so.get_session_config_entry(k) == v for k, v in SESSION_CONFIG.items())
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_compare_outputs():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, (4, 10)).astype(np.float32)
    same = compare_outputs(["y"], [y], [y])
    assert same.agree and same.cosine == pytest.approx(1.0) and same.relative_error == 0.0
    assert compare_outputs(["y"], [y + 1e-4], [y]).agree  # rounding differences of fused kernels
    bad = compare_outputs(["i", "y", "z"], [np.arange(3), -y, np.zeros(3, np.float32)],
                          [np.arange(3) + 1, y, np.zeros(3, np.float32)])
    assert not bad.agree and bad.output == "y" and bad.cosine == pytest.approx(-1.0)  # integer outputs skipped
    spike = y.copy()
    spike[0, 0] += 5 * np.abs(y).max()  # one wrong value: cosine may pass, the relative max error does not
    assert not compare_outputs(["y"], [spike], [y]).agree


class _Perturbed:
    """An optimized session whose outputs are wrong, as a broken graph rewrite would make them."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds, *args):
        return [o * np.float32(-1) + np.float32(0.5) for o in self.session.run(names, feeds, *args)]

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_evaluator_warns_once_when_optimizations_change_the_result(monkeypatch, caplog):
    import converter.search.evaluate as evaluate

    model = sensitive_model()
    caplog.set_level(logging.WARNING, logger="converter")
    ev = BuiltinEvaluator("cosine", model, data(2))
    assert ev.optimization_check is None and not caplog.records  # a sound ORT: no warning

    real = evaluate.make_session
    monkeypatch.setattr(evaluate, "make_session", lambda proto, providers, threads=0, **kw:
                        _Perturbed(real(proto, providers, threads, **kw)) if kw.get("full_optimization")
                        else real(proto, providers, threads, **kw))
    ev = BuiltinEvaluator("cosine", model, data(2))
    ev(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"ONNX Runtime {ort.__version__}" in warnings[0] and "graph optimizations change the result" in warnings[0]
    assert "the float model" in warnings[0] and "README" in warnings[0]
    assert ev.optimization_check is not None and not ev.optimization_check.agree


def test_verify_records_and_reports_a_disagreement(monkeypatch, caplog, a16_model):
    import converter.verify as verify_module

    float_model, qdq = a16_model
    result = verify(float_model, qdq, data(3, n=2), providers="cpu")
    assert all(g["agree"] for g in result.metrics["graph_optimizations"].values())
    assert "WARNING" not in format_report(result)

    real = verify_module.create_session
    monkeypatch.setattr(verify_module, "create_session", lambda *a, **kw: _Perturbed(real(*a, **kw)))
    caplog.set_level(logging.WARNING, logger="converter")
    result = verify(float_model, qdq, data(3, n=2), providers="cpu")
    checks = result.metrics["graph_optimizations"]
    assert not checks["quant"]["agree"] and checks["quant"]["onnxruntime"] == ort.__version__
    assert checks["quant"]["cosine"] < 0.999 and checks["quant"]["output"] == "y"
    assert "graph optimizations change the quantized model's output 'y'" in format_report(result)
    assert any("graph optimizations change the result" in r.getMessage() for r in caplog.records)
