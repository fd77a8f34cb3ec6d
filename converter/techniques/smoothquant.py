"""SmoothQuant of the float model where it helps (:mod:`converter.quant.smoothquant`)."""

from __future__ import annotations

from typing import Any

from ..quant.smoothquant import smoothquant
from .base import FLOAT_STAGE, Technique
from .state import FlowState

SAMPLES = 32  # calibration samples SmoothQuant reads to pick its scales


def run(state: FlowState) -> list[dict[str, Any]]:
    config = state.config
    changes = smoothquant(state.model, state.data(SAMPLES), state.providers, config.smoothquant_alpha,
                          activation_bits=config.activation_bits, symmetric=config.preset.activation_symmetric,
                          per_channel=config.per_channel)
    if not changes:
        return []
    state.edited()
    state.passes["smoothquant"] = len(changes)
    # the inserted float Muls (where 1/s could not be folded) stay in float
    state.config = config.replace(exclude_nodes=tuple(config.exclude_nodes) + tuple(c.mul_node for c in changes
                                                                                     if c.mul_node))
    return [c.to_dict() for c in changes]


TECHNIQUE = Technique(
    "smoothquant", FLOAT_STAGE, run, enabled=lambda c: bool(c.smoothquant), samples=SAMPLES,
    data_why="it picks its scales from the activations' per-channel ranges", flag="--smoothquant / smoothquant: true",
    changes_float_model=True, keeps_float_outputs=True, config_fields=("smoothquant", "smoothquant_alpha"),
    summary="moves activation outliers of MatMul/Gemm inputs into the weights")
