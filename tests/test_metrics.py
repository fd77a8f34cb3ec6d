"""converter.metrics: one definition per metric and one zero-vector convention, the same in every user
(verify's per-output stats, analyze's model metrics, the search's evaluator, the per-tensor stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from converter.analysis.metrics import MODEL_METRICS
from converter.metrics import (AGREEMENT, COSINE, SQNR, SQNR_FLOOR, TOP1, OutputStats, TensorStats, argmax_rows,
                               cosine, metric_name, mse, per_channel_sqnr, sample_agreement, sample_cosines,
                               sample_scores, sample_sqnr_db, sqnr_db)
from converter.search import BuiltinEvaluator

from .conftest import parse


def test_cosine_zero_vectors():
    """Both all-zero: 1 (identical); one all-zero: 0; otherwise the ordinary cosine. Whole-tensor, per sample,
    streamed (TensorStats) and per model output (OutputStats) agree on every row."""
    z, x = np.zeros(4), np.array([1.0, -2.0, 0.5, 3.0])
    assert cosine(z, z) == 1.0 and cosine(z, x) == 0.0 and cosine(x, z) == 0.0
    assert cosine(x, -x) == -1.0 and cosine(x, 2 * x) == 1.0
    ref = np.stack([z, z, x, x, x])
    out = np.stack([z, x, z, 3 * x, -x])
    per = sample_cosines(ref, out)
    assert per.tolist() == [1.0, 0.0, 0.0, 1.0, -1.0]
    assert per.tolist() == [cosine(r, o) for r, o in zip(ref, out)]
    st = OutputStats("y")
    st.update(ref.astype(np.float32), out.astype(np.float32), len(ref))
    assert st.cosine_mean == pytest.approx(np.mean(per)) and st.cosine_min == -1.0
    assert MODEL_METRICS[COSINE][0]([ref], [out], None).tolist() == per.tolist()


def test_cosine_never_exceeds_one():
    """Rounding can put dot / (|a| |b|) a hair above 1 for identical vectors: the cosine is clipped."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 37)) * rng.uniform(1e-3, 1e3, size=(200, 1))
    per = sample_cosines(rows, rows)
    assert per.max() <= 1.0 and per.min() > 1 - 1e-12
    assert all(cosine(r, r) <= 1.0 for r in rows)


def test_sqnr_identical_and_zero_reference():
    """Identical arrays (all-zero ones too): +inf dB, whole tensor and per channel; an all-zero reference with
    a non-zero candidate: -inf. The per-sample SQNR the search averages stays finite."""
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    assert sqnr_db(x, x) == math.inf and sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert per_channel_sqnr(x, x, 0).tolist() == [math.inf] * 3
    noisy = x + np.array([[0.0], [0.1], [0.0]])
    ch = per_channel_sqnr(noisy * 0 + x, noisy, 0)
    assert ch[0] == math.inf and ch[2] == math.inf and ch[1] == pytest.approx(10 * math.log10((x[1] ** 2).sum() / 0.04))
    per = sample_sqnr_db(x, x)
    assert np.isfinite(per).all()
    assert per.tolist() == pytest.approx((10 * np.log10((x**2).sum(1) / SQNR_FLOOR)).tolist())
    assert sample_sqnr_db(np.zeros((1, 4)), np.zeros((1, 4))).tolist() == [0.0]


def test_sqnr_and_mse_values():
    """10 log10(signal / noise) on a known error; MSE is the mean squared error, 0 for no values."""
    a = np.ones(100)
    b = a.copy()
    b[:4] += 0.5  # noise energy 1.0, signal 100
    assert sqnr_db(a, b) == pytest.approx(20.0) and mse(a, b) == pytest.approx(0.01)
    assert sample_sqnr_db(a[None], b[None]).tolist() == pytest.approx([20.0])
    assert TensorStats().mse == 0.0


def test_agreement_and_argmax_ties():
    """Arg-max ties take the first index on both sides: identical outputs always agree, a tie broken
    differently by the candidate does not."""
    ref = np.array([[1.0, 1.0, 0.0], [0.2, 0.9, 0.9], [3.0, 0.0, 0.0]])
    assert argmax_rows(ref).tolist() == [0, 1, 0]
    assert sample_agreement(ref, ref).tolist() == [1.0, 1.0, 1.0]
    out = np.array([[0.5, 1.0, 0.0], [0.2, 0.9, 0.9], [0.0, 0.0, 0.0]])  # row 3: all tied -> index 0, agrees
    assert sample_agreement(ref, out).tolist() == [0.0, 1.0, 1.0]
    assert MODEL_METRICS[AGREEMENT][0]([ref], [out], None).tolist() == [0.0, 1.0, 1.0]
    st = OutputStats("logits")
    st.update(ref.astype(np.float32), out.astype(np.float32), 3)
    assert st.agreement == pytest.approx(2 / 3)
    assert MODEL_METRICS[TOP1][0]([ref], [out], np.array([1, 1, 0])).tolist() == [1.0, 1.0, 1.0]


def test_names_and_dispatch():
    assert metric_name("agreement") == metric_name("top1_agreement") == AGREEMENT
    assert metric_name("sqnr_db") == SQNR and metric_name("cosine") == COSINE
    ref, out = np.eye(3), np.eye(3)[[0, 2, 1]]
    assert sample_scores("agreement", ref, out).tolist() == sample_scores(AGREEMENT, ref, out).tolist() == [1, 0, 0]
    assert sample_scores(TOP1, ref, out, np.array([0, 2, 1])).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown metric"):
        sample_scores("psnr", ref, out)


RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }
"""
RELU_TIMES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) { r = Relu(x)  y = Mul(r, k) }
"""


def test_search_evaluator_uses_the_convention(tmp_path):
    """The search's cosine on real ONNX Runtime runs: a sample whose float and candidate outputs are both all
    zero scores 1 (it used to score 0), one the candidate zeroes scores 0; the metric is the mean of
    sample_cosines, and ``agreement`` is the old spelling of top1-agreement."""
    x = np.array([[1.0, 2.0, -1.0, 0.5], [-1.0, -2.0, -3.0, -4.0], [0.5, 0.1, 0.2, 3.0], [-1.0, -1.0, -1.0, -1.0]],
                 np.float32)
    float_model = parse(RELU)
    scaled = parse(RELU_TIMES, k=np.array([2.0, 2.0, 2.0, 2.0], np.float32))
    zeroed = parse(RELU_TIMES, k=np.array([0.0, 0.0, 0.0, 0.0], np.float32))
    ev = BuiltinEvaluator("cosine", float_model, [{"x": x}])
    assert ev(scaled) == 1.0  # rows 2 and 4 are all zero in both
    ref = np.maximum(x, 0)
    assert ev(zeroed) == pytest.approx(float(np.mean(sample_cosines(ref, ref * 0)))) == pytest.approx(0.5)
    agree = BuiltinEvaluator("agreement", float_model, [{"x": x}])
    assert agree.metric == AGREEMENT and agree(scaled) == 1.0
