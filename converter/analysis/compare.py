"""Layer-by-layer comparison of two models that share tensor names (float vs quantized).

Works for any QDQ model, ours or another tool's (ONNX Runtime's ``quantize_static`` keeps the float
tensor names and inserts ``X -> QuantizeLinear -> X_QuantizeLinear_Output -> DequantizeLinear ->
X_DequantizeLinear_Output``). For each float tensor ``X`` produced by a node of the float model,
the quantized model's counterpart is what the consumers of ``X`` see there::

    X -> QuantizeLinear -> DequantizeLinear -> Y     compare float X with quantized Y
    X (no Q/DQ after it)                             compare float X with quantized X

(our renderer keeps graph-output names on the DequantizeLinear, ``X_float -> Q -> DQ -> X``; that
case is the second line.) Tensors present in only one model are skipped. Both models run on the
same batches in ONNX Runtime with the compared tensors added as graph outputs; the statistics are
accumulated batch by batch (:class:`~converter.metrics.TensorStats`), nothing is kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from ..progress import tqdm

from ..calib.readers import model_inputs, open_calibration
from ..calib.runner import make_session
from ..errors import ModelError
from ..graph.model_io import is_large, load_model, skeleton
from ..metrics import TensorStats
from ..ort_session import select_providers
from .metrics import finite_or_str

log = logging.getLogger("converter")


@dataclass
class TensorComparison:
    tensor: str  # name in the float model
    quant_tensor: str  # what is fetched from the quantized model
    op_type: str  # producer in the float model
    node: str
    position: int  # producer's index in the float graph
    stats: TensorStats

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "quant_tensor": self.quant_tensor, "op_type": self.op_type, "node": self.node,
                "position": self.position, **self.stats.to_dict()}


def dequantized_name_map(model: onnx.ModelProto) -> dict[str, str]:
    """``{tensor: output of the DequantizeLinear that follows its QuantizeLinear}`` in a QDQ model."""
    dq_of: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            dq_of[node.input[0]] = node.output[0]
    return {n.input[0]: dq_of[n.output[0]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.output[0] in dq_of}


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the shape inference can type (the model is not modified)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model) if is_large(model) else model)
    except Exception:  # a model shape inference cannot handle still runs: fall back to declared types
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)
            if vi.type.tensor_type.elem_type}


def pair_tensors(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                 only: Iterable[str] | None = None) -> list[tuple[str, str, onnx.NodeProto, int]]:
    """``(float tensor, quant tensor, float producer, position)`` for node outputs present in both models."""
    types = float_tensor_types(float_model)
    in_quant = {o for n in quant_model.graph.node for o in n.output} | {i.name for i in quant_model.graph.input}
    dq = dequantized_name_map(quant_model)
    wanted = set(only) if only is not None else None
    pairs = []
    for pos, node in enumerate(float_model.graph.node):
        for t in node.output:
            if not t or types.get(t) != onnx.TensorProto.FLOAT or (wanted is not None and t not in wanted):
                continue
            q = dq.get(t, t)
            if q in in_quant:
                pairs.append((t, q, node, pos))
    return pairs


def with_outputs(model: onnx.ModelProto, names: Iterable[str], types: dict[str, int] | None = None
                 ) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``names`` as graph outputs (float unless ``types`` says)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    types = types or {}
    for name in names:
        if name not in existing:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            existing.add(name)
    return out


def compare_models(float_model: Any, quant_model: Any, data: Any, max_samples: int | None = 32,
                   batch_size: int = 4, providers: list[str] | None = None, calib_spec: str | Path | None = None,
                   tensors: Iterable[str] | None = None) -> list[TensorComparison]:
    """Run both models on ``data`` and compare every shared float tensor (graph order).

    ``data`` is anything :func:`~converter.calib.readers.open_calibration` accepts (a directory of
    .npy/.npz files or images, or an iterable of ``{input: array}`` dicts).
    """
    fm, qm = load_model(float_model), load_model(quant_model)
    pairs = pair_tensors(fm, qm, tensors)
    if not pairs:
        raise ModelError("the two models share no float tensor names",
                         "compare a quantized model with the float model it was made from")
    outputs = {o.name for o in fm.graph.output}
    inner = [p for p in pairs if p[0] not in outputs]
    if tensors is None and not inner and len(fm.graph.node) > 1:
        raise ModelError(f"the two models share only their output name(s) ({', '.join(p[0] for p in pairs)}), no "
                         "tensor inside the network: they are not a float model and its quantized version",
                         "compare a quantized model with the float model it was made from (qconvert quantize "
                         "keeps the float tensor names)")
    providers = providers or select_providers("auto")
    f_sess = make_session(with_outputs(fm, [p[0] for p in pairs]), providers, optimize=False)
    q_sess = make_session(with_outputs(qm, [p[1] for p in pairs]), providers, optimize=False)
    _check_same_inputs(f_sess, q_sess)
    source = open_calibration(data, model_inputs(fm), batch_size, max_samples, calib_spec)
    rows = [TensorComparison(t, q, node.op_type, node.name, pos, TensorStats()) for t, q, node, pos in pairs]
    f_fetch, q_fetch = [r.tensor for r in rows], [r.quant_tensor for r in rows]
    with tqdm(desc="comparing", unit="sample", disable=None, leave=False) as bar:
        for batch in source:
            f_out = f_sess.run(f_fetch, batch)
            try:
                q_out = q_sess.run(q_fetch, batch)
            except Exception as exc:  # the float model took the data, the quantized one does not
                raise ModelError(f"the quantized model cannot run the data the float model takes: "
                                 f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
                                 "compare a quantized model with the float model it was made from") from None
            for row, a, b in zip(rows, f_out, q_out):
                if np.shape(a) != np.shape(b):
                    raise ModelError(f"tensor {row.tensor!r} has shape {list(np.shape(a))} in the float model and "
                                     f"{list(np.shape(b))} in the quantized one: they are not the same network",
                                     "compare a quantized model with the float model it was made from")
                row.stats.update(a, b)
            bar.update(next(iter(batch.values())).shape[0])
    return rows


def _check_same_inputs(f_sess, q_sess) -> None:
    f_in = sorted(i.name for i in f_sess.get_inputs())
    q_in = sorted(i.name for i in q_sess.get_inputs())
    if f_in != q_in:
        raise ModelError(f"the models have different inputs: {f_in} vs {q_in}",
                         "compare a quantized model with the float model it was made from")
    q_shapes = {i.name: i.shape for i in q_sess.get_inputs()}
    for i in f_sess.get_inputs():
        a, b = i.shape, q_shapes[i.name]
        fixed_differ = len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                               for x, y in zip(a, b))
        if fixed_differ:
            raise ModelError(f"input {i.name!r} has shape {a} in the float model and {b} in the quantized one",
                             "compare a quantized model with the float model it was made from (same input shapes)")


# --- presentation ----------------------------------------------------------------------------------

def _fmt(x: float, kind: str) -> str:
    if kind == "sqnr":
        return "inf" if x == float("inf") else f"{x:.1f}"
    if kind == "cos":
        return f"{x:.6f}"
    return f"{x:.3g}"


def format_table(rows: list[TensorComparison], limit: int | None = None, sort: str = "order") -> str:
    """A fixed-width table for the terminal (``sort``: order | sqnr)."""
    ordered = sorted(rows, key=lambda r: r.stats.sqnr_db) if sort == "sqnr" else list(rows)
    shown = ordered[:limit] if limit else ordered
    width = max([len("tensor")] + [len(r.tensor) for r in shown])
    width = min(width, 60)
    head = f"{'#':>4}  {'tensor':<{width}}  {'op':<18} {'SQNR dB':>8} {'cosine':>9} {'MSE':>10} {'max|err|':>10}"
    lines = [head, "-" * len(head)]
    for r in shown:
        name = r.tensor if len(r.tensor) <= width else "..." + r.tensor[-(width - 3):]
        s = r.stats
        lines.append(f"{r.position:>4}  {name:<{width}}  {r.op_type[:18]:<18} {_fmt(s.sqnr_db, 'sqnr'):>8} "
                     f"{_fmt(s.cosine, 'cos'):>9} {_fmt(s.mse, 'mse'):>10} {_fmt(s.max_abs_err, 'mse'):>10}")
    if limit and len(ordered) > limit:
        lines.append(f"... {len(ordered) - limit} more (see --json)")
    return "\n".join(lines)


def comparison_json(rows: list[TensorComparison], float_path: str, quant_path: str) -> str:
    doc = {"float_model": float_path, "quant_model": quant_path, "tensors": [r.to_dict() for r in rows]}
    return json.dumps(finite_or_str(doc), indent=2) + "\n"


def summary_line(rows: list[TensorComparison]) -> str:
    """``N tensors compared; worst SQNR X dB at TENSOR (OP)``."""
    worst = min(rows, key=lambda r: r.stats.sqnr_db)
    return (f"{len(rows)} tensors compared; worst SQNR {_fmt(worst.stats.sqnr_db, 'sqnr')} dB at {worst.tensor} "
            f"({worst.op_type})")
