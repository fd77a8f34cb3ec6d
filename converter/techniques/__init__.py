"""Post-training techniques as passes with a declared contract (:mod:`.base`), run by
:func:`converter.pipeline.run_flow` in :data:`REGISTRY` order (the float stage's, then the encoded stage's).

Adding a technique: one module with ``TECHNIQUE = Technique(...)`` and one row below (or :func:`register` at run
time, e.g. a test's toy technique).
"""

from __future__ import annotations

from typing import Any

from . import (adaquant, adaround, bias_correction, block_reconstruction, calib_choice, cle, fast_bias_correction, gptq,
               hqq, network_tuning, rotation, smoothquant)
from .base import ENCODED_STAGE, FLOAT_STAGE, FLOW_PROVIDES, Technique, TechniqueError, failed
from .state import FlowState, applied_params

REGISTRY: list[Technique] = [  # order = run order within a stage
    cle.TECHNIQUE,
    rotation.TECHNIQUE,  # after CLE: turns the streams of the equalized weights
    smoothquant.TECHNIQUE,
    calib_choice.TECHNIQUE,  # first of the encoded stage: the activation ranges the others build on
    gptq.TECHNIQUE,  # weight_algo: MatMul/Gemm weight grids, frozen before the rest sees them
    hqq.TECHNIQUE,
    adaround.TECHNIQUE,  # before bias correction: it measures the rounding AdaRound chose
    adaquant.TECHNIQUE,  # reconstruction beyond single layers; bias correction after it too
    block_reconstruction.TECHNIQUE,
    bias_correction.TECHNIQUE,
    fast_bias_correction.TECHNIQUE,  # the default's; off where bias_correction runs
    network_tuning.TECHNIQUE,  # last: fits what the layer-wise techniques left, at the model's outputs
]


def register(technique: Technique, before: str | None = None) -> None:
    """Add ``technique`` to the registry (before the one named ``before``, else last); names are unique."""
    if any(t.name == technique.name for t in REGISTRY):
        raise ValueError(f"a technique named {technique.name!r} is registered already")
    at = next((i for i, t in enumerate(REGISTRY) if t.name == before), len(REGISTRY)) if before else len(REGISTRY)
    REGISTRY.insert(at, technique)


def unregister(name: str) -> None:
    REGISTRY[:] = [t for t in REGISTRY if t.name != name]


def get(name: str) -> Technique:
    return next(t for t in REGISTRY if t.name == name)


def enabled(config: Any, stage: str | None = None, searchable_only: bool = False) -> list[Technique]:
    """The techniques ``config`` switches on, in run order (one stage's, or all)."""
    return [t for t in REGISTRY if t.enabled(config) and (stage is None or t.stage == stage)
            and (t.searchable or not searchable_only or t.stage == FLOAT_STAGE)]


def changes_float_model(entries: dict[str, Any]) -> list[str]:
    """The techniques with a report entry (they ran and changed something) that change the float model."""
    return [t.name for t in REGISTRY if t.changes_float_model and entries.get(t.name)]


__all__ = ["ENCODED_STAGE", "FLOAT_STAGE", "FLOW_PROVIDES", "FlowState", "REGISTRY", "Technique", "TechniqueError",
           "applied_params", "changes_float_model", "enabled", "failed", "get", "register", "unregister"]
