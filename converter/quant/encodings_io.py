"""Read and write AIMET encodings JSON files.

Three versions of the format are in use:

``0.6.1``
    ``activation_encodings`` and ``param_encodings`` are dicts keyed by tensor name; each value is
    a list with one dict per channel (a list of one is per-tensor) holding ``bitwidth``, ``dtype``
    ("int"/"float"), ``is_symmetric`` (the *string* "True"/"False"), ``max``, ``min``, ``offset``
    and ``scale``. A float tensor is ``[{"bitwidth": 16, "dtype": "float"}]``.
``1.0.0``
    The two sections are lists of objects with ``name``, ``enc_type`` (PER_TENSOR/PER_CHANNEL),
    ``dtype`` ("INT"/"FLOAT"), ``bw``, ``is_sym`` (a JSON boolean) and ``scale``/``offset`` lists.
``2.0.0``
    One ``encodings`` list mirroring ONNX QuantizeLinear: ``output_dtype`` ("uint8", "int8", ...),
    ``y_scale`` (scalar or list), optional ``y_zero_point`` (absent = all zeros) and ``axis``.
    It has no activation/param split: entries with an ``axis`` or more than one scale are put in
    ``params``, the rest in ``activations``; callers must not rely on that split for 2.0.0.

Block-wise weights (AIMET's ``PER_BLOCK``, ONNX's blocked DequantizeLinear), as aimet-onnx writes them:

- 2.0.0: ``y_scale`` is the scale array with its shape (nested lists: ``[K/B][N]`` for a MatMul weight
  ``[K, N]``, ``[O][I/B][1][1]`` for a Conv weight), ``axis`` the blocked axis, ``block_size`` B;
- 1.0.0: ``enc_type: "PER_BLOCK"``, ``block_size``, ``scale``/``offset`` flat in (output channel, block)
  order: a 2-D weight blocked on axis 0 (MatMul ``[K, N]``) is written transposed, ``[N][K/B]``, as AIMET
  does. The file states no shape: such entries are read with a flat placeholder shape and listed in
  :attr:`EncodingsFile.block_unknown` for the caller to shape from the model's weight;
- 0.6.1 has no block form (one entry per channel): writing a block-wise encoding there is refused (AIMET would
  flatten the blocks into a list a reader takes for channels). LPBQ (integer per-block scales under a float
  per-channel one) is not read.

We write and read all three (1.0.0 by default). 0.6.1 and 1.0.0 never state the channel
axis of a per-channel encoding: such tensors are read with ``axis=0`` as a placeholder and listed
in :attr:`EncodingsFile.axis_unknown` for the caller to fix (``dataclasses.replace``). A 0.6.1
list of one reads as per-tensor, so a one-channel per-channel encoding comes back per-tensor.

The offset convention: AIMET's ``offset`` is not ONNX's zero point. With ``q`` in the unsigned
range ``[0, 2**bw - 1]``, ``real = (q + offset) * scale``, ``min = offset * scale``, so an
unsigned type has ``zero_point = -offset`` and a signed one ``zero_point = -offset - 2**(bw-1)``.
Example: an 8-bit asymmetric input with ``scale 0.018501389771699905`` and ``offset -114``
(min -2.1092, max 2.6087) is uint8 with zero point 114. The files do not carry signedness:
symmetric encodings read back as signed with zero point 0 (AIMET's restricted-range ``-127`` too),
asymmetric ones as unsigned, as :meth:`Encoding.from_aimet` does. An encoding of another kind
(asymmetric int8, symmetric uint8) is written correctly and reads back as the equivalent one of
that natural type.

The files carry nothing but the format: no hash of the model they belong to. AIMET's loaders read the sections
they know and pass over other keys (``excluded_layers``, ``quantizer_args``), but QNN's converters and other
readers of 2.0.0 are stricter, and a file that must stay loadable everywhere is no place for our metadata.
``quantize`` binds the file to its model in the report beside it instead (``binding``: SHA-256 of the float
model, the prepared model, this file and the QDQ model), and ``apply-encodings`` checks it from there
(:mod:`converter.binding`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from converter.errors import EncodingsError
from converter.quant.encoding import Encoding

WRITE_VERSIONS = ("1.0.0", "0.6.1", "2.0.0")
READ_VERSIONS = ("0.6.1", "1.0.0", "2.0.0")

# 2.0.0 output_dtype -> (bitwidth, signed)
_INT_DTYPES = {
    "int4": (4, True),
    "uint4": (4, False),
    "int8": (8, True),
    "uint8": (8, False),
    "int16": (16, True),
    "uint16": (16, False),
    "int32": (32, True),
}
_FLOAT_DTYPES = {"float16": 16, "float32": 32}
_DTYPE_NAMES = {v: k for k, v in _INT_DTYPES.items()}  # (bitwidth, signed) -> output_dtype, for writing


@dataclass(frozen=True)
class FloatEncoding:
    """A tensor kept in floating point (not quantized)."""

    bitwidth: int = 16


AnyEncoding = Encoding | FloatEncoding


@dataclass
class EncodingsFile:
    """The contents of an encodings file.

    ``axis_unknown`` names the per-channel entries whose channel axis the file did not state; they
    hold ``axis=0`` as a placeholder.
    """

    version: str
    activations: dict[str, AnyEncoding]
    params: dict[str, AnyEncoding]
    quantizer_args: dict = field(default_factory=dict)
    axis_unknown: set[str] = field(default_factory=set)
    block_unknown: set[str] = field(default_factory=set)  # 1.0.0 PER_BLOCK: flat scales, shape from the model


# --- writing ----------------------------------------------------------------------------------


def _bool_str(value: bool) -> str:
    return "True" if value else "False"


def _entry_061(name: str, enc: AnyEncoding) -> list[dict]:
    if isinstance(enc, FloatEncoding):
        return [{"bitwidth": enc.bitwidth, "dtype": "float"}]
    if enc.blocked:
        raise EncodingsError(f"tensor {name!r}: block-wise encoding (block size {enc.block_size}); 0.6.1 has no "
                             "block form", "write --encodings-version 2.0.0 (or 1.0.0: PER_BLOCK)")
    with np.errstate(over="ignore"):
        mins, maxs = enc.mins(), enc.maxs()
    if not np.isfinite(mins + maxs).all():
        raise EncodingsError(
            f"tensor {name!r}: range overflows float32 (scale {max(enc.scale)}); "
            "0.6.1 cannot state its min/max",
            "write version 1.0.0, or recalibrate: a range beyond float32 cannot hold real activations",
        )
    sym = _bool_str(enc.symmetric)
    return [
        {"bitwidth": enc.bitwidth, "dtype": "int", "is_symmetric": sym, "max": mx, "min": mn,
         "offset": off, "scale": s}
        for s, off, mn, mx in zip(enc.scale, enc.offsets(), mins, maxs)
    ]


def _aimet_block_order(enc: Encoding) -> bool:
    """1.0.0 lists a 2-D weight's block scales by (output channel, block): transposed where axis 0 is blocked."""
    return len(enc.block_shape) == 2 and enc.axis == 0


