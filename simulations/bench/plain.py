"""`plain`: the plain LoRA baseline in fp32 and in bf16 autocast, same batches, same seed.

Reports step time, peak RSS and peak above the runtime floor (RSS after the imports, before
the model loads), the losses (bf16 should track fp32) and optional test accuracy; the target
checks that `--precision auto` picks the faster of the two on this machine.
"""

from __future__ import annotations

from edgecore.finetune import resolve_precision
from simulations.bench import benchmark, in_fresh_process, target

WORKER = "simulations.bench.plain_worker"


@benchmark("plain")
def run(options: dict) -> dict:
    results = []
    for precision in ("fp32", "bf16"):
        config = {**options, "precision": precision, "batch_size": 8, "seq_len": 128, "data": "bbc"}
        results.append({"config": precision, **in_fresh_process(WORKER, config)})
    by = {r["config"]: r for r in results}
    auto = resolve_precision("auto")
    fastest = min(r["step_s"] for r in results)
    speed = by["fp32"]["step_s"] / by["bf16"]["step_s"]
    targets = [
        target("auto_precision_step_s_over_fastest", by[auto]["step_s"] / fastest, 1.05, higher_is_better=False),
        target("bf16_speedup_over_fp32", speed, 1.0),
        target("bf16_final_loss_minus_fp32", abs(by["bf16"]["final_loss"] - by["fp32"]["final_loss"]), 0.1, higher_is_better=False),
    ]
    return {"results": results, "targets": targets, "auto_precision": auto}
