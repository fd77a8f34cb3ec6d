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
  between the members; our fused groups already leave those tensors out. But AIMET rejects a
  supergroup that starts at a depthwise or 3-D Conv (:func:`supergroup_rejected`): EfficientNet's
  depthwise Conv -> Clip (ReLU6) has a quantizer on the Conv's output, where we fuse.
* every float constant that is no Conv/Gemm/MatMul param gets an activation quantizer: Clip's min/max.

Where AIMET has a quantizer and the plan does not, the file names the tensor with an encoding that
changes nothing (:func:`aimet_additions`: a fused Relu/Clip's input gets the activation's own
encoding, exact by :func:`passes_through`; a Clip bound an encoding that represents it), and reading
drops those entries again (:func:`drop_additions`). Measured with aimet-onnx 2.42 on EfficientNet-Lite0:
16 depthwise outputs and 2 Clip bounds, then a strict load accepts the file.

We omit what AIMET does not quantize from 1.0.0/0.6.1 files and :func:`derive_omitted` puts it back
(``apply-encodings``), so the QDQ model is the same byte for byte. ``encodings_all_tensors`` writes
everything (the pre-AIMET-strict layout). The writer checks that the derivation reproduces the plan
and keeps a tensor in the file wherever it would not.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.clip import clip_bounds
from ..graph.index import GraphIndex, attr
from ..ops import CONV_OPS, TIED_OP_TYPES
from .encode import bias_encoding
from .encoding import Encoding, encoding_from_range
from .rules import RULES

