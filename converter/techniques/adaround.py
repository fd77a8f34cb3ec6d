"""AdaRound of the planned layers' weights (:mod:`converter.quant.adaround`), and, where bias correction follows,
a check at the model's outputs that its centered losses were right to trust it.

With bias correction after it, AdaRound compares its losses centered: each output's mean error is bias
correction's to remove, so the rounding spends itself on what correction cannot fix (EfficientNet-Lite0 W4A8,
ResNet-8 W4A8: the best rows of docs/results.md). That trust can fail: a layer free to buy a lower centered loss
with a large mean shift leaves the layers after it inputs that move once the shifts are corrected. On PP-OCR's
direction classifier (paddle2onnx; HardSwish and squeeze-excitation blocks; 40 calibration images), with the
layers' targets then taken from the float model's drifting activations (since replaced: each layer's own product,
:mod:`converter.quant.adaround`), the corrected model fell to chance (98/198 correct; FP32 193) where nearest
rounding + bias correction keeps 185. With the present targets that model passes the check (output error 0.023
against nearest's 0.058); the check stays as the guard where the trust is tested, on every model.

So where AdaRound runs centered, the result is checked where it counts, at the model's outputs on
:data:`CHECK_SAMPLES` calibration samples, each candidate with bias correction applied as it will be (then undone:
the bias correction technique runs next as usual): the error of the centered rounding against nearest rounding's.
Where the centered rounding's is more than :data:`CHECK_MARGIN` times nearest's, AdaRound runs again with plain
(uncentered) losses, and the lower of that and nearest rounding is kept. The report's ``check`` says what was
measured and chosen. The check costs two bias corrections and two runs of the samples (EfficientNet-Lite0: 28 s of
a 4.5-minute quantize)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.runner import make_session
from ..metrics import TensorStats
from ..quant.adaround import adaround
from ..quant.bias_correction import corrected_layers
from ..quant.control_flow import render_control_flow
from . import bias_correction
from .base import ENCODED_STAGE, Technique
from .state import FlowState, applied_params

log = logging.getLogger("converter")

SAMPLES = 128  # calibration samples AdaRound caches layer inputs from (subsampled rows, see the module)
CHECK_SAMPLES = bias_correction.SAMPLES  # samples the output check runs (bias correction's, which it applies)
# the centered rounding is replaced only where its output error passes nearest's by more than this factor: a
# closer call is within what 64 samples tell apart (PP-OCR's classifier: 9.6x; a near tie on a test model: 1.003x)
CHECK_MARGIN = 1.1


def _centered_layers(state: FlowState) -> frozenset[str]:
    """The layers whose mean error a later technique removes (bias correction's promise): compared centered."""
    if not state.centered:
        return frozenset()

    return frozenset(n.name for n in corrected_layers(state.model, state.plan, state.idx))


def _round(state: FlowState, float_weights: dict[str, np.ndarray], center: frozenset[str]) -> list:
    """AdaRound in place; the weights it rounded keep the encodings they were rounded onto (frozen)."""
    config = state.config
    layers = adaround(state.model, state.plan, state.idx, state.data(SAMPLES), state.providers,
                      config.adaround_iterations, threads=config.threads, float_weights=float_weights,
                      search=config.adaround_search, center=center, device=config.device)
    for w in float_weights:  # their values are grid values now: the encodings they were rounded onto stay
        if w in state.plan.encodings:
            state.frozen.setdefault(w, state.plan.encodings[w])
    state.reencode()  # biases of the new weights
    return layers


def _unround(state: FlowState, float_weights: dict[str, np.ndarray]) -> None:
    """The float weights back (nearest rounding under the same encodings)."""
    for w, values in float_weights.items():
        state.idx.initializers[w].CopyFrom(numpy_helper.from_array(values, w))
        state.frozen.pop(w, None)
    state.reencode()


class OutputCheck:
    """The float model's outputs against a render's, on :data:`CHECK_SAMPLES` calibration samples (held in
    memory). The float model is AdaRound's input: the model with the float weights AdaRound replaced written back
    (it changes weights only), in its own ONNX Runtime session for the check's duration."""

    def __init__(self, state: FlowState, float_weights: dict[str, np.ndarray]):
        self.batches = list(state.data(CHECK_SAMPLES))
        self.outputs = [o.name for o in state.model.graph.output
                        if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                            onnx.TensorProto.DOUBLE)]
        self.providers = state.providers
        self.reference = None
        if self.outputs:
            with applied_params(state.idx, float_weights):
                self.reference = make_session(state.model, self.providers)

    def error(self, model: onnx.ModelProto) -> float:
        """Mean over the float outputs of ``sum (q - f)^2 / sum f^2`` over the samples (inf where not finite)."""
        if self.reference is None:
            return 0.0
        session = make_session(model, self.providers)
        stats = [TensorStats() for _ in self.outputs]
        for batch in self.batches:
            for st, f, q in zip(stats, self.reference.run(self.outputs, batch), session.run(self.outputs, batch)):
                st.update(f, q)
        error = float(np.mean([st.sse / max(st.ref_energy, 1e-30) for st in stats]))
        return error if np.isfinite(error) else float("inf")  # a NaN output compares as the worst, not as no error

    def corrected_error(self, state: FlowState, values: dict[str, np.ndarray]) -> float:
        """:meth:`error` of the model with ``values`` written over its weights and bias correction applied as
        the technique will apply it; the model's values and encodings are as before afterwards."""
        biases = {n.input[2]: state.idx.constant(n.input[2]) for n in corrected_layers(state.model, state.plan,
                                                                                         state.idx)}
        with _quiet(), applied_params(state.idx, {**biases, **values}):
            state.reencode()
            bias_correction.run(state)
            error = self.error(render_control_flow(state.model, state.plan.encodings))
        state.reencode()
        return error


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The provisional bias corrections' own log lines held back (the technique's run logs them once)."""
    level = log.level
    log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(level)


def _checked(state: FlowState, float_weights: dict[str, np.ndarray], layers: list) -> tuple[list, dict[str, Any]]:
    """The centered result kept, or replaced (module doc); (layers, the report's ``check``)."""
    t = time.perf_counter()
    check = OutputCheck(state, float_weights)
    errors = {"centered": check.corrected_error(state, {}),
              "nearest": check.corrected_error(state, float_weights)}
    chosen = "centered"
    if errors["centered"] > CHECK_MARGIN * errors["nearest"]:
        log.info("adaround: its centered rounding (trusting bias correction to remove each output's mean error) "
                 "leaves a larger output error after bias correction than nearest rounding (%.4g vs %.4g on the "
                 "calibration samples): rounding again with plain losses", errors["centered"], errors["nearest"])
        _unround(state, float_weights)
        layers = _round(state, float_weights, frozenset())
        errors["uncentered"] = check.corrected_error(state, {})
        chosen = "uncentered"
        if errors["uncentered"] > errors["nearest"]:
            _unround(state, float_weights)
            layers, chosen = [], "nearest"
            log.info("adaround: nearest rounding kept (plain losses: output error %.4g)", errors["uncentered"])
    return layers, {"samples": CHECK_SAMPLES, "output_error": errors, "chosen": chosen,
                    "seconds": round(time.perf_counter() - t, 3)}


def run(state: FlowState) -> dict[str, Any]:
    config = state.config
    t = time.perf_counter()
    float_weights = state.provided.setdefault("float_weights", {})
    center = _centered_layers(state)
    layers = _round(state, float_weights, center)
    entry: dict[str, Any] = {}
    if center and layers:
        layers, entry["check"] = _checked(state, float_weights, layers)
        if not layers:
            float_weights.clear()
    return {"samples": SAMPLES, "iterations": config.adaround_iterations, "search": config.adaround_search,
            "seconds": round(time.perf_counter() - t, 3), "layers": [r.to_dict() for r in layers], **entry}


TECHNIQUE = Technique(
    "adaround", ENCODED_STAGE, run, enabled=lambda c: bool(c.adaround), samples=SAMPLES,
    data_why="it optimizes each layer's weight rounding on the layer's inputs", flag="--adaround / adaround: true",
    changes_float_model=True, searchable=True, provides=("float_weights", "frozen_weights"),
    needs=("mean_error_removed",), config_fields=("adaround", "adaround_iterations", "adaround_search", "device"),
    summary="learns each weight's rounding (up or down) against the layer's float output")
