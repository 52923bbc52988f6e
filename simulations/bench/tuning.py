"""`tuning`: plain full-depth LoRA against adaptive-depth tuning, dense and LUC-compressed.

SmolLM2-135M, BBC, batch 8 x 128, fp32, each configuration in a fresh process, in one run:
  (a) plain: dense LoRA over the full depth (the foundation baseline);
  (c) luc+adaptive: LUC-compressed for the pi4-1gb profile (450 MiB job budget), window depth
      from that budget, same number of steps as (a);
  (b) adaptive: the dense model with (c)'s window depth, same steps;
  (c') luc+adaptive trained for as many steps as fit in (a)'s training wall time.
Reported: step time, peak RSS above the runtime floor (and the estimator's prediction for the
adaptive runs), test accuracy after the same steps and after the same wall time, and early-exit
inference (layers run, latency, accuracy) against full depth.

LUC here measures a compact candidate grid (no pruning or 50%, at 3, 4 or 8 bits) so that the
whole benchmark fits its 20 minutes; `python -m edgecore compress` measures the profile's full
grid once and caches it.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from edgecore import luc
from edgecore.luc.pipeline import compress
from edgecore import models
from edgecore.memory import MIB
from edgecore.profiles import resolve_profile
from simulations.bench import benchmark, in_fresh_process, target

WORKER = "simulations.bench.tuning_worker"
PROFILE = "pi4-1gb"
COMPACT = [luc.Candidate(s, "unstructured", b) for s in (0.0, 0.5) for b in (3, 4, 8)]


def _say(message: str) -> None:
    print(f"[tuning {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@benchmark("tuning")
def run(options: dict) -> dict:
    steps = options["steps"]
    base = {"steps": steps, "batch_size": 8, "seq_len": 128, "lr": 1e-3, "eval_samples": options.get("eval_samples") or 100,
            "vote_samples": 50, "inference_samples": 30, "threshold": 0.9}
    profile = resolve_profile(PROFILE)
    shape = models.shape(options["model"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _say(f"compressing {options['model']} for {PROFILE}")
        plan = luc.tuning_reserve_step(shape, batch=8, seq_len=128)
        done = compress(options["model"], profile, "bbc", plan=plan, candidates=COMPACT, progress=False)
        folder = luc.save_compressed(Path(tmp) / "compressed", done.model, done.tokenizer, done.policy)
        compression = {"profile": PROFILE, "weights_mb": done.policy.weight_bytes / MIB, "seconds": done.seconds,
                       "layers": [c.label for c in done.policy.layers], "embedding_bits": done.policy.embedding_bits}
        del done

        def one(name: str, **config) -> dict:
            _say(f"{name}: {config.get('steps', steps)} steps")
            row = in_fresh_process(WORKER, {**base, "name": name, **config})
            results.append(row)
            return row

        plain = one("a_plain", mode="plain", model=options["model"])
        luc_row = one("c_luc_adaptive", mode="adaptive", model=str(folder), budget_mb=profile.memory_budget_mb)
        dense = one("b_adaptive", mode="adaptive", model=options["model"], window=luc_row["window"])
        same_wall = max(steps, math.floor(plain["train_s"] / luc_row["step_s"]))
        wall = one("c_luc_adaptive_same_wall_time", mode="adaptive", model=str(folder),
                   budget_mb=profile.memory_budget_mb, steps=same_wall)
    ratios = {
        "a_over_c_step_s": plain["step_s"] / luc_row["step_s"],
        "a_over_b_step_s": plain["step_s"] / dense["step_s"],
        "a_over_c_peak_above_floor": plain["peak_above_floor_mb"] / luc_row["peak_above_floor_mb"],
        "a_over_b_peak_above_floor": plain["peak_above_floor_mb"] / dense["peak_above_floor_mb"],
        "c_estimate_over_measured": luc_row["estimate_mb"] / luc_row["peak_above_floor_mb"],
        "b_estimate_over_measured": dense["estimate_mb"] / dense["peak_above_floor_mb"],
    }
    early, full = luc_row["inference"]["early_exit"], luc_row["inference"]["full_depth"]
    inference = {
        "c_layers_early_over_full": early["mean_layers"] / full["mean_layers"],
        "c_latency_early_over_full": early["latency_ms"] / full["latency_ms"],
        "c_accuracy_early_minus_full": early["accuracy"] - full["accuracy"],
    }
    targets = [
        target("c_step_speedup_vs_a", ratios["a_over_c_step_s"], 3.0),
        target("c_peak_memory_reduction_vs_a", ratios["a_over_c_peak_above_floor"], 4.0),
        target("c_accuracy_minus_a_same_steps", luc_row["test_accuracy"] - plain["test_accuracy"], -0.02),
        target("c_accuracy_minus_a_same_wall_time", wall["test_accuracy"] - plain["test_accuracy"], -0.02),
        target("estimate_error_c", abs(ratios["c_estimate_over_measured"] - 1), 0.15, higher_is_better=False),
        target("estimate_error_b", abs(ratios["b_estimate_over_measured"] - 1), 0.15, higher_is_better=False),
    ]
    return {"results": results, "ratios": {**ratios, **inference}, "targets": targets, "compression": compression}
