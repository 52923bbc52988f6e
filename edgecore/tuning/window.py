"""Window tuning: each step trains LoRA on d consecutive layers ending at an exit, plus that exit's adapter.

Layers below the window run under no_grad (nothing saved for backward), layers above the exit
do not run, and the head runs only on the answer rows. So a step's memory is the stored
weights plus the window's state, which `edgecore.memory.estimate_step` predicts: the depth d
is the deepest window that fits the device's budget (`window_depth`).

Which exit a step trains is chosen adaptively (`ExitChooser`): exit e is drawn with
probability proportional to w_e * l_e, where w is the global exit weight vector the server
sends (before there is one, `adaptive.tune` uses the client's own votes measured before
training; uniform without validation data) and l_e the running mean of this client's training
loss at e. Exits where the client still loses much get more steps, exits the fleet relies on
get more steps, and no exit is starved (every weight is kept above a floor). Exits never tried
yet count with the highest loss seen, so each is tried early. Why the votes and not uniform
weights: an early exit reading the shared head starts at a loss of ~30 nats (SmolLM2, exit
14) against ~8 at the last exit, so loss alone sent most steps to exits at chance, and their
windows moved the lower layers away from what the last exit needs (BBC accuracy fell 60% ->
57% in a fleet round that did so). A server that assigns an exit overrides the rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from edgecore import lm
from edgecore.encoding import Batch
from edgecore.errors import EdgecoreError
from edgecore.memory import MIB, ModelShape, StepPlan, estimate_step
from edgecore.tuning.exits import Exits
from edgecore.tuning.runner import DecoderRun

WEIGHT_FLOOR = 0.05  # share of the uniform weight every exit keeps, so none is starved


@dataclass(frozen=True)
class Depth:
    """The window depth chosen for a budget, and what the estimator predicted for it."""

    layers: int
    estimate_mb: float
    budget_mb: float | None


def window_depth(shape: ModelShape, plan: StepPlan, budget_mb: float | None, max_layers: int | None = None) -> Depth:
    """The deepest window (1..max_layers) whose step fits `budget_mb` (MiB above the runtime floor).

    `plan` carries the batch, sequence length, LoRA settings, precision and the stored weight
    bytes; its window is replaced. With no budget the window is max_layers deep.
    """
    deepest = max_layers or shape.layers
    if not 1 <= deepest <= shape.layers:
        raise EdgecoreError(f"window of {deepest} layers must be in 1..{shape.layers}")

    def estimate(d: int) -> float:
        return estimate_step(shape, replace(plan, window=(shape.layers - d, shape.layers - 1))).total_mb

    if budget_mb is None:
        return Depth(deepest, estimate(deepest), None)
    if estimate(1) > budget_mb:
        raise EdgecoreError(
            f"even a one-layer window needs {estimate(1):.0f} MB (weights {(plan.weight_bytes or 0) / MIB:.0f} MB, "
            f"batch {plan.batch} x {plan.seq_len}) but the budget is {budget_mb:.0f} MB: compress the model "
            "further (python -m edgecore compress) or lower the batch size / sequence length"
        )
    depth = max(d for d in range(1, deepest + 1) if estimate(d) <= budget_mb)  # estimate grows with d
    return Depth(depth, estimate(depth), budget_mb)


def normalise(weights: Sequence[float]) -> list[float]:
    """Non-negative weights scaled to sum to 1 (uniform when they are all zero)."""
    values = [max(0.0, float(w)) for w in weights]
    if any(v != v for v in values):
        raise EdgecoreError(f"exit weights {list(weights)} contain NaN")
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1 / len(values)] * len(values)


class ExitChooser:
    """Draws each step's exit: p(e) proportional to w_e * l_e (see the module docstring)."""

    def __init__(self, exits: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0, decay: float = 0.8):
        self.exits = tuple(exits)
        if weights is not None and len(weights) != len(self.exits):
            raise EdgecoreError(f"{len(weights)} exit weights given for {len(self.exits)} exits {list(self.exits)}")
        uniform = 1 / len(self.exits)
        base = normalise(weights) if weights is not None else [uniform] * len(self.exits)
        self.weights = normalise([max(w, WEIGHT_FLOOR * uniform) for w in base])
        self.loss: dict[int, float] = {}
        self.decay = decay
        self.rng = random.Random(seed)

    def probabilities(self) -> list[float]:
        unseen = max(self.loss.values(), default=1.0)
        return normalise([w * self.loss.get(e, unseen) for e, w in zip(self.exits, self.weights)])

    def choose(self) -> int:
        return self.rng.choices(self.exits, weights=self.probabilities())[0]

    def observe(self, exit_layer: int, loss: float) -> None:
        old = self.loss.get(exit_layer)
        self.loss[exit_layer] = loss if old is None else self.decay * old + (1 - self.decay) * loss


class AssignedExit:
    """Every step trains the exit the server assigned this round (the fleet spreads its windows)."""

    def __init__(self, exit_layer: int, exits: Sequence[int]):
        if exit_layer not in exits:
            raise EdgecoreError(f"assigned exit {exit_layer} is not one of the exits {list(exits)}")
        self.exit_layer = exit_layer

    def choose(self) -> int:
        return self.exit_layer

    def observe(self, exit_layer: int, loss: float) -> None:
        pass


def window_of(exit_layer: int, depth: int) -> tuple[int, int]:
    """Inclusive (first, last) trained layers of the window ending at `exit_layer`."""
    return max(0, exit_layer - depth + 1), exit_layer


def window_loss(model, exits: Exits, batch: Batch, exit_layer: int, depth: int) -> torch.Tensor:
    """Answer-token loss read at `exit_layer`, with autograd only through the window's layers."""
    first, last = window_of(exit_layer, depth)
    run = DecoderRun(model, batch)
    if first > 0:
        run.run_to(first - 1, grad=False)
    hidden = run.run_to(last)
    rows, targets = lm.answer_rows(hidden, batch)
    logits = exits.read(run, exit_layer, rows, lambda h: lm.head(model, h))
    return F.cross_entropy(logits.float(), targets)


class WindowTrainer:
    """The `step_loss` of edgecore.finetune.train for adaptive-depth tuning; logs each step's exit."""

    def __init__(self, model, exits: Exits, depth: int, chooser: ExitChooser | AssignedExit):
        self.model, self.exits, self.depth, self.chooser = model, exits, depth, chooser
        self.history: list[dict] = []

    def __call__(self, batch: Batch, step: int) -> torch.Tensor:
        exit_layer = self.chooser.choose()
        loss = window_loss(self.model, self.exits, batch, exit_layer, self.depth)
        self.chooser.observe(exit_layer, float(loss.detach()))
        first, last = window_of(exit_layer, self.depth)
        self.history.append({"step": step + 1, "exit": exit_layer, "window": [first, last], "loss": float(loss.detach())})
        return loss

    def layer_steps(self, layers: int) -> list[int]:
        """How many steps trained each layer."""
        counts = [0] * layers
        for record in self.history:
            for layer in range(record["window"][0], record["window"][1] + 1):
                counts[layer] += 1
        return counts
