"""`python -m client --server HOST:PORT --data SPEC`: join a federated run from a real device.

Checks the address and the data first (so a typo fails in a second, not after a model
load), waits a bounded time for the server to answer, then runs a Flower SuperNode whose
ClientApp trains on this device's data. The data never leaves the device: only adapter
tensors and metrics are sent.

Over TLS with `--root-certificates ca.crt` (from the server operator), authenticated with
`--auth-key KEY` (made here by `python -m client keygen --out KEY`; the operator registers
KEY.pub). A server that refuses the device gets one line saying why and a non-zero exit.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from edgecore.errors import EdgecoreError
from federation import credentials, processes
from federation.addresses import parse_address, parse_port, wait_reachable

if TYPE_CHECKING:
    from edgecore.profiles import DeviceProfile

PROJECT = Path(__file__).resolve().parent.parent
LOCAL_PROFILE = "local"  # edgecore.profiles.LOCAL, spelled here so that `keygen` starts without torch
REFUSED = 3  # the exit status when the server refused this device (2: a bad argument or file)


def node_config(args) -> str:
    """Flower's --node-config string: what this device trains on."""
    # Lazy: these pull in torch (seconds on a board); `keygen` needs none of them.
    from edgecore import data, profiles
    from federation import protocol
    if not 0 <= args.partition_id < args.num_partitions:
        raise EdgecoreError(f"--partition-id {args.partition_id} must be in [0, {args.num_partitions - 1}]")
    spec = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    data.load(spec)  # fails now, with the file and line, if the data is bad
    if '"' in spec:
        raise EdgecoreError(f"--data {spec!r}: a path with a double quote cannot be passed to Flower; rename it")
    device = args.device_profile
    if device != LOCAL_PROFILE and Path(device).exists():
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


