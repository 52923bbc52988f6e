"""`plain`: the plain LoRA baseline in fp32 and in bf16 autocast, same batches, same seed.

Reports step time, peak RSS and peak above the runtime floor (RSS after the imports, before
the model loads), the losses (bf16 should track fp32) and optional test accuracy; the target
checks that `--precision auto` picks the faster of the two on this machine. Where the CPU has
no native bf16, autocast emulates it (measured here: ~17x slower than fp32), so bf16 runs
only 2 steps there: enough for its step time and first loss.
"""

from __future__ import annotations

from edgecore.finetune import resolve_precision
from edgecore.measure import cpu_supports_bf16
from simulations.bench import benchmark, in_fresh_process, target

WORKER = "simulations.bench.plain_worker"


@benchmark("plain")
def run(options: dict) -> dict:
    results = []
    native_bf16 = cpu_supports_bf16()
    for precision in ("fp32", "bf16"):
        steps = options["steps"] if precision == "fp32" or native_bf16 else min(options["steps"], 2)
        config = {**options, "steps": steps, "precision": precision, "batch_size": 8, "seq_len": 128, "data": "bbc"}
        results.append({"config": precision, **in_fresh_process(WORKER, config)})
    by = {r["config"]: r for r in results}
    auto = resolve_precision("auto")
    fastest = min(r["step_s"] for r in results)
    speed = by["fp32"]["step_s"] / by["bf16"]["step_s"]
    targets = [
        target("auto_precision_step_s_over_fastest", by[auto]["step_s"] / fastest, 1.05, higher_is_better=False),
        target("bf16_speedup_over_fp32", speed, 1.0),
        # Same seed, same first batch: the first losses differ only by precision.
        target("bf16_first_loss_minus_fp32", abs(by["bf16"]["first_loss"] - by["fp32"]["first_loss"]), 0.05, higher_is_better=False),
    ]
    return {"results": results, "targets": targets, "auto_precision": auto}