def _entry_100(name: str, enc: AnyEncoding) -> dict:
    if isinstance(enc, FloatEncoding):
        return {"name": name, "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": enc.bitwidth}
    if enc.blocked:
        order = np.arange(len(enc.scale)).reshape(enc.block_shape)
        order = (order.T if _aimet_block_order(enc) else order).reshape(-1)
        offsets = enc.offsets()
        return {"name": name, "enc_type": "PER_BLOCK", "dtype": "INT", "bw": enc.bitwidth, "is_sym": enc.symmetric,
                "scale": [enc.scale[i] for i in order], "offset": [offsets[i] for i in order],
                "block_size": enc.block_size}
    return {
        "name": name,
        "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
        "dtype": "INT",
        "bw": enc.bitwidth,
        "is_sym": enc.symmetric,
        "scale": list(enc.scale),
        "offset": list(enc.offsets()),
    }


def _entry_200(name: str, enc: AnyEncoding) -> dict:
    if isinstance(enc, FloatEncoding):
        return {"name": name, "output_dtype": f"float{enc.bitwidth}"}
    if enc.blocked:
        entry = {"name": name, "output_dtype": _DTYPE_NAMES[(enc.bitwidth, enc.signed)],
                 "y_scale": enc.scale_array().astype(np.float64).reshape(enc.block_shape).tolist()}
        if any(enc.zero_point):
            entry["y_zero_point"] = np.asarray(enc.zero_point).reshape(enc.block_shape).tolist()
        entry.update(axis=enc.axis, block_size=enc.block_size)
        return entry
    entry: dict[str, Any] = {"name": name, "output_dtype": _DTYPE_NAMES[(enc.bitwidth, enc.signed)],
                             "y_scale": list(enc.scale) if enc.per_channel else enc.scale[0]}
    if any(enc.zero_point):
        entry["y_zero_point"] = list(enc.zero_point) if enc.per_channel else enc.zero_point[0]
    if enc.per_channel:
        entry["axis"] = enc.axis
    return entry


