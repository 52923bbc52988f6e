"""The run folder: what a federated run leaves for people, scripts and tests to read.

    runs/<name>/
      config.json          the experiment's settings
      rounds.jsonl         one line per round (round 0 = before any training)
      checkpoints/round-N/ adapter/ (PEFT format) and state.json (round, metrics, config);
                           with save-client-updates, clients/node-ID.safetensors too
      adapter/             the final global adapter, loadable with PeftModel.from_pretrained
      summary.json         accuracy per round, totals, wall time, status
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.numpy import save_file

from edgecore.errors import EdgecoreError


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
            print(f"round {r['round']}: test {metric} (n={r['test_n']}), {len(r['clients'])} clients, "
                  f"{len(r['dropped'])} dropped, {r['round_s']:.1f} s, {r['bytes_up'] / 1e6:.2f} MB up", flush=True)
            on_device = {d["device"]: d.get("accuracy") for d in r.get("devices", [])}
            for c in r["clients"]:
                if "budget-mb" not in c:
                    continue
                accuracy = on_device.get(c["device"])
                print(f"  {c['device']:>22}: {'LUC' if c['compressed'] else 'dense'} {c['weights-mb']:.0f} MB, window "
                      f"{c['window']} layers, rank {c['lora-rank']}, job peak {c['job-peak-mb']:.0f} of {c['budget-mb']:.0f} MB"
                      + (f", global adapter on its base {accuracy:.1%}" if accuracy is not None else ""), flush=True)
        self.seen = len(lines)
