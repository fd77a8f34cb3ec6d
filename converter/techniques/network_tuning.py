"""Network tuning: every quantized layer's per-channel weight scale and bias learned end to end against the float
model's outputs (:mod:`converter.quant.network_tuning`), after the layer-wise techniques and bias correction."""

from __future__ import annotations

from typing import Any

from .base import ENCODED_STAGE, Technique
from .state import FlowState
from ..quant.network_tuning import SAMPLES, tune_network


def run(state: FlowState) -> dict[str, Any]:
    config = state.config
    result = tune_network(state.model, state.plan, state.idx, state.data(SAMPLES), state.originals(),
                          epochs=config.network_tuning_epochs, mixup=config.network_tuning_mixup,
                          threads=config.threads, device=config.device,
                          float_weights=state.provided.setdefault("float_weights", {}), frozen=state.frozen)
    if result is None or not result.kept:
        return {}
    state.reencode()  # the biases' encodings follow the new weight scales
    return result.to_dict()


TECHNIQUE = Technique(
    "network_tuning", ENCODED_STAGE, run, enabled=lambda c: bool(c.network_tuning), samples=SAMPLES,
    data_why="it fits the quantized model's outputs to the float model's on calibration samples",
    flag="--network-tuning / network_tuning: true", changes_float_model=True,
    provides=("float_weights", "frozen_weights"),
    config_fields=("network_tuning", "network_tuning_epochs", "network_tuning_mixup", "threads", "device"),
    summary="learns every quantized layer's per-channel weight scale and bias against the float model's outputs")
