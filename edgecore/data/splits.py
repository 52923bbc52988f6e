"""Samples, datasets, and the fixed seeded train/validation/test split every loader uses.

The split is stratified by group (each group is cut 80/10/10 on its own) and is computed
from the data and the seed only, so every process of a federated run, and every later run,
sees the same test set. Identical samples inside a group are kept together, so a duplicated
article never sits in train and test at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgecore.errors import EdgecoreError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
TEST_FRACTION = 0.1
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Sample:
    """One training example: the loss is computed on `response` only."""

    prompt: str  # context the model reads ("" for plain text)
    response: str  # what the model learns to produce
    group: str  # the natural unit (topic, play, play/ROLE, user group)


@dataclass
class Dataset:
    """A named dataset with its three fixed splits."""

    name: str
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    choices: tuple[str, ...] | None  # classification answer words, fixed order; None for LM
    instruction: str | None = None  # classification: the question asked about the prompt

    def split(self, name: str) -> list[Sample]:
        """The split called `name` ("train", "validation" or "test")."""
        if name not in SPLIT_NAMES:
            raise EdgecoreError(
                f"unknown split {name!r} for dataset {self.name!r}; use one of: {', '.join(SPLIT_NAMES)}"
            )
        return getattr(self, name)

    @property
    def groups(self) -> list[str]:
        """Every group that occurs in any split, sorted."""
        return sorted({s.group for n in SPLIT_NAMES for s in self.split(n)})

    def group_counts(self, split: str = "train") -> dict[str, int]:
        """Samples per group in one split, sorted by group name."""
        counts = Counter(s.group for s in self.split(split))
        return dict(sorted(counts.items()))

    def summary(self) -> dict:
        """Split sizes and group counts: what a log line or a run summary wants to show."""
        return {
            "name": self.name,
            "splits": {n: len(self.split(n)) for n in SPLIT_NAMES},
            "total": sum(len(self.split(n)) for n in SPLIT_NAMES),
            "groups": len(self.groups),
            "choices": list(self.choices) if self.choices else None,
        }


def stable_int(*parts: object) -> int:
    """A 64-bit integer from text, identical in every process (unlike hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _units_by_group(samples: Sequence[Sample]) -> dict[str, list[list[int]]]:
    """Per group, lists of indices of identical samples, in content order.

    Content order (not input order) makes the split a function of the set of samples:
    listing files in another order cannot move a sample between splits.
    """
    by_group: dict[str, dict[tuple[str, str], list[int]]] = {}
    for i, s in enumerate(samples):
        by_group.setdefault(s.group, {}).setdefault((s.prompt, s.response), []).append(i)
    return {g: [units[k] for k in sorted(units)] for g, units in sorted(by_group.items())}


def _allocate(sizes: dict[str, int], caps: dict[str, int], fraction: float, seed: int, salt: str) -> dict[str, int]:
    """How many units of each group go to a split of `fraction` of the data.

    Each group gets floor or ceil of its exact share (largest remainder first), so the split
    is ~fraction overall AND per group. Ties are broken by a seeded stable hash.
    """
    quota = {g: n * fraction for g, n in sizes.items()}
    counts = {g: min(math.floor(q), caps[g]) for g, q in quota.items()}
    target = math.floor(sum(sizes.values()) * fraction + 0.5)
    order = sorted(
        (g for g in sizes if counts[g] < caps[g]),
        key=lambda g: (-(quota[g] - math.floor(quota[g])), stable_int(seed, salt, g)),
    )
    for g in order[: max(0, target - sum(counts.values()))]:
        counts[g] += 1
    return counts


def split_indices(samples: Sequence[Sample], seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Sorted (train, validation, test) indices: 80/10/10, stratified by group, seeded.

    Test is drawn first and from its own quota, so it depends on nothing but the data and
    the seed. Every group keeps at least one unit in train.
    """
    units = _units_by_group(samples)
    sizes = {g: len(u) for g, u in units.items()}
    test_n = _allocate(sizes, {g: n - 1 for g, n in sizes.items()}, TEST_FRACTION, seed, "test")
    val_n = _allocate(sizes, {g: n - 1 - test_n[g] for g, n in sizes.items()}, VALIDATION_FRACTION, seed, "validation")
    train: list[int] = []
    validation: list[int] = []
    test: list[int] = []
    for g, group_units in units.items():
        # One generator per group: a group's split ignores how other groups are shuffled.
        rng = np.random.default_rng(stable_int("split", seed, g))
        order = rng.permutation(len(group_units))
        for rank, u in enumerate(order):
            dest = test if rank < test_n[g] else validation if rank < test_n[g] + val_n[g] else train
            dest.extend(group_units[u])
    return sorted(train), sorted(validation), sorted(test)


def make_dataset(
    name: str,
    samples: Sequence[Sample],
    *,
    seed: int = 0,
    choices: tuple[str, ...] | None = None,
    instruction: str | None = None,
) -> Dataset:
    """Split `samples` with `split_indices` and wrap them as a Dataset."""
    def shuffled(indices: list[int]) -> list[Sample]:
        # A seeded content-based order, so any prefix (e.g. "the first 100 test samples")
        # is a fair sample of every group rather than the first group alone.
        chosen = [samples[i] for i in indices]
        return sorted(chosen, key=lambda s: stable_int("order", seed, s.group, s.prompt, s.response))

    train, validation, test = split_indices(samples, seed)
    ds = Dataset(
        name=name,
        train=shuffled(train),
        validation=shuffled(validation),
        test=shuffled(test),
        choices=choices,
        instruction=instruction,
    )
    log.info("dataset %s: %s", name, ds.summary()["splits"])
    return ds
