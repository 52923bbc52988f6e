"""Make a model ready to tune on one device: `prepare(DeviceSpec(...)) -> DeviceModel`.

    dev = prepare(DeviceSpec("smollm2-135m", resolve_profile("pi-zero-2w"), lora, batch_size=4, seq_len=128))

One verb owns every choice a device makes about its model, so the Flower client, the CLI
commands that take `--device` and the benchmarks make it the same way:

- **Planning share.** Plans use PLANNING_SHARE of the profile's budget (BF16_PLANNING_SHARE for a
  bf16 plan); the rest covers the estimator's measured error.
- **Precision.** The profile says how the device computes (`precision = "auto"` means the
  profile's); the host that simulates it never does. So a simulation on an AMX host and on an
  AVX2 host plans every device identically: same policy, same window, same memory estimate.
  Only the `local` profile reads the host's CPU, because there the host is the device.
  Where the host cannot run the profile's precision natively (bf16 autocast on an AVX2 CPU is
  ~29x slower), a simulation computes in fp32 and says so (`compute_precision`); the plan
  stays the profile's.
- **Dense or compressed.** Dense when a one-layer tuning step of the dense model fits the
  planning budget; otherwise LUC compresses it for that budget. A device whose budget cannot
  hold the dense weights never holds them: its compression streams layer by layer from the
  safetensors file (edgecore.luc.streamed) and reports its measured peak. A base compressed
  elsewhere (`python -m edgecore compress ... --device X`) is checked against the profile and
  used as it is.
- **Window and plan.** The deepest tuning window that fits beside the weights as stored, and,
  for a compressed base, the execution plan of its training steps (edgecore.schedule) within
  the planning budget, or within LUC's own plan's peak if the scheduler's finer accounting
  prices that higher: scheduling never asks for more than LUC runs with.
- **Persistence.** In deployment every Flower message runs in a fresh process, so the device
  model lives on the device's disk (edgecore.device_store): the compressed folder, keyed by
  everything it depends on. The next process loads it packed instead of compressing again; a
  changed input builds a new one; a corrupt or partial folder is detected and rebuilt. The
  execution plan is derived again from the cost table edgecore.schedule keeps on disk
  (milliseconds: every timing is cached), and is not installed where the verdict of its first
  real steps, kept beside that table (edgecore.schedule.guard), found LUC's own kernels faster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgecore import data as datasets
from edgecore import measure, models
from edgecore.device_store import DeviceStore, StoredBase
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, TrainSettings, add_lora
from edgecore import luc
from edgecore.luc import pipeline
from edgecore.luc.streamed import compress_streamed
from edgecore.allocator import job_heap_threshold, limit_heap_fragmentation
from edgecore.memory import MIB, ModelShape, StepPlan, estimate_step
from edgecore.profiles import DeviceProfile
from edgecore.schedule.costs import CostTable, model_key
from edgecore.schedule.executor import Executor
from edgecore.schedule.guard import CHECK_STEPS, WARMUP_STEPS, PlanCheck, Verdict, should_install, verdict_path
from edgecore.schedule.planner import ExecutionPlan
from edgecore.schedule.planner import plan as make_plan
from edgecore.schedule.workload import Workload
from edgecore.tuning import adaptive
from edgecore.tuning.exits import Exits
from edgecore.tuning.window import Depth

log = logging.getLogger(__name__)

# Plans fill at most this share of the budget: measured peaks exceeded the estimator's figure by
# up to 15-22% (the tuning benchmark, fp32), and a device that runs out of memory loses the round.
PLANNING_SHARE = 0.85
# bf16 autocast runs further over its estimate: phone-8gb (dense SmolLM2, 29-layer window, batch
# 4 x 128) estimated 1268 MB and peaked at 1483-1501 MB of its 1500 in a loopback deployment (17-18%).
BF16_PLANNING_SHARE = 0.80
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DeviceSpec:
    """Everything the device model depends on."""

    model: str  # a model name, a Hugging Face folder, or a folder compressed elsewhere
    profile: DeviceProfile
    lora: LoraSettings
    batch_size: int = 4
    seq_len: int = 128
    exits: str = "quarters"
    data: str = "bbc"  # the device's own data: LUC calibrates on its training split
    luc_grid: str = "quick"
    calib_samples: int = 2
    seed: int = 0
    precision: str = "auto"  # "auto": the profile's; "fp32" / "bf16" force one
    planning_share: float | None = None  # None: PLANNING_SHARE, or BF16_PLANNING_SHARE for a bf16 plan
    schedule: bool = True  # run a compressed base through an execution plan

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EdgecoreError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.planning_share is not None and not 0 < self.planning_share <= 1:
            raise EdgecoreError(f"planning share {self.planning_share} must be in (0, 1]")

    @property
    def share(self) -> float:
        """The share of the budget plans fill."""
        if self.planning_share is not None:
            return self.planning_share
        return planning_share(plan_precision(self.profile, self.precision))

    @property
    def planning_budget_mb(self) -> float:
        return self.profile.memory_budget_mb * self.share


@dataclass
class DeviceModel:
    spec: DeviceSpec
    model: object  # PeftModel over the dense or LUC-compressed base
    tokenizer: object
    exits: Exits
    depth: Depth
    precision: str  # what the plan is made for (the profile's)
    compute_precision: str  # what this host computes in (the plan's, unless the host cannot)
    compressed: bool
    prepare_s: float
    from_disk: bool = False  # the compressed base came from the device's store
    policy: dict = field(default_factory=dict)  # what LUC chose (empty when dense)
    build: dict = field(default_factory=dict)  # how the base was built: seconds, peak_mb, streamed
    schedule: dict | None = None  # the execution plan's summary
    executor: object | None = None  # the installed edgecore.schedule.Executor
    store: StoredBase | None = None  # where the compressed base lives on disk
    uses: int = 0  # rounds this process has served with it (simulation workers keep it across rounds)
    tuning: adaptive.AdaptiveSettings = adaptive.AdaptiveSettings()  # what sized its exits and window

    @property
    def profile(self) -> DeviceProfile:
        return self.spec.profile

    @property
    def built(self) -> bool:
        """The compressed base was built in this process (not loaded from disk)."""
        return bool(self.build) and not self.from_disk

    @property
    def weights_mb(self) -> float:
        """What the weights hold in memory now: the stored buffers still resident plus the kernels' own copies."""
        kernels = self.executor.state_bytes if self.executor is not None and self.executor.installed else 0
        return (adaptive.stored_weight_bytes(self.model) + kernels) / MIB

    @property
    def lora(self) -> LoraSettings:
        return self.spec.lora


