"""What a scheduled weight is, and how kernels read it.

Three kinds of module carry the weights a kernel can run: LUC's `CompressedLinear` (packed
codes, maybe pruned), the compressed LM head (`QuantizedHead` over a `QuantizedTable`), and a
plain `nn.Linear` a dense model keeps. `source_of` wraps any of them in a `WeightSource` that
gives the kernels one interface: the format, the dense weight, the raw group codes where they
exist, the bias, and the module's own (LUC) forward, which is the baseline every plan is
measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP32_BITS
from edgecore.luc.layer import CompressedLinear, Layout
from edgecore.luc.quant import QUANT_BITS, unpack
from edgecore.luc.storage import bits_label
from edgecore.luc.table import QuantizedHead


@dataclass(frozen=True)
class WeightFormat(Layout):
    """A CompressedLinear's layout (shape, bits, kept count, group size, bias), and what else sets a kernel's
    speed and memory: whether it is an LM head over a vocabulary table, whether LUC stored it."""

    table: bool = False  # an LM head over a packed vocabulary table (LUC's default runs it in row blocks)
    luc: bool = True  # stored by LUC (False: a plain nn.Linear of a dense model)

    @property
    def quantized(self) -> bool:
        return self.bits in QUANT_BITS

    @property
    def label(self) -> str:
        pruned = f" {1 - self.kept / self.numel:.0%} pruned" if self.sparse else ""
        return f"{bits_label(self.bits)}{pruned}{' table' if self.table else ''}"

    @property
    def key(self) -> str:
        """Identifies the format in a cost table: shape, storage, kept count and group size."""
        return (f"{self.out_features}x{self.in_features}/{bits_label(self.bits)}/kept{self.kept}/g{self.group_size}"
                f"{'/table' if self.table else ''}{'/bias' if self.bias else ''}{'' if self.luc else '/nn.Linear'}")


class WeightSource:
    """One scheduled module seen through its weights (see the module docstring)."""

    def __init__(self, module: nn.Module, fmt: WeightFormat):
        self.module = module
        self.format = fmt

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [out, in] weight, zeros where pruned, built fresh."""
        raise NotImplementedError

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    @property
    def input_dtype(self) -> torch.dtype:
        """The activations' dtype in the model this weight sits in (what the cost model times it with)."""
        return torch.float32

    def group_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [out, in] uint8, scale [out, in/g] fp16, zero [out, in/g] fp16) with w = code * scale + zero.

        Only for unpruned group-quantized weights whose groups lie inside rows (in % group_size == 0).
        """
        raise EdgecoreError(f"a {self.format.label} weight has no group codes")

    def luc_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own forward: LUC's dequantize-in-forward (or plain nn.Linear)."""
        raise NotImplementedError

    @property
    def has_group_codes(self) -> bool:
        f = self.format
        return f.quantized and not f.sparse and f.in_features % f.group_size == 0


class LinearSource(WeightSource):
    def __init__(self, module: CompressedLinear):
        layout = module.layout
        super().__init__(module, WeightFormat(layout.out_features, layout.in_features, layout.bits, layout.kept,
                                              layout.group_size, bias=layout.bias))

    def dense(self, dtype=torch.float32):
        return self.module.dense_weight(dtype)

    def bias(self, dtype):
        return None if self.module.bias is None else self.module.bias.to(dtype)

    def group_codes(self):
        if not self.has_group_codes:
            return super().group_codes()
        m, f = self.module, self.format
        codes = unpack(m.qweight, f.bits, f.numel).view(f.out_features, f.in_features)
        groups = f.in_features // f.group_size
        return codes, m.scale.view(f.out_features, groups), m.zero.view(f.out_features, groups)

    def luc_forward(self, x):
        return CompressedLinear.forward(self.module, x)


class TableSource(WeightSource):
    def __init__(self, module: QuantizedHead):
        layout = module.table.layout
        super().__init__(module, WeightFormat(layout.rows, layout.dim, layout.bits, layout.rows * layout.dim,
                                              layout.group_size, table=True))

    def dense(self, dtype=torch.float32):
        return self.module.table.dense(dtype)

    def group_codes(self):
        if not self.has_group_codes:
            return super().group_codes()
        table, f = self.module.table, self.format
        stream, scale, zero = table._views()
        codes = unpack(stream.reshape(-1), f.bits, f.numel).view(f.out_features, f.in_features)
        return codes, scale, zero

    def luc_forward(self, x):
        return QuantizedHead.forward(self.module, x)


class DenseSource(WeightSource):
    def __init__(self, module: nn.Linear):
        bits = {torch.float32: FP32_BITS, torch.float16: 16, torch.bfloat16: 16}.get(module.weight.dtype)
        super().__init__(module, WeightFormat(module.out_features, module.in_features, bits, module.weight.numel(),
                                              bias=module.bias is not None, luc=False))

    def dense(self, dtype=torch.float32):
        return self.module.weight.detach().to(dtype)

    def bias(self, dtype):
        return None if self.module.bias is None else self.module.bias.detach().to(dtype)

    @property
    def input_dtype(self):
        return self.module.weight.dtype

    def luc_forward(self, x):
        return nn.Linear.forward(self.module, x)


def source_of(module: nn.Module) -> WeightSource:
    if isinstance(module, CompressedLinear):
        return LinearSource(module)
    if isinstance(module, QuantizedHead):
        return TableSource(module)
    if isinstance(module, nn.Linear):
        return DenseSource(module)
    raise EdgecoreError(f"cannot schedule a {type(module).__name__}: only CompressedLinear, QuantizedHead and nn.Linear")
