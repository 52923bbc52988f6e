"""Benchmarks: `python -m simulations.bench NAME --out FILE.json`.

Each benchmark runs its baseline and candidate configurations side by side in one run, each
configuration in a fresh process (so peak memory and the runtime floor are that
configuration's own), and writes JSON with `machine`, `results` (one object per
configuration, units in the keys) and `targets` (metric, value, target, met) computed from
`results` in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

from edgecore.errors import EdgecoreError

BENCHMARKS: dict[str, Callable[[dict], dict]] = {}


def benchmark(name: str):
    """Register `fn(options) -> {"results": [...], "targets": [...]}` under a name."""

    def register(fn):
        BENCHMARKS[name] = fn
        return fn

    return register


def in_fresh_process(worker: str, config: dict, timeout_s: float = 1800) -> dict:
    """Run `python -m WORKER` with the config as JSON on stdin; it prints one JSON object last."""
    done = subprocess.run(
        [sys.executable, "-m", worker],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise EdgecoreError(f"benchmark worker {worker} failed for {config}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def target(metric: str, value: float, goal: float, higher_is_better: bool = True) -> dict:
    met = value >= goal if higher_is_better else value <= goal
    return {"metric": metric, "value": value, "target": goal, "met": bool(met)}
