"""The default's cheap bias correction: each quantized depthwise Conv's bias shifted by its mean output error,
measured once (:func:`converter.quant.bias_correction.correct_biases`, one round, not measured again).

The rule: depthwise Convs only (one input channel per group: a channel's 9 weights, or 25, cannot average their
rounding errors out, so the error is a mean shift of the channel; a regular Conv sums hundreds of errors), on
:data:`SAMPLES` calibration samples, one measurement of the QDQ model with a float twin beside each corrected layer.
Off where the full ``bias_correction`` runs (it corrects every layer, in rounds). Measured
(``tools/bias_correction_cost.py``): see :data:`SAMPLES`.
"""

from __future__ import annotations

from typing import Any

from ..quant.bias_correction import correct_biases
from ..quant.plan import is_depthwise
from .base import ENCODED_STAGE, Technique
from .state import FlowState

# Measured (tools/bias_correction_cost.py, 2 CPU cores under heavy load from other jobs, so seconds are upper bounds):
# EfficientNet-Lite0 100 calibration / 900 held-out: top-1 789 -> 798 (16 depthwise Convs corrected, 38 s; the same
# on every layer, LAYERS "all": 795, and on 32 samples 794; --bias-correction empirical: 797 in 389 s); ResNet-8
# 2,000 images and the digits CNN have no depthwise Conv: nothing runs, outputs unchanged (on every layer ResNet-8
# lost 1535 -> 1531, digits 581 -> 580: why the rule is depthwise only)
SAMPLES = 16
LAYERS = "depthwise"  # "all": every correctable layer (tools/bias_correction_cost.py compares)


def _selected(state: FlowState):
    if LAYERS == "all":
        return None
    return lambda n: n.op_type == "Conv" and is_depthwise(n, state.idx)


def run(state: FlowState) -> dict[str, Any]:
    layers = correct_biases(state.model, state.plan, state.idx, state.reencode, state.data(SAMPLES), state.providers,
                            rounds=1, float_weights=state.provided.get("float_weights"), measure_after=False,
                            select=_selected(state))
    return {"layers_rule": LAYERS, "samples": SAMPLES, "layers": [c.to_dict() for c in layers]} if layers else {}


TECHNIQUE = Technique(
    "fast_bias_correction", ENCODED_STAGE, run,
    enabled=lambda c: bool(c.fast_bias_correction) and not c.bias_correction, samples=SAMPLES,
    data_why="it measures each depthwise Conv's mean output shift on calibration data",
    flag="--no-fast-bias-correction / fast_bias_correction: false", changes_float_model=True, searchable=True,
    needs=("float_weights",), config_fields=("fast_bias_correction",),
    summary="the default's cheap bias correction: depthwise Convs, one measurement on 16 samples")
