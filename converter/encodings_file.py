"""The encodings file beside the QDQ model: written (:func:`encodings_json`), read back onto a float model
(:func:`encodings_for_model`) and applied (:func:`apply_encodings`, ``qconvert apply-encodings``: float model +
encodings file -> the QDQ model quantize wrote). The file format itself is :mod:`converter.quant.encodings_io`;
what AIMET expects in it is :mod:`converter.quant.aimet_rules`. :func:`check_model` is the check every written
QDQ model passes (the ONNX checker, then an ONNX Runtime session).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .binding import check_encodings_model
from .calib.runner import make_session
from .config import WEIGHT_STORAGES, QuantConfig
from .errors import EncodingsError
from .graph.index import GraphIndex
from .graph.model_io import ensure_writable_dir, external_copy, is_large, load_model, save_model
from .graph.passes import preprocess
from .graph.scopes import scopes, wrapper
from .options import FLOAT_SUFFIX
from .quant.aimet_rules import TIED_OP_TYPES, derive_omitted, file_entries, tie_conflicts
from .quant.control_flow import render_control_flow
from .quant.encoding import Encoding
from .quant.encodings_io import FloatEncoding, dumps_encodings, read_encodings
from .quant.plan import ACTIVATION, BIAS, QuantPlan
from .quant.rules import block_axis, weight_axis

log = logging.getLogger("converter")

_QUANT_SCHEMES = {"minmax": "post_training_tf", "minmax_ema": "post_training_tf",
                  "percentile": "post_training_percentile", "mse": "post_training_tf_enhanced"}


def encodings_json(plan: QuantPlan, config: QuantConfig, idx: GraphIndex) -> tuple[str, dict[str, Any]]:
    """The encodings file's text, and what it left out for AIMET (see :mod:`.quant.aimet_rules`)."""
    written, floats = file_entries(idx, plan.encodings, config.encodings_version, config.encodings_all_tensors)
    acts: dict[str, Encoding | FloatEncoding] = {}
    params: dict[str, Encoding | FloatEncoding] = {}
    for n, e in written.items():  # what the plan does not hold (aimet_rules.aimet_additions) is an activation to AIMET
        (acts if n not in plan.tensors or plan.tensors[n].role == ACTIVATION else params)[n] = e
    acts.update({n: FloatEncoding(32) for n in sorted(floats, key=lambda t: (idx.position(t), t))})
    args = {
        "activation_bitwidth": config.activation_bits,
        "param_bitwidth": config.weight_bits,  # the default: per-layer widths are in each entry (bw)
        "dtype": "int",
        "is_symmetric": config.preset.activation_symmetric,
        "per_channel_quantization": config.per_channel,
        "quant_scheme": _QUANT_SCHEMES.get(config.calib_method, config.calib_method),
    }
    ragged = [n for n, e in written.items() if e.blocked and idx.shape.get(n) and idx.shape[n][e.axis] % e.block_size]
    if ragged:
        log.warning("%d block-wise weight(s) have a ragged last block (first: %r, %d input channels, blocks of %d): "
                    "ONNX and ONNX Runtime run it, AIMET and QNN take only input channels divisible by the block size "
                    "(AIMET keeps such layers per channel)", len(ragged), ragged[0], idx.shape[ragged[0]][
                        written[ragged[0]].axis], written[ragged[0]].block_size)
    left_out = [n for n in plan.encodings if n not in written]
    conflicts = tie_conflicts(idx, plan.encodings)
    if conflicts:
        node, i, o = conflicts[0]
        log.warning("%d node(s) that AIMET ties (one quantizer for input and output: %s) have different input and "
                    "output encodings here (first: %s, %r vs %r); an AIMET sim keeps only one of them; "
                    "--target qnn ties them", len(conflicts), ", ".join(sorted(TIED_OP_TYPES)), node, i, o)
    info = {"version": config.encodings_version, "tensors": len(written),
            "omitted_biases": sum(plan.tensors[n].role == BIAS for n in left_out),
            "omitted_data_movement_outputs": sum(plan.tensors[n].role != BIAS for n in left_out),
            "marked_float": sorted(floats),
            "added_for_aimet": sorted(n for n in written if n not in plan.encodings),
            "aimet_tie_conflicts": [{"node": n, "input": i, "output": o} for n, i, o in conflicts]}
    return dumps_encodings(acts, params, args, config.encodings_version), info