# aimet_onnx.quantsim.op_outputs_to_ignore + default_config.json "is_output_quantized": "False"
OUTPUT_NOT_QUANTIZED = frozenset({
    "Flatten", "Gather", "Reshape", "Shape", "Unsqueeze", "Squeeze", "Split", "Compress", "Tile", "Transpose",
    "Identity", "Cast", "Dropout", "Expand", "Pad", "Mean",
})
# default_config.json "params": {"bias": {"is_quantized": "False"}}; 2.0.0 mirrors the QDQ graph's int32 biases
BIASES_IN_FILE = {"0.6.1": False, "1.0.0": False, "2.0.0": True}
# AIMET's 2.0.0 export (aimet-onnx 2.42, measured on ResNet-8) also names the Transpose/Reshape outputs that carry
# a Q/DQ in its QDQ graph (QuantizationSimModel._export_data_movement_op_output_quantizers); 1.0.0/0.6.1 do not
DATA_MOVEMENT_IN_FILE = {"0.6.1": False, "1.0.0": False, "2.0.0": True}
_BIAS_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}  # op type -> bias input slot
# default_config.json "supergroups": no quantizer between the two ops (the htp_* configs add Conv+PRelu,
# Conv+LeakyRelu, Conv+BatchNormalization+Relu...)
SUPERGROUPS = (("Conv", "Relu"), ("ConvTranspose", "Relu"), ("Conv", "Clip"), ("Add", "Relu"), ("Gemm", "Relu"))
# ... except that a supergroup starting at a depthwise or 3-D Conv/ConvTranspose is rejected
# (QuantSimConfigurator._set_supergroup_configs: exclude_from_supergroup -> _check_if_conv3d_or_depthwise_conv)
SUPERGROUP_REJECTS = ("depthwise", "conv3d")
# aimet_onnx param quantizers (meta/connectedgraph.py find_all_node_info): op type -> input slots that are
# params when constant; weights are quantized (int8 symmetric), biases not (BIASES_IN_FILE). Every other float
# constant an op reads (Clip's min/max, an Add's constant) gets an *activation* quantizer (asymmetric, activation
# bits): measured with aimet-onnx 2.42
_PARAM_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}
_PARAM_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# activations whose output range bounds their input's: (lower, upper) bound, None = from Clip's inputs
_BOUNDED = {"Relu": (0.0, float("inf")), "Clip": None}


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
    """``encodings`` (as read from a file) less what the writer added for AIMET (:func:`drop_additions`) plus
    what it left out; ``floats``: tensors the file marks as float (never derived).

    Data-movement outputs (only if the file names none): their data input's encoding, in graph
    order so chains propagate. Then biases (only if the file has no int32 entry: a file with any
    names all of them): scale = input scale x weight scale (:func:`.encode.bias_encoding`, as
    quantize computes it; a Gemm's input is often a Reshape's output, derived first).
    """
    out = drop_additions(idx, encodings)
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
    Adds what AIMET quantizes and the plan leaves alone (:func:`aimet_additions`), in every version,
    where reading drops exactly those again.
    """
    if all_tensors:
        return dict(encodings), set()
    added = aimet_additions(idx, encodings, export=DATA_MOVEMENT_IN_FILE[version])
    if drop_additions(idx, {**encodings, **added}) != encodings:
        added = {}
    biases = set() if BIASES_IN_FILE[version] else {n for n, e in encodings.items() if e.bitwidth == 32}
    movers = set() if DATA_MOVEMENT_IN_FILE[version] else omitted_outputs(idx, encodings)
    for drop in (biases | movers, movers, biases, set()):
        kept = {n: e for n, e in encodings.items() if n not in drop} | added
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


def supergroup_rejected(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """AIMET rejects a supergroup starting at ``node``: a depthwise Conv (group > 1, one input channel per group;
    ConvTranspose: C_in == group) or a 3-D one (5-D input or weight). A grouped Conv with more input channels per
    group still joins. aimet_onnx/common/graph_searcher.py ``_check_if_conv3d_or_depthwise_conv``."""
    if node.op_type not in CONV_OPS:
        return False
    w_shape = idx.shape.get(node.input[1]) if len(node.input) > 1 else None
    x_shape = idx.shape.get(node.input[0])
    if (x_shape is not None and len(x_shape) == 5) or (w_shape is not None and len(w_shape) == 5):
        return True  # "conv3d"
    group = attr(node, "group", 1)
    if group == 1 or not w_shape:  # AIMET: an unknown weight shape is not depthwise
        return False
    return w_shape[1] == 1 if node.op_type == "Conv" else w_shape[0] == group  # "depthwise"


def _supergroup_first(node: onnx.NodeProto, out: str, idx: GraphIndex) -> bool:
    """``out`` (of ``node``) has no AIMET quantizer: its only reader completes a supergroup pair with ``node``."""
    users = idx.uses(out)
    return (len(users) == 1 and (node.op_type, users[0].op_type) in SUPERGROUPS and out not in idx.graph_outputs
            and not supergroup_rejected(node, idx))


def aimet_quantizers(idx: GraphIndex) -> tuple[set[str], set[str]]:
    """(activation, param) tensors an aimet-onnx sim with the default config quantizes.

    Activations: model inputs, every float op output except those of :data:`OUTPUT_NOT_QUANTIZED` ops and the
    first op of a :data:`SUPERGROUPS` pair (when the pair's second op is its only reader and the first is no
    depthwise / 3-D Conv, :func:`supergroup_rejected`), and every float constant that is not a param (Clip's
    min/max, an Add's constant: activation quantizers, measured with aimet-onnx 2.42). Params: the constant
    weights of Conv/ConvTranspose/Gemm/MatMul. A file that a strict load accepts names a subset of these (and,
    for a full match, all of them).
    """
    acts = {t for t in idx.graph_inputs if idx.is_float(t)}
    params = set()
    for node in idx.graph.node:
        slot = _PARAM_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and idx.is_constant(node.input[slot]):
            params.add(node.input[slot])
        param_slots = _PARAM_SLOTS.get(node.op_type, ())
        data_only = node.op_type == "Resize"  # aimet_onnx op_params_to_ignore: only Resize's data input
        acts.update(t for i, t in enumerate(node.input)
                    if t and idx.is_constant(t) and idx.is_float(t) and i not in param_slots and not (data_only and i))
        if node.op_type in OUTPUT_NOT_QUANTIZED:
            continue
        acts.update(o for o in node.output if o and idx.is_float(o) and not _supergroup_first(node, o, idx))
    return acts, params


def bounds(node: onnx.NodeProto, idx: GraphIndex) -> tuple[float, float] | None:
    """(lower, upper) a Relu/Clip clamps to; None for other ops or a Clip with a computed bound."""
    if node.op_type not in _BOUNDED:
        return None
    if _BOUNDED[node.op_type] is not None:
        return _BOUNDED[node.op_type]
    return clip_bounds(node, idx)


def passes_through(enc: Encoding, lo: float, hi: float) -> bool:
    """Quantizing with ``enc`` before a clamp to [lo, hi] changes nothing after it: q(clamp(q(x))) == q(clamp(x))
    for every x, when each finite bound lies outside ``enc``'s range or on its grid."""
    if enc.per_channel:
        return False
    s, z = enc.scale[0], enc.zero_point[0]
    e_min, e_max = (enc.qmin - z) * s, (enc.qmax - z) * s
    for b in (lo, hi):
        if np.isfinite(b) and e_min < b < e_max and abs(b / s - round(b / s)) > 1e-3:
            return False
    return True


def exact_encoding(value: float, like: Encoding) -> Encoding:
    """A per-tensor encoding of ``like``'s integer type that represents the constant ``value`` exactly (up to
    float32 rounding of the scale): the range [min(value, 0), max(value, 0)]; 0: ``like`` (holds 0 exactly)."""
    if value == 0 and not like.per_channel:
        return like
    return encoding_from_range(min(value, 0.0), max(value, 0.0), like.bitwidth, like.signed, like.symmetric)


def represents(enc: Encoding, value: np.ndarray) -> bool:
    """``enc`` quantizes ``value`` without loss (float32 rounding aside)."""
    value = np.asarray(value, np.float32)
    return bool(np.allclose(enc.fake_quantize(value), value, rtol=1e-6, atol=1e-7))


def aimet_additions(idx: GraphIndex, encodings: dict[str, Encoding], export: bool = False) -> dict[str, Encoding]:
    """Entries an AIMET sim has quantizers for that the plan does not quantize, with encodings that change
    nothing, so a strict load accepts the file and the sim computes what the QDQ model computes:

    * the input of a Relu/Clip fused into the op before it where AIMET's supergroups do not fuse (a depthwise
      Conv -> Clip, EfficientNet's ReLU6): the activation's own encoding (:func:`passes_through`; for Relu
      this is AIMET's own tie of its input and output quantizers);
    * Clip's constant min/max (activation quantizers in AIMET): an encoding representing the value exactly;
    * ``export`` (2.0.0, as AIMET's own 2.0.0 export: ``_derive_data_movement_op_encodings`` gives a clipping
      op's single-use input its output's encoding): every fused Clip's input, Conv+Clip supergroups too.

    :func:`drop_additions` removes them again on reading, so apply-encodings gives the same QDQ model.
    """
    acts, _ = aimet_quantizers(idx)
    out: dict[str, Encoding] = {}
    for node in idx.graph.node:
        lims = bounds(node, idx)
        y = node.output[0] if node.output else None
        if lims is None or y not in encodings or encodings[y].per_channel:
            continue
        x = node.input[0]
        derived = export and node.op_type == "Clip" and len(idx.uses(x)) == 1 and x not in idx.graph_outputs
        if ((x in acts or derived) and x not in encodings and not idx.is_constant(x) and idx.is_float(x)
                and passes_through(encodings[y], *lims)):
            out[x] = encodings[y]
        for c in node.input[1:]:
            if c and c in acts and c not in encodings and idx.is_constant(c):
                enc = exact_encoding(float(idx.constant(c).reshape(-1)[0]), encodings[y])
                if represents(enc, idx.constant(c)):
                    out[c] = enc
    return out


def drop_additions(idx: GraphIndex, encodings: dict[str, Encoding]) -> dict[str, Encoding]:
    """``encodings`` without the entries :func:`aimet_additions` writes (a file of AIMET's own keeps what
    changes numbers: a Relu/Clip input with another encoding, a Clip bound it does not represent exactly)."""
    drop = set()
    for node in idx.graph.node:
        lims = bounds(node, idx)
        y = node.output[0] if node.output else None
        if lims is None or y not in encodings:
            continue
        x = node.input[0]
        if (x in encodings and encodings[x] == encodings[y] and len(idx.uses(x)) == 1
                and x not in idx.graph_outputs and passes_through(encodings[y], *lims)):
            drop.add(x)
        drop.update(c for c in node.input[1:] if c in encodings and idx.is_constant(c)
                    and represents(encodings[c], idx.constant(c)))
    return {n: e for n, e in encodings.items() if n not in drop}
