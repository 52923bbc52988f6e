"""`python -m server`: host a federated run for real devices.

Starts a SuperLink on HOST:PORT (one HTTP port serves the devices, the control API and the
ServerApp), submits the app with the experiment's settings, prints each round as it lands in
the run folder, and stops the SuperLink (by PID) when the run ends. Devices join with
`python -m client --server THIS_HOST:PORT --data ...`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from federation import processes
from federation.addresses import parse_port
from server import run_config
from server.run_folder import RoundPrinter

PROJECT = Path(__file__).resolve().parent.parent


def start_superlink(host: str, port: int, flwr_home: Path) -> tuple[subprocess.Popen, Path]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    command = [
        str(processes.BIN / "flower-superlink"), "--insecure", "--host", host, "--port", str(port),
        "--control-api-address", f"127.0.0.1:{processes.free_port()}",
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("w") as log:
        process = subprocess.Popen(command, env=processes.flower_env(flwr_home), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    local = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
    processes.wait_healthy(local, process, timeout_s=60, log_file=log_file)
    return process, log_file


def serve(host: str, port: int, experiment: Experiment, flwr_home: Path, keep_alive: bool, timeout_s: float) -> dict:
    run_dir, run_name = Path(experiment.run_dir), experiment.run_name
    processes.exit_on_sigterm()
    process, log_file = start_superlink(host, port, flwr_home)
    print(f"SuperLink listening on {host}:{port} (log: {log_file}); waiting for {experiment.min_clients} clients", flush=True)
    env = processes.flower_env(flwr_home)
    try:
        processes.write_connection(flwr_home, "self", f"127.0.0.1:{port}")
        run_id = processes.submit_run(PROJECT, "self", env, run_config=run_config.as_flwr_overrides(experiment))
        print(f"run {run_id} started; run folder {run_dir / run_name}", flush=True)
        status = processes.await_completion(run_id, "self", env, timeout_s, on_poll=RoundPrinter(run_dir / run_name))
        if keep_alive:
            print("run finished; the SuperLink stays up (--keep-alive): stop it with Ctrl-C", flush=True)
            process.wait()
    finally:
        processes.stop(process)
    return {"run_id": run_id, "status": status, "run_folder": str(run_dir / run_name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", default="8080", help="the one port devices and tools connect to")
    parser.add_argument("--config", type=Path, default=None, help="experiment TOML (configs/experiments/*.toml); default: pyproject's [tool.flwr.app.config]")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-rounds=5 min-clients=3"')
    parser.add_argument("--flwr-home", type=Path, default=PROJECT / ".flwr" / "server", help="Flower's state and logs for this server")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="give up on the run after this many seconds")
    parser.add_argument("--keep-alive", action="store_true", help="keep the SuperLink running after the run")
    args = parser.parse_args(argv)
    try:
        port = parse_port(args.port, "--port")
        experiment = run_config.pin_run_folder(run_config.resolve(args.config, args.run_config), "server")
        run_config.preflight(experiment)
        outcome = serve(args.host, port, experiment, args.flwr_home, args.keep_alive, args.timeout)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
