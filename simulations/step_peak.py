"""Peak memory of a few real LoRA training steps, measured in a fresh process.

The measurement follows the project's memory contract: a fresh Python process imports
torch, transformers, peft and edgecore, records its RSS as the runtime floor, loads the
model, adds LoRA, runs a few `edgecore.finetune.train` steps, and reports the peak RSS minus
the floor. SmolLM2's weights are memory-mapped from the safetensors cache: the pages count
once in the RSS (as file-backed pages, once the forward pass has touched them), not twice.

This is how `edgecore.memory`'s estimator was calibrated, and how tests/test_memory.py keeps
it honest. It sits above edgecore because it uses all of it (models, data, finetune, LUC,
tuning); the estimator itself imports none of them.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import peft  # noqa: F401  (part of the floor: everything a client imports)
import torch
import transformers  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401  (imported lazily on first load)

from edgecore import data as datasets
from edgecore import measure, models
from edgecore.allocator import allocator_in_effect, limit_heap_fragmentation
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, TrainSettings, add_lora, batches, train
from edgecore.luc.layer import CompressedLinear
from edgecore.memory import DEFAULT_TARGETS, StepPlan
from edgecore.tuning.exits import Exits
from edgecore.tuning.window import ExitChooser, WindowTrainer


def measure_training_peak(
    model_name: str,
    batch: int,
    seq_len: int,
    steps: int = 2,
    *,
    lora_r: int = 8,
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS,
    lora_dropout: float = 0.05,
    precision: str = "fp32",
    data: str = "synthetic",
    limit_heap: bool = False,
    window: tuple[int, int] | None = None,
    timeout_s: float = 900,
) -> dict:
    """Peak RSS of `steps` LoRA training steps in a fresh process, minus its runtime floor.

    Returns the child's report: floor_mb, loaded_mb, peak_mb (above the floor), the batch's
    real length and answer tokens (`plan_fields` to rebuild the StepPlan), and step_s.
    `data` is "synthetic" (every sequence exactly seq_len tokens, one answer token) or a
    dataset spec for `edgecore.data.load` such as "bbc". `window` (first, last) trains only
    those layers, read at an exit after `last` (edgecore.tuning's window step); None: all.
    """
    models.check_source(model_name)  # a wrong name fails here, in seconds, with its fix
    request = {
        "model": model_name,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "lora_r": lora_r,
        "lora_targets": list(lora_targets),
        "lora_dropout": lora_dropout,
        "precision": precision,
        "data": data,
        "limit_heap": limit_heap,
        "window": list(window) if window else None,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if limit_heap:  # from the child's first allocation, before it imports torch
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    root = str(Path(__file__).resolve().parent.parent)  # the repository
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "simulations.step_peak", json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=root,
        )
    except subprocess.TimeoutExpired:
        raise EdgecoreError(f"the memory measurement of {model_name} took over {timeout_s:.0f} s; lower batch or steps") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise EdgecoreError(f"the memory measurement of {model_name} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_from_report(report: dict, **changes: Any) -> StepPlan:
    """The StepPlan that describes what a measurement really ran."""
    fields_ = report["plan_fields"]
    window = tuple(fields_["window"]) if fields_.get("window") else None
    plan = dict(fields_, lora_targets=tuple(fields_["lora_targets"]), window=window)
    return replace(StepPlan(**plan), **changes)


def _synthetic(seq_len: int, count: int):
    """Classification samples long enough to fill seq_len, with one-token answers."""
    rng = random.Random(0)
    words = "the market team phone bank goal chip web shares profit match coach software film vote".split()
    letters = ("a", "b", "c", "d")  # " a" is one token under byte-level BPE and SmolLM2 alike
    samples = [
        Sample(" ".join(rng.choice(words) for _ in range(seq_len)), letters[k % 4], letters[k % 4])
        for k in range(count)
    ]
    return Dataset("synthetic", samples, samples[:4], samples[:4], letters, "Which letter fits?")


def _child(request: dict) -> dict:
    """Runs in the fresh process: floor after imports, then load, LoRA and training."""
    if request["limit_heap"]:
        limit_heap_fragmentation()  # as a client does (the environment already set the same threshold)
    torch.manual_seed(0)
    floor = measure.rss_mb()
    model, tokenizer = models.load(request["model"])
    loaded = measure.rss_mb() - floor
    packed = any(isinstance(m, CompressedLinear) for m in model.modules())
    lora = LoraSettings(r=request["lora_r"], dropout=request["lora_dropout"], targets=tuple(request["lora_targets"]))
    model = add_lora(model, lora)
    if request["data"] == "synthetic":
        dataset = _synthetic(request["seq_len"], 4 * request["batch"])
    else:
        dataset = datasets.load(request["data"])
    encoder = Encoder(tokenizer, dataset, max_len=request["seq_len"])
    settings = TrainSettings(
        steps=request["steps"], batch_size=request["batch"], seq_len=request["seq_len"], precision=request["precision"]
    )
    # The same seeded batches train() will draw: their real length and answer-token count.
    stream = batches(encoder, dataset.train, settings.batch_size, settings.seed)
    drawn = [next(stream) for _ in range(settings.steps)]
    length = max(b.input_ids.shape[1] for b in drawn)
    answers = max(b.num_target_tokens for b in drawn)
    del drawn, stream
    step_loss, extra = None, []
    if request.get("window"):
        first, last = request["window"]
        exits = Exits([last], model.config.hidden_size)
        step_loss = WindowTrainer(model, exits, last - first + 1, ExitChooser([last]))
        extra = list(exits.parameters())
    report = train(model, encoder, dataset.train, settings, progress=False, step_loss=step_loss, extra_params=extra)
    return {
        "request": request,
        "floor_mb": floor,
        "loaded_mb": loaded,
        "peak_mb": report.peak_rss_mb - floor,
        "step_s": report.mean_step_s,
        "allocator": allocator_in_effect(),
        "plan_fields": {
            "batch": request["batch"],
            "seq_len": length,
            "lora_r": request["lora_r"],
            "lora_targets": tuple(request["lora_targets"]),
            "lora_dropout": request["lora_dropout"],
            "precision": report.precision,
            "answer_tokens": answers,
            "allocator": allocator_in_effect(),
            "window": tuple(request["window"]) if request.get("window") else None,
            "packed_weights": packed,
        },
    }


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m simulations.step_peak '<json request>'  (see measure_training_peak)", file=sys.stderr)
        return 2
    try:
        print(json.dumps(_child(json.loads(argv[0]))))
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
