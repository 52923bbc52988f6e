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
    fp32, bf16 = by["fp32"], by["bf16"]
    ratios = {
        "bf16_step_s_over_fp32": bf16["step_s"] / fp32["step_s"],
        "bf16_peak_above_floor_over_fp32": bf16["peak_above_floor_mb"] / fp32["peak_above_floor_mb"],
    }
    # Same seed, same first batch: the first losses differ only by precision (bf16 keeps ~3 digits).
    loss_gap = abs(bf16["first_loss"] - fp32["first_loss"]) / fp32["first_loss"]
    targets = [
        target("auto_precision_step_s_over_fastest", by[auto]["step_s"] / fastest, 1.05, higher_is_better=False),
        target("bf16_first_loss_relative_gap", loss_gap, 0.02, higher_is_better=False),
    ]
    return {"results": results, "ratios": ratios, "targets": targets, "auto_precision": auto}
