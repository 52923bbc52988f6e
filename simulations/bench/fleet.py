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
Every fleet slot is expected in every round (min-clients is the fleet's size): a client whose
update did not count (an error, a rejected update, no reply) is reported with why, and a
device that never contributed fails the budget target instead of passing it unmeasured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgecore.experiment import Experiment
from edgecore.fleet import Fleet
from federation.protocol import BUDGET_MB, PARTITION_ID
from server import run_config
from server.run_folder import clients_within_budget, contribution
from simulations.bench import benchmark, target
from simulations.simulate import simulate

ROUNDS = 3


def _say(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def simulate_fleet(name: str, experiment: Experiment, fleet: Fleet) -> tuple[dict, list[dict]]:
    """Simulate one configuration on the whole fleet; (its results row, its round records)."""
    clients = experiment.min_clients
    _say(f"{name}: {experiment.num_rounds} rounds, {clients} clients, pipeline {experiment.pipeline}")
    outcome = simulate(clients, experiment, timeout_s=3600)
    if outcome["status"] != "finished:completed":
        raise RuntimeError(f"{name}: the simulation ended {outcome['status']}; see {outcome['run_folder']}")
    folder = Path(outcome["run_folder"])
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    for r in rounds:  # the plain path knows no device: its clients are matched to their partition's slot
        for c in r["clients"]:
            device = fleet.client(int(c[PARTITION_ID])).device
            c["device"] = device.name
            c.setdefault(BUDGET_MB, device.memory_budget_mb)
    share = contribution(rounds, expected=clients)
    row = {
        "config": name,
        "pipeline": experiment.pipeline,
        "wall_s": outcome["wall_s"],
        "accuracy_per_round": [r["test_accuracy"] for r in rounds],
        "round_wall_s": [r["round_s"] for r in rounds[1:]],
        "bytes_up_per_round": [r["bytes_up"] for r in rounds[1:]],
        "dropped": sum(len(r["dropped"]) for r in rounds),
        "contributed_fraction": share["fraction"],
        "not_contributed": share["missing"],
        "clients": [_client(c) for r in rounds[1:] for c in [{"round": r["round"], **c} for c in r["clients"]]],
        "device_accuracy_per_round": summary.get("device_accuracy_per_round", {}),
        "run_folder": _relative(folder),
    }
    return row, rounds


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
    common = {"model": options["model"], "num-rounds": rounds, "min-clients": len(fleet.slots), "run-name": ""}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, records = {}, {}
    for name, pipeline in (("a_plain", "plain"), ("b_edge", "edge")):
        experiment = Experiment.from_mapping({**base.as_run_config(), **common, "pipeline": pipeline,
                                              "run-name": f"bench-fleet-{stamp}-{name}"})
        runs[name], records[name] = simulate_fleet(name, experiment, fleet)
    plain, edge = runs["a_plain"], runs["b_edge"]
    budgets = {slot.device.name: slot.device.memory_budget_mb for slot in fleet.slots}
    # Over the accepted updates only; a device of the fleet that never contributed is a row that is not within.
    memory = {name: clients_within_budget(rounds, expected_profiles=budgets) for name, rounds in records.items()}
    ratios = {
        "uplink_a_over_b": sum(plain["bytes_up_per_round"]) / sum(edge["bytes_up_per_round"]),
        "round_wall_a_over_b": sum(plain["round_wall_s"]) / sum(edge["round_wall_s"]),
    }
    over = [m["max_job_peak_mb"] / m["budget_mb"] for m in memory["a_plain"].values() if m["contributed_rounds"]]
    targets = [
        target("b_final_accuracy_minus_a", edge["accuracy_per_round"][-1] - plain["accuracy_per_round"][-1], -0.02),
        target("b_clients_contributed", edge["contributed_fraction"], 1.0),
        target("b_clients_within_budget", float(all(m["within"] for m in memory["b_edge"].values())), 1.0),
        target("uplink_reduction_a_over_b", ratios["uplink_a_over_b"], 4.0),
    ]
    return {"results": [plain, edge], "memory_by_device": memory, "budgets_mb": budgets, "ratios": ratios,
            "a_worst_over_budget": max(over, default=None), "targets": targets, "fleet": fleet.name}
