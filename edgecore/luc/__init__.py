"""LUC, layer-wise unified compression: each decoder layer gets its own bit-width and sparsity.

The API, on a model you hold (in place, config-driven, as torchao's `quantize_`):

    from edgecore import luc
    config = luc.LucConfig(candidates, embedding_bits=(8, 4), weight_budget_bytes=budget)
    policy = luc.compress_(model, config, calibration_batches)
    luc.save_compressed(folder, model, tokenizer, policy)
    model, tokenizer, policy = luc.load_compressed(folder)

Modules, bottom up:
- `config`: Candidate (the one spelling of a choice; fp32 is bits 32), NMPattern and its parser, LucConfig;
- `quant`, `prune`, `storage`, `layer`, `table`: packed codes, Wanda masks, CompressedLinear, packed embeddings;
- `sensitivity`: the calibration pass and the per-(layer, candidate) KL, with its disk cache;
- `knapsack`: the multiple-choice knapsack; `policy`: Policy, its prices, choose_policy (any scores);
- `budget`: the tuning step a weight budget must leave room for;
- `compress`: compress_ (search + apply_policy); `saved`: save_compressed, load_compressed, read_policy.

Above them (they load models and data by name, and import edgecore.models / edgecore.profiles):
`pipeline.compress` (the CLI's `python -m edgecore compress`) and `streamed.compress_streamed`.
They are not imported here.
"""

from edgecore.luc.budget import tuning_reserve_bytes, tuning_reserve_step
from edgecore.luc.compress import (
    Search,
    apply_policy,
    compress_,
    embedding_sensitivity,
    search,
    stored_nbytes,
    summarize_memory,
)
from edgecore.luc.config import FP16_BITS, FP32_BITS, Candidate, LucConfig, NMPattern, Sparsity, parse_n_m, parse_pattern
from edgecore.luc.layer import CompressedLinear, CompressedLoraLinear, Layout, expected_nbytes, register_peft
from edgecore.luc.policy import (
    Policy,
    choose_policy,
    dense_nbytes,
    embedding_nbytes,
    fixed_nbytes,
    layer_nbytes,
    policy_nbytes,
    uniform_policy,
)
from edgecore.luc.prune import (
    ActivationStats,
    activation_norms,
    keep_mask,
    kept_per_row,
    n_m_mask,
    unstructured_mask,
    wanda_scores,
)
from edgecore.luc.quant import QuantizedTensor, dequantize, pack, packed_nbytes, quantize, unpack
from edgecore.luc.saved import is_compressed_folder, load_compressed, read_policy, save_compressed
from edgecore.luc.sensitivity import Calibration, Sensitivity, SensitivityCache, measure, policy_kl

__all__ = [
    "ActivationStats",
    "Calibration",
    "Candidate",
    "CompressedLinear",
    "CompressedLoraLinear",
    "FP16_BITS",
    "FP32_BITS",
    "Layout",
    "LucConfig",
    "NMPattern",
    "Policy",
    "QuantizedTensor",
    "Search",
    "Sensitivity",
    "SensitivityCache",
    "Sparsity",
    "activation_norms",
    "apply_policy",
    "choose_policy",
    "compress_",
    "dense_nbytes",
    "dequantize",
    "embedding_nbytes",
    "embedding_sensitivity",
    "expected_nbytes",
    "fixed_nbytes",
    "is_compressed_folder",
    "keep_mask",
    "kept_per_row",
    "layer_nbytes",
    "load_compressed",
    "measure",
    "n_m_mask",
    "pack",
    "packed_nbytes",
    "parse_n_m",
    "parse_pattern",
    "policy_kl",
    "policy_nbytes",
    "quantize",
    "read_policy",
    "register_peft",
    "save_compressed",
    "search",
    "stored_nbytes",
    "summarize_memory",
    "tuning_reserve_bytes",
    "tuning_reserve_step",
    "uniform_policy",
    "unpack",
    "unstructured_mask",
    "wanda_scores",
]
