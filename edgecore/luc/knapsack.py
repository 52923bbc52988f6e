"""Per-layer compression policy: a multiple-choice knapsack solved by dynamic programming.

Each decoder layer picks exactly one option (a sparsity or N:M pattern and a bit-width) with a
memory cost and a measured sensitivity; the policy minimises total sensitivity subject to
the total cost fitting the weight budget.

Costs are rounded UP to a grid of `resolution` bytes before the DP, so every policy it
returns really fits the budget. The DP is exact on the rounded problem, and the rounded
problem can only lose options whose true total lies within `layers x resolution` bytes of
the budget: the answer is optimal for the budget minus that slack (about 0.1% of it by
default). With integer costs and resolution 1 it is exact, which the tests check against
brute force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgecore.errors import EdgecoreError


@dataclass(frozen=True)
class Option:
    """One way to store one layer."""

    label: str  # e.g. "50% unstructured, 4 bits"
    cost_bytes: int
    sensitivity: float


def min_budget(options: Sequence[Sequence[Option]]) -> int:
    return sum(min(o.cost_bytes for o in layer) for layer in options)


def solve(options: Sequence[Sequence[Option]], budget_bytes: int, resolution: int | None = None) -> list[int]:
    """The index of the chosen option for every layer, minimising total sensitivity within budget."""
    if not options or any(not layer for layer in options):
        raise EdgecoreError("every layer needs at least one compression option")
    smallest = min_budget(options)
    if smallest > budget_bytes:
        raise EdgecoreError(
            f"the weight budget of {budget_bytes / 2**20:.1f} MB cannot hold the layers even at their most "
            f"compressed ({smallest / 2**20:.1f} MB): the smallest budget that fits is {smallest / 2**20:.1f} MB; "
            "raise the device's memory budget or allow more compression (fewer bits, more sparsity)"
        )
    resolution = resolution or max(1, budget_bytes // (1000 * len(options)))
    units = budget_bytes // resolution
    best = np.zeros(units + 1)  # best[c]: least total sensitivity of the layers so far within c units
    picks: list[np.ndarray] = []
    for layer in options:
        nxt = np.full(units + 1, math.inf)
        pick = np.full(units + 1, -1, dtype=np.int32)
        for index, option in enumerate(layer):
            cost = math.ceil(option.cost_bytes / resolution)
            if cost > units:
                continue
            candidate = np.full(units + 1, math.inf)
            candidate[cost:] = best[: units + 1 - cost] + option.sensitivity
            better = candidate < nxt
            nxt[better], pick[better] = candidate[better], index
        picks.append(pick)
        best = nxt
    if not math.isfinite(best[units]):
        # Rounding costs up can make a budget that only just fits infeasible on the grid; a finer
        # grid fixes that, and at 1 byte the rounding is exact (feasibility was checked above).
        return solve(options, budget_bytes, resolution=max(1, resolution // 8))
    chosen, capacity = [], units
    for layer, pick in zip(reversed(options), reversed(picks)):
        index = int(pick[capacity])
        chosen.append(index)
        capacity -= math.ceil(layer[index].cost_bytes / resolution)
    return chosen[::-1]


def total(options: Sequence[Sequence[Option]], chosen: Sequence[int]) -> tuple[int, float]:
    """(bytes, sensitivity) of a policy."""
    picked = [layer[i] for layer, i in zip(options, chosen)]
    return sum(o.cost_bytes for o in picked), sum(o.sensitivity for o in picked)
