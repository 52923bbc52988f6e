"""Flower records <-> the wire format's plain arrays (edgecore.wire stays Flower-free)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_metrics(values: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in values.items()})
