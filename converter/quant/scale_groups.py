"""Scale groups that respect ranges: split a shared encoding whose members' ranges differ too much.

A scale group (:mod:`.plan`, step 5) makes a data-movement op's output reuse its inputs' encoding,
so a runtime can move the integers without requantizing. That is free when the members carry the
same values (Reshape, Transpose, MaxPool). A ``Concat`` joins *different* tensors, and when their
ranges differ the shared encoding is the union: a YOLO-style head ``Concat(boxes 0..320, class
probabilities 0..1)`` quantizes the probabilities with a step of 1.26, and every score becomes 0 or
1.26.

The bound is the error the sharing causes: a member whose own range is ``w`` inside a group range
``W`` gets a step ``W / w`` times its own, so its quantization noise grows by ``20 log10(W / w)``
dB (uniform noise power is step^2 / 12), i.e. it loses ``log2(W / w)`` bits. A group in which a
member would lose more than ``max_loss_bits`` is split:

* the members are re-grouped along the single-input data-movement ops only (Reshape, Transpose,
  MaxPool... still share, their values are the same), so each ``Concat`` input keeps its own
  encoding and the ``Concat`` output gets its own (requantization, where the target runs it:
  ORT CPU's QLinearConcat takes per-input scales; TensorRT inserts a reformat when Concat inputs'
  scales differ; QNN's converter inserts a Convert op);
* a part that only reaches graph outputs or float consumers (the head's output) is not quantized
  at all: the ``Concat`` and the data movement after it run in float on dequantized inputs, so the
  user gets every member at its own resolution.

Splitting needs only one encoding per tensor; it runs after calibration, inside
:func:`~converter.quant.encode.compute_encodings`, so every path that renders a plan (quantize,
the search's tries, the analyzer) splits the same way.
"""

from __future__ import annotations

import math
from typing import Any

from ..graph.index import GraphIndex
from ..ops import MIXED_OPERAND_OPS, MULTI_INPUT_SHARED_OPS
from .plan import QuantPlan
from .rules import RULES


def loss_bits(group_range: tuple[float, float], member_range: tuple[float, float]) -> float:
    """Bits of resolution a member loses when quantized with the group's range instead of its own."""
    w = member_range[1] - member_range[0]
    big = group_range[1] - group_range[0]
    if w <= 0:
        return 0.0 if big <= 0 else math.inf
    return max(0.0, math.log2(big / w))


def split_mixed_groups(plan: QuantPlan, idx: GraphIndex, ranges: dict[str, tuple[float, float]],
                       max_loss_bits: float) -> list[dict[str, Any]]:
    """Split the scale groups of ``plan`` whose members' ``ranges`` differ by more than ``max_loss_bits``.

    Edits ``plan.tensors`` (new group roots; members left to float are removed) and ``plan.nodes``
    (data-movement nodes left in float get status ``float-mixed-ranges``). Returns one finding per
    split group for the report.
    """
    findings = []
    for root, members in plan.group_members().items():
        if len(members) < 2 or any(m not in ranges for m in members):
            continue
        lo = min(ranges[m][0] for m in members)
        hi = max(ranges[m][1] for m in members)
        losses = {m: loss_bits((lo, hi), ranges[m]) for m in members}
        worst = max(losses, key=lambda m: (losses[m], m))
        if losses[worst] <= max_loss_bits:
            continue
        parts = _regroup(members, idx)
        if len(set(parts.values())) < 2:
            continue  # no Concat inside: the members carry the same values, nothing to gain
        floated = _float_parts(plan, idx, parts)
        first: dict[str, str] = {}
        for m in members:  # members are in graph order: each part is named by its first member
            first.setdefault(parts[m], m)
        for m in members:
            if parts[m] in floated:
                del plan.tensors[m]
            else:
                plan.tensors[m].group = first[parts[m]]
        float_nodes = []
        for m in members:
            node = idx.producer.get(m)
            if parts[m] in floated and node is not None and node.name in plan.nodes:
                plan.nodes[node.name].status = "float-mixed-ranges"
                float_nodes.append(node.name)
        findings.append({
            "group": root, "range": [lo, hi], "worst_member": worst, "worst_range": list(ranges[worst]),
            "loss_bits": round(losses[worst], 2), "noise_increase_db": round(20 * math.log10(2) * losses[worst], 1),
            "parts": sorted({first[p] for p in parts.values() if p not in floated}),
            "float_nodes": float_nodes,
        })
    return findings


def _regroup(members: list[str], idx: GraphIndex) -> dict[str, str]:
    """Member -> part id, linking members only through single-input data-movement ops."""
    member_set = set(members)
    parent = {m: m for m in members}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for m in members:
        node = idx.producer.get(m)
        if node is None or node.op_type in MULTI_INPUT_SHARED_OPS or RULES.get(node.op_type) is None:
            continue
        if RULES[node.op_type].kind != "shared":
            continue
        for t in node.input:
            if t in member_set:
                parent[find(m)] = find(t)
    return {m: find(m) for m in members}


def _float_parts(plan: QuantPlan, idx: GraphIndex, parts: dict[str, str]) -> set[str]:
    """Parts that start at a multi-input op's output and reach only graph outputs or float consumers."""
    by_part: dict[str, list[str]] = {}
    for m, p in parts.items():
        by_part.setdefault(p, []).append(m)
    out = set()
    for p, tensors in by_part.items():
        head = idx.producer.get(p)
        if head is None or head.op_type not in MULTI_INPUT_SHARED_OPS:
            continue
        inside = set(tensors)
        needed = False
        for t in tensors:
            for consumer in idx.uses(t):
                status = plan.nodes.get(consumer.name)
                if status is None or status.status.startswith("float") or status.status == "not-float":
                    continue
                if RULES.get(consumer.op_type) is not None and RULES[consumer.op_type].kind == "shared" \
                        and all(o in inside for o in consumer.output if o):
                    continue
                needed = True  # a quantized op reads it: it keeps an encoding of its own
        if not needed:
            out.add(p)
    return out


def mixed_operands(plan: QuantPlan, idx: GraphIndex, ranges: dict[str, tuple[float, float]],
                   max_loss_bits: float) -> list[dict[str, Any]]:
    """Quantized binary ops whose two activation operands' ranges differ by more than ``max_loss_bits``.

    Each operand keeps its own encoding (QLinearAdd/QLinearMul take per-input scales), but the output's
    encoding spans the larger one: what the small operand adds is resolved with the output's step. Listed
    for the report; nothing is changed.
    """
    out = []
    for node in idx.graph.node:
        status = plan.nodes.get(node.name)
        if node.op_type not in MIXED_OPERAND_OPS or status is None or status.status != "quantized":
            continue
        ops = [t for t in node.input[:2] if t in ranges and t in plan.tensors]
        if len(ops) != 2:
            continue
        lo = min(ranges[t][0] for t in ops)
        hi = max(ranges[t][1] for t in ops)
        losses = {t: loss_bits((lo, hi), ranges[t]) for t in ops}
        small = max(losses, key=lambda t: losses[t])
        if losses[small] > max_loss_bits:
            out.append({"node": node.name, "op_type": node.op_type, "small_operand": small,
                        "small_range": list(ranges[small]), "range": [lo, hi], "loss_bits": round(losses[small], 2)})
    return out
