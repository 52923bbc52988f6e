"""Server-side aggregation for heterogeneous clients: ranks, layer windows, exits.

Pure numpy, no Flower: the strategy calls these on the named fp32 arrays of `edgecore.wire`.

The global adapter is kept at the fleet's largest LoRA rank R. A client of rank r < R gets the
global arrays cut to r (`truncate`) and sends back tensors of rank r, and only for the decoder
layers of its window plus its exit. What a client may send, and the check of an update against
it, are `federation.validation`'s (`tensors_of_window`, `update_problems`), called from the one
place a reply is parsed (`federation.protocol`). Here, `partial_average` merges the accepted
updates element by element over the clients that really hold each element, and
`ServerOptimizer` turns the average into the next global adapter (FedAvg, or FedAdam over the
averaged delta). `global_exit_weights` merges the clients' votes on how much each exit should
count, and `LayerLedger` decides which window (exit) each client trains next round.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from edgecore.errors import EdgecoreError
from edgecore.experiment import AGGREGATIONS
from edgecore.wire import rank_axis, rank_slice, with_rank
from federation.validation import nonnegative_vector, positive_weight

Arrays = dict[str, np.ndarray]

# Window scores that differ by less than this (relatively) are ties: float sums over different
# windows must not break a tie that is exact in real numbers.
TIE_TOLERANCE = 1e-9


# --- Averaging ----------------------------------------------------------------------------


def _held_index(name: str, value: np.ndarray, reference: np.ndarray) -> tuple[slice, slice]:
    """The part of the global tensor a (possibly lower-rank) update tensor really holds."""
    axis = rank_axis(name)
    rank = value.shape[axis]
    if value.ndim != 2 or not 1 <= rank <= reference.shape[axis] or with_rank(reference.shape, axis, rank) != value.shape:
        raise EdgecoreError(
            f"{name}: shape {tuple(value.shape)} does not fit the global shape {tuple(reference.shape)} at any rank "
            f"<= {reference.shape[axis]}; run update_problems before averaging"
        )
    return rank_slice(axis, rank)


def partial_average(
    global_arrays: Mapping[str, np.ndarray], updates: Sequence[tuple[Mapping[str, np.ndarray], float]]
) -> tuple[Arrays, dict[str, int]]:
    """Examples-weighted mean, element by element, over the updates that hold each element.

    Each update is read as zero-padded to the global rank together with a mask of the elements
    it really holds (its own rank slices; the padding is not held). Every element becomes the
    weighted mean over the updates that hold it; elements no update holds, and tensors nobody
    sent, keep the global value (untouched tensors are the global arrays themselves).

    Why not HetLoRA's plain mean of the zero-padded updates: a rank-r client would then count
    as a vote for zero on slices r..R it never trained, so every round a low-rank client takes
    part the high-rank slices shrink toward zero, and more so the more low-rank clients there are.

    Returns the new arrays and, for every global tensor, how many updates sent it.
    """
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    contributors = {name: 0 for name in global_arrays}
    for number, (arrays, examples) in enumerate(updates):
        weight = positive_weight(examples, f"update {number}")
        for name, value in arrays.items():
            if name not in global_arrays:
                raise EdgecoreError(f"update {number}: tensor {name!r} is not in the global adapter; run update_problems first")
            reference = global_arrays[name]
            value = np.asarray(value, dtype=np.float64)
            held = _held_index(name, value, reference)
            sums.setdefault(name, np.zeros(reference.shape))[held] += weight * value
            weights.setdefault(name, np.zeros(reference.shape))[held] += weight
            contributors[name] += 1
    averaged: Arrays = {}
    for name, reference in global_arrays.items():
        if name not in sums:
            averaged[name] = reference
            continue
        held = weights[name] > 0
        mean = np.array(reference, dtype=np.float64)
        mean[held] = sums[name][held] / weights[name][held]
        averaged[name] = mean.astype(reference.dtype)
    return averaged, contributors


def holder_counts(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per tensor somebody sent: how many updates hold each element (the mask partial_average weighs by)."""
    counts: dict[str, np.ndarray] = {}
    for arrays in updates:
        for name, value in arrays.items():
            reference = global_arrays[name]
            counts.setdefault(name, np.zeros(reference.shape, dtype=np.int64))[_held_index(name, np.asarray(value), reference)] += 1
    return counts


# --- Server optimizers --------------------------------------------------------------------


