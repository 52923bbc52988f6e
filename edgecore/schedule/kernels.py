"""Ways to run one weight: y = x W^T + b from a `WeightSource`.

Each kernel says which formats it runs, what it keeps while installed (`extra_bytes`, beyond
the stored weights), what one call builds and drops (`transient_bytes`), whether a gradient
can flow back through it to x (`differentiable`; the weights stay frozen either way), and how
far its output may stray from the reference F.linear(x, source.dense(fp32)) (`tolerance`:
relative Frobenius error, checked by the tests).

Measured on the 2-core AVX2 test machine (576x1536 projection): fp32 dense 0.13 ms at one row,
12.6 ms at 1024 rows; bf16 0.14 / 106 ms (no bf16 units); torch's int8 weight-only kernel with
bf16 input 0.09 / 25 ms, with fp32 input 0.74 ms at one row; int4 weight-only, bf16 input,
0.09 / 25 ms; CSR at 75% sparsity 0.22 / 24 ms. So the right kernel depends on the rows: the
weight-only kernels win for decoding, unpacked fp32 for training, and the cost table decides.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from edgecore.luc.config import FP32_BITS
from edgecore.schedule.formats import WeightFormat, WeightSource

FP32, BF16 = 4, 2


class Kernel:
    name: str = ""
    differentiable: bool = False
    reads_packed: bool = False  # rebuilds from the layer's packed weights at every call (else: its own state)
    tolerance: float = 1e-5
    description: str = ""

    def applies(self, fmt: WeightFormat) -> bool:
        return True

    def extra_bytes(self, fmt: WeightFormat) -> int:
        return 0

    def transient_bytes(self, fmt: WeightFormat) -> int:
        return 0

    def saved_bytes(self, fmt: WeightFormat) -> int:
        """What autograd keeps from one call until the backward pass, beyond the input (train role)."""
        return 0

    def prepare(self, source: WeightSource) -> dict[str, torch.Tensor]:
        """The state this kernel keeps while installed (computed once, from the stored weights)."""
        return {}

    def __call__(self, state: dict, source: WeightSource, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _with_bias(y: torch.Tensor, source: WeightSource) -> torch.Tensor:
    bias = source.bias(y.dtype)
    return y if bias is None else y + bias


class LucDequant(Kernel):
    """The module's own forward: LUC rebuilds the dense weight at every call (the head in row blocks)."""

    name = "luc-dequant"
    differentiable = True
    reads_packed = True
    description = "LUC's default: rebuild the fp32 weight at every call"
    HEAD_BLOCK_ROWS = 8192  # edgecore.luc.table's DEFAULT_CHUNK_ROWS

    def transient_bytes(self, fmt):
        if fmt.table:
            return min(fmt.out_features, self.HEAD_BLOCK_ROWS) * fmt.in_features * FP32
        if fmt.bits == FP32_BITS and not fmt.sparse:
            return 0
        # Unpacking holds the codes as floats, the values and the weight at once: measured 10.0 MB
        # for a 4- or 8-bit 1536 x 576 weight (3.4 MB in fp32); fp16 values are only cast.
        return fmt.numel * FP32 * (3 if fmt.quantized else 1)

    def saved_bytes(self, fmt):
        return 0 if fmt.table else fmt.numel * FP32  # autograd keeps the rebuilt weight only  # the head's row blocks are rebuilt in backward

    def __call__(self, state, source, x):
        return source.luc_forward(x)


class DequantBf16(Kernel):
    """Rebuild the weight in bf16 at every call and multiply in bf16 (fast only with bf16 units)."""

    name = "dequant-bf16"
    differentiable = True
    reads_packed = True
    tolerance = 2e-2
    description = "rebuild a bf16 weight at every call, bf16 matmul"

    def applies(self, fmt):
        return not fmt.table  # a whole vocabulary table per call is the memory LUC's row blocks avoid

    def transient_bytes(self, fmt):
        return fmt.numel * (BF16 + FP32)  # dequantized in fp32, then cast

    def saved_bytes(self, fmt):
        return fmt.numel * BF16

    def __call__(self, state, source, x):
        y = F.linear(x.to(torch.bfloat16), source.dense(torch.bfloat16))
        return _with_bias(y.to(x.dtype), source)


