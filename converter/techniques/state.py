"""The state the flow and its techniques share: the model, its index, the calibration data and what the techniques
provide each other.

The model is edited in two ways. A graph edit (nodes added/removed/rewired: CLE, SmoothQuant) ends with
:meth:`FlowState.edited`, which drops the index; the next ``state.idx`` builds it again (no hand-patched index
dicts). A value edit of a planned weight or bias (AdaRound, bias correction: initializers overwritten in place, the
index stays valid) is recorded against the values before the encoded stage (:meth:`snapshot_params`), so the
search can drop it for a layer that falls back to float (:meth:`take_edits`, :func:`applied_params`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.readers import model_inputs, open_calibration
from ..ort_session import select_providers
from ..graph.index import GraphIndex
from ..quant.control_flow import compute_subgraph_encodings
from ..quant.encode import compute_encodings


@dataclass
class FlowState:
    """A float model ready for planning (loaded, preprocessed), and, while the flow runs, its plan, calibration
    and the techniques' shared facts."""

    source_path: str | None
    name: str
    original_opset: int
    model: onnx.ModelProto  # preprocessed float model (the techniques edit it)
    passes: dict[str, int]
    # facts the flow and the techniques provide each other, by the names their contracts declare
    # (base.Technique.provides/needs): bn_stats, float_weights, frozen_weights, mean_error_removed, ...
    provided: dict[str, Any] = field(default_factory=dict)
    # set by the orchestrator (converter.pipeline.run_flow)
    config: Any = None
    calib_data: Any = None
    calib_spec: Any = None
    plan: Any = None
    subs: list = field(default_factory=list)
    calib: Any = None
    ran: list[str] = field(default_factory=list)  # techniques run so far, in order
    entries: dict[str, Any] = field(default_factory=dict)  # technique -> report entry (those that changed something)
    timings: dict[str, float] = field(default_factory=dict)
    _idx: GraphIndex | None = None
    _params: dict[str, bytes] = field(default_factory=dict)  # planned weights/biases before the encoded stage

    @property
    def idx(self) -> GraphIndex:
        if self._idx is None:
            self._idx = GraphIndex.build(self.model)
        return self._idx

    def edited(self) -> None:
        """The graph changed (nodes, names, initializers added or removed): the index is built again on next use."""
        self._idx = None

    @property
    def inputs(self):
        return model_inputs(self.model)

    @property
    def providers(self) -> list[str]:
        return select_providers(self.config.providers)

    def data(self, samples: int | None):
        """The calibration data opened for a pass reading ``samples`` samples (None: all)."""
        return open_calibration(self.calib_data, self.inputs, self.config.batch_size, samples, self.calib_spec)

    # --- encodings ------------------------------------------------------------------------------------------------
    @property
    def centered(self) -> bool:
        """A technique will remove each output channel's mean error (bias correction's promise): weight ranges and
        AdaRound's losses are then chosen without it."""
        return bool(self.provided.get("mean_error_removed"))

    @property
    def frozen(self) -> dict[str, Any]:
        """weight -> the encoding its values were rounded onto (AdaRound): kept instead of derived again."""
        return self.provided.setdefault("frozen_weights", {})

    def reencode(self) -> None:
        """The plan's encodings (main graph and bodies) recomputed from the model's current values. The main
        graph's on its own tensors: a body's tensors, merged into the plan when it was first encoded, have no
        values or producers in the main graph (a body's own weights: Silero VAD's) and keep the encodings their
        body gave them."""
        plan = self.plan
        body = {n for n in plan.tensors if not _in_graph(self.idx, n)} if self.subs else set()
        if body:
            kept = {n: plan.encodings[n] for n in body if n in plan.encodings}
            main = dataclasses.replace(plan, tensors={n: t for n, t in plan.tensors.items() if n not in body},
                                       encodings={n: e for n, e in plan.encodings.items() if n not in body})
            compute_encodings(main, self.idx, self.calib.observers, self.calib.methods, self.config,
                              frozen=self.frozen, centered=self.centered)
            plan.encodings = {n: kept[n] if n in kept else main.encodings[n] for n in plan.tensors
                              if n in kept or n in main.encodings}
            plan.split_groups, plan.mixed_operands = main.split_groups, main.mixed_operands
        else:
            compute_encodings(plan, self.idx, self.calib.observers, self.calib.methods, self.config,
                              frozen=self.frozen, centered=self.centered)
        if self.subs:
            compute_subgraph_encodings(self.plan, self.subs, self.calib.observers, self.calib.methods, self.config,
                                       centered=self.centered)

    # --- value edits ----------------------------------------------------------------------------------------------
    def snapshot_params(self) -> None:
        """Remember the planned weights' and biases' values (before the encoded stage edits them)."""
        names = [t.name for t in self.plan.tensors.values() if t.role in ("weight", "bias")]
        self._params = {n: self.idx.initializers[n].SerializeToString() for n in names if n in self.idx.initializers}

    def _changed(self) -> Iterator[tuple[str, onnx.TensorProto, bytes]]:
        """(name, initializer now, its bytes before) of the planned weights/biases the encoded stage changed."""
        for n, before in self._params.items():
            init = self.idx.initializers.get(n)
            if init is not None and init.SerializeToString() != before:
                yield n, init, before

    def edits(self) -> dict[str, np.ndarray]:
        """The planned weights/biases the encoded stage changed: tensor -> its value now."""
        return {n: numpy_helper.to_array(init) for n, init, _ in self._changed()}

    def originals(self) -> dict[str, np.ndarray]:
        """The planned weights/biases the encoded stage changed, with the values they had before it."""
        out = {}
        for n, _, before in self._changed():
            t = onnx.TensorProto()
            t.ParseFromString(before)
            out[n] = numpy_helper.to_array(t)
        return out

    def take_edits(self) -> dict[str, np.ndarray]:
        """:meth:`edits`, and the model's values put back to what they were before: the float model again."""
        out = self.edits()
        for n in out:
            self.idx.initializers[n].ParseFromString(self._params[n])
        return out


def _in_graph(idx: GraphIndex, name: str) -> bool:
    """``name`` is a tensor of the graph ``idx`` indexes (a constant, a node's input or output, a graph input)."""
    return name in idx.initializers or name in idx.producer or name in idx.consumers or name in idx.graph_inputs


@contextlib.contextmanager
def applied_params(idx: GraphIndex, values: Mapping[str, np.ndarray]) -> Iterator[None]:
    """The model behind ``idx`` with ``values`` written over its initializers for the duration (then restored)."""
    saved = {n: idx.initializers[n].SerializeToString() for n in values}
    try:
        for n, v in values.items():
            idx.initializers[n].CopyFrom(numpy_helper.from_array(v, n))
        yield
    finally:
        for n, raw in saved.items():
            idx.initializers[n].ParseFromString(raw)
