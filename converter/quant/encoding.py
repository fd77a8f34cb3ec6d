"""Quantization encodings: the numbers that turn a float tensor into integers.

An :class:`Encoding` is stored the way ONNX ``QuantizeLinear`` needs it: a scale and an ONNX zero
point per tensor (or per channel along ``axis``), plus the integer type (bitwidth and signedness).

AIMET's encodings files describe the same thing with an ``offset`` instead of a zero point
(see ``ENCODINGS.md`` in the design notes). With ``q`` in the *unsigned* range ``[0, 2**bw - 1]``::

    real = (q + offset) * scale
    min  = offset * scale
    max  = (2**bw - 1 + offset) * scale

so for an unsigned ONNX type ``zero_point = -offset`` and for a signed one
``zero_point = -offset - 2**(bw - 1)``. A symmetric 8-bit tensor (int8, zero point 0) therefore
has ``offset = -128``. :meth:`Encoding.offsets` and :meth:`Encoding.from_aimet` are the only
places that convert between the two conventions.

Scales are kept as float32 values (stored in Python floats): a float32 printed by ``repr`` of its
float64 widening reads back to the same float32, which is what makes the encodings file round trip
byte-exact.

Block-wise weights (ONNX opset 21 blocked DequantizeLinear) carry one scale per *block*: ``axis`` is then
the blocked axis (the input-channel axis of a Conv/Gemm/MatMul weight), ``block_size`` the number of its
elements a block spans, and ``block_shape`` the shape of the scale array: the weight's shape with the blocked
axis divided by the block size (rounded up: the last block may be ragged, ONNX allows it) and 1 where one
scale covers the whole dimension (the kernel dims of a Conv: a block is ``block_size`` input channels times
the whole kernel, as in AIMET). ``scale``/``zero_point`` hold the array in C order. Example: a MatMul weight
``[K=72, N=16]`` with blocks of 32 has ``axis=0``, ``block_shape=(3, 16)``; a Conv weight ``[O, I=64, 3, 3]``
has ``axis=1``, ``block_shape=(O, 2, 1, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ONNX TensorProto data types for the integer types we emit.
_ONNX_INT_TYPES = {
    (4, True): 22,  # INT4 (opset 21; stored packed, two values a byte)
    (4, False): 21,  # UINT4
    (8, True): 3,  # INT8
    (8, False): 2,  # UINT8
    (16, True): 5,  # INT16
    (16, False): 4,  # UINT16
    (32, True): 6,  # INT32
}
_NUMPY_INT_TYPES = {  # 4-bit values live in 8-bit arrays until written (onnx.helper.make_tensor packs them)
    (4, True): np.int8,
    (4, False): np.uint8,
    (8, True): np.int8,
    (8, False): np.uint8,
    (16, True): np.int16,
    (16, False): np.uint16,
    (32, True): np.int32,
}

# Largest |range| an encoding covers: 2**126 (8.5e37). Mask sentinels such as finfo(float32).min
# (-3.4e38) would otherwise give min = offset * scale beyond float32 (inf in the encodings);
# clipped to -2**126 they still act as minus infinity (exp(-8.5e37) = 0 in a softmax).
RANGE_LIMIT = 2.0**126


@dataclass(frozen=True)
class Encoding:
    """Quantization parameters of one tensor.

    ``scale`` and ``zero_point`` have one entry per tensor (``axis is None``) or one per channel
    along ``axis``. ``zero_point`` uses the ONNX convention (an integer of the quantized type).
    ``symmetric`` says the range was chosen around zero (zero point 0 for signed types).
    """

    bitwidth: int
    signed: bool
    symmetric: bool
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None
    block_size: int | None = None  # block-wise: elements of ``axis`` one scale spans
    block_shape: tuple[int, ...] | None = None  # block-wise: shape of the scale array

    def __post_init__(self) -> None:
        if (self.block_size is None) != (self.block_shape is None):
            raise ValueError("block_size and block_shape go together")
        if self.block_size is not None:
            object.__setattr__(self, "block_shape", tuple(int(d) for d in self.block_shape))
            if self.axis is None or not 0 <= self.axis < len(self.block_shape) or self.block_size < 1:
                raise ValueError(f"a block-wise encoding needs a blocked axis within {self.block_shape}")
            if int(np.prod(self.block_shape)) != len(self.scale):
                raise ValueError(f"{len(self.scale)} scales for a block shape {self.block_shape}")
        if (self.bitwidth, self.signed) not in _ONNX_INT_TYPES:
            raise ValueError(f"unsupported integer type: {'' if self.signed else 'u'}int{self.bitwidth}")
        if len(self.scale) != len(self.zero_point) or not self.scale:
            raise ValueError("scale and zero_point must be non-empty and of equal length")
        if self.axis is None and len(self.scale) != 1:
            raise ValueError("a per-tensor encoding has exactly one scale")
        # Normalise to float32-representable Python floats and plain ints.
        object.__setattr__(self, "scale", tuple(float(np.float32(s)) for s in self.scale))
        object.__setattr__(self, "zero_point", tuple(int(z) for z in self.zero_point))
        lo, hi = self.qmin, self.qmax
        for z in self.zero_point:
            if not lo <= z <= hi:
                raise ValueError(f"zero point {z} outside [{lo}, {hi}]")
        for s in self.scale:
            if not (np.isfinite(s) and s > 0):
                raise ValueError(f"scale must be finite and > 0, got {s}")

    # --- integer type -------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bitwidth - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bitwidth - 1) - 1 if self.signed else 2**self.bitwidth - 1

    @property
    def onnx_dtype(self) -> int:
        """TensorProto data type of the quantized tensor."""
        return _ONNX_INT_TYPES[(self.bitwidth, self.signed)]

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY_INT_TYPES[(self.bitwidth, self.signed)]

    @property
    def per_channel(self) -> bool:
        """More than one scale (per channel, or block-wise)."""
        return self.axis is not None

    @property
    def blocked(self) -> bool:
        return self.block_size is not None

    def granularity(self) -> str:
        """per-tensor, per-channel or block-<size>, for reports."""
        return f"block-{self.block_size}" if self.blocked else "per-channel" if self.per_channel else "per-tensor"

    def expanded(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Per-block ``values`` (scale or zero point, C order of ``block_shape``) spread over a tensor of ``shape``:
        each block's value repeated over its ``block_size`` elements (the last block cut short where ragged) and
        over the dimensions one value covers whole."""
        v = np.asarray(values).reshape(self.block_shape)
        v = np.repeat(v, self.block_size, axis=self.axis)
        v = np.take(v, np.arange(shape[self.axis]), axis=self.axis)
        return np.broadcast_to(v, shape)

    def onnx_block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale input of an ONNX blocked DequantizeLinear on a tensor of ``shape``: the tensor's shape
        with the blocked axis divided (rounded up). ONNX Runtime rejects broadcasting (1 for a kernel dim)."""
        return tuple(self.block_shape[i] if i == self.axis else d for i, d in enumerate(shape))

    def channel_scales(self) -> np.ndarray:
        """Block-wise: the largest block scale of each output channel (the scale array reduced over the blocked
        axis, kernel dims squeezed), e.g. for an int32 bias beside the weight."""
        s = self.scale_array().reshape(self.block_shape).max(axis=self.axis)
        return s.reshape(-1)

    # --- AIMET view ---------------------------------------------------------------------------
    def offsets(self) -> tuple[int, ...]:
        """AIMET offsets (``real = (q_unsigned + offset) * scale``)."""
        shift = 2 ** (self.bitwidth - 1) if self.signed else 0
        return tuple(-z - shift for z in self.zero_point)

    def mins(self) -> tuple[float, ...]:
        return tuple(float(np.float32(o) * np.float32(s)) for o, s in zip(self.offsets(), self.scale))

    def maxs(self) -> tuple[float, ...]:
        top = 2**self.bitwidth - 1
        return tuple(float(np.float32(top + o) * np.float32(s)) for o, s in zip(self.offsets(), self.scale))

    @classmethod
    def from_aimet(
        cls,
        bitwidth: int,
        symmetric: bool,
        scale: list[float] | tuple[float, ...],
        offset: list[int] | tuple[int, ...],
        axis: int | None = None,
        signed: bool | None = None,
    ) -> "Encoding":
        """Build from AIMET's (scale, offset).

        Symmetric encodings map to a signed type with zero point 0 (AIMET writes offset -128 for a
        full int8 range and -127 for the restricted one; both mean zero point 0). Asymmetric ones map
        to an unsigned type with ``zero_point = -offset``. ``signed`` overrides the type choice.
        """
        if signed is None:
            signed = bool(symmetric)
        if symmetric and signed:
            zps = [0] * len(scale)
        else:
            shift = 2 ** (bitwidth - 1) if signed else 0
            zps = [-int(o) - shift for o in offset]
        return cls(bitwidth, signed, bool(symmetric), tuple(scale), tuple(zps), axis)

    # --- numbers ------------------------------------------------------------------------------
    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)

    def zero_point_array(self) -> np.ndarray:
        return np.asarray(self.zero_point, dtype=self.numpy_dtype)

    def _broadcast(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Block-wise scale and zero point spread over a tensor of ``shape``."""
        return self.expanded(self.scale_array(), shape), self.expanded(self.zero_point_array().astype(np.float32), shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Quantize ``x`` exactly as ONNX QuantizeLinear does (round half to even, saturate)."""
        if self.blocked:
            scale, zp = self._broadcast(x.shape)
            q = np.rint(x.astype(np.float32) / scale) + zp
            return np.clip(q, self.qmin, self.qmax).astype(self.numpy_dtype)
        scale, zp = self.scale_array(), self.zero_point_array().astype(np.float32)
        if self.axis is not None:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = np.rint(x.astype(np.float32) / scale) + zp
        return np.clip(q, self.qmin, self.qmax).astype(self.numpy_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if self.blocked:
            scale, zp = self._broadcast(q.shape)
            return ((q.astype(np.float32) - zp) * scale).astype(np.float32)
        scale, zp = self.scale_array(), self.zero_point_array().astype(np.float32)
        if self.axis is not None:
            shape = [1] * q.ndim
            shape[self.axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return ((q.astype(np.float32) - zp) * scale).astype(np.float32)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))


def encoding_from_range(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    bitwidth: int,
    signed: bool,
    symmetric: bool,
    axis: int | None = None,
) -> Encoding:
    """Scale and zero point covering ``[rmin, rmax]`` (arrays for per-channel).

    The range is widened to include 0 so that zero is exactly representable (padding, ReLU).
    Symmetric encodings use the restricted range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` with zero
    point 0, as TensorRT and ONNX Runtime do for int8; asymmetric ones use every level.
    A range of width 0 (e.g. a dead channel) gets scale 1. Ranges are clipped to
    ``[-RANGE_LIMIT, RANGE_LIMIT]`` so that scale, min and max stay finite float32 numbers.
    """
    rmin = np.clip(np.asarray(rmin, dtype=np.float64).reshape(-1), -RANGE_LIMIT, 0.0)
    rmax = np.clip(np.asarray(rmax, dtype=np.float64).reshape(-1), 0.0, RANGE_LIMIT)
    if symmetric:
        levels = 2 ** (bitwidth - 1) - 1
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = absmax / levels
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        if signed:
            zp = np.zeros(scale.shape, dtype=np.int64)
        else:  # symmetric range in an unsigned type: zero in the middle
            zp = np.full(scale.shape, 2 ** (bitwidth - 1), dtype=np.int64)
    else:
        levels = 2**bitwidth - 1
        scale = ((rmax - rmin) / levels)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        qmin = -(2 ** (bitwidth - 1)) if signed else 0
        zp = np.rint(qmin - rmin / scale.astype(np.float64)).astype(np.int64)
        zp = np.clip(zp, qmin, qmin + levels)
    return Encoding(bitwidth, signed, symmetric, tuple(scale.tolist()), tuple(zp.tolist()), axis)