class Unpacked(Kernel):
    """Unpack once when installed and keep the dense fp32 weight: no rebuild, 4 bytes a weight."""

    name = "unpacked-fp32"
    differentiable = True
    description = "unpacked ahead of time, fp32 weight kept"

    def applies(self, fmt):
        return fmt.luc and (fmt.quantized or fmt.sparse or fmt.bits == 16)

    def extra_bytes(self, fmt):
        return fmt.numel * FP32

    def prepare(self, source):
        return {"weight": source.dense(torch.float32)}

    def __call__(self, state, source, x):
        return F.linear(x, state["weight"].to(x.dtype), source.bias(x.dtype))


class Int8WeightOnly(Kernel):
    """torch's int8 weight-only matmul (`aten._weight_int8pack_mm`) on bf16 activations.

    Its weight is symmetric per output channel, so LUC's group-wise codes are re-quantized once
    (one more rounding, bounded by the tolerance); only for weights LUC already stores in fewer
    bits than fp32 (group codes or fp16), never for a weight a dense model keeps.
    """

    name = "int8-weight-only"
    tolerance = 2e-2
    description = "per-channel int8 weight, torch's weight-only kernel, bf16 activations"

    def applies(self, fmt):
        return (fmt.quantized or (fmt.bits == 16 and fmt.luc)) and hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def extra_bytes(self, fmt):
        return fmt.numel + fmt.out_features * BF16

    def prepare(self, source):
        weight = source.dense(torch.float32)
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
        codes = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"codes": codes, "scale": scale.to(torch.bfloat16)}

    def __call__(self, state, source, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, state["codes"], state["scale"])
        return _with_bias(y.to(x.dtype).view(*x.shape[:-1], -1), source)


class Int4WeightOnly(Kernel):
    """torch's int4 weight-only matmul (`aten._weight_int4pack_mm_for_cpu`) on bf16 activations.

    LUC's 2-, 3- and 4-bit group codes fit its 4-bit codes: torch computes (code - 8) * scale + zero'.
    A b-bit code is shifted by 8 - 2^(b-1), so zero' = zero + 2^(b-1) * scale is the group's
    middle, the smallest value to round. Scales and zeros are rounded from fp16 to bf16, the only
    change (bounded by the tolerance). Needs unpruned weights, groups of
    32/64/128/256 inside rows and a multiple of 16 output channels.
    """

    name = "int4-weight-only"
    tolerance = 2e-2
    description = "LUC's codes repacked for torch's int4 kernel, bf16 activations"

    def applies(self, fmt):
        return (fmt.bits in (2, 3, 4) and not fmt.sparse and fmt.group_size in (32, 64, 128, 256)
                and fmt.in_features % fmt.group_size == 0 and fmt.out_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    def extra_bytes(self, fmt):
        return fmt.numel // 2 + fmt.out_features * (fmt.in_features // fmt.group_size) * 2 * BF16

    def prepare(self, source):
        codes, scale, zero = source.group_codes()
        half = 2 ** (source.format.bits - 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + (8 - half), 1)
        scale32 = scale.float()
        scales_zeros = torch.stack([scale32, zero.float() + half * scale32], dim=-1)  # [out, groups, 2]
        return {"packed": packed, "scales_zeros": scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)}

    def __call__(self, state, source, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, state["packed"], source.format.group_size,
                                                         state["scales_zeros"])
        return _with_bias(y.to(x.dtype).view(*x.shape[:-1], -1), source)


class CsrSparse(Kernel):
    """Pruned weights as an fp32 CSR matrix (`torch.sparse.mm`): skips the zeros, pays for indices."""

    name = "csr-fp32"
    description = "pruned weight as fp32 CSR, sparse matmul"

    def applies(self, fmt):
        return fmt.sparse and not fmt.table

    def extra_bytes(self, fmt):
        return fmt.kept * (FP32 + 8) + (fmt.out_features + 1) * 8  # values, int64 column ids, row offsets

    def prepare(self, source):
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return {"weight": source.dense(torch.float32).to_sparse_csr()}

    def __call__(self, state, source, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        y = torch.sparse.mm(state["weight"], flat.t()).t()
        return _with_bias(y.to(x.dtype).reshape(*x.shape[:-1], -1), source)


KERNELS: dict[str, Kernel] = {k.name: k for k in (LucDequant(), Unpacked(), DequantBf16(), Int8WeightOnly(),
                                                  Int4WeightOnly(), CsrSparse())}
BASELINE = "luc-dequant"


def kernels_for(fmt: WeightFormat, *, differentiable: bool = False) -> list[Kernel]:
    """The kernels that run `fmt` (only those a gradient can flow through when asked)."""
    return [k for k in KERNELS.values() if k.applies(fmt) and (k.differentiable or not differentiable)]
