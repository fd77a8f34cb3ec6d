"""GPTQ of the planned MatMul/Gemm weights (:mod:`converter.quant.gptq`), ``--weight-algo gptq``."""

from __future__ import annotations

import time
from typing import Any

from .base import ENCODED_STAGE, Technique
from .state import FlowState

SAMPLES = 512  # calibration samples the layers' input Hessians are accumulated from (streamed, batch by batch); a
# layer needs many more rows (samples x tokens) than input features, or GPTQ fits the calibration data alone


def run(state: FlowState) -> dict[str, Any]:
    from ..quant.gptq import gptq

    t = time.perf_counter()
    layers = gptq(state.model, state.plan, state.idx, state.data(SAMPLES), state.providers,
                  state.config.weight_calib, float_weights=state.provided.setdefault("float_weights", {}),
                  frozen=state.frozen)
    if not layers:
        return {}
    state.reencode()  # the biases beside the new grids; the grids themselves are frozen
    return {"samples": SAMPLES, "seconds": round(time.perf_counter() - t, 3), "layers": [r.to_dict() for r in layers]}


TECHNIQUE = Technique(
    "gptq", ENCODED_STAGE, run, enabled=lambda c: c.weight_algo == "gptq", samples=SAMPLES,
    data_why="it rounds each MatMul/Gemm weight against its layer's input statistics", flag="--weight-algo gptq",
    changes_float_model=True, searchable=True, provides=("float_weights", "frozen_weights"),
    config_fields=("weight_algo",), switch=(("weight_algo", "gptq"),),
    summary="rounds MatMul/Gemm weights column by column, each error spread over the columns left (GPTQ)")