def planning_share(precision: str) -> float:
    return BF16_PLANNING_SHARE if precision == "bf16" else PLANNING_SHARE


def planning_profile(profile: DeviceProfile, share: float | None = None) -> DeviceProfile:
    """The profile as plans see it: the planning share of its budget (by default its precision's)."""
    share = planning_share(profile.precision) if share is None else share
    return replace(profile, memory_budget_mb=profile.memory_budget_mb * share)


def plan_precision(profile: DeviceProfile, requested: str = "auto") -> str:
    """The precision a device's plan is made for: the profile's, unless one is forced."""
    if requested not in PRECISIONS:
        raise EdgecoreError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    return profile.precision if requested == "auto" else requested


def host_precision(precision: str, requested: str = "auto") -> str:
    """What this host computes the plan's precision in: bf16 only where it runs natively, unless forced."""
    if precision == "bf16" and requested == "auto" and not measure.cpu_supports_bf16():
        return "fp32"
    return precision


def step_plan(spec: DeviceSpec, precision: str) -> StepPlan:
    """The training step the device plans for (window unset: the whole depth)."""
    return StepPlan.from_settings(spec, spec.lora, precision=precision, allocator="returning")


def one_layer_step(shape: ModelShape, plan: StepPlan) -> StepPlan:
    return replace(plan, window=(shape.layers - 1, shape.layers - 1))


