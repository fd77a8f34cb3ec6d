"""Stream rotation of the float model (:mod:`converter.quant.rotation`), ``--rotate``."""

from __future__ import annotations

from typing import Any

from ..quant.rotation import rotate_streams
from .base import FLOAT_STAGE, Technique
from .state import FlowState

SAMPLES = 32  # calibration samples the layers' input moments are measured on (channels x channels each)


def run(state: FlowState) -> dict[str, Any]:
    config = state.config
    result = rotate_streams(state.model, state.data(SAMPLES), state.providers, config.weight_bits,
                            per_channel=config.per_channel, method=config.weight_calib,
                            symmetric=config.weight_symmetric, candidates=config.rotation_candidates,
                            idx=state.idx)  # values rewritten in place: the index stays valid
    if not any(s.rotated for s in result.streams):
        return {}
    stats = state.provided.get("bn_stats")
    if stats:  # per-channel BatchNorm statistics of a turned tensor no longer describe its channels
        for s in result.streams:
            if s.rotated:
                for t in s.tensors:
                    stats.pop(t, None)
    state.passes["rotation"] = sum(s.rotated for s in result.streams)
    return result.to_dict()


TECHNIQUE = Technique(
    "rotation", FLOAT_STAGE, run, enabled=lambda c: bool(c.rotation), samples=SAMPLES,
    data_why="it weighs each weight's rounding error by its layer's input channels", flag="--rotate / rotation: true",
    changes_float_model=True, keeps_float_outputs=True, needs=("bn_stats",), provides=("bn_stats",),
    config_fields=("rotation", "rotation_candidates"),
    summary="turns each linear residual stream by an orthogonal matrix (FP32 unchanged) for the weights' rounding")