def brought_base(folder: str, profile: DeviceProfile) -> str:
    """--model: a base compressed elsewhere for this device, checked against its profile now."""
    from edgecore.device import check_compressed_base  # lazy, as in node_config
    from edgecore.luc.saved import is_compressed_folder
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
    security = security_args(args)
    config = node_config(args)
    wait_reachable(host, port, tries=args.connect_tries, root_certificates=args.root_certificates)
    command = [
        str(processes.BIN / "flower-supernode"), "--superlink", f"{host}:{port}", "--port", str(runtime_port),
        "--node-config", config, "--max-retries", str(args.max_retries), "--max-wait-time", str(args.max_wait_time),
        *security,
    ]
    flwr_home = args.flwr_home or PROJECT / ".flwr" / f"client-{runtime_port}"
    transport = ("TLS, authenticated" if args.auth_key else "TLS") if args.root_certificates else "plain HTTP"
    print(f"joining {host}:{port} over {transport} with {config} (local runtime port {runtime_port})", flush=True)
    processes.exit_on_sigterm()
    process = subprocess.Popen(command, env=processes.flower_env(flwr_home), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        code, tail = relay(process)
    except KeyboardInterrupt:
        return 130
    finally:
        processes.stop(process)
    reason = refusal(tail, args)
    if reason:
        print(f"error: the server refused this device: {reason}", file=sys.stderr)
        return REFUSED
    return code


def security_args(args) -> list[str]:
    """The SuperNode's TLS and authentication flags, from files checked now (before any connection)."""
    if args.auth_key and not args.root_certificates:
        raise EdgecoreError("--auth-key needs TLS (Flower authenticates devices only over TLS): pass --root-certificates "
                            "ca.crt from the server operator as well")
    if not args.root_certificates:
        return ["--insecure"]
    credentials.check_root_certificates(args.root_certificates)
    flags = ["--root-certificates", str(Path(args.root_certificates).resolve())]
    if args.auth_key:
        credentials.check_device_private_key(args.auth_key)
        flags += ["--auth-supernode-private-key", str(Path(args.auth_key).resolve())]
    return flags


def relay(process: subprocess.Popen) -> tuple[int, list[str]]:
    """Pass the SuperNode's output through and keep its end, where Flower says why it stopped.

    A thread reads, so that a ClientApp child still holding the pipe cannot keep us waiting
    once the SuperNode itself has exited.
    """
    tail: collections.deque[str] = collections.deque(maxlen=200)

    def pump() -> None:
        for line in process.stdout:
            sys.stdout.write(line)
            tail.append(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = process.wait()
    reader.join(timeout=5)
    return code, list(tail)


def refusal(lines: list[str], args) -> str | None:
    """What Flower's last words mean for this device, when the server refused it; None otherwise."""
    text = "".join(lines)
    if "Failed to initialize the connection to the SuperLink" not in text:
        return None  # it was admitted (whatever ended it later is not a refusal) or never got that far
    public = credentials.public_key_path(args.auth_key) if args.auth_key else None
    if "[code: 2004]" in text and public:  # ActivateNode: no node holds this key (or it is online elsewhere)
        return (f"its public key {public} is not registered (or another connected device uses the same key); "
                f"ask the operator to run `python -m server register {public.name}`")
    if "[code: 2001]" in text:  # the SuperLink authenticates devices and this one came without a key
        return ("it admits only registered devices and this one has no key: make one with `python -m client keygen "
                "--out KEY`, have the operator register KEY.pub, and pass --auth-key KEY")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"its TLS certificate is not trusted by --root-certificates {args.root_certificates}; ask the "
                "operator for this server's ca.crt")
    if "Connection reset by peer" in text and not args.root_certificates:
        return "it closed the plain-HTTP connection, so it probably requires TLS: pass --root-certificates ca.crt from the operator"
    return None


def keygen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m client keygen",
                                     description="Make this device's key pair for an authenticating server.")
    parser.add_argument("--out", type=Path, required=True, help="the private key's path; the public key goes to PATH.pub")
    parser.add_argument("--force", action="store_true", help="replace a key pair that already exists")
    args = parser.parse_args(argv)
    try:
        public = credentials.make_device_key(args.out, force=args.force)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    private = args.out.resolve()
    print(f"wrote {private} (private: it stays on this device, readable only by you) and {public.resolve()}.\n"
          f"send {public.name} to the server operator, who admits this device with "
          f"`python -m server register {public.name}` (or lists it in --device-keys).\n"
          f"then join with: python -m client --server HOST:PORT --root-certificates ca.crt --auth-key {private} --data ...")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "keygen":
        return keygen_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the server's HOST:PORT, e.g. 192.168.1.20:8080")
    parser.add_argument("--data", required=True, help="bbc, shakespeare, shakespeare:role, or this device's JSONL file / folder")
    parser.add_argument("--partition-id", type=int, default=0, help="with a shared dataset: which partition this device holds")
    parser.add_argument("--num-partitions", type=int, default=1, help="with a shared dataset: how many partitions there are")
    parser.add_argument("--device-profile", default=LOCAL_PROFILE,
                        help="this device's profile: a shipped name (configs/devices/), a .toml file, or 'local' (detect)")
    parser.add_argument("--model", default=None,
                        help="a base compressed for this device elsewhere (python -m edgecore compress ... --device X "
                             "--out FOLDER); default: the server's model, compressed here if the budget needs it")
    parser.add_argument("--lora-rank", type=int, default=None, help="this device's LoRA rank (default: the server's lora-r)")
    parser.add_argument("--runtime-port", default="9094", help="local port for Flower's client runtime; give each client on one machine its own")
    parser.add_argument("--root-certificates", type=Path, default=None,
                        help="the server's CA certificate (ca.crt from its operator): connect over TLS (default: plain HTTP)")
    parser.add_argument("--auth-key", type=Path, default=None,
                        help="this device's private key (python -m client keygen --out PATH), for a server with --device-keys")
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
