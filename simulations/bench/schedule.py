"""`schedule`: LUC's dequantize-in-forward against scheduled execution, with dense bf16 as the speed reference.

SmolLM2-135M made ready by edgecore.device.prepare for two shipped profiles (LUC, quick grid,
sensitivity cached; the window the device's planning budget fits), each configuration in a
fresh process, all in one run:
  (a) luc: the compressed model as LUC runs it (every packed layer rebuilt at every call);
  (b) scheduled: the same model through the plan the measured cost table picks, within the
      profile's budget and at most (a)'s predicted peak;
  (c) dense-bf16: the uncompressed model in bf16.
Workloads: a window training step (batch 8 x 128 where the profile's budget fits it, else 4
x 128; the deepest window the budget fits) and decoding 64 tokens at batch 1 after a
16-token prompt. Then (b) for pi4-1gb decoding again with a job budget below its compressed
weights, so that frozen layers stream from disk. Reported per configuration: median time,
peak RSS above the runtime floor, the cost model's predicted time; ratios (a)/(b), (c)/(b),
prediction error, the streaming slowdown and the decoded tokens' agreement with (a).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from edgecore.device import DeviceSpec, prepare
from edgecore.device_store import DeviceStore
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings
from edgecore.memory import MIB
from edgecore.profiles import resolve_profile
from simulations.bench import benchmark, in_fresh_process, target

WORKER = "simulations.bench.schedule_worker"
PROFILES = {"pi-zero-2w": 4, "pi4-1gb": 8}  # profile -> training batch (8 x 128 does not fit pi-zero-2w's 200 MB)
SEQ_LEN, PROMPT, NEW_TOKENS = 128, 16, 64
STREAM_PROFILE, STREAM_BUDGET_MB = "pi4-1gb", 150  # below its compressed weights (165 MB)


def _say(message: str) -> None:
    print(f"[schedule {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _device(model: str, profile_name: str, store: DeviceStore):
    """The device's model as a client prepares it (edgecore.device): its compressed base and window."""
    spec = DeviceSpec(model, resolve_profile(profile_name), LoraSettings(), batch_size=PROFILES[profile_name],
                      seq_len=SEQ_LEN, calib_samples=2, schedule=False)
    dev = prepare(spec, store)
    if not dev.compressed:
        raise EdgecoreError(f"{model} stays dense on {profile_name}: this benchmark compares compressed execution")
    return dev


@benchmark("schedule")
def run(options: dict) -> dict:
    model = options["model"]
    results, targets, ratios = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for profile_name, batch in PROFILES.items():
            profile = resolve_profile(profile_name)
            _say(f"preparing {model} for {profile_name}")
            dev = _device(model, profile_name, DeviceStore(Path(tmp) / "devices"))
            folder, weight_bytes, depth = dev.store.folder, int(dev.policy["weights_mb"] * MIB), dev.depth.layers
            workloads = {"train": {"kind": "train", "batch": batch, "seq_len": SEQ_LEN, "depth": depth},
                         "decode": {"kind": "decode", "batch": 1, "seq_len": PROMPT, "new_tokens": NEW_TOKENS}}
            costs = str(Path(tmp) / f"costs-{profile_name}.json")
            by = {}
            for kind, workload in workloads.items():
                for mode in ("luc", "scheduled", "dense-bf16"):
                    name = f"{profile_name}/{kind}/{mode}"
                    _say(f"{name}: {workload}")
                    repeats = 1 if (mode == "luc" and kind == "decode") else (2 if mode == "dense-bf16" else 3)
                    by[(kind, mode)] = in_fresh_process(WORKER, {
                        "name": name, "mode": mode, "profile": profile_name, "model": model, "folder": str(folder),
                        "workload": workload, "budget_mb": profile.memory_budget_mb, "costs": costs, "repeats": repeats})
                    results.append(by[(kind, mode)])
            if profile_name == STREAM_PROFILE:
                name = f"{profile_name}/decode/scheduled-streaming-{STREAM_BUDGET_MB}mb"
                _say(name)
                by[("decode", "streaming")] = in_fresh_process(WORKER, {
                    "name": name, "mode": "scheduled", "profile": profile_name, "model": model, "folder": str(folder),
                    "workload": workloads["decode"], "budget_mb": STREAM_BUDGET_MB, "streaming": True, "costs": costs,
                    "repeats": 1})
                results.append(by[("decode", "streaming")])
                stream = by[("decode", "streaming")]
                ratios[f"{profile_name} streaming slowdown vs scheduled (decode)"] = stream["seconds"] / by[("decode", "scheduled")]["seconds"]
                targets.append(target(f"{profile_name} streams: peak above floor within {STREAM_BUDGET_MB} MB + runtime "
                                      f"slack, below the compressed weights ({weight_bytes / MIB:.0f} MB)",
                                      stream["peak_above_floor_mb"], weight_bytes / MIB, higher_is_better=False))
            for kind in workloads:
                a, b, c = by[(kind, "luc")], by[(kind, "scheduled")], by[(kind, "dense-bf16")]
                ratios[f"{profile_name} {kind}: (a) luc / (b) scheduled time"] = a["seconds"] / b["seconds"]
                ratios[f"{profile_name} {kind}: (c) dense bf16 / (b) scheduled time"] = c["seconds"] / b["seconds"]
                ratios[f"{profile_name} {kind}: (b) / (a) peak above floor"] = b["peak_above_floor_mb"] / a["peak_above_floor_mb"]
                for row in (a, b, c):
                    row["prediction_error"] = row["predicted_s"] / row["seconds"] - 1
                    targets.append(target(f"{row['config']}: |predicted / measured - 1|", abs(row["prediction_error"]),
                                          0.25, higher_is_better=False))
                if kind == "decode":
                    # The bound on (c)/(b): (b) cannot be faster than its measured rest of the model.
                    ratios[f"{profile_name} decode: (c) dense bf16 time / (b)'s rest of the model"] = c["seconds"] / b["plan"]["rest_s"]
                    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"])) / len(a["tokens"])
                    ratios[f"{profile_name} decode: tokens equal to (a)'s"] = same
                    targets.append(target(f"{profile_name} decode: (c) dense bf16 / (b) scheduled time", c["seconds"] / b["seconds"], 2.0))
                else:
                    targets.append(target(f"{profile_name} train: (a) luc / (b) scheduled time", a["seconds"] / b["seconds"], 1.5))
                targets.append(target(f"{profile_name} {kind}: (b) peak above floor / (a)'s", b["peak_above_floor_mb"] / a["peak_above_floor_mb"],
                                      1.0, higher_is_better=False))
    return {"results": results, "ratios": ratios, "targets": targets}
