"""A client's device-specific model: the base as its budget allows, LoRA at its rank, exits, window depth.

The base stays dense when the dense weights leave room for at least a one-layer tuning
window within the device's budget (the memory estimator decides); otherwise LUC compresses
it for the budget (weights as large as a one-layer window allows). Adaptive depth then trains
the deepest window that fits beside the weights as stored. Plans use PLANNING_SHARE of the
budget, the rest covering the estimator's measured error. The result is cached per process, keyed by
everything it depends on: Flower's simulation keeps its worker processes across rounds, so
only the first round pays for compression, and the sensitivity table is also cached on
disk (edgecore.luc), so the next run does not measure it again.

LoRA scaling across ranks: the global adapter has the fleet's largest rank R and alpha A.
A client of rank r uses alpha A * r / R, so every client applies the same scale A / R to
B @ A and the first r rank slices of the global adapter mean the same update on every device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache

from client.pipeline import HEAP_THRESHOLD_BYTES
from edgecore import models
from edgecore.experiment import Experiment
from edgecore.finetune import LoraSettings, TrainSettings, add_lora, resolve_precision
from edgecore.memory import MIB, ModelShape, StepPlan, estimate_step, limit_heap_fragmentation
from edgecore.profiles import DeviceProfile
from edgecore.tuning import adaptive
from edgecore.tuning.exits import Exits
from edgecore.tuning.window import Depth

log = logging.getLogger(__name__)

# Plans fill at most this share of the budget: measured peaks exceeded the estimator's figure by
# up to 15-22% (the tuning benchmark), and a device that runs out of memory loses the round.
PLANNING_SHARE = 0.85


@dataclass
class DeviceModel:
    profile: DeviceProfile
    model: object  # PeftModel over the dense or LUC-compressed base
    tokenizer: object
    exits: Exits
    depth: Depth
    lora: LoraSettings
    weights_mb: float  # the base as stored
    compressed: bool
    prepare_s: float
    policy: dict  # what LUC chose ("" entries when dense)
    schedule: dict | None = None  # the execution plan's summary (compressed bases run through edgecore.schedule)
    executor: object | None = None  # the installed edgecore.schedule.Executor


def client_lora(experiment: Experiment, rank: int | None) -> LoraSettings:
    """The experiment's LoRA at `rank`, with alpha scaled so that alpha / rank stays the global one."""
    base = experiment.lora()
    rank = rank or base.r
    alpha = base.alpha * rank / base.r
    return replace(base, r=rank, alpha=int(alpha) if float(alpha).is_integer() else alpha)


def device_model(experiment: Experiment, profile: DeviceProfile, rank: int | None) -> DeviceModel:
    """The cached device model for this experiment, profile and rank (see the module docstring)."""
    step = (experiment.batch_size, experiment.seq_len, experiment.precision)
    return _cached(experiment.model, experiment.data, profile, client_lora(experiment, rank), step,
                   experiment.exits, experiment.luc_grid, experiment.calib_samples, experiment.seed)


