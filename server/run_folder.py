"""The run folder: what a federated run leaves for people, scripts and tests to read.

    runs/<name>/
      config.json          the experiment's settings
      rounds.jsonl         one line per round (round 0 = before any training): `sampled` (the nodes sent
                           the round's instruction), `clients` (those whose update was accepted),
                           `dropped` (the others: node_id, device when known, cause: error,
                           rejected or no-reply, reason), `privacy` (epsilon so far, under DP), ...
      checkpoints/round-N/ adapter/ (PEFT format) and state.json (round, metrics, config);
                           with save-client-updates, clients/node-ID.safetensors too
      adapter/             the final global adapter, loadable with PeftModel.from_pretrained
      summary.json         accuracy per round, totals, wall time, status, who contributed
                           (contribution, clients_within_budget)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from safetensors.numpy import save_file

from edgecore.errors import EdgecoreError
from federation.protocol import BUDGET_MB, JOB_PEAK_MB


class RunFolder:
    def __init__(self, root: Path, name: str | None = None):
        name = name or time.strftime("fl-%Y%m%d-%H%M%S")
        self.path = Path(root) / name
        if (self.path / "summary.json").exists():
            raise EdgecoreError(f"run folder {self.path} already holds a finished run; choose another run name")
        self.path.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict] = []

    def write_config(self, config: dict) -> None:
        (self.path / "config.json").write_text(json.dumps(config, indent=2))

    def add_round(self, record: dict) -> None:
        self.rounds.append(record)
        with (self.path / "rounds.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round}"

    def write_state(self, server_round: int, state: dict) -> None:
        (self.checkpoint_dir(server_round) / "state.json").write_text(json.dumps(state, indent=2))

    def save_client_update(self, server_round: int, node_id: int, arrays: dict) -> None:
        folder = self.checkpoint_dir(server_round) / "clients"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(arrays, folder / f"node-{node_id}.safetensors")

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


def contribution(rounds: list[dict], expected: int = 0) -> dict:
    """Who contributed to each training round of these round records (round 0, before training, is none).

    A client contributed to a round when the server accepted its update (`clients`); a sampled
    client whose reply was an error, whose update was rejected or that sent no reply is in
    `dropped`. `expected` is how many clients every round should have had (min-clients, a
    fleet's size): a round that sampled fewer misses the rest too. Returns
      per_round       round -> {"clients": the accepted clients, "missing": the others, "of": the round's size}
      expected, contributed   (client, round) pairs, all and those that contributed
      fraction        contributed / expected (0.0 when there is no pair: nothing contributed)
      all_contributed every expected client contributed to every round
      missing         each pair that did not: round, node_id, device ("" when no record names it), cause, reason
    A failed client's device is named from any record of its node (an earlier update, an evaluation).
    """
    training = [r for r in rounds if _field(r, "round", "round record") >= 1]
    named = {c["node_id"]: c["device"] for r in training for key in ("clients", "devices", "dropped")
             for c in r.get(key, []) if c.get("device") and "node_id" in c}
    per_round, missing = {}, []
    for r in training:
        where = f"round {r['round']} record"
        clients, dropped = _field(r, "clients", where), _field(r, "dropped", where)
        sampled = len(r.get("sampled", clients + dropped))  # `sampled`: absent from older run folders
        size = max(sampled, expected)
        lost = [{"round": r["round"], "node_id": d.get("node_id"), "device": d.get("device") or named.get(d.get("node_id"), ""),
                 "cause": d.get("cause", "rejected"), "reason": d.get("reason", "")} for d in dropped]
        lost += [{"round": r["round"], "node_id": None, "device": "", "cause": "not-sampled",
                  "reason": f"the round sampled {sampled} of the {expected} expected clients"}
                 for _ in range(size - len(clients) - len(lost))]
        per_round[r["round"]] = {"clients": clients, "missing": lost, "of": size}
        missing += lost
    pairs = sum(r["of"] for r in per_round.values())
    done = sum(len(r["clients"]) for r in per_round.values())
    return {"per_round": per_round, "expected": pairs, "contributed": done, "fraction": done / pairs if pairs else 0.0,
            "all_contributed": bool(pairs) and done == pairs, "missing": missing}


def clients_within_budget(rounds: list[dict], expected_profiles: Iterable[str] = ()) -> dict:
    """Per device profile, over the accepted updates only: the largest measured job peak against its budget.

    Rows: the profiles that contributed with a budget, those named by a client that did not
    contribute, and `expected_profiles` (a fleet's devices). Each has `contributed_rounds` (the
    rounds with an accepted update of that profile) of `rounds_run`, and `missing_rounds` (the rounds
    with none, or with a client of that profile that did not contribute); `within` is true only
    for a profile that contributed and stayed within its budget every time.
    """
    share = contribution(rounds)
    table: dict[str, dict] = {}
    unbudgeted = {c.get("device") for r in share["per_round"].values() for c in r["clients"] if BUDGET_MB not in c}
    devices = [*expected_profiles, *(c["device"] for r in share["per_round"].values() for c in r["clients"] if BUDGET_MB in c),
               *(m["device"] for m in share["missing"] if m["device"] and m["device"] not in unbudgeted)]
    for device in dict.fromkeys(devices):
        row = table[device] = {"budget_mb": None, "max_job_peak_mb": None, "contributed_rounds": 0,
                               "rounds_run": len(share["per_round"]), "missing_rounds": [], "within": False}
        for number, r in share["per_round"].items():
            mine = [c for c in r["clients"] if c.get("device") == device]
            for c in mine:
                peak = _field(c, JOB_PEAK_MB, f"round {number}, node {c.get('node_id')}")
                row["budget_mb"] = _field(c, BUDGET_MB, f"round {number}, node {c.get('node_id')}")
                row["max_job_peak_mb"] = max(row["max_job_peak_mb"] or 0.0, peak)
            row["contributed_rounds"] += bool(mine)
            if not mine or any(m["device"] == device for m in r["missing"]):
                row["missing_rounds"].append(number)
        row["within"] = row["contributed_rounds"] > 0 and row["max_job_peak_mb"] <= row["budget_mb"]
    return table


def _field(record: dict, key: str, where: str):
    if key not in record:
        raise EdgecoreError(f"{where}: no {key!r} field (fields: {', '.join(sorted(record)) or 'none'})")
    return record[key]


class RoundPrinter:
    """Prints the rounds that appeared in a run folder since the last call (for wrappers)."""

    def __init__(self, run_folder: Path):
        self.rounds_file = Path(run_folder) / "rounds.jsonl"
        self.seen = 0

    def __call__(self) -> None:
        if not self.rounds_file.exists():
            return
        lines = self.rounds_file.read_text().splitlines()
        for line in lines[self.seen:]:
            r = json.loads(line)
            metric = f"accuracy {r['test_accuracy']:.1%}" if "test_accuracy" in r else f"perplexity {r['test_perplexity']:.2f}"
            share = contribution([r])["per_round"].get(r["round"])
            who = f"{len(share['clients'])} of {share['of']} contributed, " if share else ""
            privacy = f", epsilon {r['privacy']['epsilon']:.3g} so far" if "privacy" in r else ""
            print(f"round {r['round']}: test {metric} (n={r['test_n']}), {who}{r['round_s']:.1f} s, "
                  f"{r['bytes_up'] / 1e6:.2f} MB up{privacy}", flush=True)
            for m in share["missing"] if share else []:
                print(f"  did not contribute: {m['device'] or 'device unknown'} (node {m['node_id']}), {m['cause']}: "
                      f"{m['reason']}", flush=True)
            on_device = {d["device"]: d.get("accuracy") for d in r.get("devices", [])}
            for c in r["clients"]:
                if BUDGET_MB not in c:
                    continue
                accuracy = on_device.get(c["device"])
                print(f"  {c['device']:>22}: {'LUC' if c['compressed'] else 'dense'} {c['weights-mb']:.0f} MB, window "
                      f"{c['window']} layers, rank {c['lora-rank']}, job peak {c['job-peak-mb']:.0f} of {c['budget-mb']:.0f} MB"
                      + (f", global adapter on its base {accuracy:.1%}" if accuracy is not None else ""), flush=True)
        self.seen = len(lines)
