"""AIMET's quantizer placement, as data: which tensors an encodings file should name.

AIMET's ``load_encodings_to_sim(sim, path, strict=True)`` rejects a file naming a tensor that has no
enabled quantizer in its QuantizationSimModel. Read from aimet_onnx (``quantsim.py``, module
constants; ``aimet_common/quantsim_config/default_config.json``), aimet-onnx 2.x:

* ``op_outputs_to_ignore``: no output quantizer on data-movement ops (their output holds the
  input's values); ``default_config.json`` also sets ``is_output_quantized: False`` for Cast,
  Dropout, Expand, Squeeze, Pad, Mean, Gather -> :data:`OUTPUT_NOT_QUANTIZED`.
* ``params.bias.is_quantized: False``: bias quantizers are off by default; int32 biases appear only
  in 2.0.0 exports (which mirror the QDQ graph, data-movement outputs included) -> :data:`BIASES_IN_FILE`,
  :data:`DATA_MOVEMENT_IN_FILE`. AIMET's own 2.0.0 file therefore fails its own strict load into a
  default-config sim (bias quantizers disabled); 2.0.0 is the deployment (QNN) format.
* ``op_types_to_tie_qtzrs``: one quantizer object for the input and the output of these ops; a file
  giving them different encodings loads without an error and the last one wins (ResNet-8: the
  AveragePool range 0..4.2 replaced the Relu range 0..24.3 before it, 19% of values clipped)
  -> :data:`TIED_OP_TYPES`. The ``qnn`` target ties them in the plan (``TargetPreset.tied_op_types``).
* ``supergroups`` (Conv+Relu, Conv+Clip, Add+Relu, Gemm+Relu, ConvTranspose+Relu): no quantizer
  between the members; our fused groups already leave those tensors out.

We omit what AIMET does not quantize from 1.0.0/0.6.1 files and :func:`derive_omitted` puts it back
(``apply-encodings``), so the QDQ model is the same byte for byte. ``encodings_all_tensors`` writes
everything (the pre-AIMET-strict layout). The writer checks that the derivation reproduces the plan
and keeps a tensor in the file wherever it would not.
"""

from __future__ import annotations

import onnx

from ..graph.index import GraphIndex, attr
from .encode import bias_encoding
from .encoding import Encoding
from .rules import RULES

# aimet_onnx.quantsim.op_outputs_to_ignore + default_config.json "is_output_quantized": "False"
OUTPUT_NOT_QUANTIZED = frozenset({
    "Flatten", "Gather", "Reshape", "Shape", "Unsqueeze", "Squeeze", "Split", "Compress", "Tile", "Transpose",
    "Identity", "Cast", "Dropout", "Expand", "Pad", "Mean",
})
# aimet_onnx.quantsim.op_types_to_tie_qtzrs: input and output share one quantizer
TIED_OP_TYPES = frozenset({"Concat", "MaxPool", "AveragePool", "Resize"})
# default_config.json "params": {"bias": {"is_quantized": "False"}}; 2.0.0 mirrors the QDQ graph's int32 biases
BIASES_IN_FILE = {"0.6.1": False, "1.0.0": False, "2.0.0": True}
# AIMET's 2.0.0 export (aimet-onnx 2.42, measured on ResNet-8) also names the Transpose/Reshape outputs that carry
# a Q/DQ in its QDQ graph (QuantizationSimModel._export_data_movement_op_output_quantizers); 1.0.0/0.6.1 do not
DATA_MOVEMENT_IN_FILE = {"0.6.1": False, "1.0.0": False, "2.0.0": True}
_BIAS_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}  # op type -> bias input slot
# default_config.json "supergroups": no quantizer between the two ops
SUPERGROUPS = (("Conv", "Relu"), ("ConvTranspose", "Relu"), ("Conv", "Clip"), ("Add", "Relu"), ("Gemm", "Relu"))
# ops whose float constant inputs (past the data input) get param quantizers: Clip's min/max (measured, 2.42)
CONSTANT_INPUTS_QUANTIZED = frozenset({"Clip"})
# aimet_onnx param quantizers: the weight input of these ops (biases are off, see BIASES_IN_FILE)
_PARAM_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def data_input(node: onnx.NodeProto) -> str | None:
    """The input whose values a data-movement op's output carries (its first activation slot)."""
    rule = RULES.get(node.op_type)
    slots = rule.activations if rule is not None and rule.activations else (0,)
    return node.input[slots[0]] if slots[0] < len(node.input) else None


def omitted_outputs(idx: GraphIndex, encodings: dict[str, Encoding]) -> set[str]:
    """Outputs of ops AIMET puts no quantizer on whose encoding is their data input's (derivable)."""
    out = set()
    for node in idx.graph.node:
        if node.op_type not in OUTPUT_NOT_QUANTIZED or RULES.get(node.op_type) is None:
            continue
        src = data_input(node)
        for o in node.output:
            if o in encodings and src in encodings and encodings[o] == encodings[src]:
                out.add(o)
    return out


