"""`python -m edgecore schedule`: the device's model (edgecore.device.prepare), its execution plan, printed.

A command-line module: it sits above edgecore.device, which it drives.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from edgecore.device import DeviceSpec, execution_plan, prepare, step_plan
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings
from edgecore.memory import ModelShape
from edgecore.profiles import DeviceProfile, resolve_profile
from edgecore.schedule.costs import CostTable
from edgecore.schedule.planner import ExecutionPlan
from edgecore.schedule.workload import Workload
from edgecore.tuning.adaptive import stored_weight_bytes

log = logging.getLogger(__name__)


def run(args) -> None:
    """Plan `args.workload` for the device's model as edgecore.device.prepare makes it (compressed, and
    stored on disk, when the budget needs it), within the device's planning budget or --budget-mb."""
    profile = resolve_profile(args.device)
    if args.budget_mb is not None and args.budget_mb <= 0:
        raise EdgecoreError(f"--budget-mb {args.budget_mb} must be positive")
    for name in ("batch", "seq_len", "new_tokens"):
        if getattr(args, name) < 1:
            raise EdgecoreError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.costs is not None and not args.costs.is_file():
        raise EdgecoreError(f"--costs {args.costs} is not a file: give a cost table JSON (or leave it out to measure here)")
    if args.json and args.json.is_dir():
        raise EdgecoreError(f"--json {args.json} is a directory; give a file name")
    costs = CostTable.load(args.costs) if args.costs else CostTable.for_profile(profile.name)

    lora = LoraSettings()
    spec = DeviceSpec(args.model, profile, lora, batch_size=args.batch, seq_len=args.seq_len, data=args.data,
                      luc_grid=args.luc_grid, schedule=False)
    dev = prepare(spec)
    step = replace(step_plan(spec, dev.precision), weight_bytes=stored_weight_bytes(dev.model), packed_weights=dev.compressed)
    if args.workload == "train":
        depth = args.window or dev.depth.layers
        layers = ModelShape.from_config(dev.model.config).layers
        if not 1 <= depth <= layers:
            raise EdgecoreError(f"--window {depth} must be in 1..{layers}")
        workload = Workload.train(args.batch, args.seq_len, depth)
    elif args.workload == "forward":
        workload = Workload.forward(args.batch, args.seq_len)
    else:
        workload = Workload.decode(args.seq_len, args.new_tokens)
    result, _luc_only = execution_plan(dev, workload, costs, step, args.budget_mb)
    print(f"device {profile.name}: {profile.description or ''}".rstrip())
    print(f"base: {'LUC-compressed' if dev.compressed else 'dense'}"
          + (f" ({dev.store.folder}{', from disk' if dev.from_disk else ''})" if dev.store else ""))
    print(result.table())
    source = f"{costs.path}" if costs.path else "given"
    print(f"cost table: {source} ({len(costs.entries)} timings, {costs.measured_now} measured now; "
          f"{costs.seconds_measuring:.1f} s spent measuring in all)")
    if args.json:
        write_plan(args.json, result, profile)
        print(f"json: {args.json}")


def write_plan(path: Path, result: ExecutionPlan, profile: DeviceProfile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": profile.summary(), **result.to_dict()}, indent=1))
