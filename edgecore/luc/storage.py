"""What every packed-storage module shares: the bit-widths it stores, its size, a refusal to load
mismatched buffers, its label."""

from __future__ import annotations

import torch
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP16_BITS, FP32_BITS
from edgecore.luc.quant import QUANT_BITS

FLOAT_DTYPES = {FP32_BITS: torch.float32, FP16_BITS: torch.float16}  # bits stored as plain float values
STORAGE_BITS = (FP32_BITS, FP16_BITS, *QUANT_BITS)  # fp32 values, fp16 values, else packed codes


def bits_label(bits: int) -> str:
    return {FP32_BITS: "fp32", FP16_BITS: "fp16"}.get(bits, f"{bits}-bit")


class PackedStorage(nn.Module):
    """Base of modules whose state is packed buffers laid out from their configuration."""

    def nbytes(self) -> int:
        """Bytes really held by this module's own buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict would silently cast e.g. fp16 values into an fp32 stream of the same
        # length: a dtype mismatch means the module was built for another configuration.
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is not None and key in state_dict and state_dict[key].dtype != buffer.dtype:
                raise EdgecoreError(
                    f"{key} is {state_dict[key].dtype} in the state dict but {buffer.dtype} in a module built for "
                    f"{self.extra_repr()}: rebuild it with the configuration the state dict was saved with"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
