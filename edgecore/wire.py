"""How adapters travel: plain named fp32 numpy arrays, no Flower types.

Both sides import this module: the client turns its trained adapter into arrays, the server
checks every update against the global adapter before it counts. Names are PEFT's own
state-dict keys, so the arrays load into a stock `PeftModel` unchanged. Everything travels
as fp32: Flower's ArrayRecord rejects bf16, and adapters are small.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from edgecore.errors import EdgecoreError

Arrays = dict[str, np.ndarray]


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


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def update_problems(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_delta_norm: float) -> list[str]:
    """Why an update must not count (empty when it is fine).

    Checked against the global adapter it was trained from: the same keys, shapes and dtype
    (fp32), only finite values, and a distance from the global adapter no larger than
    `max_delta_norm` (L2 over all tensors), which catches exploded or scaled-up updates.
    """
    problems = []
    missing, unexpected = set(reference) - set(update), set(update) - set(reference)
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {sorted(missing)[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {sorted(unexpected)[0]}")
    squared = 0.0
    for name in sorted(set(update) & set(reference)):
        value, ref = update[name], reference[name]
        if value.shape != ref.shape:
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        elif value.dtype != np.float32:
            problems.append(f"{name}: dtype {value.dtype}, expected float32")
        elif not np.isfinite(value).all():
            problems.append(f"{name}: {int((~np.isfinite(value)).sum())} non-finite values")
        else:
            squared += float(np.square(value.astype(np.float64) - ref).sum())
    delta = squared**0.5
    if not problems and delta > max_delta_norm:
        problems.append(f"update norm {delta:.3g} exceeds the limit {max_delta_norm:.3g} (max-update-norm)")
    return problems
