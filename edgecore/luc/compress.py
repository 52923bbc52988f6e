"""The LUC verb on a model you hold: `compress_(model, config, calibration) -> Policy`.

    policy = compress_(model, LucConfig(candidates, embedding_bits=(8, 4), weight_budget_bytes=budget), batches)

Like torchao's `quantize_(model, Int4WeightOnlyConfig())`: in place, driven by a config object
(edgecore.luc.config.LucConfig). The steps (`search`, then `apply_policy`): one dense
calibration pass over the batches (activation norms for Wanda, cached layer inputs, dense
log-probabilities), unless a Calibration is given; the sensitivity of every (layer, candidate),
from the disk cache when one is given and holds it; the table's sensitivity per bit-width; the
knapsack policy for the weight budget (edgecore.luc.policy.choose_policy); compression in place.

edgecore.luc.pipeline.compress is the same from a model name, a device profile and a data spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from edgecore.encoding import Batch
from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP32_BITS, Candidate, LucConfig
from edgecore.luc.layer import set_module
from edgecore.luc.policy import Policy, choose_policy
from edgecore.luc.quant import dequantize_like
from edgecore.luc.sensitivity import Calibration, Sensitivity, SensitivityCache, compress_linear, linears, measure_cached
from edgecore.luc.table import compress_embeddings
from edgecore.memory import MIB, ModelShape

# ---------------------------------------------------------------- sensitivity of the table


@torch.no_grad()
def embedding_sensitivity(calib: Calibration, bits_options: Sequence[int], group_size: int) -> dict[int, float]:
    """KL of quantizing the token table alone (input embedding and tied head at once), per bit-width."""
    table = calib.model.get_input_embeddings().weight
    head = calib.model.get_output_embeddings().weight
    original, original_head = table.data, head.data
    result = {}
    for bits in bits_options:
        if bits == FP32_BITS:
            result[bits] = 0.0
            continue
        try:
            table.data = dequantize_like(original, bits, group_size)
            if head is not table:
                head.data = dequantize_like(original_head, bits, group_size)
            result[bits] = calib.kl_full()
        finally:
            table.data, head.data = original, original_head
    return result


# ---------------------------------------------------------------- measure and choose


@dataclass
class Search:
    """What `search` measured and chose (the model is left as it was)."""

    policy: Policy
    sensitivity: Sensitivity
    embedding_kl: dict[int, float]
    calibration: Calibration
    from_cache: bool
    seconds: dict[str, float] = field(default_factory=dict)


def calibrate(model, config: LucConfig, calibration: Calibration | Sequence[Batch]) -> Calibration:
    """`calibration` itself, or the dense pass over those batches (at `config.kl_tokens` positions)."""
    if isinstance(calibration, Calibration):
        return calibration
    return Calibration(model, calibration, kl_tokens=config.kl_tokens)


def search(
    model, config: LucConfig, calibration: Calibration | Sequence[Batch], *, model_id: str = "", profile: str = "",
    cache: SensitivityCache | None = None, progress: bool = False,
) -> Search:
    """Measure every choice `config` allows and pick the policy for its budget; the model is not changed.

    `model_id` names the model in the policy and the sensitivity cache key; `profile` names the
    device in the policy.
    """
    seconds = {}
    started = time.perf_counter()
    calib = calibrate(model, config, calibration)
    seconds["calibration"] = time.perf_counter() - started
    table, from_cache = measure_cached(
        calib, config.candidates, model_id=model_id, cache=cache, group_size=config.group_size, progress=progress
    )
    seconds["sensitivity"] = table.seconds
    started = time.perf_counter()
    embedding_kl = embedding_sensitivity(calib, config.embedding_bits, config.group_size)
    seconds["embedding_sensitivity"] = time.perf_counter() - started
    policy = choose_policy(ModelShape.from_config(calib.model.config), table.candidates, table.kl, embedding_kl,
                           config.weight_budget_bytes, group_size=config.group_size, model=model_id, profile=profile)
    return Search(policy, table, embedding_kl, calib, from_cache, seconds)


def compress_(
    model, config: LucConfig, calibration: Calibration | Sequence[Batch], *, model_id: str = "", profile: str = "",
    cache: SensitivityCache | None = None, progress: bool = False,
) -> Policy:
    """Compress `model` in place as LUC chooses for `config` (`search`, then `apply_policy`); returns the policy."""
    found = search(model, config, calibration, model_id=model_id, profile=profile, cache=cache, progress=progress)
    apply_policy(model, found.policy, found.calibration)
    return found.policy


# ---------------------------------------------------------------- apply


@torch.no_grad()
def compress_layer(
    layer: nn.Module, candidate: Candidate, act_norm: Callable[[str], torch.Tensor], group_size: int
) -> None:
    """Replace every linear of one decoder layer by its packed CompressedLinear (`act_norm(name)`: its
    Wanda norms); a dense candidate leaves the layer as it is."""
    if candidate.is_dense:
        return
    for name, linear in linears(layer).items():
        set_module(layer, name, compress_linear(linear, act_norm(name), candidate, group_size))


@torch.no_grad()
def apply_policy(model, policy: Policy, calib: Calibration) -> None:
    """Compress `model` in place: Wanda masks from `calib`'s activation norms, packed storage per layer."""
    layers = list(model.model.layers)
    if len(layers) != len(policy.layers):
        raise EdgecoreError(f"the policy has {len(policy.layers)} layers but the model has {len(layers)}")
    for index, (layer, candidate) in enumerate(zip(layers, policy.layers)):
        compress_layer(layer, candidate, lambda name, index=index: calib.act_norm(index, name), policy.group_size)
    if policy.embedding_bits != FP32_BITS:
        compress_embeddings(model, policy.embedding_bits, policy.group_size)


# ---------------------------------------------------------------- measure what it holds


def stored_nbytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def summarize_memory(policy: Policy, model: nn.Module) -> dict:
    """Promised (policy) against measured (stored tensors) bytes."""
    measured = stored_nbytes(model)
    return {"promised_mb": policy.weight_bytes / MIB, "measured_mb": measured / MIB,
            "ratio": measured / policy.weight_bytes}


__all__ = ["Search", "apply_policy", "calibrate", "compress_", "compress_layer", "embedding_sensitivity", "search",
           "stored_nbytes", "summarize_memory"]
