"""`fleet`: plain federated LoRA against the heterogeneous edgecore pipeline, same fleet, data, seeds, rounds.

Both runs are real Flower simulations of the default experiment (pyproject's run config: the
`demo` fleet of a 200 MB board, a 450 MB board and a phone, BBC, SmolLM2-135M), one after the
other in this run:
  (a) plain: every client tunes the dense model at full depth, whatever its budget (what
      FlowerTune and OpenFedLLM do);
  (b) edge: every client runs edgecore for its device (LUC when the budget needs it, the
      deepest window that fits, votes), the server aggregates partially and by rank.
Reported per round: the global adapter's test accuracy on the dense base, wall time, uplink
bytes; per client: the measured job peak (stored weights plus what training added) against
its device's budget; for (b) also the global adapter's accuracy on each device's own base.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgecore.experiment import Experiment
from server import run_config
from simulations.bench import benchmark, target
from simulations.simulate import simulate

ROUNDS = 3


def _say(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run(name: str, experiment: Experiment, clients: int) -> dict:
    _say(f"{name}: {experiment.num_rounds} rounds, {clients} clients, pipeline {experiment.pipeline}")
    outcome = simulate(clients, experiment, timeout_s=3600)
    if outcome["status"] != "finished:completed":
        raise RuntimeError(f"{name}: the simulation ended {outcome['status']}; see {outcome['run_folder']}")
    folder = Path(outcome["run_folder"])
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "config": name,
        "pipeline": experiment.pipeline,
        "wall_s": outcome["wall_s"],
        "accuracy_per_round": [r["test_accuracy"] for r in rounds],
        "round_wall_s": [r["round_s"] for r in rounds[1:]],
        "bytes_up_per_round": [r["bytes_up"] for r in rounds[1:]],
        "dropped": sum(len(r["dropped"]) for r in rounds),
        "clients": [_client(c) for r in rounds[1:] for c in [{"round": r["round"], **c} for c in r["clients"]]],
        "device_accuracy_per_round": summary.get("device_accuracy_per_round", {}),
        "run_folder": _relative(folder),
    }


def _relative(folder: Path) -> str:
    """The run folder as the project sees it (results files must not name this machine's paths)."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return folder.name


def _client(c: dict) -> dict:
    keys = ("round", "device", "partition-id", "job-peak-mb", "budget-mb", "estimate-mb", "weights-mb", "window",
            "lora-rank", "compressed", "step-s", "bytes-up", "peak-rss-mb", "assigned_exit")
    return {k.replace("-", "_"): c.get(k) for k in keys if k in c}


@benchmark("fleet")
def run(options: dict) -> dict:
    base = run_config.resolve(None)  # the default experiment: the demo fleet
    rounds = options.get("rounds") or ROUNDS
    fleet = base.load_fleet()
    clients = len(fleet.slots)
    common = {"model": options["model"], "num-rounds": rounds, "min-clients": clients, "run-name": ""}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    for name, pipeline in (("a_plain", "plain"), ("b_edge", "edge")):
        experiment = Experiment.from_mapping({**base.as_run_config(), **common, "pipeline": pipeline,
                                              "run-name": f"bench-fleet-{stamp}-{name}"})
        runs[name] = _run(name, experiment, clients)
    plain, edge = runs["a_plain"], runs["b_edge"]
    budgets = {slot.device.name: slot.device.memory_budget_mb for slot in fleet.slots}
    for row in (plain, edge):  # the plain path knows no device: its clients are matched by partition
        for c in row["clients"]:
            c.setdefault("budget_mb", fleet.client(int(c["partition_id"])).device.memory_budget_mb)
            c["device"] = fleet.client(int(c["partition_id"])).device.name
    memory = {name: _memory(row["clients"]) for name, row in runs.items()}
    ratios = {
        "uplink_a_over_b": sum(plain["bytes_up_per_round"]) / sum(edge["bytes_up_per_round"]),
        "round_wall_a_over_b": sum(plain["round_wall_s"]) / sum(edge["round_wall_s"]),
    }
    over = [m["max_job_peak_mb"] / m["budget_mb"] for m in memory["a_plain"].values()]
    targets = [
        target("b_final_accuracy_minus_a", edge["accuracy_per_round"][-1] - plain["accuracy_per_round"][-1], -0.02),
        target("b_clients_within_budget", float(all(m["within"] for m in memory["b_edge"].values())), 1.0),
        target("uplink_reduction_a_over_b", ratios["uplink_a_over_b"], 4.0),
    ]
    return {"results": [plain, edge], "memory_by_device": memory, "budgets_mb": budgets, "ratios": ratios,
            "a_worst_over_budget": max(over), "targets": targets, "fleet": fleet.name}


def _memory(clients: list[dict]) -> dict:
    """Per device: the largest job peak of any round against the budget."""
    table: dict[str, dict] = {}
    for c in clients:
        row = table.setdefault(c["device"], {"budget_mb": c["budget_mb"], "max_job_peak_mb": 0.0})
        row["max_job_peak_mb"] = max(row["max_job_peak_mb"], c.get("job_peak_mb") or 0.0)
        row["within"] = row["max_job_peak_mb"] <= row["budget_mb"]
    return table