class ServerOptimizer:
    """Turns the round's average into the next global adapter.

    "fedavg" and "fedprox" take the average as it is (FedProx's proximal term is a client-side
    loss term). "fedadam" (Reddi et al. 2021, Adaptive Federated Optimization) treats
    delta = average - global as a pseudo-gradient per tensor and takes an Adam-like step
    global + lr * m / (sqrt(v) + tau), with no bias correction as in the paper. Only tensors
    somebody sent move; the others, and their moments, stay as they are.
    """

    KINDS = AGGREGATIONS  # the names an experiment may give (edgecore.experiment)

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if kind not in self.KINDS:
            raise EdgecoreError(f"server optimizer {kind!r} is unknown; choose one of {', '.join(self.KINDS)}")
        if not lr > 0:
            raise EdgecoreError(f"server lr {lr!r} must be > 0")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise EdgecoreError(f"server {label} {beta!r} must be in [0, 1)")
        if not tau > 0:
            raise EdgecoreError(f"server tau {tau!r} must be > 0; it keeps the step finite where v is 0")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.first_moment: dict[str, np.ndarray] = {}
        self.second_moment: dict[str, np.ndarray] = {}

    def step(self, global_arrays: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray], contributors: Mapping[str, int]) -> Arrays:
        """The next global arrays from this round's average (see `partial_average`)."""
        unknown = set(averaged) - set(global_arrays)
        if unknown:
            raise EdgecoreError(f"averaged tensor {sorted(unknown)[0]!r} is not in the global adapter; average against the same global arrays")
        if self.kind != "fedadam":
            return {name: averaged.get(name, value) for name, value in global_arrays.items()}
        return {
            name: self._adam_step(name, value, averaged[name]) if contributors.get(name, 0) > 0 and name in averaged else value
            for name, value in global_arrays.items()
        }

    def _adam_step(self, name: str, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        current64 = np.asarray(current, dtype=np.float64)
        delta = np.asarray(average, dtype=np.float64) - current64
        m = self.first_moment.get(name, np.zeros_like(delta))
        v = self.second_moment.get(name, np.zeros_like(delta))
        if m.shape != delta.shape:
            raise EdgecoreError(f"{name}: shape changed from {m.shape} to {delta.shape} between rounds; start a new ServerOptimizer")
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.beta2 * v + (1 - self.beta2) * np.square(delta)
        self.first_moment[name], self.second_moment[name] = m, v
        return (current64 + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.asarray(current).dtype)


# --- Exit weights -------------------------------------------------------------------------


def _weighted_mean(vectors: Sequence[tuple[Sequence[float], float]], length: int, what: str, entry: str) -> np.ndarray | None:
    """Examples-weighted mean of validated vectors; None when there are none."""
    total, weight_sum = np.zeros(length), 0.0
    for number, (vector, examples) in enumerate(vectors):
        weight = positive_weight(examples, f"{what} {number}")
        total += weight * nonnegative_vector(vector, length, f"{what} {number}", entry)
        weight_sum += weight
    return total / weight_sum if weight_sum else None


def global_exit_weights(votes: Sequence[tuple[Sequence[float], float]], exits: int) -> list[float]:
    """The fleet's exit weights: the examples-weighted mean of the clients' votes, summing to 1.

    Uniform (1/exits each) when nobody voted or every vote is all zeros.
    """
    if isinstance(exits, bool) or not isinstance(exits, (int, np.integer)) or exits < 1:
        raise EdgecoreError(f"exits {exits!r} must be a positive integer: the number of exits")
    mean = _weighted_mean(votes, exits, "exit vote", "exit")
    if mean is None or mean.sum() == 0:
        return [1.0 / exits] * exits
    return (mean / mean.sum()).tolist()


# --- Which window each client trains ------------------------------------------------------


class LayerLedger:
    """Per decoder layer: how much it has been trained, and how much it matters.

    `coverage[l]` counts client-steps that trained layer l. `importance[l]` is an exponential
    moving average (decay 0.5) of the examples-weighted mean of the importance vectors clients
    report; the first report sets it directly, so it does not start biased toward zero.
    """

    DECAY = 0.5
    # Keeps layers nobody rated yet in the running. Relative to the mean importance, so the
    # rule does not depend on the unit clients measure importance in.
    IMPORTANCE_FLOOR = 1e-3
    EXIT_WEIGHT_FLOOR = 0.05  # share of the uniform weight an exit keeps in the window score

    def __init__(self, layers: int):
        if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
            raise EdgecoreError(f"layers {layers!r} must be a positive integer: the model's decoder layers")
        self.layers = int(layers)
        self.coverage = np.zeros(self.layers)
        self.importance = np.zeros(self.layers)
        self._rated = False

    def record_training(self, first: int, last: int, steps: float) -> None:
        """Add `steps` client-steps to layers first..last (inclusive)."""
        if not 0 <= first <= last < self.layers:
            raise EdgecoreError(f"trained layers {first}..{last} are outside 0..{self.layers - 1} or reversed")
        if not (math.isfinite(steps) and steps >= 0):
            raise EdgecoreError(f"steps {steps!r} must be a finite number >= 0")
        self.coverage[first : last + 1] += steps

    def record_importance(self, vectors: Sequence[tuple[Sequence[float], float]]) -> None:
        """Fold this round's (importance vector, num_examples) reports into the moving average."""
        mean = _weighted_mean(vectors, self.layers, "importance vector", "decoder layer")
        if mean is None:
            return
        self.importance = mean if not self._rated else self.DECAY * self.importance + (1 - self.DECAY) * mean
        self._rated = True

    def _check_exits(self, exits: Sequence[int]) -> list[int]:
        exits = [int(e) for e in exits]
        if not exits or exits != sorted(set(exits)) or exits[0] < 0 or exits[-1] >= self.layers:
            raise EdgecoreError(
                f"exits {exits} must be non-empty, sorted, unique and within 0..{self.layers - 1}"
            )
        return exits

    @staticmethod
    def _check_depths(depths: Mapping[object, int]) -> None:
        for client, depth in depths.items():
            if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
                raise EdgecoreError(f"client {client!r}: window depth {depth!r} must be an integer >= 1")

    @staticmethod
    def window(exit_layer: int, depth: int) -> tuple[int, int]:
        """The layers (first, last) a window of `depth` layers ending at `exit_layer` trains."""
        return max(0, exit_layer - depth + 1), exit_layer

    def _layer_values(self) -> np.ndarray:
        floor = self.IMPORTANCE_FLOOR * self.importance.mean() if self.importance.any() else 1.0
        return self.importance + floor

    def assign_windows(
        self, depths: Mapping[object, int], exits: Sequence[int], exit_weights: Sequence[float] | None = None
    ) -> dict[object, int]:
        """The exit each client trains up to this round; its window is layers max(0, e-d+1)..e.

        With the global `exit_weights` (the fleet's votes), each exit's score is multiplied by
        its weight (floored at EXIT_WEIGHT_FLOOR of the uniform weight, so no exit is shut out
        for good): windows go where the fleet's exits work, and coverage still rotates them.

        Clients are served deepest window first (deep windows go to the devices that can afford
        them; ties keep the order of `depths`). Each candidate exit e scores the sum over its
        window's layers l of (importance_l + eps) / (1 + coverage_l + planned_l), where
        planned_l counts the windows already handed out in this call that cover l: clients of
        one round spread over different layers, and the layers covered least and mattering
        most come first. The highest score wins; ties go to the deeper exit. A depth of at least
        the deepest exit + 1 always takes the last exit: its windows are then the prefixes 0..e,
        each holding the shallower ones, and every term is positive.
        """
        exits = self._check_exits(exits)
        self._check_depths(depths)
        weights = self._exit_weights(exits, exit_weights)
        values, planned = self._layer_values(), np.zeros(self.layers)
        chosen = {}
        for client in sorted(depths, key=lambda c: -depths[c]):  # stable: ties keep dict order
            depth = depths[client]
            best = self._best_exit(exits, depth, values, planned, weights)
            first, last = self.window(best, depth)
            planned[first : last + 1] += 1
            chosen[client] = best
        return {client: chosen[client] for client in depths}

    @classmethod
    def _exit_weights(cls, exits: list[int], exit_weights: Sequence[float] | None) -> dict[int, float]:
        if exit_weights is None:
            return {e: 1.0 for e in exits}
        vector = nonnegative_vector(exit_weights, len(exits), "exit weights", "weight")
        floor = cls.EXIT_WEIGHT_FLOOR / len(exits)
        return {e: max(float(w), floor) for e, w in zip(exits, vector)}

    def _best_exit(self, exits: list[int], depth: int, values: np.ndarray, planned: np.ndarray, weights: dict) -> int:
        def score(exit_layer: int) -> float:
            first, last = self.window(exit_layer, depth)
            span = slice(first, last + 1)
            return weights[exit_layer] * float((values[span] / (1 + self.coverage[span] + planned[span])).sum())

        best, best_score = exits[-1], score(exits[-1])
        for exit_layer in reversed(exits[:-1]):  # deepest first: a shallower exit must beat it clearly
            candidate = score(exit_layer)
            if candidate > best_score * (1 + TIE_TOLERANCE):
                best, best_score = exit_layer, candidate
        return best
