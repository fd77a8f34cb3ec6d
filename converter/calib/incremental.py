"""Capture tensors of a model that changes layer by layer, computing each node once, not once per layer.

A layer-wise technique (AdaRound's search, AdaQuant, block reconstruction) visits the layers in graph order and
for each needs its input in the QDQ model built so far: running the model's prefix up to every layer from the
inputs costs the sum of all prefixes, quadratic in depth (EfficientNet-Lite0's 50 layers, 100 images: 120 of the
search's 164 s). :class:`IncrementalCapture` keeps, for every calibration batch, the values at the frontier of
what has been computed (the tensors a node not yet run still reads) and runs only the nodes between that frontier
and the tensors asked for; each node then runs about once per model over the whole pass.

The model may be rebuilt between captures (the QDQ model is re-rendered after each layer's weights change): nodes
are known by their output names, and a cached value stays valid as long as the nodes that computed it are
unchanged: a caller changes only nodes not yet computed (a layer whose input was captured runs with its new
weights when a later capture needs its output). Control flow (If/Loop/Scan), or a frontier whose values would pass
:data:`LIMIT_MB`, falls back to running the prefix from the inputs (the frontier dropped), so memory stays bounded
as before.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from ..graph.index import bodies
from .runner import elem_types, iter_capture, make_session

log = logging.getLogger("converter")

LIMIT_MB = 1024  # frontier values kept at most (all batches); past it, the prefix runs from the inputs


class IncrementalCapture:
    """Tensors of successive versions of one model over fixed ``batches`` (module doc)."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], providers: list[str], limit_mb: int = LIMIT_MB):
        self.batches = list(batches)
        self.providers = providers
        self.limit = limit_mb << 20
        self.values: dict[str, list[np.ndarray]] = {}  # frontier tensor -> its value in each batch
        self.done: set[tuple[str, ...]] = set()  # nodes computed (their outputs), whether still on the frontier or not
        self.nodes_run = 0  # nodes run over all captures (the work done; a prefix from the inputs counts in full)
        self.peak_bytes = 0  # the largest frontier kept
        self._open = False  # a capture is being consumed

    def capture(self, model: onnx.ModelProto, wanted: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """``wanted``'s values in each batch (plus the batch's inputs), one batch at a time, running only what the
        frontier lacks. Consume it to the end: a capture left half-way drops the frontier (the next runs from the
        inputs)."""
        if self._open or _has_bodies(model):
            self.values, self.done = {}, set()
        if not self.batches:
            return
        if _has_bodies(model):
            self.nodes_run += len(model.graph.node)
            yield from iter_capture(model, wanted, self.batches, self.providers)
            return
        g = model.graph
        producer = {o: n for n in g.node for o in n.output if o}
        available = set(self.batches[0] if self.batches else ()) | set(self.values) | {t.name for t in g.initializer}
        needed: set[int] = set()
        stack = [t for t in wanted if t not in available]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(t for t in node.input if t and t not in available)
        order = [n for n in g.node if id(n) in needed]  # graph order is topological
        done = self.done | {tuple(n.output) for n in order}
        produced = {o for n in order for o in n.output if o}
        read_later = {t for n in g.node if tuple(n.output) not in done for t in n.input if t}
        keep = [t for t in dict.fromkeys([*self.values, *produced]) if t in read_later]
        outputs = list(dict.fromkeys([*(t for t in wanted if t in produced), *(t for t in keep if t in produced)]))
        inputs = sorted({t for n in order for t in n.input if t in self.values and t not in produced})
        session, feeds = self._session(model, order, inputs, outputs) if order else (None, set())
        frontier: dict[str, list[np.ndarray | None]] = {t: [None] * len(self.batches) for t in keep}
        self._open = True
        for i, batch in enumerate(self.batches):
            values = dict(batch)
            if session is not None:
                feed = {**{k: batch[k] for k in feeds}, **{t: self.values[t][i] for t in inputs}}
                values.update(zip(outputs, session.run(outputs, feed)))
            values.update({t: self.values[t][i] for t in wanted if t in self.values and t not in produced})
            for t in keep:
                frontier[t][i] = values[t] if t in values else self.values[t][i]
            for vs in self.values.values():  # the old frontier's values of this batch are not read again
                vs[i] = None
            if i == len(self.batches) - 1:  # settled before the last value goes out (zip() stops at it)
                self._settle(frontier, done)
            yield values

    def _settle(self, frontier: dict[str, list[np.ndarray | None]], done: set[tuple[str, ...]]) -> None:
        self._open = False
        self.values, self.done = frontier, done
        held = sum(v.nbytes for vs in frontier.values() for v in vs)
        self.peak_bytes = max(self.peak_bytes, held)
        if held > self.limit:
            log.debug("incremental capture: frontier of %d MiB over %d MiB, dropped", held >> 20, self.limit >> 20)
            self.values, self.done = {}, set()

    def _session(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str]):
        """A session running ``nodes`` on the frontier's ``inputs`` (and the batches' own inputs) to ``outputs``,
        and the batch inputs it reads."""
        g = model.graph
        read = {t for n in nodes for t in n.input if t}
        feeds = {k for k in (self.batches[0] if self.batches else ()) if k in read}
        sub = onnx.ModelProto(ir_version=model.ir_version)  # not a copy of the whole model: its weights are many
        sub.opset_import.extend(model.opset_import)
        sub.functions.extend(model.functions)
        sub.graph.name = g.name
        sub.graph.node.extend(nodes)
        sub.graph.initializer.extend(t for t in g.initializer if t.name in read)
        sub.graph.input.extend(i for i in g.input if i.name in feeds)
        for t in inputs:
            v = self.values[t][0]
            sub.graph.input.append(helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                 [None] * v.ndim))
        types = elem_types(model)
        sub.graph.output.extend(helper.make_tensor_value_info(t, types[t], None) if types.get(t)
                                else helper.make_empty_tensor_value_info(t) for t in outputs)
        self.nodes_run += len(nodes)
        return make_session(sub, self.providers), feeds


def _has_bodies(model: onnx.ModelProto) -> bool:
    return any(bodies(n) for n in model.graph.node)
