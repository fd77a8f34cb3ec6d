"""AdaQuant of the planned layers, one at a time: weight, bias and scale learned against the layer's float output
(:mod:`converter.quant.reconstruction`). With ``block_reconstruction`` on too, the block technique learns AdaQuant's
parameters block by block instead, and this one does not run."""

from __future__ import annotations

import time
from typing import Any

from .base import ENCODED_STAGE, Technique
from .state import FlowState

SAMPLES = 128  # calibration samples the layer inputs are cached from (whole samples, bounded: see the module)


def run_reconstruction(state: FlowState, blocks: bool, adaquant: bool, samples: int) -> dict[str, Any]:
    """The shared run of this technique and :mod:`.block_reconstruction`."""
    from ..quant.reconstruction import reconstruct

    config = state.config
    t = time.perf_counter()
    float_weights = state.provided.setdefault("float_weights", {})
    units = reconstruct(state.model, state.plan, state.idx, state.data(samples), state.providers, blocks=blocks,
                        adaquant=adaquant, iterations=config.reconstruction_iterations,
                        qdrop=config.reconstruction_qdrop, threads=config.threads, device=config.device,
                        float_weights=float_weights, frozen=state.frozen)
    if not units:
        return {}
    state.reencode()  # biases of the new weights
    return {"samples": samples, "iterations": config.reconstruction_iterations, "adaquant": adaquant,
            "blocks": blocks, "qdrop": config.reconstruction_qdrop, "seconds": round(time.perf_counter() - t, 3),
            "units": [u.to_dict() for u in units]}


def run(state: FlowState) -> dict[str, Any]:
    return run_reconstruction(state, blocks=False, adaquant=True, samples=SAMPLES)


TECHNIQUE = Technique(
    "adaquant", ENCODED_STAGE, run, enabled=lambda c: bool(c.adaquant) and not c.block_reconstruction,
    samples=SAMPLES, data_why="it learns each layer's weights, bias and scale on the layer's inputs",
    flag="--adaquant / adaquant: true", changes_float_model=True, searchable=True,
    provides=("float_weights", "frozen_weights"),
    config_fields=("adaquant", "reconstruction_iterations", "reconstruction_qdrop", "device"),
    summary="learns each layer's weights, bias and per-channel scale against its float output (AdaQuant)")
