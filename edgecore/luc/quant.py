"""Group-wise asymmetric (min-max) weight quantization with really packed storage.

A tensor is read as one row-major stream and cut into groups of `group_size` consecutive
values; each group has its own fp16 `scale` and `zero` (the group minimum), and every value
becomes a `bits`-bit code `round((x - zero) / scale)`. For a 2-D `[out, in]` weight whose `in`
is a multiple of `group_size` every group lies inside one row (groups run along `in`);
otherwise groups run on into the next row, and the last group of the stream may be shorter.

Codes are packed densely: 4 bits two per byte, 2 bits four per byte, 3 bits eight codes in
three bytes, 8 bits one per byte (1 bit, eight per byte, serves the sparsity masks). Codes sit
little-endian: the first code of a chunk occupies its lowest bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgecore.errors import EdgecoreError

QUANT_BITS = (2, 3, 4, 8)
PACK_BITS = (1, 2, 3, 4, 8)  # 1 bit is for masks only
FP16_MAX = 65504.0


def _check_pack_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise EdgecoreError(f"cannot pack {bits}-bit codes: bits must be one of {PACK_BITS}")


def chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk: lcm(bits, 8) bits, at most 24."""
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` uses for `numel` codes of `bits` bits (the tail chunk is padded)."""
    _check_pack_bits(bits)
    if numel < 0:
        raise EdgecoreError(f"numel={numel} must be at least 0")
    codes, nbytes = chunk(bits)
    return -(-numel // codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, each < 2**bits) into a 1-D uint8 byte stream."""
    _check_pack_bits(bits)
    if codes.dtype != torch.uint8:
        raise EdgecoreError(f"codes must be uint8 to pack, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise EdgecoreError(f"a code of {int(flat.max())} does not fit in {bits} bits (allowed 0..{2**bits - 1})")
    if bits == 8:
        return flat.clone()
    per, nbytes = chunk(bits)
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # One word per chunk (uint8 when a chunk is one byte, else int32: 3 bits x 8 = 24 bits),
    # built by OR-ing each position's codes in; a loop over the <= 8 positions, not elements.
    chunks = flat.view(-1, per).to(_word_dtype(nbytes))
    words = chunks[:, 0].clone()
    for i in range(1, per):
        words |= chunks[:, i] << (i * bits)
    if nbytes == 1:
        return words
    return torch.stack([(words >> (8 * j)) & 0xFF for j in range(nbytes)], dim=1).to(torch.uint8).reshape(-1)


def _word_dtype(nbytes: int) -> torch.dtype:
    return torch.uint8 if nbytes == 1 else torch.int32


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` codes of a stream made by `pack`, as a 1-D uint8 tensor."""
    expected = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise EdgecoreError(
            f"packed stream of {tuple(packed.shape)} {packed.dtype} does not hold {numel} {bits}-bit codes: "
            f"expected a 1-D uint8 tensor of {expected} bytes"
        )
    if bits == 8:
        return packed.clone()
    per, nbytes = chunk(bits)
    if nbytes == 1:
        words = packed
    else:
        chunks = packed.view(-1, nbytes).to(torch.int32)
        words = chunks[:, 0].clone()
        for j in range(1, nbytes):
            words |= chunks[:, j] << (8 * j)
    shifts = torch.arange(per, device=packed.device, dtype=words.dtype) * bits
    codes = (words[:, None] >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]


def num_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def _check_quant_args(bits: int, group_size: int) -> None:
    if bits not in QUANT_BITS:
        raise EdgecoreError(f"cannot quantize to {bits} bits: bits must be one of {QUANT_BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise EdgecoreError(f"group_size={group_size!r} must be a positive integer (e.g. 64)")


def quantized_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes a `QuantizedTensor` of `numel` values holds: packed codes plus fp16 scale and zero."""
    _check_quant_args(bits, group_size)
    return packed_nbytes(numel, bits) + 2 * 2 * num_groups(numel, group_size)


@dataclass
class QuantizedTensor:
    """Packed codes plus one fp16 (scale, zero) per group; `dequantize` gives the values back."""

    packed: torch.Tensor  # uint8, 1-D
    scale: torch.Tensor  # float16, [groups]
    zero: torch.Tensor  # float16, [groups]
    shape: tuple[int, ...]
    bits: int
    group_size: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.scale, self.zero, self.shape, self.bits, self.group_size, dtype)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: tuple[int, ...],
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """code * scale + zero per group, computed in fp32 (so every dtype rounds the same values)."""
    numel = math.prod(shape)
    codes = unpack(packed, bits, numel).to(torch.float32)
    groups = num_groups(numel, group_size)
    if scale.numel() != groups or zero.numel() != groups:
        raise EdgecoreError(
            f"{numel} values in groups of {group_size} need {groups} scales and zeros, "
            f"got {scale.numel()} and {zero.numel()}"
        )
    pad = groups * group_size - numel
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    values = codes.view(groups, group_size) * scale.float()[:, None] + zero.float()[:, None]
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


def quantize(values: torch.Tensor, bits: int, group_size: int = 64) -> QuantizedTensor:
    """Min-max asymmetric quantization of a 1-D or 2-D float tensor, groups along the row-major stream."""
    _check_quant_args(bits, group_size)
    if values.dim() not in (1, 2) or not values.is_floating_point():
        raise EdgecoreError(f"can quantize a 1-D or 2-D float tensor, got {tuple(values.shape)} {values.dtype}")
    shape = tuple(values.shape)
    x = values.detach().to(torch.float32).reshape(-1)
    if x.numel() == 0:
        raise EdgecoreError(f"cannot quantize an empty tensor of shape {shape}")
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > FP16_MAX:
        raise EdgecoreError(f"values must be finite and within the fp16 range (|x| <= {FP16_MAX}) to quantize")
    groups = num_groups(x.numel(), group_size)
    pad = groups * group_size - x.numel()
    if pad:
        # Repeating the last value (which belongs to the tail group) leaves its min and max as they are.
        x = torch.cat([x, x[-1].expand(pad)])
    grouped = x.view(groups, group_size)
    low, high = grouped.amin(dim=1), grouped.amax(dim=1)
    qmax = 2**bits - 1
    zero = low.to(torch.float16)
    # fp16 rounding of the scale (relative error <= 2**-11) moves the top level by at most
    # qmax * 2**-11 < 1/8 of a step, so the top group value still rounds within half a step.
    scale = ((high - low) / qmax).to(torch.float16)
    # Codes come from the fp16 scale and zero that are stored, so dequantize reproduces them exactly.
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # constant group: all codes 0
    codes = torch.round((grouped - zero.float()[:, None]) / safe_scale[:, None]).clamp_(0, qmax)
    codes = codes.to(torch.uint8).reshape(-1)[: x.numel() - pad]
    return QuantizedTensor(pack(codes, bits), scale, zero, shape, bits, group_size)


def dequantize_like(values: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """`values` after a round trip through `bits`-bit storage (16: fp16), same shape and dtype: what a
    quantized copy would compute with, for measuring its effect without building the packed module."""
    if bits == 16:
        return values.to(torch.float16).to(values.dtype)
    return quantize(values, bits, group_size).dequantize(values.dtype)
