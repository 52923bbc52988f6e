"""LUC, layer-wise unified compression: each decoder layer gets its own bit-width and sparsity.

- `quant`: group-wise asymmetric quantization with really packed codes.
- `prune`: Wanda scores and keep-masks (unstructured or N:M).
- `layer`: CompressedLinear, an nn.Linear that stores only packed kept weights.
"""

from edgecore.luc.layer import CompressedLinear, CompressedLoraLinear, Layout, expected_nbytes, register_peft
from edgecore.luc.prune import (
    ActivationStats,
    NMPattern,
    Sparsity,
    activation_norms,
    keep_mask,
    kept_per_row,
    n_m_mask,
    parse_pattern,
    unstructured_mask,
    wanda_scores,
)
from edgecore.luc.quant import QuantizedTensor, dequantize, pack, packed_nbytes, quantize, unpack

__all__ = [
    "ActivationStats",
    "CompressedLinear",
    "CompressedLoraLinear",
    "Layout",
    "NMPattern",
    "QuantizedTensor",
    "Sparsity",
    "activation_norms",
    "dequantize",
    "expected_nbytes",
    "keep_mask",
    "kept_per_row",
    "n_m_mask",
    "pack",
    "packed_nbytes",
    "parse_pattern",
    "quantize",
    "register_peft",
    "unpack",
    "unstructured_mask",
    "wanda_scores",
]
