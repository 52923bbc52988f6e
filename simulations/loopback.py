"""`python -m simulations.loopback`: a fleet as a real deployment on this machine.

Where `simulations.simulate` runs Flower's simulation engine, this starts exactly what a user
starts on real hardware: `python -m server` and one `python -m client --device-profile X` per
fleet slot, each with its own runtime port, Flower home and (with `--separate-disks`) its own
`$EDGECORE_CACHE`, as if every device had its own disk. Every Flower message therefore runs in a
fresh process, as on a device. It waits for the server, stops every process it started by PID
(also on failure or Ctrl-C), and prints the run's outcome and per round each device's
preparation time, where its model came from and its memory.

    python -m simulations.loopback --fleet demo -c "num-rounds=3"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.fleet import resolve_fleet
from federation import processes

PROJECT = Path(__file__).resolve().parent.parent


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, *command], cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def run(fleet_name: str, overrides: str, work: Path, data: str, separate_disks: bool, timeout_s: float) -> dict:
    fleet = resolve_fleet(fleet_name)
    slots = fleet.slots
    port = processes.free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = f"min-clients={len(slots)} run-dir={json.dumps(str(work / 'runs'))} {overrides}".strip()
    started = time.perf_counter()
    children = [_start(["-m", "server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--flwr-home", str(work / "server"),
                         "-c", config], work / "server.log", dict(os.environ))]
    try:
        for i, slot in enumerate(slots):
            env = dict(os.environ)
            if separate_disks:
                env["EDGECORE_CACHE"] = str(work / f"disk-{i}")
            command = ["-m", "client", "--server", f"127.0.0.1:{port}", "--data", data, "--partition-id", str(i),
                       "--num-partitions", str(len(slots)), "--device-profile", slot.device.source or slot.device.name,
                       "--runtime-port", str(processes.free_port()), "--flwr-home", str(work / f"client-{i}")]
            command += ["--lora-rank", str(slot.lora_rank)] if slot.lora_rank else []
            children.append(_start(command, work / f"client-{i}.log", env))
        server = children[0]
        try:
            server.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise EdgecoreError(f"the run did not end within {timeout_s:.0f} s; logs in {work}") from None
    finally:
        for process in reversed(children):
            processes.stop(process)
    lines = (work / "server.log").read_text().strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise EdgecoreError(f"the server ended without an outcome (exit {children[0].returncode}); see {work / 'server.log'}") from None
    return {**outcome, "wall_s": time.perf_counter() - started, "logs": str(work)}


def per_device(run_folder: Path) -> list[dict]:
    """Per round and device: contributed, preparation time, where the model came from, memory."""
    rows = []
    for line in (run_folder / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        for client in record.get("clients", []):
            rows.append({"round": record["round"], "device": client.get("device"), "prepare_s": client.get("prepare-s"),
                         "from_disk": client.get("from-disk"), "built": client.get("built"),
                         "build_peak_mb": client.get("build-peak-mb"), "job_peak_mb": client.get("job-peak-mb"),
                         "budget_mb": client.get("budget-mb"), "round_s": client.get("round-s"),
                         "window": client.get("window"), "scheduled": client.get("scheduled")})
        for missing in record.get("dropped", []):
            rows.append({"round": record["round"], "device": missing.get("device"), "dropped": missing.get("reason")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.loopback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleet", default="demo", help="a shipped fleet (configs/fleets/) or a fleet file")
    parser.add_argument("-c", "--run-config", default="", help='server overrides, e.g. "num-rounds=3"')
    parser.add_argument("--data", default="bbc", help="the devices' data (a shared data set, partitioned among them)")
    parser.add_argument("--work", type=Path, default=PROJECT / "runs" / time.strftime("loopback-%Y%m%d-%H%M%S"),
                        help="logs, Flower homes, run folder and (with --separate-disks) each device's disk")
    parser.add_argument("--separate-disks", action="store_true",
                        help="give every device its own $EDGECORE_CACHE, as on separate hardware (each converts the model once)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    args = parser.parse_args(argv)
    try:
        outcome = run(args.fleet, args.run_config, args.work, args.data, args.separate_disks, args.timeout)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in per_device(Path(outcome["run_folder"])):
        print(json.dumps(row))
    print(json.dumps(outcome))
    return 0 if outcome.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