def bias_tensors(idx: GraphIndex) -> dict[str, tuple[str, str]]:
    """Bias initializer -> (activation input, weight) of the Conv/ConvTranspose/Gemm reading it."""
    out = {}
    for node in idx.graph.node:
        slot = _BIAS_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] and idx.is_constant(node.input[slot]):
            out[node.input[slot]] = (node.input[0], node.input[1])
    return out


def derive_omitted(idx: GraphIndex, encodings: dict[str, Encoding], floats: set[str] = frozenset()) -> dict[str, Encoding]:
    """``encodings`` (as read from a file) plus what the writer left out; ``floats``: tensors the
    file marks as float (never derived).

    Data-movement outputs (only if the file names none): their data input's encoding, in graph
    order so chains propagate. Then biases (only if the file has no int32 entry: a file with any
    names all of them): scale = input scale x weight scale (:func:`.encode.bias_encoding`, as
    quantize computes it; a Gemm's input is often a Reshape's output, derived first).
    """
    out = dict(encodings)
    movers = [n for n in idx.graph.node if n.op_type in OUTPUT_NOT_QUANTIZED and RULES.get(n.op_type)]
    if not any(o in encodings for n in movers for o in n.output):
        for node in movers:
            src = data_input(node)
            if src in out:
                for o in node.output:
                    if o and idx.is_float(o) and o not in out and o not in floats:
                        out[o] = out[src]
    if not any(e.bitwidth == 32 for e in encodings.values()):
        for b, (act, w) in bias_tensors(idx).items():
            if b not in out and b not in floats and act in out and w in out and len(idx.shape.get(b, [])) == 1:
                out[b] = bias_encoding(idx.constant(b), out[act], out[w])[0]
    return out


def file_entries(idx: GraphIndex, encodings: dict[str, Encoding], version: str,
                 all_tensors: bool) -> tuple[dict[str, Encoding], set[str]]:
    """What a file of ``version`` names: (encodings to write, tensors to mark float).

    Leaves out biases (unless the version carries them) and data-movement outputs, each kind only
    where :func:`derive_omitted` gives back exactly ``encodings``, else that kind is written whole.
    A data-movement output the plan keeps float although its input is quantized (an excluded node,
    a target that runs it in float) is marked float, so the derivation does not quantize it.
    """
    if all_tensors:
        return dict(encodings), set()
    biases = set() if BIASES_IN_FILE[version] else {n for n, e in encodings.items() if e.bitwidth == 32}
    movers = set() if DATA_MOVEMENT_IN_FILE[version] else omitted_outputs(idx, encodings)
    for drop in (biases | movers, movers, biases, set()):
        kept = {n: e for n, e in encodings.items() if n not in drop}
        floats = set(derive_omitted(idx, kept)) - set(encodings)
        if derive_omitted(idx, kept, floats) == encodings:
            return kept, floats
    return dict(encodings), set()


def tie_conflicts(idx: GraphIndex, encodings: dict[str, Encoding]) -> list[tuple[str, str, str]]:
    """(node, input, output) of ops AIMET ties whose input and output encodings differ.

    Loading such a file into an AIMET sim keeps one of the two silently; the ``qnn`` target ties
    them in the plan so this list is empty there.
    """
    out = []
    for node in idx.graph.node:
        if node.op_type not in TIED_OP_TYPES or not node.output:
            continue
        o = node.output[0]
        for i in (node.input if node.op_type == "Concat" else node.input[:1]):
            if i in encodings and o in encodings and encodings[i] != encodings[o]:
                out.append((node.name, i, o))
    return out


def aimet_quantizers(idx: GraphIndex) -> tuple[set[str], set[str]]:
    """(activation, param) tensors an aimet-onnx sim with the default config quantizes.

    Model inputs, every float op output except those of :data:`OUTPUT_NOT_QUANTIZED` ops and the
    first op of a :data:`SUPERGROUPS` pair (when it is the pair's only reader), constant weights, and
    the float constant inputs of :data:`CONSTANT_INPUTS_QUANTIZED` ops. A file that a strict load
    accepts names a subset of these (and, for a full match, all of them).

    Measured with aimet-onnx 2.42 on EfficientNet-Lite0 (strict-load errors): a grouped (depthwise)
    Conv does not join the Conv+Clip supergroup (its output has a quantizer), and Clip's min/max
    constants get param quantizers.
    """
    acts = {t for t in idx.graph_inputs if idx.is_float(t)}
    params = set()
    for node in idx.graph.node:
        slot = _PARAM_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and idx.is_constant(node.input[slot]):
            params.add(node.input[slot])
        if node.op_type in CONSTANT_INPUTS_QUANTIZED:
            params.update(t for t in node.input[1:] if t and idx.is_constant(t) and idx.is_float(t))
        if node.op_type in OUTPUT_NOT_QUANTIZED:
            continue
        grouped = node.op_type == "Conv" and attr(node, "group", 1) != 1
        for o in node.output:
            users = idx.uses(o)
            fused = (len(users) == 1 and (node.op_type, users[0].op_type) in SUPERGROUPS
                     and o not in idx.graph_outputs and not grouped)
            if o and idx.is_float(o) and not fused:
                acts.add(o)
    return acts, params