def dense_fits(shape: ModelShape, plan: StepPlan, budget_mb: float) -> bool:
    """A one-layer tuning step of the dense model fits the budget."""
    return estimate_step(shape, one_layer_step(shape, plan)).total_mb <= budget_mb


def check_compressed_base(folder: Path | str, profile: DeviceProfile, budget_mb: float | None = None,
                          plan: StepPlan | None = None) -> luc.Policy:
    """A base compressed elsewhere, checked against the device: its bit-widths and sparsities are
    ones the profile runs, and its weights leave room for a one-layer tuning step in the budget
    (`plan`'s batch and LoRA; one sequence of 128 tokens when the run's step is not known yet, as
    before a client connects: the ClientApp checks again with the run's step)."""
    policy = luc.read_policy(folder)
    allowed = set(profile.candidates())
    wrong = sorted({c.label for c in policy.layers if not c.is_dense and c not in allowed})
    if wrong:
        raise EdgecoreError(f"{folder}: layers compressed as {wrong}, which device {profile.name} does not run "
                            f"(its weight_bits {list(profile.weight_bits)}); compress it with --device {profile.name}")
    if policy.embedding_bits not in (*profile.weight_bits, luc.FP32_BITS):
        raise EdgecoreError(f"{folder}: the embedding table is stored in {policy.embedding_bits} bits, which device "
                            f"{profile.name} does not run; compress it with --device {profile.name}")
    budget_mb = planning_profile(profile).memory_budget_mb if budget_mb is None else budget_mb
    shape = models.shape(str(folder))
    plan = replace(plan or luc.tuning_reserve_step(shape, batch=1), weight_bytes=policy.weight_bytes, packed_weights=True)
    need = estimate_step(shape, one_layer_step(shape, plan)).total_mb
    if need > budget_mb:
        raise EdgecoreError(f"{folder}: its {policy.weight_bytes / MIB:.0f} MB of weights and a one-layer tuning step "
                            f"need {need:.0f} MB, over device {profile.name}'s planning budget of {budget_mb:.0f} MB; "
                            f"compress it with --device {profile.name}")
    return policy


def prepare(spec: DeviceSpec, store: DeviceStore | None = None) -> DeviceModel:
    """The device model for `spec` (see the module docstring). `store` defaults to the device's disk store."""
    started = time.perf_counter()
    profile = spec.profile
    precision = plan_precision(profile, spec.precision)
    compute = host_precision(precision, spec.precision)
    if compute != precision:
        log.warning("device %s computes in %s; this host has no native %s, so it computes in %s (the plan stays %s)",
                    profile.name, precision, precision, compute, precision)
    plan = step_plan(spec, precision)
    budget_mb = spec.planning_budget_mb
    store = store or DeviceStore.default()
    stored, build = None, {}
    if models.is_compressed(spec.model):
        policy = check_compressed_base(spec.model, profile, budget_mb, plan)
        base, tokenizer, _ = luc.load_compressed(spec.model, owned=True)
        compressed, from_disk, summary = True, True, policy_summary(policy)
    else:
        shape = models.shape(spec.model)
        if dense_fits(shape, plan, budget_mb):
            base, tokenizer = models.load(spec.model, seed=spec.seed)
            compressed, from_disk, summary = False, False, {}
        else:
            dataset = datasets.load(spec.data, seed=spec.seed)
            stored, from_disk = store.base(store_inputs(spec, plan, dataset),
                                           lambda out: _compress(spec, shape, plan, dataset, out))
            base, tokenizer, policy = luc.load_compressed(stored.folder, owned=True)
            compressed, summary, build = True, policy_summary(policy), stored.build
    # After compression, which it would slow down.
    limit_heap_fragmentation(job_heap_threshold(spec.batch_size * spec.seq_len, base.config.hidden_size))
    model = add_lora(base, spec.lora)
    train_settings = _train_settings(spec, precision)
    tuning = adaptive.AdaptiveSettings(exits=spec.exits, exit_rank=spec.lora.r, budget_mb=budget_mb)
    exits, depth = adaptive.prepare(model, tuning, train_settings, spec.lora)
    dev = DeviceModel(spec, model, tokenizer, exits, depth, precision, compute, compressed, 0.0, from_disk,
                      summary, build, store=stored, tuning=tuning)
    if compressed and spec.schedule:
        _install_plan(dev, replace(plan, weight_bytes=adaptive.stored_weight_bytes(model), packed_weights=True))
    dev.prepare_s = time.perf_counter() - started
    log.info("device %s: %s base%s, %.0f MB stored, window %d layers (estimate %.0f of %.0f MB), %s, %.1f s",
             profile.name, "LUC-compressed" if compressed else "dense", " from disk" if from_disk else "", dev.weights_mb,
             depth.layers, depth.estimate_mb, profile.memory_budget_mb, precision, dev.prepare_s)
    return dev


