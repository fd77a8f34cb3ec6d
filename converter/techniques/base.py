"""The contract every post-training technique declares (:class:`Technique`), and the errors of running one.

A technique is a pass over the :class:`~converter.techniques.state.FlowState`. What it does is one function,
``run(state) -> report entry``; everything the flow needs to know about it is declared beside that function, so
the orchestrator (:func:`converter.pipeline.run_flow`) never names a technique:

* ``stage``: :data:`FLOAT_STAGE` rewrites the float model before planning (CLE, SmoothQuant); :data:`ENCODED_STAGE`
  adjusts weights or biases after the encodings exist (AdaRound, bias correction), with ``state.plan`` and
  ``state.calib`` set and ``state.reencode()`` to recompute the encodings from the edited values.
* ``samples``: calibration samples it reads (``state.data(technique)`` opens that many); 0 = no data. The flow
  keeps that many in memory for a one-shot reader, and a missing calibration set stops the run before any work,
  with one error naming the technique.
* ``changes_float_model``: when it ran (its entry is not empty) the float model the encodings apply to is no
  longer the input, so ``quantize`` writes ``<name>.prepared.onnx``. ``keeps_float_outputs``: the rewrite keeps the
  FP32 outputs (to a tolerance: the contract test checks it).
* ``searchable``: the accuracy search may run it; its weight/bias edits are then dropped for a layer that falls back
  to float (:meth:`FlowState.take_edits`).
* ``provides`` / ``needs``: the facts techniques hand each other through ``state.provided`` (e.g. AdaRound provides
  ``float_weights``, which bias correction needs to measure the rounding against; bias correction provides
  ``mean_error_removed``, a promise the weight ranges and AdaRound's losses read before it runs). A need no earlier
  technique (or the flow: ``bn_stats``) provides is optional: the technique works without it.
* ``config_fields``: the QuantConfig fields it reads; ``enabled(config)`` says whether it runs. Its options live in
  the config section ``techniques.<name>`` (its on/off field there), unless ``switch`` names the choice of another
  field that turns it on (``calib_method: auto``): its options are then in that field's section.

Adding a technique = one module defining ``TECHNIQUE = Technique(...)`` + one row in
:data:`converter.techniques.REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError, UserError

if TYPE_CHECKING:
    from .state import FlowState

FLOAT_STAGE = "float"  # rewrites the float model before planning
ENCODED_STAGE = "encoded"  # adjusts weights/biases after the encodings exist
STAGES = (FLOAT_STAGE, ENCODED_STAGE)
FLOW_PROVIDES = ("bn_stats",)  # what the flow itself puts into state.provided (prepare, before any technique)


@dataclass(frozen=True)
class Technique:
    name: str  # its report key, and how errors name it
    stage: str  # FLOAT_STAGE | ENCODED_STAGE
    run: Callable[["FlowState"], Any]  # -> JSON-able report entry; empty/None: nothing changed
    enabled: Callable[[Any], bool]  # QuantConfig -> whether it runs
    samples: int = 0  # calibration samples it reads (0: none)
    data_why: str = ""  # what it does with the data (the missing-data error says it)
    flag: str = ""  # the option that switches it on/off (the missing-data error's fix names it)
    changes_float_model: bool = False
    keeps_float_outputs: bool = False
    searchable: bool = False
    provides: tuple[str, ...] = ()
    promises: tuple[str, ...] = ()  # facts true as soon as it is enabled, read by what runs before it
    needs: tuple[str, ...] = ()
    config_fields: tuple[str, ...] = ()
    # the config values that switch it on, where a choice of another field does (calib_method: auto) rather than
    # its own on/off field techniques.<name>; empty: ``{name: True}``
    switch: tuple[tuple[str, Any], ...] = ()
    summary: str = ""

    def on(self) -> dict[str, Any]:
        """The config changes that switch it on."""
        return dict(self.switch) if self.switch else {self.name: True}

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"technique {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}")
        if self.samples < 0:
            raise ValueError(f"technique {self.name!r}: samples must be >= 0")

    def contract(self) -> dict[str, Any]:
        """The declaration, JSON-able."""
        return {"stage": self.stage, "samples": self.samples, "changes_float_model": self.changes_float_model,
                "keeps_float_outputs": self.keeps_float_outputs, "searchable": self.searchable,
                "provides": list(self.provides), "promises": list(self.promises), "needs": list(self.needs), "config_fields": list(self.config_fields)}

    def missing_data(self) -> ConfigError:
        return ConfigError(f"{self.name} needs calibration data: {self.data_why or 'it reads calibration samples'}",
                           "pass calibration data (--calib DIR, or calib_data= in Python)"
                           + (f", or drop {self.flag}" if self.flag else ""))


class TechniqueError(RuntimeError):
    """A technique failed inside (a bug, or an input it cannot handle that no check caught): names it and what ran
    before it (as onnx_ir's Sequential pass does)."""


def failed(technique: Technique, before: list[str], exc: Exception) -> Exception:
    """The error to raise for ``exc`` escaping ``technique``: a user error keeps its class and fix, with the
    technique named; anything else becomes a :class:`TechniqueError` chained to it."""
    ran = ", ".join(before) if before else "none"
    if isinstance(exc, UserError):
        err = type(exc).__new__(type(exc))
        UserError.__init__(err, f"{technique.name}: {exc.message}", exc.fix)
        return err
    return TechniqueError(f"technique {technique.name!r} ({technique.stage} stage) failed: {type(exc).__name__}: "
                          f"{exc} (techniques run before it: {ran})")
