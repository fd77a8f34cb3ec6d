"""Bias correction of the planned layers (:mod:`converter.quant.bias_correction`): analytical from BatchNorm
statistics (``analytical``, and ``auto`` where they reach), empirical on calibration data (``empirical``, and
``auto`` elsewhere), encodings recomputed."""

from __future__ import annotations

import logging
from typing import Any

from ..quant.bias_correction import correct_analytically, correct_biases
from .base import ENCODED_STAGE, Technique
from .state import FlowState

log = logging.getLogger("converter")

SAMPLES = 64  # calibration samples bias correction measures the mean outputs on (empirical, auto)


def run(state: FlowState) -> dict[str, Any]:
    mode = state.config.bias_correction_mode
    float_weights = state.provided.get("float_weights")
    layers = []
    if mode in ("analytical", "auto"):
        layers = correct_analytically(state.model, state.plan, state.idx, state.provided.get("bn_stats") or {},
                                      state.reencode, float_weights)
        if not layers:
            log.log(logging.WARNING if mode == "analytical" else logging.DEBUG,
                    "analytical bias correction: no quantized layer reads a BatchNorm's output (through Relu/Clip) "
                    "whose statistics are known (the exporter folded them?)%s",
                    "; use --bias-correction-mode empirical|auto" if mode == "analytical" else "")
    samples = 0
    if mode in ("empirical", "auto"):
        samples = SAMPLES
        layers += correct_biases(state.model, state.plan, state.idx, state.reencode, state.data(SAMPLES),
                                 state.providers, skip={c.node for c in layers}, float_weights=float_weights)
    return {"mode": mode, "samples": samples, "layers": [c.to_dict() for c in layers]}


TECHNIQUE = Technique(
    "bias_correction", ENCODED_STAGE, run, enabled=lambda c: bool(c.bias_correction), samples=SAMPLES,
    data_why="it measures each layer's mean output shift on calibration data",
    flag="--bias-correction / bias_correction: true", changes_float_model=True, searchable=True,
    promises=("mean_error_removed",), needs=("bn_stats", "float_weights"),
    config_fields=("bias_correction", "bias_correction_mode"),
    summary="shifts each quantized Conv/Gemm bias so its mean output matches the float model's")