@lru_cache(maxsize=3)
def _cached(model_name, data_spec, profile, lora, step: tuple, exits_spec, grid, calib_samples, seed) -> DeviceModel:
    started = time.perf_counter()
    batch_size, seq_len, precision = step
    settings = TrainSettings(batch_size=batch_size, seq_len=seq_len, precision=precision)
    shape = ModelShape.from_name(model_name)
    planning = replace(profile, memory_budget_mb=profile.memory_budget_mb * PLANNING_SHARE)
    plan = StepPlan(batch=settings.batch_size, seq_len=settings.seq_len, lora_r=lora.r, lora_targets=tuple(lora.targets),
                    lora_dropout=lora.dropout, precision=resolve_precision(settings.precision), allocator="returning")
    one_layer = replace(plan, window=(shape.layers - 1, shape.layers - 1))
    policy: dict = {}
    if estimate_step(shape, one_layer).total_mb <= planning.memory_budget_mb:
        base, tokenizer = models.load(model_name, seed=seed)  # the dense weights leave room to tune: keep them
        compressed = False
    else:
        base, tokenizer, policy = _compress(model_name, data_spec, planning, plan, shape, grid, calib_samples, seed)
        compressed = True
    limit_heap_fragmentation(HEAP_THRESHOLD_BYTES)  # after compression, which it would slow down (see client.pipeline)
    model = add_lora(base, lora)
    exits, depth = adaptive.prepare(model, adaptive.AdaptiveSettings(exits=exits_spec, exit_rank=lora.r,
                                                                     budget_mb=planning.memory_budget_mb), settings, lora)
    schedule = executor = None
    if compressed:
        step_plan = replace(plan, weight_bytes=adaptive.stored_weight_bytes(model), packed_weights=True)
        schedule, executor = _schedule(model, model_name, exits, depth, profile, planning.memory_budget_mb, step_plan)
    # What the weights hold in memory: the stored buffers still resident plus the kernels' own copies.
    weights_mb = (adaptive.stored_weight_bytes(model) + (executor.state_bytes if executor else 0)) / MIB
    log.info("device %s: %s base, %.0f MB stored, window %d layers (estimate %.0f of %.0f MB)", profile.name,
             "LUC-compressed" if compressed else "dense", weights_mb, depth.layers, depth.estimate_mb, profile.memory_budget_mb)
    return DeviceModel(profile, model, tokenizer, exits, depth, lora, weights_mb, compressed,
                       time.perf_counter() - started, policy, schedule, executor)


def _schedule(model, model_name, exits, depth, profile, budget_mb, step_plan):
    """Install the execution plan for this device's training steps (and evaluation, which reuses the
    no-grad kernels): (its summary, the executor), or (None, None) and LUC's own forward if no plan fits.

    The budget is the planning budget, or the plan of LUC's own kernels if the scheduler's finer
    accounting prices that a little higher: scheduling never asks for more than LUC ran with.
    """
    from edgecore.errors import EdgecoreError
    from edgecore.schedule.costs import CostTable, model_key
    from edgecore.schedule.executor import Executor
    from edgecore.schedule.planner import plan
    from edgecore.schedule.workload import Workload

    workload = Workload.train(step_plan.batch, step_plan.seq_len, depth.layers, exits=tuple(exits.layers))
    costs = CostTable.for_profile(profile.name)
    key = model_key(model_name, step_plan.lora_r, step_plan.lora_targets)
    window_free = replace(step_plan, window=None)
    try:
        luc_only = plan(model, workload, costs, model_key=key, exits=exits, step_plan=window_free, allowed={"luc-dequant"})
        budget = max(int(budget_mb * MIB), luc_only.peak_bytes)
        chosen = plan(model, workload, costs, budget_bytes=budget, model_key=key, exits=exits, step_plan=window_free)
    except EdgecoreError as err:
        log.warning("device %s: no execution plan (%s); LUC's own kernels run", profile.name, err)
        return None, None
    executor = Executor(model, chosen).install()
    log.info("device %s: scheduled %s: predicted %.2f s per step (LUC's own %.2f s), peak %.0f of %.0f MB; kernels %s; "
             "%.0f s measuring costs", profile.name, workload.label, chosen.predicted_seconds, luc_only.predicted_seconds,
             chosen.peak_bytes / MIB, budget / MIB, chosen.kernel_counts(), costs.seconds_measuring)
    return {**chosen.summary(), "luc_predicted_s": luc_only.predicted_seconds}, executor



def _compress(model_name, data_spec, profile, plan, shape, grid, calib_samples, seed):
    from edgecore.luc.compress import weight_budget_bytes
    from edgecore.luc.pipeline import compress, default_cache, grid_candidates

    one_layer = replace(plan, window=(shape.layers - 1, shape.layers - 1), packed_weights=True)
    candidates = grid_candidates(profile, grid)
    result = compress(model_name, profile, data_spec, weight_budget=weight_budget_bytes(profile, shape, one_layer),
                      calib_samples=calib_samples, cache=default_cache(), seed=seed, progress=False, candidates=candidates)
    policy = result.policy
    summary = {"layers": [c.label for c in policy.layers], "embedding_bits": policy.embedding_bits,
               "weights_mb": policy.weight_bytes / MIB, "from_cache": result.from_cache, "seconds": result.seconds}
    return result.model, result.tokenizer, summary
