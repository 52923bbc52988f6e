"""What a weight budget must leave for tuning: the step the compressed model is tuned with.

`tuning_reserve_step` is the training step (a StepPlan) whose memory the budget reserves;
`tuning_reserve_bytes` is what the estimator predicts that step needs besides the base weights.
edgecore.luc.pipeline.weight_budget_bytes takes it off a device profile's memory budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

from edgecore.errors import EdgecoreError
from edgecore.memory import MIB, ModelShape, StepPlan, estimate_step


def tuning_reserve_step(shape: ModelShape, batch: int = 4, seq_len: int = 128, window_layers: int = 1) -> StepPlan:
    """The step the budget must leave room for: LoRA on the top `window_layers` layers (adaptive-depth
    tuning then uses whatever room the compressed weights leave for deeper windows)."""
    if not 1 <= window_layers <= shape.layers:
        raise EdgecoreError(f"tuning window of {window_layers} layers must be in 1..{shape.layers}")
    # packed: the window's compressed linears dequantize in their forward, and autograd keeps that copy.
    return StepPlan(batch=batch, seq_len=seq_len, window=(shape.layers - window_layers, shape.layers - 1),
                    allocator="returning", packed_weights=True)


def tuning_reserve_bytes(shape: ModelShape, plan: StepPlan) -> int:
    """What one training step of `plan` needs besides the base weights, as the estimator predicts it."""
    estimate = estimate_step(shape, replace(plan, weight_bytes=0))
    return math.ceil(estimate.total_mb * MIB) + 1  # rounded up, so weights at the budget still leave the step room


__all__ = ["tuning_reserve_bytes", "tuning_reserve_step"]
