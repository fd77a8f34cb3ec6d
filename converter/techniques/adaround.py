"""AdaRound of the planned layers' weights (:mod:`converter.quant.adaround`)."""

from __future__ import annotations

import time
from typing import Any

from ..quant.adaround import adaround
from ..quant.bias_correction import corrected_layers
from .base import ENCODED_STAGE, Technique
from .state import FlowState

SAMPLES = 128  # calibration samples AdaRound caches layer inputs from (subsampled rows, see the module)


def _centered_layers(state: FlowState) -> frozenset[str]:
    """The layers whose mean error a later technique removes (bias correction's promise): compared centered."""
    if not state.centered:
        return frozenset()

    return frozenset(n.name for n in corrected_layers(state.model, state.plan, state.idx))


def run(state: FlowState) -> dict[str, Any]:
    config = state.config
    t = time.perf_counter()
    float_weights = state.provided.setdefault("float_weights", {})
    layers = adaround(state.model, state.plan, state.idx, state.data(SAMPLES), state.providers,
                      config.adaround_iterations, threads=config.threads, float_weights=float_weights,
                      search=config.adaround_search, center=_centered_layers(state), device=config.device)
    for w in float_weights:  # their values are grid values now: the encodings they were rounded onto stay
        if w in state.plan.encodings:
            state.frozen.setdefault(w, state.plan.encodings[w])
    state.reencode()  # biases of the new weights
    return {"samples": SAMPLES, "iterations": config.adaround_iterations, "search": config.adaround_search,
            "seconds": round(time.perf_counter() - t, 3), "layers": [r.to_dict() for r in layers]}


TECHNIQUE = Technique(
    "adaround", ENCODED_STAGE, run, enabled=lambda c: bool(c.adaround), samples=SAMPLES,
    data_why="it optimizes each layer's weight rounding on the layer's inputs", flag="--adaround / adaround: true",
    changes_float_model=True, searchable=True, provides=("float_weights", "frozen_weights"),
    needs=("mean_error_removed",), config_fields=("adaround", "adaround_iterations", "adaround_search", "device"),
    summary="learns each weight's rounding (up or down) against the layer's float output")