def _section(version: str, encodings: dict[str, AnyEncoding]) -> list | dict:
    if version == "1.0.0":
        return [_entry_100(name, enc) for name, enc in encodings.items()]
    return {name: _entry_061(name, enc) for name, enc in encodings.items()}


def dumps_encodings(
    activations: dict[str, AnyEncoding],
    params: dict[str, AnyEncoding],
    quantizer_args: dict,
    version: str = "1.0.0",
) -> str:
    """AIMET encodings JSON text of ``version`` ("1.0.0", "0.6.1" or "2.0.0"), deterministic.

    2.0.0 has one ``encodings`` list (activations first, then params) and no quantizer_args.
    """
    if version not in WRITE_VERSIONS:
        raise EncodingsError(
            f"cannot write encodings version {version!r}",
            f"choose one of the supported versions: {', '.join(WRITE_VERSIONS)}",
        )
    if version == "2.0.0":
        entries = [_entry_200(n, e) for n, e in (*activations.items(), *params.items())]
        body = ("\n" + ",\n".join(f"    {json.dumps(e)}" for e in entries) + "\n  ") if entries else ""
        return f'{{\n  "version": "2.0.0",\n  "encodings": [{body}]\n}}\n'
    if version == "0.6.1":
        quantizer_args = {k: _bool_str(v) if isinstance(v, bool) else v for k, v in quantizer_args.items()}
    doc = {
        "version": version,
        "activation_encodings": _section(version, activations),
        "param_encodings": _section(version, params),
        "quantizer_args": dict(quantizer_args),
    }
    return _layout(doc)


def _layout(doc: dict) -> str:
    """``doc`` as JSON with one tensor per line (and quantizer_args indented).

    ``json.dumps(indent=...)`` puts every per-channel scale on its own line and runs Python's slow
    encoder (0.18 s for EfficientNet-Lite0, a fifth of a whole calibration); the entries here go
    through the C encoder, and a tensor's encoding stays on one greppable line.
    """
    lines = ["{", f'  "version": {json.dumps(doc["version"])},']
    for key in ("activation_encodings", "param_encodings"):
        section = doc[key]
        if isinstance(section, dict):
            items = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in section.items()]
            opening, closing = "{", "}"
        else:
            items = [f"    {json.dumps(v)}" for v in section]
            opening, closing = "[", "]"
        body = ("\n" + ",\n".join(items) + "\n  ") if items else ""
        lines.append(f'  "{key}": {opening}{body}{closing},')
    args = json.dumps(doc["quantizer_args"], indent=2).replace("\n", "\n  ")
    lines.append(f'  "quantizer_args": {args}')
    return "\n".join(lines) + "\n}\n"


# --- reading ----------------------------------------------------------------------------------

_REQUIRED = object()
_KINDS = {"str": str, "bool": bool, "list": list, "dict": dict, "int": int, "number": (int, float)}