def _train_settings(spec: DeviceSpec, precision: str) -> TrainSettings:
    return TrainSettings(batch_size=spec.batch_size, seq_len=spec.seq_len, precision=precision)


def policy_summary(policy: luc.Policy) -> dict:
    return {"layers": [c.label for c in policy.layers], "embedding_bits": policy.embedding_bits,
            "weights_mb": policy.weight_bytes / MIB}


def weight_budget(spec: DeviceSpec, shape: ModelShape, plan: StepPlan) -> int:
    """Bytes LUC may give the stored weights: the planning budget less a one-layer tuning step's state."""
    one_layer = replace(one_layer_step(shape, plan), packed_weights=True)
    return pipeline.weight_budget_bytes(planning_profile(spec.profile, spec.share), shape, one_layer)


def store_inputs(spec: DeviceSpec, plan: StepPlan, dataset) -> dict:
    """Everything a compressed base depends on (the device store's key)."""
    return {
        "model": spec.model, "weights": models.source_fingerprint(spec.model, spec.seed),
        "profile": spec.profile.summary(), "planning_share": spec.share,
        "step": {"batch": plan.batch, "seq_len": plan.seq_len, "lora_r": plan.lora_r,
                 "lora_targets": list(plan.lora_targets), "precision": plan.precision},
        "luc_grid": spec.luc_grid, "calib_samples": spec.calib_samples, "seed": spec.seed, "data": spec.data,
        "calibration": pipeline.calibration_fingerprint(dataset, spec.calib_samples, spec.seed),
    }


def _compress(spec: DeviceSpec, shape: ModelShape, plan: StepPlan, dataset, out: Path) -> dict:
    """Compress spec.model for the device into `out`; returns how (seconds, peak, streamed).

    Streams from the dense safetensors when the dense fp32 weights would not fit the device's
    budget; compresses in memory otherwise (faster: one dense pass).
    """
    budget = weight_budget(spec, shape, plan)
    candidates = pipeline.grid_candidates(spec.profile, spec.luc_grid)
    dense_mb = shape.num_params * 4 / MIB
    if dense_mb > spec.profile.memory_budget_mb:
        result = compress_streamed(models.dense_folder(spec.model, seed=spec.seed), spec.profile, dataset, out,
                                   weight_budget=budget, calib_samples=spec.calib_samples, seed=spec.seed,
                                   cache=pipeline.default_cache(), candidates=candidates, model_id=spec.model,
                                   progress=False)
        return {"streamed": True, "peak_mb": result.peak_mb, "seconds": sum(result.seconds.values()),
                "from_cache": result.from_cache}
    measure.reset_peak()
    floor = measure.rss_mb()
    result = pipeline.compress(spec.model, spec.profile, spec.data, weight_budget=budget, calib_samples=spec.calib_samples,
                               cache=pipeline.default_cache(), seed=spec.seed, progress=False, candidates=candidates)
    luc.save_compressed(out, result.model, result.tokenizer, result.policy)
    return {"streamed": False, "peak_mb": measure.peak_rss_mb() - floor, "seconds": sum(result.seconds.values()),
            "from_cache": result.from_cache}


