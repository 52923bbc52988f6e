"""How adapters travel: plain named fp32 numpy arrays, no Flower types.

Both sides import this module: the client turns its trained adapter into arrays, the server
checks every update against the global adapter before it counts. Names are PEFT's own
state-dict keys, so the arrays load into a stock `PeftModel` unchanged. Everything travels
as fp32: Flower's ArrayRecord rejects bf16, and adapters are small.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from edgecore.errors import EdgecoreError

Arrays = dict[str, np.ndarray]
EXIT_PREFIX = "exit."  # exit adapters travel as exit.<layer>.down (rank x hidden) and exit.<layer>.up (hidden x rank)
_LORA_LAYER = re.compile(r"\.layers\.(\d+)\.")
_LORA_PART = re.compile(r"\.lora_([AB])(?:\.|$)")
_EXIT_KEY = re.compile(r"^exit\.(\d+)\.(down|up)$")


def adapter_arrays(model) -> Arrays:
    """The model's adapter weights as fp32 numpy arrays, keyed by PEFT state-dict name."""
    state = get_peft_model_state_dict(model)
    return {name: tensor.detach().to(torch.float32).cpu().numpy() for name, tensor in state.items()}


def load_adapter_arrays(model, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy arrays into the model's adapter; the key sets must match exactly."""
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = expected - set(arrays), set(arrays) - expected
    if missing or unexpected:
        raise EdgecoreError(
            f"adapter arrays do not fit this model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); are the LoRA rank and targets the same on both sides?"
        )
    set_peft_model_state_dict(model, {name: torch.from_numpy(np.asarray(a)) for name, a in arrays.items()})


def split_exits(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    """(LoRA tensors, exit-adapter tensors)."""
    lora = {k: v for k, v in arrays.items() if not k.startswith(EXIT_PREFIX)}
    return lora, {k: v for k, v in arrays.items() if k.startswith(EXIT_PREFIX)}


def exit_arrays(exits) -> Arrays:
    """An `edgecore.tuning.exits.Exits` module's adapters as fp32 arrays."""
    return {name: t.to(torch.float32).cpu().numpy() for name, t in exits.state().items()}


# --- Key names ---------------------------------------------------------------------------


def _lora_part(name: str) -> str | None:
    """'A' or 'B' for a LoRA key that names its decoder layer, else None."""
    part = _LORA_PART.search(name)
    return part.group(1) if part and _LORA_LAYER.search(name) else None


def layer_of(name: str) -> int | None:
    """The decoder layer a LoRA key belongs to, or the layer an exit key sits after; None otherwise."""
    exit_key = _EXIT_KEY.match(name)
    if exit_key:
        return int(exit_key.group(1))
    if _lora_part(name):
        return int(_LORA_LAYER.search(name).group(1))
    return None


def rank_axis(name: str) -> int:
    """The axis that has the LoRA rank: 0 for lora_A and exit down, 1 for lora_B and exit up."""
    exit_key = _EXIT_KEY.match(name)
    if exit_key:
        return 0 if exit_key.group(2) == "down" else 1
    part = _lora_part(name)
    if part:
        return 0 if part == "A" else 1
    raise EdgecoreError(
        f"tensor {name!r} is neither a LoRA key ('...layers.<L>....lora_A/lora_B.weight') nor an exit key "
        "('exit.<L>.down|up'), so it has no rank axis; send only adapter tensors"
    )


# --- Ranks --------------------------------------------------------------------------------


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise EdgecoreError(f"rank {rank!r} is not a positive integer; give the LoRA rank, e.g. 8")
    return int(rank)


def _as_matrix(name: str, value) -> np.ndarray:
    """The tensor as a 2-D array; adapter tensors are matrices, anything else is a caller bug."""
    value = np.asarray(value)
    if value.ndim != 2:
        raise EdgecoreError(f"tensor {name!r} has shape {tuple(value.shape)}; adapter tensors are 2-D matrices")
    return value


def rank_slice(axis: int, rank: int) -> tuple[slice, slice]:
    """Index of the first `rank` slices along `axis` of a matrix."""
    return (slice(0, rank), slice(None)) if axis == 0 else (slice(None), slice(0, rank))


def with_rank(shape: tuple[int, ...], axis: int, rank: int) -> tuple[int, ...]:
    resized = list(shape)
    resized[axis] = rank
    return tuple(resized)


def truncate_rank(arrays: Mapping[str, np.ndarray], rank: int) -> Arrays:
    """Copies of the tensors cut to their first `rank` rank slices: what a rank-`rank` client gets."""
    rank = _check_rank(rank)
    cut = {}
    for name, value in arrays.items():
        axis, value = rank_axis(name), _as_matrix(name, value)
        if value.shape[axis] < rank:
            raise EdgecoreError(
                f"tensor {name!r} has rank {value.shape[axis]}, below the requested {rank}; "
                "truncate only to a rank at most the tensor's own (pad to raise it)"
            )
        cut[name] = value[rank_slice(axis, rank)].copy()
    return cut


def pad_rank(arrays: Mapping[str, np.ndarray], rank: int) -> Arrays:
    """The tensors zero-padded along their rank axis up to `rank` (the inverse of `truncate_rank`)."""
    rank = _check_rank(rank)
    padded = {}
    for name, value in arrays.items():
        axis, value = rank_axis(name), _as_matrix(name, value)
        if value.shape[axis] > rank:
            raise EdgecoreError(
                f"tensor {name!r} has rank {value.shape[axis]}, above the requested {rank}; "
                "pad only to a rank at least the tensor's own (truncate to lower it)"
            )
        out = np.zeros(with_rank(value.shape, axis, rank), dtype=value.dtype)
        out[rank_slice(axis, value.shape[axis])] = value
        padded[name] = out
    return padded


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
