"""What one hostile device cannot do to a round: buy weight, push the adapter far, or outvote the rest.

Pure numpy, no Flower; the strategy applies these to the replies that passed
`federation.protocol`'s checks, in this order:

- `outliers`: an update whose distance from the global adapter (RMS per element sent, so a
  deep window and a shallow one compare fairly) exceeds `ratio` times the round's low median
  is dropped. The absolute `max-update-norm` only catches explosions; this catches an update
  crafted to sit just under it, which an honest round never comes near.
- `bounded_weights`: a reply's weight is its claimed example count, capped at `ratio` times
  the round's low median claim. Example counts are unverifiable: without the cap a client
  claiming 10^12 examples takes all the weight and the global adapter becomes its update.
  The low median (the smaller middle value) is an honest claim while honest clients are the
  majority, including a round of one honest and one hostile client.
- `coordinate_median`, `trimmed_mean`: robust replacements for the weighted mean, element by
  element over the clients that really hold each element (rank-heterogeneous, partial
  updates: see `server.aggregation.partial_average`). The rules are Flower's FedMedian
  (`np.median`) and FedTrimmedAvg (cut int(fraction * n) values from each end, mean the rest),
  unweighted as there; here n is each element's own number of holders.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from edgecore.errors import EdgecoreError
from edgecore.wire import rank_axis, rank_slice

Arrays = dict[str, np.ndarray]


def low_median(values: Sequence[float]) -> float:
    """The smaller middle value: an honest one while honest values are at least half."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise EdgecoreError("low_median of no values")
    return ordered[(len(ordered) - 1) // 2]


def bounded_weights(claims: Sequence[float], ratio: float) -> list[float]:
    """Each claim capped at `ratio` x the low median claim; `ratio` <= 0 leaves the claims as they are."""
    if ratio <= 0 or not claims:
        return [float(c) for c in claims]
    cap = ratio * low_median(claims)
    return [min(float(c), cap) for c in claims]


def outliers(distances: Sequence[float], ratio: float) -> list[int]:
    """Indices of the distances above `ratio` x their low median (none when `ratio` <= 0)."""
    if ratio <= 0 or not distances:
        return []
    limit = ratio * low_median(distances)
    return [i for i, d in enumerate(distances) if d > limit]


def _stacked(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]):
    """Per tensor sent: (clients x global shape) float64 values, NaN where a client holds nothing."""
    stacks: dict[str, np.ndarray] = {}
    contributors = {name: 0 for name in global_arrays}
    for number, arrays in enumerate(updates):
        for name, value in arrays.items():
            if name not in global_arrays:
                raise EdgecoreError(f"update {number}: tensor {name!r} is not in the global adapter; screen updates first")
            reference = global_arrays[name]
            stack = stacks.setdefault(name, np.full((len(updates), *reference.shape), np.nan))
            rank = np.asarray(value).shape[rank_axis(name)]
            stack[(number, *rank_slice(rank_axis(name), rank))] = value
            contributors[name] += 1
    return stacks, contributors


def _robust(global_arrays, updates, reduce) -> tuple[Arrays, dict[str, int]]:
    stacks, contributors = _stacked(global_arrays, updates)
    averaged: Arrays = {}
    for name, reference in global_arrays.items():
        if name not in stacks:
            averaged[name] = reference
            continue
        values = stacks[name]
        held = (~np.isnan(values)).sum(axis=0)
        merged = np.array(reference, dtype=np.float64)
        merged[held > 0] = reduce(values, held)[held > 0]
        averaged[name] = merged.astype(reference.dtype)
    return averaged, contributors


def coordinate_median(global_arrays, updates: Sequence[Mapping[str, np.ndarray]]) -> tuple[Arrays, dict[str, int]]:
    """Element-wise median over the clients holding each element; elements nobody holds keep the global value.

    Returns the new arrays and, per global tensor, how many updates sent it (as partial_average).
    """
    def median(values, held):
        with warnings.catch_warnings():  # elements nobody holds warn; they keep the global value anyway
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(values, axis=0)
    return _robust(global_arrays, updates, median)


def trimmed_mean(global_arrays, updates: Sequence[Mapping[str, np.ndarray]], fraction: float) -> tuple[Arrays, dict[str, int]]:
    """Element-wise mean after cutting int(fraction * n) values from each end, n = the element's holders."""
    if not 0 <= fraction < 0.5:
        raise EdgecoreError(f"trim-fraction = {fraction} must be in [0, 0.5): the share cut from each end")

    def mean(values, held):
        ordered = np.sort(values, axis=0)  # NaN (not held) sorts last
        cut = np.floor(fraction * held).astype(int)
        position = np.arange(values.shape[0]).reshape((-1,) + (1,) * (values.ndim - 1))
        kept = (position >= cut) & (position < held - cut)
        with np.errstate(all="ignore"):
            return np.where(kept, ordered, 0.0).sum(axis=0) / kept.sum(axis=0)
    return _robust(global_arrays, updates, mean)

