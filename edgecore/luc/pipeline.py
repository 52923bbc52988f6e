"""One call from a model name, a device profile and the client's data to a compressed model.

    result = compress("smollm2-135m", resolve_profile("pi-zero-2w"), "bbc")

The name-based wrapper of `edgecore.luc.compress_` (which works on a model you hold), for the CLI
(`python -m edgecore compress`), edgecore.device and the benches.

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
from edgecore.luc.budget import tuning_reserve_bytes, tuning_reserve_step
from edgecore.luc.compress import Search, apply_policy, search
from edgecore.luc.config import DEFAULT_GROUP_SIZE, UNSTRUCTURED, Candidate, LucConfig
from edgecore.luc.policy import Policy
from edgecore.luc.sensitivity import SensitivityCache
from edgecore.memory import MIB, ModelShape, StepPlan
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


# ---------------------------------------------------------------- from a device profile


def weight_budget_bytes(profile: DeviceProfile, shape: ModelShape, plan: StepPlan) -> int:
    """The profile's memory budget minus the tuning state of `plan`: what the stored weights may take."""
    budget = int(profile.memory_budget_mb * MIB) - tuning_reserve_bytes(shape, plan)
    if budget <= 0:
        raise EdgecoreError(
            f"device {profile.name} ({profile.source or 'profile'}): memory_budget_mb = {profile.memory_budget_mb:g} "
            f"leaves nothing for weights after the tuning step's {tuning_reserve_bytes(shape, plan) / MIB:.0f} MB "
            f"(batch {plan.batch} x {plan.seq_len}, window {plan.window}); use a smaller batch or window, or give "
            "--weight-budget-mb explicitly"
        )
    return budget


def profile_config(profile: DeviceProfile, weight_budget: int, *, candidates: list[Candidate] | None = None,
                   calib_samples: int = 8, calib_len: int = 128, group_size: int = DEFAULT_GROUP_SIZE,
                   seed: int = 0) -> LucConfig:
    """The LucConfig of compressing for `profile` within `weight_budget` bytes: its candidates (or
    `candidates`, which must be among them) and its bit-widths for the table."""
    config = LucConfig(tuple(profile.candidates()), tuple(profile.weight_bits), weight_budget, group_size,
                       calib_samples, calib_len, seed=seed)
    return config.allowing(candidates, by=f"device {profile.name}")


@dataclass
class CompressResult:
    """The compressed model and what the search behind it measured and chose."""

    model: object
    tokenizer: object
    search: Search
    seconds: dict[str, float] = field(default_factory=dict)  # load, the search's phases, apply

    @property
    def policy(self) -> Policy:
        return self.search.policy

    @property
    def from_cache(self) -> bool:
        return self.search.from_cache


# The "quick" grid: 8 or 4 bits unpruned, or half pruned at 4 bits (the pi-zero-2w profile's
# first compression of SmolLM2 took 108 s with 4 candidates, 50%/8b included, which cost as
# much to measure and was never cheaper than 0%/4b).
QUICK = {(0.0, 8), (0.0, 4), (0.5, 4)}
GRIDS = ("quick", "full")


def grid_candidates(profile: DeviceProfile, grid: str) -> list[Candidate]:
    """The profile's candidates, all ("full") or the quick grid's among them (all when it has none of those)."""
    if grid not in GRIDS:
        raise EdgecoreError(f"LUC grid {grid!r} is not one of {GRIDS}")
    candidates = profile.candidates()
    if grid == "quick":
        quick = [c for c in candidates if c.pattern == UNSTRUCTURED and (c.sparsity, c.bits) in QUICK]
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
    group_size: int = DEFAULT_GROUP_SIZE,
    cache: SensitivityCache | None = None,
    seed: int = 0,
    progress: bool = True,
    candidates: list[Candidate] | None = None,
) -> CompressResult:
    """Load `model_name` and calibration data, then LUC-compress the model for `profile` (see the module docstring):
    `edgecore.luc.compress_` by name.

    `weight_budget` (bytes) defaults to the profile's budget less the tuning step `plan`
    (default: `tuning_reserve_step`). `candidates` narrows the profile's choices (a subset of
    them), e.g. to measure faster.
    """
    models.check_source(model_name)
    shape = models.shape(model_name)
    if weight_budget is None:
        weight_budget = weight_budget_bytes(profile, shape, plan or tuning_reserve_step(shape))
    config = profile_config(profile, weight_budget, candidates=candidates, calib_samples=calib_samples,
                            calib_len=calib_len, group_size=group_size, seed=seed)
    dataset = datasets.load(data_spec, seed=seed)
    started = time.perf_counter()
    model, tokenizer = models.load(model_name, seed=seed)
    load_s = time.perf_counter() - started

    batches = calibration_batches(tokenizer, dataset, config.calib_samples, config.calib_len, config.seed)
    found = search(model, config, batches, model_id=model_name, profile=profile.name, cache=cache, progress=progress)
    started = time.perf_counter()
    apply_policy(model, found.policy, found.calibration)
    seconds = {"load": load_s, **found.seconds, "apply": time.perf_counter() - started}
    return CompressResult(model, tokenizer, found, seconds)


def default_out(model_name: str, profile: DeviceProfile) -> Path:
    return Path("runs") / "compressed" / f"{Path(model_name).name}-{profile.name}"
