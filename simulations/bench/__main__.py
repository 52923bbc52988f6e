"""`python -m simulations.bench NAME --out FILE.json [--steps N] [--model M]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.measure import machine
from simulations.bench import BENCHMARKS, fleet, luc, plain, privacy, schedule, tuning  # noqa: F401  (registers the benchmarks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--model", default="smollm2-135m", help="model name or local folder")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration")
    parser.add_argument("--eval-samples", type=int, default=0, help="test samples scored after training (0: none)")
    args = parser.parse_args(argv)
    options = {"model": args.model, "steps": args.steps, "eval_samples": args.eval_samples}
    try:
        outcome = BENCHMARKS[args.name](options)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"benchmark": args.name, "machine": machine(), "options": options, **outcome}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for row in report["results"]:
        print(json.dumps(row))
    for name, value in report.get("ratios", {}).items():
        print(f"ratio {name}: {value:.3g}")
    for goal in report["targets"]:
        print(f"target {goal['metric']}: {goal['value']:.3g} vs {goal['target']:.3g} -> {'met' if goal['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
