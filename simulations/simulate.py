"""`python -m simulations.simulate`: run the Flower app as a local simulation, safely.

What `flwr run .` does, without its traps: a SuperLink in simulation mode that this process
starts on free loopback ports (so it is stopped by PID when the run ends, even on failure),
a project-local FLWR_HOME, no runtime dependency installation, and the run's real final
status from `flwr ls` (`flwr run --stream` exits 0 even when the run failed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from federation import processes
from server import run_config
from server.run_folder import RoundPrinter

PROJECT = Path(__file__).resolve().parent.parent


def start_simulation_superlink(flwr_home: Path) -> tuple[subprocess.Popen, str, Path]:
    port, control = processes.free_port(), processes.free_port()
    address = f"127.0.0.1:{port}"
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    command = [
        str(processes.BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("w") as log:
        process = subprocess.Popen(
            command, env=processes.flower_env(flwr_home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    processes.wait_healthy(address, process, timeout_s=60, log_file=log_file)
    return process, address, log_file


def simulate(
    num_clients: int,
    experiment: Experiment,
    flwr_home: Path = PROJECT / ".flwr" / "simulation",
    timeout_s: float = 1800,
    cpus_per_client: int = 2,
) -> dict:
    """Run the app on `num_clients` simulated SuperNodes; return the run id, status and run folder.

    The run folder is pinned to an absolute path so this process knows where the server wrote it.
    """
    flwr_home = Path(flwr_home)
    experiment = run_config.pin_run_folder(experiment, "sim")
    run_folder = Path(experiment.run_dir) / experiment.run_name
    process, address, log_file = start_simulation_superlink(flwr_home)
    env = processes.flower_env(flwr_home)
    try:
        processes.write_connection(flwr_home, "sim", address)
        federation = f"num-supernodes={num_clients} client-resources-num-cpus={cpus_per_client}"
        started = time.perf_counter()
        run_id = processes.submit_run(PROJECT, "sim", env, run_config=run_config.as_flwr_overrides(experiment),
                                   federation_config=federation)
        print(f"run {run_id} submitted to the simulation SuperLink at {address} (log: {log_file})", flush=True)
        status = processes.await_completion(run_id, "sim", env, timeout_s, on_poll=RoundPrinter(run_folder))
    finally:
        processes.stop(process)
    return {"run_id": run_id, "status": status, "wall_s": time.perf_counter() - started, "run_folder": str(run_folder)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=4, help="simulated SuperNodes (one data partition each)")
    parser.add_argument("--config", type=Path, default=None, help="an experiment TOML file (configs/experiments/*.toml)")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-rounds=2 local-steps=4"')
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is abandoned")
    args = parser.parse_args(argv)
    try:
        experiment = run_config.resolve(args.config, args.run_config)
        run_config.preflight(experiment)
        outcome = simulate(args.num_clients, experiment, timeout_s=args.timeout)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
