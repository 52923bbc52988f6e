"""`python -m client --server HOST:PORT --data SPEC`: join a federated run from a real device.

Checks the address and the data first (so a typo fails in a second, not after a model
load), waits a bounded time for the server to answer, then runs a Flower SuperNode whose
ClientApp trains on this device's data. The data never leaves the device: only adapter
tensors and metrics are sent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from edgecore import data, profiles
from edgecore.device import check_compressed_base
from edgecore.errors import EdgecoreError
from edgecore.luc.saved import is_compressed_folder
from federation import processes, protocol
from federation.addresses import parse_address, parse_port, wait_reachable

PROJECT = Path(__file__).resolve().parent.parent


def node_config(args) -> str:
    """Flower's --node-config string: what this device trains on."""
    if not 0 <= args.partition_id < args.num_partitions:
        raise EdgecoreError(f"--partition-id {args.partition_id} must be in [0, {args.num_partitions - 1}]")
    spec = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    data.load(spec)  # fails now, with the file and line, if the data is bad
    if '"' in spec:
        raise EdgecoreError(f"--data {spec!r}: a path with a double quote cannot be passed to Flower; rename it")
    device = args.device_profile
    if device != profiles.LOCAL and Path(device).exists():
        device = str(Path(device).resolve())
    profile = profiles.resolve_profile(device)  # fails now, naming the field, if the profile is bad
    if '"' in device:
        raise EdgecoreError(f"--device-profile {device!r}: a path with a double quote cannot be passed to Flower; rename it")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise EdgecoreError(f"--lora-rank {args.lora_rank} must be at least 1")
    config = {protocol.NODE_DATA: spec, protocol.NODE_PARTITION_ID: args.partition_id,
              protocol.NODE_NUM_PARTITIONS: args.num_partitions, protocol.NODE_DEVICE_PROFILE: device}
    print(f"device profile: {profile.name}, {profile.memory_budget_mb:.0f} MB for the job", flush=True)
    if args.model is not None:
        config[protocol.NODE_MODEL] = brought_base(args.model, profile)
    if args.lora_rank:
        config[protocol.NODE_LORA_RANK] = args.lora_rank
    return " ".join(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}" for key, value in config.items())


def brought_base(folder: str, profile: profiles.DeviceProfile) -> str:
    """--model: a base compressed elsewhere for this device, checked against its profile now."""
    path = Path(folder).resolve()
    if not path.is_dir() or not is_compressed_folder(path):
        raise EdgecoreError(f"--model {folder}: not a compressed model folder; make one with "
                            f"`python -m edgecore compress --model MODEL --device {profile.name} --out FOLDER`")
    if '"' in str(path):
        raise EdgecoreError(f"--model {folder!r}: a path with a double quote cannot be passed to Flower; rename it")
    policy = check_compressed_base(path, profile)
    print(f"base: {path} ({policy.model} compressed to {policy.weight_bytes / 2**20:.0f} MB), checked against "
          f"{profile.name}", flush=True)
    return str(path)


def run_supernode(args) -> int:
    host, port = parse_address(args.server, "--server")
    runtime_port = parse_port(args.runtime_port, "--runtime-port")
    config = node_config(args)
    wait_reachable(host, port, tries=args.connect_tries)
    command = [
        str(processes.BIN / "flower-supernode"), "--superlink", f"{host}:{port}", "--port", str(runtime_port),
        "--node-config", config, "--max-retries", str(args.max_retries), "--max-wait-time", str(args.max_wait_time),
    ]
    command += ["--root-certificates", str(args.root_certificates)] if args.root_certificates else ["--insecure"]
    flwr_home = args.flwr_home or PROJECT / ".flwr" / f"client-{runtime_port}"
    print(f"joining {host}:{port} with {config} (local runtime port {runtime_port})", flush=True)
    processes.exit_on_sigterm()
    process = subprocess.Popen(command, env=processes.flower_env(flwr_home), start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        processes.stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the server's HOST:PORT, e.g. 192.168.1.20:8080")
    parser.add_argument("--data", required=True, help="bbc, shakespeare, shakespeare:role, or this device's JSONL file / folder")
    parser.add_argument("--partition-id", type=int, default=0, help="with a shared dataset: which partition this device holds")
    parser.add_argument("--num-partitions", type=int, default=1, help="with a shared dataset: how many partitions there are")
    parser.add_argument("--device-profile", default=profiles.LOCAL,
                        help="this device's profile: a shipped name (configs/devices/), a .toml file, or 'local' (detect)")
    parser.add_argument("--model", default=None,
                        help="a base compressed for this device elsewhere (python -m edgecore compress ... --device X "
                             "--out FOLDER); default: the server's model, compressed here if the budget needs it")
    parser.add_argument("--lora-rank", type=int, default=None, help="this device's LoRA rank (default: the server's lora-r)")
    parser.add_argument("--runtime-port", default="9094", help="local port for Flower's client runtime; give each client on one machine its own")
    parser.add_argument("--root-certificates", type=Path, default=None, help="CA certificate for a TLS server (default: insecure)")
    parser.add_argument("--connect-tries", type=int, default=10, help="tries (2 s apart) to reach the server before giving up")
    parser.add_argument("--max-retries", type=int, default=30, help="reconnection attempts once connected, before giving up")
    parser.add_argument("--max-wait-time", type=float, default=300, help="seconds to keep reconnecting before giving up")
    parser.add_argument("--flwr-home", type=Path, default=None, help="Flower's state for this client")
    args = parser.parse_args(argv)
    try:
        return run_supernode(args)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
