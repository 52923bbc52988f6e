"""Flower records <-> the wire format's plain arrays (edgecore.wire stays Flower-free)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_metrics(values: dict) -> MetricRecord:
    """Numbers and lists of numbers; a list with any float travels as floats (MetricRecord lists are uniform)."""
    return MetricRecord({k: _metric(v) for k, v in values.items()})


def _metric(value):
    if isinstance(value, (list, tuple)):
        return [float(x) for x in value] if any(isinstance(x, float) for x in value) else [int(x) for x in value]
    return float(value) if isinstance(value, float) else int(value)
