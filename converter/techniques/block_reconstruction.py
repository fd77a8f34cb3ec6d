"""Block-wise reconstruction (BRECQ with QDrop): the layers of each block learn their rounding together against the
block's float output, inputs from the quantized prefix (:mod:`converter.quant.reconstruction`); with ``adaquant``
on too, their weights and scales instead."""

from __future__ import annotations

from typing import Any

from .adaquant import run_reconstruction
from .base import ENCODED_STAGE, Technique
from .state import FlowState

SAMPLES = 128  # calibration samples the block inputs are cached from (whole samples, bounded: see the module)


def run(state: FlowState) -> dict[str, Any]:
    return run_reconstruction(state, blocks=True, adaquant=bool(state.config.adaquant), samples=SAMPLES)


TECHNIQUE = Technique(
    "block_reconstruction", ENCODED_STAGE, run, enabled=lambda c: bool(c.block_reconstruction), samples=SAMPLES,
    data_why="it learns each block's weight rounding on the block's inputs",
    flag="--block-reconstruction / block_reconstruction: true", changes_float_model=True, searchable=True,
    provides=("float_weights", "frozen_weights"),
    config_fields=("block_reconstruction", "adaquant", "reconstruction_iterations", "reconstruction_qdrop", "device"),
    summary="learns the weight rounding of each block (e.g. an inverted-residual block) against its float output "
            "(QDrop optional)")
