"""`python -m edgecore schedule`: load or compress a model for a device, plan its execution, print the plan."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, add_lora
from edgecore.memory import MIB, ModelShape, StepPlan
from edgecore.profiles import DeviceProfile
from edgecore.schedule.costs import CostTable, model_key
from edgecore.schedule.planner import Plan, plan
from edgecore.schedule.workload import Workload

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: object  # PEFT model over the compressed base
    name: str  # what the model is called in cost tables
    shape: ModelShape
    step_plan: StepPlan  # the training step the window depth was chosen for


def compressed_model(model_spec: str, profile: DeviceProfile, data: str = "bbc", grid: str = "quick",
                     batch: int = 4, seq_len: int = 128, calib_samples: int = 2, progress: bool = True):
    """(model, name) from a compressed folder, or `model_spec` compressed by LUC for `profile`."""
    from edgecore.luc import compress as luc
    from edgecore.luc import pipeline

    if Path(model_spec).is_dir() and luc.is_compressed_folder(model_spec):
        model, _tokenizer, policy = luc.load_compressed(model_spec)
        return model, policy.model
    shape = ModelShape.from_name(model_spec)
    log.info("compressing %s for %s (LUC, %s grid; sensitivity cached after the first time)", model_spec, profile.name, grid)
    result = pipeline.compress(model_spec, profile, data, plan=luc.default_tuning_plan(shape, batch, seq_len),
                               calib_samples=calib_samples, cache=pipeline.default_cache(), progress=progress,
                               candidates=pipeline.grid_candidates(profile, grid))
    return result.model, model_spec


def prepare(model, name: str, lora: LoraSettings, batch: int, seq_len: int) -> Prepared:
    from edgecore.luc.compress import stored_nbytes

    shape = ModelShape.from_config(model.config)
    step_plan = StepPlan(batch=batch, seq_len=seq_len, lora_r=lora.r, lora_targets=tuple(lora.targets),
                         lora_dropout=lora.dropout, weight_bytes=stored_nbytes(model), packed_weights=True,
                         allocator="returning")
    return Prepared(add_lora(model, lora), model_key(name, lora.r, lora.targets), shape, step_plan)


def window_layers(prepared: Prepared, budget_mb: float | None) -> int:
    from edgecore.tuning.window import window_depth

    return window_depth(prepared.shape, prepared.step_plan, budget_mb).layers


def run(args) -> None:
    from edgecore.profiles import resolve_profile

    profile = resolve_profile(args.device)
    budget_mb = args.budget_mb if args.budget_mb is not None else profile.memory_budget_mb
    if budget_mb <= 0:
        raise EdgecoreError(f"--budget-mb {budget_mb} must be positive")
    for name in ("batch", "seq_len", "new_tokens"):
        if getattr(args, name) < 1:
            raise EdgecoreError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.costs is not None and not args.costs.is_file():
        raise EdgecoreError(f"--costs {args.costs} is not a file: give a cost table JSON (or leave it out to measure here)")
    if args.json and args.json.is_dir():
        raise EdgecoreError(f"--json {args.json} is a directory; give a file name")
    costs = CostTable.load(args.costs) if args.costs else CostTable.for_profile(profile.name)

    model, name = compressed_model(args.model, profile, args.data, args.luc_grid, args.batch, args.seq_len)
    prepared = prepare(model, name, LoraSettings(), args.batch, args.seq_len)
    if args.workload == "train":
        depth = args.window or window_layers(prepared, budget_mb)
        if not 1 <= depth <= prepared.shape.layers:
            raise EdgecoreError(f"--window {depth} must be in 1..{prepared.shape.layers}")
        workload = Workload.train(args.batch, args.seq_len, depth)
    elif args.workload == "forward":
        workload = Workload.forward(args.batch, args.seq_len)
    else:
        workload = Workload.decode(args.seq_len, args.new_tokens)
    result = plan(prepared.model, workload, costs, budget_bytes=int(budget_mb * MIB), model_key=prepared.name,
                  step_plan=replace(prepared.step_plan, window=None))
    print(f"device {profile.name}: {profile.description or ''}".rstrip())
    print(result.table())
    source = f"{costs.path}" if costs.path else "given"
    print(f"cost table: {source} ({len(costs.entries)} timings, {costs.measured_now} measured now; "
          f"{costs.seconds_measuring:.1f} s spent measuring in all)")
    if args.json:
        write_plan(args.json, result, profile)
        print(f"json: {args.json}")


def write_plan(path: Path, result: Plan, profile: DeviceProfile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": profile.summary(), **result.to_dict()}, indent=1))
