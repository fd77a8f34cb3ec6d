"""Quantize inside If/Loop/Scan bodies with the same rules as the main graph.

Each body (:mod:`converter.graph.scopes`) is planned on its own by :func:`build_plan` on a wrapper
model: the body with its captures as inputs (or initializers, for outer constants), so the rule table,
the target's patterns and fused groups (Conv+Relu, ...) apply exactly as at the top level. Tensors keep
their names (preprocessing made body names unique in the whole model,
:func:`converter.graph.passes.unique_subgraph_names`), so one encodings file covers the main graph and
every body, and ``apply-encodings`` finds each entry again.

* Calibration: :func:`converter.calib.subgraphs.collect_subgraph_ranges` (min/max per tensor over all
  iterations and samples; see there what a per-iteration range means).
* Encodings: :func:`compute_encodings` per body plan; a tensor the main plan already encodes (a captured
  activation) keeps the main plan's encoding everywhere.
* Rendering: :func:`render_control_flow` renders innermost bodies first with :func:`render_qdq` on the
  wrapper, writes them back, then the main graph. A body's outputs keep their names and float type (a
  quantized output is ``Q -> DQ`` writing the output name), so the If/Loop/Scan node and the graph around
  it see the same interface as before. A captured activation is quantized at the top of the body that
  reads it (its own Q/DQ pair there, same encoding).
* A tensor that cannot be calibrated (a branch the data never takes, a loop that never runs, a capture
  of unknown type) is named in a warning and left in float, with its scale group; the rest quantizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import onnx

from ..graph.index import GraphIndex, bodies
from ..graph.passes import _drop_unused_initializers
from ..graph.scopes import Scope, all_graph_names, scopes, unknown_captures, wrapper, write_back
from .encode import bias_encoding, compute_encodings
from .encoding import Encoding
from .plan import ACTIVATION, BIAS, QuantPlan, build_plan, drop_activations
from .qdq import ensure_opset, render_qdq

log = logging.getLogger("converter")


@dataclass
class SubPlan:
    scope: Scope
    model: onnx.ModelProto  # the wrapper
    idx: GraphIndex
    plan: QuantPlan


def plan_subgraphs(model: onnx.ModelProto, config, warn: bool = True) -> list[SubPlan]:
    """One plan per body (innermost first); bodies with nothing to quantize are skipped. ``warn``: name the
    captures of unknown type (once per run: the search plans the bodies again for every try)."""
    out = []
    for scope in scopes(model):
        w = wrapper(scope, model)
        idx = GraphIndex.build(w)
        plan = build_plan(w, config, idx)
        unknown = unknown_captures(scope)
        if unknown and warn:
            readers = [n.name for n in scope.graph.node if set(n.input) & set(unknown)
                       and plan.nodes.get(n.name) is not None and plan.nodes[n.name].status != "not-float"]
            if readers:
                log.warning("%s: captured tensor(s) %s have no known type, so they cannot be calibrated or "
                            "quantized; %s read them in float (the rest of the body is quantized)", scope.path,
                            ", ".join(repr(u) for u in unknown), ", ".join(repr(r) for r in readers[:3]))
        if plan.tensors:
            out.append(SubPlan(scope, w, idx, plan))
    return out


def subgraph_activations(subs: list[SubPlan]) -> list[str]:
    return list(dict.fromkeys(t.name for s in subs for t in s.plan.by_role(ACTIVATION)))


def drop_uncalibrated(subs: list[SubPlan], unreached: list[str], warn: bool = True) -> list[str]:
    """Leave tensors without a range (and their scale groups, and biases built on them) in float; warn
    (unless ``warn`` is off: a plan made again after the calibration that already named them)."""
    missing = set(unreached)
    dropped: list[str] = []
    for s in subs:
        plan = s.plan
        names = [n for n in plan.tensors if n in missing and plan.tensors[n].role == ACTIVATION]
        if not names:
            continue
        roles = {n: t.role for n, t in plan.tensors.items()}
        gone = drop_activations(plan, set(names))
        mates = len([n for n in gone if n not in missing and roles[n] == ACTIVATION])
        captured = [n for n in names if n in set(s.scope.captures())]
        if warn:
            log.warning("%s: %d tensor(s) got no calibration values (a branch the data never takes, or a loop that "
                        "never runs): %s%s; left in float%s, the rest is quantized", s.scope.path, len(names),
                        ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else ""),
                        f" (captured from the enclosing graph: {', '.join(repr(n) for n in captured[:3])})"
                        if captured else "", f" with {mates} tensor(s) sharing their encodings" if mates else "")
        dropped += names
    return dropped


def compute_subgraph_encodings(main: QuantPlan, subs: list[SubPlan], observers: Mapping, methods: Mapping[str, str],
                               config, centered: bool = False) -> None:
    """Encodings of each body plan, then merged into ``main`` (tensors and encodings); ``centered``: as in
    :func:`~converter.quant.encode.compute_encodings`."""
    for s in subs:
        compute_encodings(s.plan, s.idx, observers, methods, config, centered=centered)
        _adopt_outer_encodings(s, main)
        for name, t in s.plan.tensors.items():
            if name in main.encodings or name not in s.plan.encodings:
                continue  # a captured tensor the main graph (or another body) already encodes keeps that encoding
            main.tensors[name] = t
            main.encodings[name] = s.plan.encodings[name]


def _adopt_outer_encodings(s: SubPlan, main: QuantPlan) -> None:
    """A body's scale group holding a tensor already encoded outside (a captured activation) takes that encoding,
    and the biases computed from it follow, so each tensor name has one encoding and every Q/DQ agrees."""
    plan = s.plan
    for root, members in plan.group_members().items():
        outer = next((main.encodings[m] for m in members if m in main.encodings), None)
        if outer is None or all(plan.encodings.get(m) == outer for m in members):
            continue
        for m in members:
            plan.encodings[m] = outer
        for b in plan.by_role(BIAS):
            act, w = b.bias_of
            if act in members and w in plan.encodings and b.name in plan.encodings:
                plan.encodings[b.name], plan.encodings[w] = bias_encoding(s.idx.constant(b.name), outer,
                                                                           plan.encodings[w])


def subgraph_summary(subs: list[SubPlan]) -> list[dict[str, Any]]:
    out = []
    for s in subs:
        counts: dict[str, int] = {}
        for st in s.plan.nodes.values():
            counts[st.status] = counts.get(st.status, 0) + 1
        out.append({"subgraph": s.scope.path, "node": s.scope.node.name, "op_type": s.scope.node.op_type,
                    "nodes": len(s.scope.graph.node), "node_counts": counts,
                    "quantized_nodes": counts.get("quantized", 0) + counts.get("fused", 0),
                    "quantized_tensors": len(s.plan.tensors)})
    return out


def has_control_flow(model: onnx.ModelProto) -> bool:
    """The main graph has a node with a graph attribute (If/Loop/Scan)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def render_control_flow(float_model: onnx.ModelProto, encodings: dict[str, Encoding],
                        low_bit_as_int8: bool = False) -> onnx.ModelProto:
    """:func:`render_qdq` for a model with bodies: each body with the encodings of the tensors its own nodes
    read or define, innermost first, then the main graph. Without bodies it is exactly ``render_qdq``."""
    if not any(bodies(n) for n in float_model.graph.node):
        return render_qdq(float_model, encodings, low_bit_as_int8=low_bit_as_int8)
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    ensure_opset(model, encodings)  # once, before the bodies are cut out (as render_qdq would for the main graph)
    reserved = all_graph_names(model)
    for scope in scopes(model):
        used = scope.used()
        wanted = {t: e for t, e in encodings.items() if t in used}
        if not wanted:
            continue
        rendered = render_qdq(wrapper(scope, model), wanted, reserved=reserved, low_bit_as_int8=low_bit_as_int8)
        write_back(scope, rendered)
    main_idx = GraphIndex.build(model)
    main_used = set(main_idx.consumers) | main_idx.graph_outputs  # read in the main graph (not only by bodies)
    out = render_qdq(model, {t: e for t, e in encodings.items() if t in main_used}, reserved=reserved,
                     low_bit_as_int8=low_bit_as_int8)
    _drop_unused_initializers(out)  # outer weights now read quantized inside the bodies
    return out


def quantized_nodes_in_bodies(model: onnx.ModelProto) -> dict[str, int]:
    """Per body of the rendered model: nodes (other than Q/DQ) that read at least one dequantized tensor."""
    out = {}
    for scope in scopes(model):
        dq = {o for n in scope.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        out[scope.path] = sum(1 for n in scope.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                              and dq & set(n.input))
    return out


def subgraph_qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ nodes inside bodies of the rendered model."""
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for scope in scopes(model):
        for n in scope.graph.node:
            if n.op_type in counts:
                counts[n.op_type] += 1
    return counts
