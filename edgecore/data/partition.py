"""Split a list of samples over simulated clients: iid, Dirichlet label/group skew, or natural groups.

Every scheme returns, per partition, the sorted indices into `samples`; the partitions are
disjoint and together cover every sample. All randomness comes from a seeded numpy
Generator, so the same call gives the same partitions in every process.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from edgecore.data.splits import Sample
from edgecore.errors import EdgecoreError

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "natural")
DEFAULT_ALPHA = 0.5
DIRICHLET_ATTEMPTS = 100  # redraws before giving up on a draw that leaves every client some data


def parse_partition_spec(text: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'natural' -> ('natural', None); 'dirichlet:0.3' -> ('dirichlet', 0.3)."""
    scheme, sep, param = text.strip().partition(":")
    scheme = scheme.strip().lower()
    if scheme not in SCHEMES:
        raise EdgecoreError(
            f"unknown partition scheme {text!r}; "
            "use one of: iid, natural, dirichlet or dirichlet:ALPHA (e.g. dirichlet:0.3)"
        )
    if not sep:
        return scheme, None
    if scheme != "dirichlet":
        raise EdgecoreError(
            f"partition scheme {scheme!r} takes no parameter (got {text!r}); write just {scheme!r}"
        )
    try:
        alpha = float(param)
    except ValueError:
        raise EdgecoreError(
            f"partition spec {text!r}: alpha {param!r} is not a number; write e.g. dirichlet:0.3"
        ) from None
    _check_alpha(alpha)
    return scheme, alpha


def _check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha) or alpha <= 0:
        raise EdgecoreError(
            f"Dirichlet alpha must be a positive number, got {alpha}; "
            "small (0.1) is very skewed, large (100) is near iid"
        )


def _by_group(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Group name -> indices, groups sorted by name so the result never depends on input order of groups."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.group].append(i)
    return dict(sorted(groups.items()))


def _list(indices: list[int], shown: int = 10) -> str:
    """Partition numbers for a message, cut short when there are many."""
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return f"{indices[:shown]}{more}"


def _iid(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    # array_split gives sizes that differ by at most one.
    return [chunk.tolist() for chunk in np.array_split(rng.permutation(n), k)]


def _dirichlet_once(groups: dict[str, list[int]], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One draw: each group's samples spread over partitions in Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(k)]
    for indices in groups.values():
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(k, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
        for part, chunk in zip(parts, np.split(shuffled, cuts)):
            part.extend(chunk.tolist())
    return parts


def _dirichlet(groups: dict[str, list[int]], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """Redraw (bounded) until no partition is empty; small alpha with many partitions may never get there."""
    for attempt in range(1, DIRICHLET_ATTEMPTS + 1):
        parts = _dirichlet_once(groups, k, alpha, rng)
        empty = [i for i, p in enumerate(parts) if not p]
        if not empty:
            log.debug("dirichlet partition found after %d draw(s)", attempt)
            return parts
    raise EdgecoreError(
        f"Dirichlet partition (alpha={alpha}) of {sum(map(len, groups.values()))} samples left partition(s) "
        f"{_list(empty)} empty in each of {DIRICHLET_ATTEMPTS} draws; "
        f"use fewer partitions than {k}, a larger alpha, or 'iid'"
    )


def _natural(groups: dict[str, list[int]], k: int) -> list[list[int]]:
    """Whole groups per partition: largest group first, each to the currently smallest partition."""
    if len(groups) < k:
        raise EdgecoreError(
            f"natural partition needs at least one group per partition: {len(groups)} group(s) "
            f"for {k} partitions; use at most {len(groups)} partitions, or 'iid' / 'dirichlet:ALPHA'"
        )
    parts: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, i) for i in range(k)]  # (size, partition index): ties go to the lower index
    # Name order first, then a stable sort by size, so equal-size groups are dealt by name.
    for _, indices in sorted(groups.items(), key=lambda item: -len(item[1])):
        size, i = heapq.heappop(heap)
        parts[i].extend(indices)
        heapq.heappush(heap, (size + len(indices), i))
    return parts


def partition(
    samples: Sequence[Sample],
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> list[list[int]]:
    """Per partition, the sorted indices into `samples`: disjoint, covering every sample.

    scheme: "iid" (seeded shuffle, near-equal sizes), "dirichlet" (per group, proportions
    ~ Dirichlet(alpha)), "natural" (whole groups, balanced greedily). "dirichlet:0.3"
    is accepted too and overrides `alpha`.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise EdgecoreError(f"num_partitions must be a whole number >= 1, got {num_partitions!r}")
    name, spec_alpha = parse_partition_spec(scheme)
    if not samples:
        raise EdgecoreError("cannot partition an empty list of samples; check that the dataset split is not empty")
    rng = np.random.default_rng(seed)
    if name == "iid":
        parts = _iid(len(samples), num_partitions, rng)
    elif name == "dirichlet":
        alpha = spec_alpha if spec_alpha is not None else alpha
        _check_alpha(alpha)
        parts = _dirichlet(_by_group(samples), num_partitions, alpha, rng)
    else:
        parts = _natural(_by_group(samples), num_partitions)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise EdgecoreError(
            f"{name} partition of {len(samples)} samples into {num_partitions} partitions leaves partition(s) "
            f"{_list(empty)} empty; use at most {len(samples)} partitions"
        )
    return [sorted(p) for p in parts]


def label_skew(samples: Sequence[Sample], parts: list[list[int]]) -> float:
    """Mean, over partitions, of the largest group's share: 1.0 means one group per partition."""
    shares = []
    for part in parts:
        counts: dict[str, int] = defaultdict(int)
        for i in part:
            counts[samples[i].group] += 1
        shares.append(max(counts.values()) / len(part))
    return float(np.mean(shares))


def share(samples: Sequence[Sample], num_partitions: int, partition_id: int, spec: str = "iid", *, seed: int = 0) -> list[Sample]:
    """The samples client `partition_id` of `num_partitions` trains on (all of them when alone)."""
    if not 0 <= partition_id < num_partitions:
        raise EdgecoreError(f"partition id {partition_id} must be in [0, {num_partitions - 1}] for {num_partitions} partitions")
    if num_partitions == 1:
        return list(samples)
    return [samples[i] for i in partition(samples, num_partitions, spec, seed=seed)[partition_id]]
