"""One call from a model name, a device profile and the client's data to a compressed model.

    result = compress("smollm2-135m", resolve_profile("pi-zero-2w"), "bbc")

Steps: calibration batches from the data's training split; one dense calibration pass
(activation norms for Wanda, cached layer inputs, dense log-probabilities); sensitivity of
every (layer, candidate) the profile allows, from the disk cache when the same model, tokens
and candidates were measured before; the table's sensitivity per bit-width; the knapsack
policy for the weight budget (the profile's budget minus the tuning step's state, or an
explicit budget); and compression in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgecore import data as datasets
from edgecore import models
from edgecore.encoding import Batch, Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.luc.compress import (
    Policy,
    apply_policy,
    choose_policy,
    default_tuning_plan,
    embedding_options,
    embedding_sensitivity,
    weight_budget_bytes,
)
from edgecore.luc.sensitivity import Calibration, Candidate, Sensitivity, SensitivityCache, measure_cached
from edgecore.memory import ModelShape, StepPlan
from edgecore.profiles import DeviceProfile

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8


def default_cache() -> SensitivityCache:
    return SensitivityCache(models.cache_root() / "sensitivity")


def calibration_samples(dataset, samples: int = 8, seed: int = 0) -> list[datasets.Sample]:
    """`samples` training samples, a seeded draw (so the cache key is stable)."""
    if not 1 <= samples <= 256:
        raise EdgecoreError(f"calibration samples = {samples} must be in 1..256 (8 to 32 is typical)")
    if len(dataset.train) < samples:
        raise EdgecoreError(f"the training split has {len(dataset.train)} samples, fewer than the {samples} asked for calibration")
    return random.Random(seed).sample(dataset.train, samples)


def calibration_fingerprint(dataset, samples: int = 8, seed: int = 0) -> str:
    """A hash of the calibration samples' text: what a compressed base depends on of the data."""
    picked = calibration_samples(dataset, samples, seed)
    return hashlib.sha256(json.dumps([[s.prompt, s.response] for s in picked]).encode()).hexdigest()[:24]


def calibration_batches(tokenizer, dataset, samples: int = 8, seq_len: int = 128, seed: int = 0) -> list[Batch]:
    """`samples` training sequences (calibration_samples), in batches of 8."""
    picked = calibration_samples(dataset, samples, seed)
    encoder = Encoder(tokenizer, dataset, max_len=seq_len)
    encoded = [encoder.encode(s) for s in picked]
    return [collate(encoded[i : i + CALIBRATION_BATCH], tokenizer.pad_token_id) for i in range(0, samples, CALIBRATION_BATCH)]


@dataclass
class CompressResult:
    model: object
    tokenizer: object
    policy: Policy
    sensitivity: Sensitivity
    embedding_kl: dict[int, float]
    calibration: Calibration
    from_cache: bool
    seconds: dict[str, float] = field(default_factory=dict)


def profile_candidates(profile: DeviceProfile) -> list[Candidate]:
    return [Candidate.from_profile(c) for c in profile.candidates()]


# The "quick" grid: 8 or 4 bits unpruned, or half pruned at 4 bits (the pi-zero-2w profile's
# first compression of SmolLM2 took 108 s with 4 candidates, 50%/8b included, which cost as
# much to measure and was never cheaper than 0%/4b).
QUICK = {(0.0, 8), (0.0, 4), (0.5, 4)}
GRIDS = ("quick", "full")


def grid_candidates(profile: DeviceProfile, grid: str) -> list[Candidate]:
    """The profile's candidates, all ("full") or the quick grid's among them (all when it has none of those)."""
    if grid not in GRIDS:
        raise EdgecoreError(f"LUC grid {grid!r} is not one of {GRIDS}")
    candidates = profile_candidates(profile)
    if grid == "quick":
        quick = [c for c in candidates if c.pattern == "unstructured" and (c.sparsity, c.bits) in QUICK]
        candidates = quick or candidates
    return candidates


def compress(
    model_name: str,
    profile: DeviceProfile,
    data_spec: str,
    *,
    weight_budget: int | None = None,
    plan: StepPlan | None = None,
    calib_samples: int = 8,
    calib_len: int = 128,
    group_size: int = 64,
    cache: SensitivityCache | None = None,
    seed: int = 0,
    progress: bool = True,
    candidates: list[Candidate] | None = None,
) -> CompressResult:
    """Measure, choose and apply the LUC policy of `model_name` for `profile` (see the module docstring).

    `candidates` narrows the profile's choices (a subset of them), e.g. to measure faster.
    """
    models.check_source(model_name)
    shape = models.shape(model_name)
    if weight_budget is None:
        budget = weight_budget_bytes(profile, shape, plan or default_tuning_plan(shape))
    elif weight_budget > 0:
        budget = weight_budget
    else:
        raise EdgecoreError(f"weight budget {weight_budget} bytes must be positive")
    dataset = datasets.load(data_spec, seed=seed)
    seconds = {}
    started = time.perf_counter()
    model, tokenizer = models.load(model_name, seed=seed)
    seconds["load"] = time.perf_counter() - started

    started = time.perf_counter()
    calib = Calibration(model, calibration_batches(tokenizer, dataset, calib_samples, calib_len, seed))
    seconds["calibration"] = time.perf_counter() - started
    allowed = profile_candidates(profile)
    if candidates is None:
        candidates = allowed
    elif not set(candidates) <= set(allowed):
        raise EdgecoreError(f"candidates {[c.label for c in set(candidates) - set(allowed)]} are not allowed by device {profile.name}")
    table, from_cache = measure_cached(
        calib, candidates, model_id=model_name, cache=cache, group_size=group_size, progress=progress
    )
    seconds["sensitivity"] = table.seconds
    started = time.perf_counter()
    embedding_kl = embedding_sensitivity(calib, embedding_options(profile.weight_bits), group_size)
    seconds["embedding_sensitivity"] = time.perf_counter() - started

    policy = choose_policy(model_name, shape, table, embedding_kl, budget, profile.name)
    started = time.perf_counter()
    apply_policy(model, policy, calib)
    seconds["apply"] = time.perf_counter() - started
    return CompressResult(model, tokenizer, policy, table, embedding_kl, calib, from_cache, seconds)


def default_out(model_name: str, profile: DeviceProfile) -> Path:
    return Path("runs") / "compressed" / f"{Path(model_name).name}-{profile.name}"