class _Reader:
    """Typed access to the parsed JSON; every problem raises EncodingsError naming file/tensor/key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str | None, key: str, problem: str, fix: str) -> NoReturn:
        where = f"tensor {name!r}, key {key!r}" if name is not None else f"key {key!r}"
        raise EncodingsError(f"{self.source}: {where}: {problem}", fix)

    def get(self, obj: dict, name: str | None, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """``obj[key]`` checked to be of ``kind``: str, int, number, bool, list, dict."""
        if key not in obj:
            if default is _REQUIRED:
                self.fail(name, key, "missing", f"add {key!r} to the entry or regenerate the file")
            return default
        value = obj[key]
        if kind == "bool" and value in ("True", "False"):
            return value == "True"
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, _KINDS[kind]) or (kind in ("int", "number") and isinstance(value, bool)):
            self.fail(name, key, f"expected {kind}, got {json.dumps(value)}",
                      f"write {key!r} as a JSON {kind} (see the encodings format spec)")
        return value

    def items(self, obj: dict, name: str, key: str, kind: str) -> list:
        """``obj[key]`` as a non-empty list of ``kind`` (a scalar is a list of one)."""
        values = obj.get(key)
        if not isinstance(values, list):
            return [self.get(obj, name, key, kind)]
        if not values:
            self.fail(name, key, "empty list", f"give {key!r} one value per channel")
        return [self.get({key: v}, name, key, kind) for v in values]

    def scales(self, name: str, key: str, scales: list[float]) -> list[float]:
        for s in scales:
            with np.errstate(over="ignore"):
                s32 = np.float32(s)
            if not (np.isfinite(s32) and s32 > 0):
                self.fail(name, key, f"scale {s!r} is not a positive finite float32",
                          "recalibrate this tensor; a scale must be > 0")
        return scales

    def same(self, name: str, key: str, values: list) -> Any:
        if any(v != values[0] for v in values):
            self.fail(name, key, f"channels disagree: {values}", f"give every channel the same {key!r}")
        return values[0]

    def aimet(self, name: str, bw: int, sym: bool, scales: list, offsets: list, per_channel: bool,
              keys: tuple[str, str, str]) -> Encoding:
        """Encoding from AIMET (scale, offset) lists; ``keys`` name bitwidth, scale, offset."""
        bw_key, scale_key, offset_key = keys
        if bw not in (4, 8, 16, 32) or (bw == 32 and not sym):
            self.fail(name, bw_key, f"unsupported bitwidth {bw} ({'' if sym else 'a'}symmetric)",
                      "use 4, 8 or 16 bits, or 32 bits symmetric")
        if len(scales) != len(offsets):
            self.fail(name, offset_key, f"{len(offsets)} offsets for {len(scales)} scales",
                      "give one offset per scale")
        self.scales(name, scale_key, scales)
        for off in offsets:
            if not -(2**bw - 1) <= off <= 0:
                self.fail(name, offset_key, f"offset {off} outside [{-(2**bw - 1)}, 0] for {bw} bits",
                          "the offset is min/scale: recalibrate or fix the bitwidth")
        return Encoding.from_aimet(bw, sym, scales, offsets, axis=0 if per_channel else None)

    def add(self, out: dict, name: str, enc: AnyEncoding) -> None:
        if name in out:
            self.fail(name, "name", "appears twice", "keep one encoding per tensor")
        out[name] = enc


def _read_061(rd: _Reader, data: dict, out: EncodingsFile) -> None:
    for section, target in (("activation_encodings", out.activations), ("param_encodings", out.params)):
        for name, entries in rd.get(data, None, section, "dict", {}).items():
            if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
                rd.fail(name, section, "expected a non-empty list of encoding dicts",
                        "write one dict per channel, e.g. [{\"bitwidth\": 8, ...}]")
            dtype = rd.same(name, "dtype", [rd.get(e, name, "dtype", "str", "int") for e in entries])
            bw = rd.same(name, "bitwidth", [rd.get(e, name, "bitwidth", "int") for e in entries])
            if dtype == "float":
                rd.add(target, name, FloatEncoding(bw))
                continue
            if dtype != "int":
                rd.fail(name, "dtype", f"unknown dtype {dtype!r}", "use \"int\" or \"float\"")
            sym = rd.same(name, "is_symmetric", [rd.get(e, name, "is_symmetric", "bool") for e in entries])
            scales = [rd.get(e, name, "scale", "number") for e in entries]
            offsets = [rd.get(e, name, "offset", "int") for e in entries]
            enc = rd.aimet(name, bw, sym, scales, offsets, len(entries) > 1, ("bitwidth", "scale", "offset"))
            rd.add(target, name, enc)
            if enc.per_channel:
                out.axis_unknown.add(name)


def _read_100(rd: _Reader, data: dict, out: EncodingsFile) -> None:
    for section, target in (("activation_encodings", out.activations), ("param_encodings", out.params)):
        for entry in rd.get(data, None, section, "list", []):
            if not isinstance(entry, dict):
                rd.fail(None, section, f"expected objects, got {json.dumps(entry)}",
                        "write each encoding as an object with a \"name\"")
            name = rd.get(entry, None, "name", "str")
            enc_type = rd.get(entry, name, "enc_type", "str")
            dtype = rd.get(entry, name, "dtype", "str")
            bw = rd.get(entry, name, "bw", "int")
            if dtype == "FLOAT":
                rd.add(target, name, FloatEncoding(bw))
                continue
            if dtype != "INT":
                rd.fail(name, "dtype", f"unknown dtype {dtype!r}", "use \"INT\" or \"FLOAT\"")
            if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"):
                rd.fail(name, "enc_type", f"{enc_type!r} is not supported",
                        "re-export with per-tensor, per-channel or PER_BLOCK encodings (no LPBQ)")
            scales = rd.items(entry, name, "scale", "number")
            if enc_type == "PER_TENSOR" and len(scales) != 1:
                rd.fail(name, "scale", f"PER_TENSOR with {len(scales)} scales", "set enc_type PER_CHANNEL")
            offsets = rd.items(entry, name, "offset", "int")
            sym = rd.get(entry, name, "is_sym", "bool")
            enc = rd.aimet(name, bw, sym, scales, offsets, enc_type != "PER_TENSOR", ("bw", "scale", "offset"))
            if enc_type == "PER_BLOCK":  # flat placeholder; the caller shapes it from the weight (block_unknown)
                size = rd.get(entry, name, "block_size", "int")
                if size < 1:
                    rd.fail(name, "block_size", f"block size {size}", "give the block size (e.g. 32) of the weight")
                enc = Encoding(enc.bitwidth, enc.signed, enc.symmetric, enc.scale, enc.zero_point, 0, size,
                               (len(enc.scale),))
                out.block_unknown.add(name)
            rd.add(target, name, enc)
            if enc_type == "PER_CHANNEL":
                out.axis_unknown.add(name)


def _read_200(rd: _Reader, data: dict, out: EncodingsFile) -> None:
    for entry in rd.get(data, None, "encodings", "list"):
        if not isinstance(entry, dict):
            rd.fail(None, "encodings", f"expected objects, got {json.dumps(entry)}",
                    "write each encoding as an object with a \"name\"")
        name = rd.get(entry, None, "name", "str")
        dtype = rd.get(entry, name, "output_dtype", "str")
        if dtype in _FLOAT_DTYPES:
            rd.add(out.activations, name, FloatEncoding(_FLOAT_DTYPES[dtype]))
            continue
        if dtype not in _INT_DTYPES:
            rd.fail(name, "output_dtype", f"unsupported dtype {dtype!r}",
                    f"use one of {', '.join([*_INT_DTYPES, *_FLOAT_DTYPES])}")
        if "per_block_int_scale" in entry:
            rd.fail(name, "per_block_int_scale", "LPBQ encodings are not supported",
                    "re-export with block-wise (PER_BLOCK) or per-channel encodings")
        bw, signed = _INT_DTYPES[dtype]
        if "block_size" in entry:
            rd.add(out.params, name, _blocked_200(rd, entry, name, bw, signed))
            continue
        scales = rd.scales(name, "y_scale", rd.items(entry, name, "y_scale", "number"))
        zps = rd.items(entry, name, "y_zero_point", "int") if "y_zero_point" in entry else [0] * len(scales)
        if len(zps) != len(scales):
            rd.fail(name, "y_zero_point", f"{len(zps)} zero points for {len(scales)} scales",
                    "give one zero point per scale")
        lo, hi = (-(2 ** (bw - 1)), 2 ** (bw - 1) - 1) if signed else (0, 2**bw - 1)
        if any(not lo <= z <= hi for z in zps):
            rd.fail(name, "y_zero_point", f"zero points {zps} outside [{lo}, {hi}] for {dtype}",
                    "fix the zero point or the output_dtype")
        axis = rd.get(entry, name, "axis", "int", None)
        per_channel = axis is not None or len(scales) > 1
        symmetric = signed and not any(zps)
        enc = Encoding(bw, signed, symmetric, tuple(scales), tuple(zps), (axis or 0) if per_channel else None)
        rd.add(out.params if per_channel else out.activations, name, enc)
        if per_channel and axis is None:
            out.axis_unknown.add(name)


def _blocked_200(rd: _Reader, entry: dict, name: str, bw: int, signed: bool) -> Encoding:
    """A 2.0.0 block-wise entry: ``y_scale`` nested lists of the scale array's shape, ``axis``, ``block_size``."""
    size = rd.get(entry, name, "block_size", "int")
    axis = rd.get(entry, name, "axis", "int")
    try:
        scale = np.asarray(entry["y_scale"], dtype=np.float64)
        zp = np.asarray(entry.get("y_zero_point", np.zeros(scale.shape, np.int64)), dtype=np.float64)
    except (TypeError, ValueError):
        rd.fail(name, "y_scale", "not a rectangular array of numbers", "write y_scale as nested lists of one shape")
    if scale.ndim < 1 or zp.shape != scale.shape or not 0 <= axis < scale.ndim or size < 1:
        rd.fail(name, "y_scale", f"scale shape {list(scale.shape)}, zero point shape {list(zp.shape)}, axis {axis}, "
                f"block size {size} do not fit", "give y_scale the weight's rank with the blocked axis divided")
    rd.scales(name, "y_scale", scale.reshape(-1).tolist())
    lo, hi = (-(2 ** (bw - 1)), 2 ** (bw - 1) - 1) if signed else (0, 2**bw - 1)
    if np.any(zp % 1 != 0) or np.any((zp < lo) | (zp > hi)):
        rd.fail(name, "y_zero_point", f"zero points outside the integers [{lo}, {hi}]", "fix the zero points")
    zps = tuple(int(z) for z in zp.reshape(-1))
    return Encoding(bw, signed, signed and not any(zps), tuple(scale.reshape(-1).tolist()), zps, axis, size,
                    scale.shape)


