"""Calibrate tensors that live inside If/Loop/Scan bodies.

ONNX Runtime only returns tensors of the main graph: a name inside a body cannot be requested as an
output. So each wanted tensor is reduced *inside its own body* to two one-element tensors, its min and
max, and these are threaded out to the main graph as extra outputs of every enclosing body and
control-flow node::

    body:  t -> Cast(float) -> Reshape(-1) -> Concat(+inf) -> ReduceMin -> [1]  (extra body output)
                                           -> Concat(-inf) -> ReduceMax -> [1]  (extra body output)

* ``If``: both branches must produce the same outputs, so every branch gets the same extra outputs; the
  branch that does not have the tensor outputs the neutral element (``+inf`` for a min, ``-inf`` for a
  max, an ``Identity`` of an outer constant). A branch the data never takes therefore reports nothing.
* ``Loop`` / ``Scan``: an extra body output is appended after the existing ones, i.e. it is an extra
  *scan output*, which the runtime stacks over iterations (``[iterations, 1]``). Inside an enclosing
  body the stack is reduced again to ``[1]`` (so a body's extra outputs always have the same shape, as
  scan outputs must); a loop that runs zero times yields ``+inf``/``-inf`` and again reports nothing.
* Nested bodies compose: the extra outputs of an inner node are reduced and re-emitted by the body
  that contains it, up to the main graph. Tensors of the main graph that a body captures are reduced
  in the main graph directly.

A per-iteration range is therefore **one encoding for all iterations**: the range over every
iteration of every run on every calibration sample (the min of the mins and the max of the maxes). A
body runs with one set of Q/DQ parameters whatever the iteration, so that is the only range a static
encoding can have. Histogram methods (percentile, mse) need the values themselves, which would have to
be stacked per iteration; tensors inside bodies are calibrated with min/max whatever ``calib_method``
says (the report lists each tensor's method).

The augmented model runs once over the calibration data, separately from the main pass (whose taps
stream subsampled values). A tensor that reports nothing over the whole data (a branch never taken,
a loop that never runs) has no range: :func:`collect_subgraph_ranges` returns it in ``unreached``.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph.index import graph_attrs
from .observers import MinMaxObserver
from .runner import _samples_in, make_session

log = logging.getLogger("converter")

_PINF, _NINF, _FLAT = "__cfstat_pinf", "__cfstat_ninf", "__cfstat_flat"


class _Names:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, base: str) -> str:
        self.n += 1
        return f"__cfstat{self.n}_{base}"


def _reduce(nodes: list[onnx.NodeProto], src: str, names: _Names, cast: bool) -> tuple[str, str]:
    """Nodes computing [1]-shaped min and max of ``src`` (any shape, possibly empty)."""
    x = src
    if cast:
        x = names("f")
        nodes.append(helper.make_node("Cast", [src], [x], to=TensorProto.FLOAT))
    flat = names("flat")
    nodes.append(helper.make_node("Reshape", [x, _FLAT], [flat]))
    lo_in, hi_in, lo, hi = names("lo_in"), names("hi_in"), names("min"), names("max")
    nodes.append(helper.make_node("Concat", [flat, _PINF], [lo_in], axis=0))
    nodes.append(helper.make_node("Concat", [flat, _NINF], [hi_in], axis=0))
    nodes.append(helper.make_node("ReduceMin", [lo_in], [lo], keepdims=1))
    nodes.append(helper.make_node("ReduceMax", [hi_in], [hi], keepdims=1))
    return lo, hi


def _out(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def stats_model(model: onnx.ModelProto, wanted: set[str]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """``model`` with min/max outputs for every tensor of ``wanted`` (wherever it is defined).

    Returns the augmented model and ``{tensor: (min output, max output)}`` (main-graph outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = _Names()
    types: dict[str, int] = {}

    def collect_types(g: onnx.GraphProto) -> None:
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for n in g.node:
            for _, sub in graph_attrs(n):
                collect_types(sub)

    collect_types(m.graph)

    def process(g: onnx.GraphProto, top: bool) -> dict[str, tuple[str, str]]:
        """Add the stats of ``wanted`` tensors defined in ``g`` or its bodies; returns the names in ``g``."""
        local = {i.name for i in g.input} | {o for n in g.node for o in n.output if o}
        extra: list[onnx.NodeProto] = []
        stats: dict[str, tuple[str, str]] = {}
        for t in sorted(wanted & local):
            stats[t] = _reduce(extra, t, names, types.get(t) != TensorProto.FLOAT)
        for node in list(g.node):
            subs = list(graph_attrs(node))
            if not subs:
                continue
            inner = [(a, sub, process(sub, False)) for a, sub in subs]
            keys = sorted({t for _, _, s in inner for t in s})
            if not keys:
                continue
            for _, sub, s in inner:
                for t in keys:
                    for k, (neutral, have) in enumerate(((_PINF, s.get(t, (None, None))[0]),
                                                         (_NINF, s.get(t, (None, None))[1]))):
                        if have is None:
                            have = names("none")
                            sub.node.append(helper.make_node("Identity", [neutral], [have]))
                        sub.output.append(_out(have))
            if node.op_type == "Scan":
                n_new = 2 * len(keys)
                for a in node.attribute:
                    if a.name in ("scan_output_axes", "scan_output_directions"):
                        a.ints.extend([0] * n_new)
            for t in keys:
                lo, hi = names("node_min"), names("node_max")
                node.output.extend([lo, hi])
                if node.op_type in ("Loop", "Scan") or not top:
                    # stacked per iteration (Loop/Scan) and/or re-emitted by an enclosing body: reduce to [1]
                    lo2, _ = _reduce(extra, lo, names, False)
                    _, hi2 = _reduce(extra, hi, names, False)
                    lo, hi = lo2, hi2
                stats[t] = (lo, hi)
        g.node.extend(extra)
        return stats  # the caller makes them outputs (of a body: in the order every sibling branch shares)

    result = process(m.graph, True)
    for lo, hi in result.values():
        m.graph.output.extend([_out(lo), _out(hi)])
    m.graph.initializer.extend([numpy_helper.from_array(np.array([np.inf], np.float32), _PINF),
                                numpy_helper.from_array(np.array([-np.inf], np.float32), _NINF),
                                numpy_helper.from_array(np.array([-1], np.int64), _FLAT)])
    return m, result


def collect_subgraph_ranges(model: onnx.ModelProto, tensors: list[str], data: Iterable[dict[str, np.ndarray]],
                            providers: list[str], threads: int = 0) -> tuple[dict[str, MinMaxObserver], list[str], int]:
    """Min/max observers for ``tensors`` (inside bodies or captured by them) over ``data``.

    Returns (observers of the tensors that got values, tensors that never got any, samples seen)."""
    wanted = set(tensors)
    augmented, stats = stats_model(model, wanted)
    fetch = [o for t in sorted(stats) for o in stats[t]]
    observers = {t: MinMaxObserver() for t in stats}
    if not fetch:
        return {}, sorted(wanted), 0
    session = make_session(augmented, providers, threads, optimize=True)
    start, samples = time.perf_counter(), 0
    for batch in data:
        values = dict(zip(fetch, session.run(fetch, dict(batch))))
        for t, (lo, hi) in stats.items():
            lo_v, hi_v = values[lo], values[hi]
            lo_v, hi_v = lo_v[np.isfinite(lo_v)], hi_v[np.isfinite(hi_v)]
            if lo_v.size and hi_v.size:
                observers[t].update(lo=float(lo_v.min()), hi=float(hi_v.max()))
        for o in observers.values():
            o.end_batch()
        samples += _samples_in(batch)
    reached = {t: o for t, o in observers.items() if o.min <= o.max}
    unreached = sorted(wanted - set(reached))
    log.info("calibrated %d tensor(s) inside control flow in %.2f s", len(reached), time.perf_counter() - start)
    return reached, unreached, samples