def encodings_for_model(model: onnx.ModelProto, enc_file, source: str) -> dict[str, Encoding]:
    idx = GraphIndex.build(model)
    tensors = set(idx.producer) | set(idx.graph_inputs) | set(idx.initializers)
    bodies = {}  # tensors read or defined inside If/Loop/Scan bodies -> the index of a body's wrapper
    for scope in scopes(model):
        body_idx = GraphIndex.build(wrapper(scope, model))
        for name in scope.used():  # defined there or captured (an outer weight read only inside the body)
            bodies.setdefault(name, body_idx)
    out: dict[str, Encoding] = {}
    for section in (enc_file.activations, enc_file.params):
        for name, enc in section.items():
            if isinstance(enc, FloatEncoding):
                continue
            if name not in tensors and name not in bodies:
                raise EncodingsError(f"{source}: tensor {name!r} is not in the model (if quantize wrote a "
                                     f"<name>{FLOAT_SUFFIX} next to it, SmoothQuant/CLE changed the float model)",
                                     f"apply the encodings to the float model they were computed for (<name>{FLOAT_SUFFIX} "
                                     "when quantize wrote one)")
            where = idx if name in tensors and (idx.uses(name) or name not in bodies) else bodies[name]
            if where.is_constant(name) and enc.per_channel and name in enc_file.axis_unknown:
                enc = dataclasses.replace(enc, axis=_param_axis(where, name, enc, source))
            if name in enc_file.block_unknown:
                enc = _param_blocks(where, name, enc, source)
            out[name] = enc
    floats = {n for sec in (enc_file.activations, enc_file.params) for n, e in sec.items() if isinstance(e, FloatEncoding)}
    return derive_omitted(idx, out, floats)


def _param_axis(idx: GraphIndex, name: str, enc: Encoding, source: str) -> int:
    if enc.bitwidth == 32:  # bias: one scale per output channel
        return 0
    shape = idx.shape.get(name, [])
    for node in idx.uses(name):
        axis = weight_axis(node, idx)
        if axis is not None and axis < len(shape) and shape[axis] == len(enc.scale):
            return axis
    raise EncodingsError(f"{source}: tensor {name!r} has {len(enc.scale)} per-channel scales, which fits no "
                         f"channel axis of its shape {shape}",
                         "apply the encodings to the float model they were computed for")


def _param_blocks(idx: GraphIndex, name: str, enc: Encoding, source: str) -> Encoding:
    """A 1.0.0 PER_BLOCK entry (flat scales in (output channel, block) order) shaped from the weight it
    encodes: the blocked axis and channel axis of its consumer (:mod:`.quant.rules`)."""
    shape = idx.shape.get(name, []) if idx.is_constant(name) else []
    for node in idx.uses(name):
        baxis, caxis = block_axis(node, idx), weight_axis(node, idx)
        if baxis is None or caxis is None or baxis >= len(shape) or caxis >= len(shape):
            continue
        block_shape = [1] * len(shape)
        block_shape[caxis], block_shape[baxis] = shape[caxis], -(-shape[baxis] // enc.block_size)
        if int(np.prod(block_shape)) != len(enc.scale):
            continue
        order = np.arange(len(enc.scale))
        if len(shape) == 2 and baxis == 0:  # written (channel, block): transposed back
            order = order.reshape(block_shape[::-1]).T.reshape(-1)
        return Encoding(enc.bitwidth, enc.signed, enc.symmetric, tuple(enc.scale[i] for i in order),
                        tuple(enc.zero_point[i] for i in order), baxis, enc.block_size, tuple(block_shape))
    raise EncodingsError(f"{source}: tensor {name!r} has {len(enc.scale)} block scales (block size {enc.block_size}), "
                         f"which fit no Conv/Gemm/MatMul weight layout of its shape {shape}",
                         "apply the encodings to the float model they were computed for")


def apply_encodings(model: Any, encodings: str | Path, output: str | Path,
                    weight_storage: str | None = None) -> onnx.ModelProto:
    """Float model + encodings file -> the QDQ model (the same bytes ``quantize`` wrote).

    When the quantize report beside the encodings records them, ``model`` must be the file they were made for
    (:func:`converter.binding.check_encodings_model`): the ``<name>.prepared.onnx`` quantize wrote, else the
    float model it was given. ``weight_storage``: ``packed`` or ``int8`` for weights below 8 bits (not block-wise;
    :func:`converter.quant.qdq.as_int8`); None: as that report records (quantize's ``weights.storage``), else
    packed."""
    output = Path(output)
    ensure_writable_dir(output.parent if str(output.parent) else ".")
    if weight_storage is not None and weight_storage not in WEIGHT_STORAGES[1:]:
        raise EncodingsError(f"weight storage {weight_storage!r} is not one of packed, int8",
                             "pass packed or int8, or leave it unset to follow the quantize report")
    float_model = load_model(model)  # first: a missing or broken model file is one clear error
    found = check_encodings_model(model, encodings)
    if weight_storage is None:
        weight_storage = (found[1].get("weight_storage") if found else None) or "packed"
    preprocess(float_model)
    enc_file = read_encodings(encodings)
    encs = encodings_for_model(float_model, enc_file, str(encodings))
    qdq = render_control_flow(float_model, encs, weight_storage == "int8")
    check_model(qdq)
    save_model(qdq, output, external=is_large(float_model))  # the layout quantize writes
    return qdq


def check_model(model: onnx.ModelProto, data: bytes | str | None = None) -> None:
    """The output must pass the full ONNX checker and load in ONNX Runtime (``data``: the model serialized,
    or the path of a copy with external data)."""
    if data is None and is_large(model):  # over the protobuf limit: checked from a copy with external data
        with external_copy(model) as path:
            check_model(model, path)
        return
    try:
        onnx.checker.check_model(data if data is not None else model, full_check=True)
    except Exception as exc:
        raise RuntimeError(f"internal error: the QDQ model fails the ONNX checker: {exc}") from exc
    make_session(data if data is not None else model, ["CPUExecutionProvider"], optimize=False)
