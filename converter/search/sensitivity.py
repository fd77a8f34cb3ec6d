"""Per-layer sensitivity to quantization.

Single-op (Huawei AMCT's accuracy-based auto calibration): run the float model once on a few
samples and keep every layer's float inputs. Then, for each layer alone, compare its float output
with the output of the same layer quantized the way the plan says (its input activations, weights,
bias and output through their Q/DQ), both fed the *same float inputs*. No error propagates from
earlier layers, so the score says how much quantizing this layer costs, and no full-model evaluation
is needed per layer. Scores: cosine similarity (ranking key), SQNR in dB, MSE.

Propagated (the default): quantize only that layer, run the *whole* model on the same few samples
and compare the model's outputs with the float outputs (worst output's cosine). A layer inside an
If/Loop/Scan body is scored the same way (its Q/DQ rendered inside the body). The layer's error
goes through everything after it, so a layer whose local error looks small but which later layers
amplify (MiniLM's first FFN output, whose outlier channels set a range that wipes out the others
before a LayerNorm) ranks where it belongs. One render and one short run per layer, no full
evaluation.

Subset (NNCF 3.4's accuracy-aware ranking): the user's metric, on the evaluation items the fully
quantized model changed most, with only that layer kept in float: the layers whose float copy recovers
most come first. One render and one run on a few hundred items per layer, and an argmax metric ranks
by what it measures (a layer that flips the decisive items) rather than by output cosine.

End-to-end (AIMET's per-layer analysis): quantize only that layer and evaluate the whole model with
the user's metric. N full evaluations: for when the user can afford it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx
from ..progress import tqdm

from ..calib.runner import make_session
from ..graph.index import GraphIndex
from ..metrics import TensorStats
from ..quant.control_flow import render_control_flow
from ..quant.layers import Layer, layer_model
from ..quant.plan import QuantPlan
from ..quant.qdq import render_qdq

log = logging.getLogger("converter")


@dataclass
class LayerScore:
    name: str
    op_type: str  # the layer's ops, "+"-joined (Conv+Relu, a GELU block Div+Erf+Add+Mul+Mul)
    cosine: float
    sqnr_db: float
    mse: float
    nodes: tuple[str, ...] = ()
    metric: float | None = None  # end-to-end: the model metric with only this layer quantized
    subgraph: str = ""  # the If/Loop/Scan body the layer is in (its path); "" = the main graph
    recovery: float | None = None  # subset ranking: the metric gained on the subset with only this layer in float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        return d


def compare(ref: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """(cosine, SQNR dB, MSE) of ``test`` against ``ref``, every value as one vector (:mod:`converter.metrics`)."""
    s = TensorStats()
    s.update(ref, test)
    return s.cosine, s.sqnr_db, s.mse


def single_op_sensitivity(model: onnx.ModelProto, idx: GraphIndex, plan: QuantPlan, layers: list[Layer],
                          captured: list[dict[str, np.ndarray]], providers: list[str]) -> list[LayerScore]:
    """Score every layer alone on the captured float inputs; worst (lowest cosine) first. Main-graph layers
    only: the values inside If/Loop/Scan bodies cannot be captured (the search scores body layers propagated)."""
    scores = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=None, leave=False):
        sub = layer_model(model, idx, layer)
        tensors = set(layer.inputs) | set(layer.constants) | {layer.output}
        encodings = {t: e for t, e in plan.encodings.items() if t in tensors}
        fsess = make_session(sub, providers, optimize=False)
        qsess = make_session(render_qdq(sub, encodings), providers, optimize=False)
        acts = [i.name for i in sub.graph.input]
        refs, tests = [], []
        for values in captured:
            feed = {t: values[t] for t in acts}
            refs.append(fsess.run(None, feed)[0].ravel())
            tests.append(qsess.run(None, feed)[0].ravel())
        cos, sqnr, mse = compare(np.concatenate(refs), np.concatenate(tests))
        scores.append(LayerScore(layer.name, layer.label, cos, sqnr, mse, layer.nodes, subgraph=layer.scope))
    return rank(scores)


def propagated_sensitivity(model: onnx.ModelProto, plan: QuantPlan, layers: list[Layer],
                           batches: list[dict[str, np.ndarray]], providers: list[str],
                           outputs: list[str] | None = None,
                           quantizers: dict[str, list[str]] | None = None) -> list[LayerScore]:
    """Score every layer by the model outputs with only that layer quantized; worst (lowest cosine) first.

    ``outputs``: the graph outputs compared (default: every float output); a layer's score is its
    worst output's cosine (SQNR and MSE of that output beside it). ``quantizers``: per layer, the
    encodings quantized for it (default: ``layer.quantizers``); the search passes the ones keeping the
    layer in float would remove (:func:`~converter.quant.layers.owned_quantizers`).
    """
    fsess = make_session(model, providers)
    names = outputs or [o.name for o in fsess.get_outputs() if o.type == "tensor(float)"] or \
        [fsess.get_outputs()[0].name]
    refs = [fsess.run(names, b) for b in batches]
    scores = []
    for layer in tqdm(layers, desc="sensitivity (propagated)", unit="layer", disable=None, leave=False):
        which = quantizers.get(layer.name, []) if quantizers is not None else layer.quantizers
        encodings = {t: plan.encodings[t] for t in which if t in plan.encodings}
        # basic optimizations: no QDQ fusion; a layer inside an If/Loop/Scan body gets its Q/DQ there
        qsess = make_session(render_control_flow(model, encodings), providers)
        tests = [qsess.run(names, b) for b in batches]
        worst = None
        for k in range(len(names)):
            r = np.concatenate([ref[k].ravel() for ref in refs])
            t = np.concatenate([test[k].ravel() for test in tests])
            m = compare(r, t)
            worst = m if worst is None or (m[0], m[1]) < (worst[0], worst[1]) else worst
        scores.append(LayerScore(layer.name, layer.label, *worst, layer.nodes, subgraph=layer.scope))
    return rank(scores)


def rank(scores: list[LayerScore]) -> list[LayerScore]:
    """Worst first: lowest cosine, then lowest SQNR; name breaks ties deterministically."""
    return sorted(scores, key=lambda s: (s.cosine, s.sqnr_db, s.name))


def end_to_end_sensitivity(layers: list[Layer], evaluate_only: Callable[[Layer], float]) -> list[LayerScore]:
    """Model metric with only one layer quantized at a time (higher is better); worst first."""
    scores = []
    for layer in tqdm(layers, desc="end-to-end sensitivity", unit="layer", disable=None, leave=False):
        m = evaluate_only(layer)
        scores.append(LayerScore(layer.name, layer.label, math.nan, math.nan, math.nan, layer.nodes, metric=m,
                                  subgraph=layer.scope))
    return sorted(scores, key=lambda s: (s.metric, s.name))


def subset_sensitivity(layers: list[Layer], evaluate_float: Callable[[Layer], tuple[float, float]],
                       all_quantized: tuple[float, float]) -> list[LayerScore]:
    """NNCF's ranking: the user's metric on the evaluation items the fully quantized model changed most, with
    only one layer at a time kept in float (``evaluate_float(layer) -> (metric, mean item cosine)`` on that
    subset). Most recovered first; ties (an argmax metric moves in steps of one item) by the higher output
    cosine, then the name. ``all_quantized``: the same pair for the fully quantized model."""
    scores = []
    for layer in tqdm(layers, desc="sensitivity (subset)", unit="layer", disable=None, leave=False):
        m, cos = evaluate_float(layer)
        scores.append(LayerScore(layer.name, layer.label, cos, math.nan, math.nan, layer.nodes, metric=m,
                                 subgraph=layer.scope, recovery=m - all_quantized[0]))
    return sorted(scores, key=lambda s: (-s.metric, -s.cosine, s.name))


def spearman(a: list[str], b: list[str]) -> float:
    """Spearman rank correlation of two orderings of the same names."""
    pos_b = {n: i for i, n in enumerate(b)}
    common = [n for n in a if n in pos_b]
    n = len(common)
    if n < 2:
        return math.nan
    ra = {name: i for i, name in enumerate(common)}
    rb_sorted = sorted(common, key=lambda x: pos_b[x])
    rb = {name: i for i, name in enumerate(rb_sorted)}
    d2 = sum((ra[x] - rb[x]) ** 2 for x in common)
    return 1 - 6 * d2 / (n * (n * n - 1))