_READERS = {"0.6.1": _read_061, "1.0.0": _read_100, "2.0.0": _read_200}


def loads_encodings(text: str, source: str = "<string>") -> EncodingsFile:
    """Parse AIMET encodings JSON (0.6.1, 1.0.0 or 2.0.0; no ``version`` means 0.6.1)."""
    rd = _Reader(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EncodingsError(f"{source}: not valid JSON: {e}",
                             "check the file is an AIMET encodings JSON") from e
    if not isinstance(data, dict):
        rd.fail(None, "version", "the file is not a JSON object", "check the file is an AIMET encodings JSON")
    version = rd.get(data, None, "version", "str", None)
    sections = ("activation_encodings", "param_encodings")
    if version is None and any(isinstance(data.get(k), dict) for k in sections):
        version = "0.6.1"
    if version not in _READERS:
        rd.fail(None, "version", f"unknown encodings version {version!r}",
                f"supported versions are {', '.join(READ_VERSIONS)}")
    args = rd.get(data, None, "quantizer_args", "dict", {})
    if version == "0.6.1":
        args = {k: v == "True" if v in ("True", "False") else v for k, v in args.items()}
    out = EncodingsFile(version, {}, {}, args, set())
    _READERS[version](rd, data, out)
    return out


def read_encodings(path: str | Path) -> EncodingsFile:
    """Read an AIMET encodings JSON file (see :func:`loads_encodings`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EncodingsError(f"cannot read encodings file {path}: {e}",
                             "check the path points to an AIMET encodings JSON file") from e
    return loads_encodings(text, str(path))
