"""HQQ of the planned MatMul/Gemm weights (:mod:`converter.quant.hqq`), ``--weight-algo hqq``: no data."""

from __future__ import annotations

import time
from typing import Any

from .base import ENCODED_STAGE, Technique
from .state import FlowState


def run(state: FlowState) -> dict[str, Any]:
    from ..quant.hqq import hqq

    t = time.perf_counter()
    layers = hqq(state.model, state.plan, state.idx, float_weights=state.provided.setdefault("float_weights", {}),
                 frozen=state.frozen)
    if not layers:
        return {}
    state.reencode()  # the biases beside the new grids; the grids themselves are frozen
    return {"seconds": round(time.perf_counter() - t, 3), "layers": [r.to_dict() for r in layers]}


TECHNIQUE = Technique(
    "hqq", ENCODED_STAGE, run, enabled=lambda c: c.weight_algo == "hqq",
    changes_float_model=True, searchable=True, provides=("float_weights", "frozen_weights"),
    config_fields=("weight_algo",), switch=(("weight_algo", "hqq"),),
    summary="fits each MatMul/Gemm weight block's scale and zero point under an l_p error (HQQ), no data")
