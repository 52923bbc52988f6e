"""CompressedLinear: a drop-in nn.Linear whose weight really takes less memory.

Only the KEPT weights are stored, as one row-major stream: packed group-quantized codes with
fp16 scales and zeros (bits 2/3/4/8), or plain fp16 (bits 16) / fp32 (bits 32) values. A
sparse layer also stores its keep-mask, one bit per weight. Everything is a registered buffer,
so `state_dict()` / `load_state_dict()` round-trip and `nbytes()` is the memory really held.

The dense weight is rebuilt on every forward call and dropped afterwards; caching it would
undo the saving (fast kernels that skip the rebuild come later). Choose the model's dtype
before compressing: `model.to(dtype)` casts floating buffers too (scales, fp16/fp32 values).

Buffer sizes are a deterministic function of the configuration (`Layout`), so a saved
compressed model is rebuilt with `CompressedLinear.empty(...)` from its policy and shapes and
filled by `load_state_dict`, and `expected_nbytes` prices a choice before compressing anything.

Under PEFT, `register_peft(lora_config)` lets LoRA wrap CompressedLinear targets; the adapter
trains in full precision beside the frozen compressed base, with the same parameter names as on
a dense nn.Linear (so a saved adapter loads onto the dense model too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP16_BITS, Sparsity
from edgecore.luc.prune import kept_per_row
from edgecore.luc.quant import FP16_MAX, QuantizedTensor, num_groups, pack, packed_nbytes, quantize, unpack
from edgecore.luc.storage import FLOAT_DTYPES, STORAGE_BITS, PackedStorage, bits_label


@dataclass(frozen=True)
class Layout:
    """What a CompressedLinear stores; every buffer's shape and dtype follows from it."""

    out_features: int
    in_features: int
    bits: int
    kept: int  # weights stored, the rest are pruned (zero)
    group_size: int = 64
    bias: bool = False

    def __post_init__(self):
        for name in ("out_features", "in_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EdgecoreError(f"{name}={value!r} must be a positive integer")
        if self.bits not in STORAGE_BITS:
            raise EdgecoreError(f"bits={self.bits!r} is not supported: use one of {STORAGE_BITS}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise EdgecoreError(f"group_size={self.group_size!r} must be a positive integer (e.g. 64)")
        if not 1 <= self.kept <= self.numel:
            raise EdgecoreError(f"kept={self.kept} weights must be in [1, {self.numel}] for a {self.shape} weight")

    @classmethod
    def for_config(
        cls,
        out_features: int,
        in_features: int,
        bits: int,
        sparsity: Sparsity = 0.0,
        group_size: int = 64,
        bias: bool = False,
    ) -> Layout:
        """The layout of a layer pruned with `sparsity` (masks from edgecore.luc.prune keep k per row)."""
        if not isinstance(in_features, int) or in_features < 1:
            raise EdgecoreError(f"in_features={in_features!r} must be a positive integer")
        kept = out_features * kept_per_row(in_features, sparsity)
        return cls(out_features, in_features, bits, kept, group_size, bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def sparse(self) -> bool:
        return self.kept < self.numel

    def buffers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
        """name -> (shape, dtype) of every buffer; None for a buffer this layout does not hold."""
        if self.bits in FLOAT_DTYPES:
            stream = ((self.kept,), FLOAT_DTYPES[self.bits])
            scale = zero = None
        else:
            stream = ((packed_nbytes(self.kept, self.bits),), torch.uint8)
            scale = zero = ((num_groups(self.kept, self.group_size),), torch.float16)
        return {
            "qweight": stream,
            "scale": scale,
            "zero": zero,
            "mask": ((packed_nbytes(self.numel, 1),), torch.uint8) if self.sparse else None,
            "bias": ((self.out_features,), torch.float32) if self.bias else None,
        }

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in filter(None, self.buffers().values()))


def expected_nbytes(
    out_features: int,
    in_features: int,
    bits: int,
    sparsity: Sparsity = 0.0,
    group_size: int = 64,
    bias: bool = False,
) -> int:
    """Bytes a CompressedLinear of this configuration holds: the memory cost of a policy choice.

    `sparsity` is an unstructured fraction in [0, 1) or an NMPattern.
    """
    return Layout.for_config(out_features, in_features, bits, sparsity, group_size, bias).nbytes


class CompressedLinear(PackedStorage):
    """y = x W^T + b with W rebuilt from packed storage at every call; see the module docstring."""

    def __init__(self, layout: Layout, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.in_features = layout.in_features  # nn.Linear's names: PEFT and friends read them
        self.out_features = layout.out_features
        for name, spec in layout.buffers().items():
            tensor = None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=device)
            self.register_buffer(name, tensor)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        out_features: int,
        in_features: int,
        *,
        bits: int,
        sparsity: Sparsity = 0.0,
        group_size: int = 64,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> CompressedLinear:
        """Zero-filled storage for this configuration, to be filled by `load_state_dict`."""
        return cls(Layout.for_config(out_features, in_features, bits, sparsity, group_size, bias), device)

    @classmethod
    def empty_like(
        cls, linear: nn.Linear, *, bits: int, sparsity: Sparsity = 0.0, group_size: int = 64
    ) -> CompressedLinear:
        """`empty` with the shape, bias and device of `linear` (which may live on the meta device)."""
        return cls.empty(
            linear.out_features,
            linear.in_features,
            bits=bits,
            sparsity=sparsity,
            group_size=group_size,
            bias=linear.bias is not None,
            device=linear.weight.device,
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, bits: int, keep: torch.Tensor | None = None, group_size: int = 64
    ) -> CompressedLinear:
        """Compress `linear`: store the weights where `keep` is True (all if None) at `bits`.

        A keep-mask that keeps everything is stored as dense (no mask). Masks from
        edgecore.luc.prune keep the same count in every row, which makes the result the size
        `expected_nbytes` predicts; any other mask works but its size depends on its count.
        """
        weight = linear.weight.detach()
        if weight.dim() != 2 or weight.device.type == "meta":
            raise EdgecoreError(
                f"from_linear needs a materialised 2-D weight, got {tuple(weight.shape)} on {weight.device}"
            )
        if keep is not None and (keep.dtype != torch.bool or keep.shape != weight.shape):
            raise EdgecoreError(
                f"keep-mask must be a bool tensor shaped like the weight {tuple(weight.shape)}, "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        kept = weight.numel() if keep is None else int(keep.sum())
        out_features, in_features = weight.shape
        layout = Layout(out_features, in_features, bits, kept, group_size, linear.bias is not None)
        module = cls(layout, device=weight.device)
        # Boolean indexing reads in row-major order, the order the stream is rebuilt in.
        values = weight.float()[keep.to(weight.device)] if layout.sparse else weight.float().reshape(-1)
        module._store_values(values)
        if layout.sparse:
            module.mask.copy_(pack(keep.reshape(-1).to(torch.uint8), 1))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def _store_values(self, values: torch.Tensor) -> None:
        bits = self.layout.bits
        if bits in FLOAT_DTYPES:
            if bits == FP16_BITS and float(values.abs().max()) > FP16_MAX:
                raise EdgecoreError(f"weights exceed the fp16 range (|w| <= {FP16_MAX}); store them with bits=32")
            self.qweight.copy_(values)
            return
        q = quantize(values, bits, self.layout.group_size)
        self.qweight.copy_(q.packed)
        self.scale.copy_(q.scale)
        self.zero.copy_(q.zero)

    # -- use ---------------------------------------------------------------------------------

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def keep_fraction(self) -> float:
        return self.layout.kept / self.layout.numel

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored (kept) weights as a 1-D tensor, dequantized."""
        if self.layout.bits in FLOAT_DTYPES:
            return self.qweight.to(dtype)
        q = QuantizedTensor(
            self.qweight, self.scale, self.zero, (self.layout.kept,), self.layout.bits, self.layout.group_size
        )
        return q.dequantize(dtype)

    def keep_mask(self) -> torch.Tensor | None:
        """The bool keep-mask [out, in], or None when dense."""
        if self.mask is None:
            return None
        return unpack(self.mask, 1, self.layout.numel).bool().view(self.layout.shape)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [out, in] weight (zeros where pruned), built fresh in `dtype`."""
        values = self.values(dtype)
        keep = self.keep_mask()
        if keep is None:
            return values.view(self.layout.shape)
        # masked_scatter_ fills the kept places in row-major order, the stream's order; it
        # measured about twice as fast as weight[keep] = values on CPU.
        return torch.zeros(self.layout.shape, dtype=dtype, device=values.device).masked_scatter_(keep, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), bias)


    def extra_repr(self) -> str:
        bits = bits_label(self.bits)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{bits}, keep={self.keep_fraction:.3f}, group_size={self.layout.group_size}, nbytes={self.nbytes()}"
        )



# -- PEFT LoRA ---------------------------------------------------------------------------------


class CompressedLoraLinear(LoraLinear):
    """peft's LoRA Linear over a frozen CompressedLinear: base(x) + B(A(dropout(x))) * scaling.

    peft finds the base's device through its `qweight` buffer (the name GPTQ layers use), and
    a module with no `weight` needs that: the stored stream is named `qweight` for this reason.

    Plain LoRA only: merging, DoRA and the other variants need a dense base weight to change
    or to read, and folding B @ A into packed low-bit codes would need re-quantization.
    """

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise EdgecoreError(
                f"LoRA variant {type(variant).__name__} is not supported on a CompressedLinear base: use plain LoRA"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise EdgecoreError("a LoRA adapter cannot be merged into a CompressedLinear; keep it unmerged")


PEFT_CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {CompressedLinear: CompressedLoraLinear}


def register_peft(config: LoraConfig) -> LoraConfig:
    """Let `config` put LoRA on CompressedLinear targets (peft's custom-module mapping); returns it."""
    config._register_custom_module(PEFT_CUSTOM_MODULES)
    return config


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `root` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
