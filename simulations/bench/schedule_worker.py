"""One configuration of the `schedule` benchmark, in its own process (config JSON on stdin).

mode "luc": the LUC-compressed model as LUC runs it (every layer rebuilt at every call).
mode "scheduled": the same model through a plan (edgecore.schedule) whose predicted peak is at
most the budget and at most the "luc" plan's predicted peak. mode "dense-bf16": the dense model
in bf16, the speed reference. Each times its workload (median of `repeats` runs after a
warm-up) and reports the peak RSS above the runtime floor (RSS after the imports), reset after
planning so that measuring kernels does not count, and the cost model's predicted time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from edgecore import device, measure, models  # the imports set the runtime floor
from edgecore.finetune import LoraSettings, add_lora
from edgecore.allocator import limit_heap_fragmentation
from edgecore.memory import MIB
from edgecore.profiles import resolve_profile
from edgecore.schedule.costs import CostTable, model_key
from edgecore.tuning.adaptive import stored_weight_bytes
from edgecore.schedule.executor import Executor
from edgecore.schedule.planner import plan
from edgecore.schedule.workload import Workload


def main() -> None:
    config = json.loads(sys.stdin.read())
    limit_heap_fragmentation()  # every configuration alike: freed memory goes back to the OS
    floor_mb = measure.rss_mb()
    mode, shape = config["mode"], config["workload"]
    lora = LoraSettings()
    if mode == "dense-bf16":  # the speed reference, not a device: the dense model in bf16
        model, _tokenizer = models.load(config["model"])
        peft_model, name = add_lora(model, lora).to(torch.bfloat16), config["model"]
        step = device.step_plan(device.DeviceSpec(config["model"], resolve_profile(config["profile"]), lora), "bf16")
    else:  # the compressed base as the device loads it from its store (a carried base, checked against the profile)
        spec = device.DeviceSpec(config["folder"], resolve_profile(config["profile"]), lora, batch_size=shape["batch"],
                                 seq_len=shape["seq_len"], schedule=False)
        dev = device.prepare(spec)
        peft_model, name = dev.model, config["folder"]
        step = replace(device.step_plan(spec, dev.precision), weight_bytes=stored_weight_bytes(peft_model),
                       packed_weights=True)
    limit_heap_fragmentation()  # again after prepare's own setting: every configuration alike
    measure.make_resident(peft_model)
    key = model_key(name, lora.r, lora.targets)
    workload = Workload(**shape)
    costs = CostTable.load(config["costs"]) if Path(config["costs"]).exists() else CostTable(Path(config["costs"]), config["profile"])
    step_plan = replace(step, window=None)
    started = time.perf_counter()
    luc_plan = plan(peft_model, workload, costs, model_key=key, step_plan=step_plan, allowed={"luc-dequant"})
    result = {"config": config["name"], "mode": mode, "profile": config["profile"], "workload": workload.label,
              "floor_mb": floor_mb, "luc_plan_peak_mb": luc_plan.peak_bytes / MIB}
    chosen = luc_plan
    executor = None
    if mode == "scheduled":
        budget = int(config["budget_mb"] * MIB)
        if not config.get("streaming"):
            budget = min(budget, luc_plan.peak_bytes)  # at no more than LUC's memory
        chosen = plan(peft_model, workload, costs, budget_bytes=budget, model_key=key, step_plan=step_plan)
        executor = Executor(peft_model, chosen).install()
        result.update(budget_mb=budget / MIB, plan=chosen.summary(), state_mb=executor.state_bytes / MIB)
    result.update(planning_s=time.perf_counter() - started, costs_measured_now=costs.measured_now,
                  costs_seconds_measuring=costs.seconds_measuring, predicted_s=chosen.predicted_seconds,
                  predicted_peak_mb=chosen.peak_bytes / MIB)

    warm = replace(workload, new_tokens=2) if workload.kind == "decode" else workload
    warm.run(peft_model)
    measure.reset_peak()
    times = []
    for _ in range(config["repeats"]):
        started = time.perf_counter()
        out = workload.run(peft_model)
        times.append(time.perf_counter() - started)
    result.update(seconds=statistics.median(times), all_seconds=times, peak_mb=measure.peak_rss_mb(),
                  peak_above_floor_mb=measure.peak_rss_mb() - floor_mb)
    if workload.kind == "decode":
        result["tokens"] = out.reshape(-1).tolist()
    else:
        result["output"] = float(out.float().sum()) if workload.kind == "forward" else float(out)
    if executor is not None:
        result["kernel_calls"] = executor.kernel_calls()
        if executor.stream is not None:
            result["stream_reads"] = executor.stream.reads
    print(json.dumps(result))


if __name__ == "__main__":
    main()
