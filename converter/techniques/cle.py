"""Cross-layer equalization + high-bias absorption of the float model (:mod:`converter.quant.cle`)."""

from __future__ import annotations

from typing import Any

from ..quant.bias_correction import equalized_statistics
from ..quant.cle import equalize
from .base import FLOAT_STAGE, Technique
from .state import FlowState

SAMPLES = 32  # calibration samples high-bias absorption reads


def run(state: FlowState) -> dict[str, Any]:
    result = equalize(state.model, state.data(SAMPLES), state.providers, state.config.cle_relu6)
    state.edited()
    stats = state.provided.get("bn_stats")
    if stats:  # analytical bias correction reads the BatchNorm statistics of the equalized channels
        for p in result.pairs:
            first = state.model.graph.node[state.idx.order[p.first]]
            equalized_statistics(stats, first.output[0], p.scale, p.shift)
    state.passes["cle_pairs"] = len(result.pairs)
    return result.to_dict()


TECHNIQUE = Technique(
    "cle", FLOAT_STAGE, run, enabled=lambda c: bool(c.cle), samples=SAMPLES,
    data_why="high-bias absorption reads the layers' outputs", flag="--cle / cle: true",
    changes_float_model=True, keeps_float_outputs=True, needs=("bn_stats",), provides=("bn_stats",),
    config_fields=("cle", "cle_relu6"),
    summary="scales Conv->Conv/depthwise chains so each channel uses the per-tensor range alike")