def _install_plan(dev: DeviceModel, plan: StepPlan) -> None:
    """Install the execution plan for the training steps (evaluation reuses its no-grad kernels),
    unless none fits or this device already measured it slower than LUC's own kernels."""
    profile = dev.profile
    workload = Workload.train(plan.batch, plan.seq_len, dev.depth.layers, exits=tuple(dev.exits.layers))
    costs = CostTable.for_profile(profile.name)
    try:
        chosen, luc_only = execution_plan(dev, workload, costs, plan)
    except EdgecoreError as err:
        log.warning("device %s: no execution plan (%s); LUC's own kernels run", profile.name, err)
        return
    dev.schedule = {**chosen.summary(), "luc_predicted_s": luc_only.predicted_seconds}
    verdict = _verdict(chosen)
    if not should_install(verdict, chosen):
        log.info("device %s: this plan measured slower than LUC's own kernels here before (%.2f against %.2f s a "
                 "step); LUC's own run", profile.name, verdict.plan_s, verdict.luc_s or 0.0)
        dev.schedule["verdict"] = verdict.to_dict()
        return
    dev.executor = Executor(dev.model, chosen).install()
    log.info("device %s: scheduled %s: predicted %.2f s per step (LUC's own %.2f s), peak %.0f of %.0f MB; "
             "%.0f s measuring costs", profile.name, workload.label, chosen.predicted_seconds, luc_only.predicted_seconds,
             chosen.peak_bytes / MIB, chosen.budget_bytes / MIB, costs.seconds_measuring)


def _verdict(chosen: ExecutionPlan) -> Verdict | None:
    try:
        return Verdict.load(verdict_path(chosen))
    except EdgecoreError as err:
        log.warning("%s; checking the plan again", err)
        return None


def plan_check(dev: DeviceModel, steps: int) -> PlanCheck | None:
    """The check of the installed plan's first real steps (None when none runs or it was checked), sized so that
    a round of `steps` steps can time the plan and LUC's own kernels after a warm-up step each: every
    Flower message is a fresh process, so a check must end within one round."""
    if dev.executor is None or not dev.executor.installed or _verdict(dev.executor.plan) is not None:
        return None  # no plan running, or this one was measured here already
    timed = max(1, min(CHECK_STEPS, (steps - 2 * WARMUP_STEPS) // 2))
    return PlanCheck(dev.executor, dev.schedule["luc_predicted_s"], steps=timed, path=verdict_path(dev.executor.plan))


def execution_plan(dev: DeviceModel, workload: Workload, costs: CostTable, plan: StepPlan,
                   budget_mb: float | None = None) -> tuple[ExecutionPlan, ExecutionPlan]:
    """(the fastest plan for `workload` within the planning budget, or within LUC's own plan's peak if the
    scheduler's finer accounting prices that higher; LUC's own plan). An explicit `budget_mb` is kept
    exactly (below the compressed weights, layers stream)."""
    key = model_key(dev.spec.model, plan.lora_r, plan.lora_targets)
    window_free = replace(plan, window=None)
    luc_only = make_plan(dev.model, workload, costs, model_key=key, exits=dev.exits, step_plan=window_free,
                         allowed={"luc-dequant"})
    if budget_mb is None:
        budget = max(int(dev.spec.planning_budget_mb * MIB), luc_only.peak_bytes)
    else:
        budget = int(budget_mb * MIB)
    chosen = make_plan(dev.model, workload, costs, budget_bytes=budget, model_key=key, exits=dev.exits,
                       step_plan=window_free)
    return chosen, luc_only
