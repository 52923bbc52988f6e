"""Every check of what a client sends, in one place: pure numpy, no Flower.

`federation.protocol` parses a reply's records and calls these; the server's aggregation
calls the number checks on its own inputs too, so a value is judged by one rule wherever it
is read.

- `positive_number`, `nonnegative_number`, `positive_integer`, `finite_number`, `fraction`, `flag`, `nonnegative_list`,
  `step_counts`, `device_name`: one value a reply carries ("" when it is fine, else what was
  expected; federation.protocol names the key);
- `report_problems`: the free-form part of a reply (its measurements), which the run folder
  records: kebab-case names that cannot shadow a record's own fields, bounded finite values;
- `positive_weight`, `nonnegative_vector`: the same rules for the aggregation's own inputs, raising;
- `tensors_of_window`: the tensors a client training a window of decoder layers and one exit
  may send;
- `update_problems`: an update against the global adapter (the tensors it may send, at its
  declared rank, fp32, finite, not too far from the global); `update_distance`: how far.

Every bound is far beyond any honest value and well inside float64, so nothing a client sends
can overflow a sum, an average or a JSON line.

Two kinds of tensor travel (see `edgecore.wire`):
- PEFT LoRA keys, `...layers.<L>...lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank);
- exit adapters, `exit.<L>.down` (rank x hidden) and `exit.<L>.up` (hidden x rank).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from edgecore.errors import EdgecoreError
from edgecore.wire import EXIT_PREFIX, layer_of, rank_axis, rank_slice, with_rank

# --- Numbers and vectors ------------------------------------------------------------------

MAX_MAGNITUDE = 1e15  # the largest |value| of any number a reply carries (an example count, a byte count, a vote)
MAX_STEPS = 10**9  # the most training steps a reply may claim for one layer
MAX_LIST = 100_000  # the most entries of one list a reply carries
MAX_REPORT_ENTRIES = 200
METRIC_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # kebab-case, as every key the protocol defines
MAX_NAME = 64
# Names a client's report may not take: a round record's own fields for a client, which are
# snake_case (node_id, assigned_exit, weight) or this one word.
RESERVED_NAMES = frozenset({"device", "weight", "cause", "reason", "round"})


def is_number(value) -> bool:
    """An int or float (numpy's too), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _bounded(value) -> bool:
    return is_number(value) and math.isfinite(value) and abs(value) <= MAX_MAGNITUDE


def positive_number(value) -> str:
    """Empty when `value` is a finite number > 0, else what was expected (so for every check below)."""
    return "" if _bounded(value) and value > 0 else f"expected a finite number > 0 and <= {MAX_MAGNITUDE:.0e}"


def nonnegative_number(value) -> str:
    return "" if _bounded(value) and value >= 0 else f"expected a finite number >= 0 and <= {MAX_MAGNITUDE:.0e}"


def finite_number(value) -> str:
    return "" if _bounded(value) else f"expected a finite number of magnitude <= {MAX_MAGNITUDE:.0e}"


def fraction(value) -> str:
    return "" if is_number(value) and 0 <= value <= 1 else "expected a number in [0, 1]"


def positive_integer(value) -> str:
    return "" if _bounded(value) and float(value).is_integer() and value >= 1 else "expected an integer >= 1"


def flag(value) -> str:
    return "" if is_number(value) and value in (0, 1) else "expected 0 or 1"


def _list_of(value, entry_ok) -> bool:
    return isinstance(value, (list, tuple)) and len(value) <= MAX_LIST and all(entry_ok(x) for x in value)


def nonnegative_list(value) -> str:
    ok = _list_of(value, lambda x: _bounded(x) and x >= 0)
    return "" if ok else f"expected a list of finite numbers >= 0 and <= {MAX_MAGNITUDE:.0e}"


def step_counts(value) -> str:
    ok = _list_of(value, lambda x: is_number(x) and math.isfinite(x) and float(x).is_integer() and 0 <= x <= MAX_STEPS)
    return "" if ok else f"expected a list of whole step counts in [0, {MAX_STEPS:.0e}]"


def device_name(value) -> str:
    ok = isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()
    return "" if ok else "expected the device profile's name: a printable string of 1-128 characters"


def report_problems(report: Mapping) -> list[str]:
    """Why a reply's report (its free-form measurements) must not be recorded (empty when it is fine)."""
    if len(report) > MAX_REPORT_ENTRIES:
        return [f"report of {len(report)} entries; at most {MAX_REPORT_ENTRIES}"]
    problems = []
    for name, value in report.items():
        if not isinstance(name, str) or len(name) > MAX_NAME or not METRIC_NAME.fullmatch(name):
            problems.append(f"metric name {str(name)[:80]!r}: expected kebab-case of at most {MAX_NAME} characters")
        elif name in RESERVED_NAMES:
            problems.append(f"metric name {name!r} is reserved for the server's own record of the client")
        elif not (_bounded(value) or (isinstance(value, (list, tuple)) and _list_of(value, _bounded))):
            problems.append(f"metric {name!r} = {str(value)[:80]}: expected a finite number (or list of them) of "
                            f"magnitude <= {MAX_MAGNITUDE:.0e}")
    return problems


def positive_weight(weight, what: str) -> float:
    """An update's weight in every average (its num_examples): a finite number > 0, else EdgecoreError."""
    if not is_number(weight):
        raise EdgecoreError(f"{what}: weight {weight!r} is not a number; give its num_examples")
    if positive_number(weight):
        raise EdgecoreError(f"{what}: weight {weight!r} must be a finite number > 0 (its num_examples)")
    return float(weight)


def nonnegative_vector(vector, length: int | None, what: str, entry: str) -> np.ndarray:
    """A vector of finite entries >= 0; of `length` entries unless `length` is None."""
    try:
        values = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise EdgecoreError(f"{what} is {vector!r}; expected a list of numbers, one per {entry}") from None
    if values.ndim != 1 or (length is not None and values.shape != (length,)):
        expected = f"({length},)" if length is not None else "(n,)"
        raise EdgecoreError(f"{what} has shape {values.shape}, expected {expected}: one entry per {entry}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise EdgecoreError(f"{what} is {values.tolist()}; entries must be finite and >= 0")
    return values


# --- Tensors ------------------------------------------------------------------------------


def tensors_of_window(global_arrays: Mapping[str, np.ndarray], first_layer: int, last_layer: int, exit_layer: int) -> set[str]:
    """Names a client training decoder layers first..last (inclusive) and the exit at `exit_layer` may send."""
    if not 0 <= first_layer <= last_layer:
        raise EdgecoreError(
            f"window layers {first_layer}..{last_layer} are not a range; need 0 <= first_layer <= last_layer"
        )
    exit_names = {f"exit.{exit_layer}.down", f"exit.{exit_layer}.up"}
    names = {name for name in global_arrays if name in exit_names}
    for name in global_arrays:
        layer = layer_of(name)
        if not name.startswith(EXIT_PREFIX) and layer is not None and first_layer <= layer <= last_layer:
            names.add(name)
    return names


def _tensor_problems(name: str, value, reference: np.ndarray, rank: int) -> list[str]:
    """Shape, dtype and value problems of one sent tensor against its global tensor."""
    axis = rank_axis(name)
    global_rank = reference.shape[axis]
    if rank > global_rank:
        return [f"{name}: declared rank {rank} exceeds the global rank {global_rank}; the client must train at rank <= {global_rank}"]
    expected = with_rank(reference.shape, axis, rank)
    value = np.asarray(value)
    if value.shape != expected:
        return [f"{name}: shape {tuple(value.shape)}, expected {expected} for rank {rank}"]
    if value.dtype != np.float32:
        return [f"{name}: dtype {value.dtype}, expected float32; convert before sending"]
    if not np.isfinite(value).all():
        return [f"{name}: {int((~np.isfinite(value)).sum())} non-finite values (NaN/inf); training diverged"]
    return []


def update_problems(
    update: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    *,
    allowed: set[str] | None,
    rank: int,
    max_delta_norm: float,
) -> list[str]:
    """Why a client update must be rejected (empty when it is fine).

    The update is a rank-`rank` client's answer to the global adapter truncated to `rank`: every
    tensor must be a global one, assigned to it this round (when `allowed` is given), of the
    global shape with the rank axis at `rank`, fp32 and finite. Its L2 distance from the
    truncated global adapter, over all sent tensors, must not exceed `max_delta_norm`, which
    catches exploded or scaled-up updates; the distance is only measured on a well-formed update.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        return [f"declared rank {rank!r} is not a positive integer"]
    if not update:
        return ["update is empty: it sends no tensor"]
    problems = []
    for name in sorted(update):
        value = update[name]
        if name not in global_arrays:
            problems.append(f"{name}: not in the global adapter; the client sent a tensor the server never sent")
            continue
        if allowed is not None and name not in allowed:
            problems.append(f"{name}: not assigned this round; the client must send only its window's tensors")
            continue
        problems.extend(_tensor_problems(name, value, global_arrays[name], rank))
    if problems:
        return problems
    delta, _ = update_distance(update, global_arrays, rank)
    if delta > max_delta_norm:
        problems.append(
            f"update distance {delta:.3g} from the global adapter exceeds the limit {max_delta_norm:.3g} (max-update-norm)"
        )
    return problems


def update_distance(update: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray], rank: int) -> tuple[float, int]:
    """A well-formed update's L2 distance from the global adapter cut to `rank`, and how many elements it sent."""
    squared, elements = 0.0, 0
    for name, value in update.items():
        start = np.asarray(global_arrays[name])[rank_slice(rank_axis(name), rank)].astype(np.float64)
        squared += float(np.square(np.asarray(value, dtype=np.float64) - start).sum())
        elements += int(np.asarray(value).size)
    return math.sqrt(squared), elements
