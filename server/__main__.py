"""`python -m server`: host a federated run for real devices.

Starts a SuperLink on HOST:PORT (one HTTP port serves the devices, the control API and the
ServerApp), submits the app with the experiment's settings, prints each round as it lands in
the run folder, and stops the SuperLink (by PID) when the run ends. Devices join with
`python -m client --server THIS_HOST:PORT --data ...`.

TLS is the default: `--certificates DIR` (from `python -m server certs`) or the three --ssl-*
files; plain HTTP only with an explicit `--insecure`. `--device-keys` admits only registered
devices. Helpers: `python -m server certs --host NAME --out DIR` makes the certificates,
`python -m server register KEY.pub` admits one more device to a running server.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgecore.errors import EdgecoreError
from federation import credentials, processes
from federation.addresses import parse_port

if TYPE_CHECKING:
    from edgecore.experiment import Experiment

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = PROJECT / ".flwr" / "server"
CONNECTION = "self"  # the server's own connection in its FLWR_HOME/config.toml


@dataclass(frozen=True)
class Security:
    """How the SuperLink is reached: TLS files (None: plain HTTP) and the devices it admits (None: any)."""

    tls: credentials.ServerFiles | None
    device_keys: list[credentials.DeviceKey] | None

    def superlink_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return self.tls.superlink_args() + (["--enable-supernode-auth"] if self.device_keys else [])

    @property
    def ca(self) -> Path | None:
        return self.tls.ca if self.tls else None


def start_superlink(host: str, port: int, flwr_home: Path, security: Security) -> tuple[subprocess.Popen, Path]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    command = [
        str(processes.BIN / "flower-superlink"), *security.superlink_args(), "--host", host, "--port", str(port),
        "--control-api-address", f"127.0.0.1:{processes.free_port()}",
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("w") as log:
        process = subprocess.Popen(command, env=processes.flower_env(flwr_home), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    processes.wait_healthy(f"127.0.0.1:{port}" if host in credentials.BIND_ALL else f"{host}:{port}", process,
                           timeout_s=60, log_file=log_file, root_certificates=security.ca)
    return process, log_file


def serve(host: str, port: int, experiment: Experiment, flwr_home: Path, keep_alive: bool, timeout_s: float,
          security: Security) -> dict:
    from server import run_config  # lazy: torch and the app's modules; `certs` and `register` need none of them
    from server.run_folder import RoundPrinter

    run_dir, run_name = Path(experiment.run_dir), experiment.run_name
    processes.exit_on_sigterm()
    process, log_file = start_superlink(host, port, flwr_home, security)
    transport = "TLS" if security.tls else "plain HTTP (--insecure)"
    print(f"SuperLink listening on {host}:{port} over {transport} (log: {log_file}); waiting for "
          f"{experiment.min_clients} clients", flush=True)
    env = processes.flower_env(flwr_home)
    try:
        # 127.0.0.1 is always in the certificate (federation.credentials), whatever host it listens on.
        processes.write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", root_certificates=security.ca)
        if security.device_keys:
            processes.register_devices(security.device_keys, CONNECTION, env, flwr_home / "device-keys")
            print(f"device authentication on: {len(security.device_keys)} registered device keys; add one later with "
                  f"`python -m server register KEY.pub --flwr-home {flwr_home}`", flush=True)
        elif security.tls:
            print("device authentication off: any device that trusts the CA may join (--device-keys admits only "
                  "registered ones)", flush=True)
        run_id = processes.submit_run(PROJECT, CONNECTION, env, run_config=run_config.as_flwr_overrides(experiment))
        print(f"run {run_id} started; run folder {run_dir / run_name}", flush=True)
        status = processes.await_completion(run_id, CONNECTION, env, timeout_s, on_poll=RoundPrinter(run_dir / run_name))
        if keep_alive:
            print("run finished; the SuperLink stays up (--keep-alive): stop it with Ctrl-C", flush=True)
            process.wait()
    finally:
        processes.stop(process)
    return {"run_id": run_id, "status": status, "run_folder": str(run_dir / run_name)}


def security_from(args) -> Security:
    """--certificates / --ssl-* / --insecure and --device-keys, checked before anything starts."""
    explicit = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if args.insecure:
        if args.certificates or any(explicit):
            raise EdgecoreError("--insecure contradicts --certificates/--ssl-*: pass the certificates for TLS, or only --insecure")
        if args.device_keys:
            raise EdgecoreError("--device-keys needs TLS (Flower authenticates devices only over TLS): drop --insecure "
                                f"and pass --certificates DIR, made with `{credentials.MAKE_CERTS}`")
        if not _is_loopback(args.host):
            print(f"warning: --insecure on {args.host}: traffic is unencrypted and any machine that reaches this port "
                  "can join as a device; use --certificates and --device-keys (README: Secure deployment)",
                  file=sys.stderr, flush=True)
        return Security(None, None)
    if args.certificates and any(explicit):
        raise EdgecoreError("pass either --certificates DIR or the three --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, not both")
    if args.certificates:
        tls = credentials.ServerFiles.in_folder(args.certificates)
    elif all(explicit):
        tls = credentials.ServerFiles(*explicit)
    elif any(explicit):
        missing = [flag for flag, path in zip(("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"), explicit) if not path]
        raise EdgecoreError(f"TLS needs all three files: {', '.join(missing)} missing (or pass --certificates DIR)")
    else:
        raise EdgecoreError("the server needs TLS certificates or an explicit --insecure: make them with "
                            "`python -m server certs --host THIS_HOST --out certs` and pass --certificates certs "
                            "(devices get certs/ca.crt), or pass --insecure for plain HTTP on a network you trust")
    credentials.check_server_files(tls, args.host)
    return Security(tls, credentials.read_device_keys(args.device_keys) if args.device_keys else None)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def certs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server certs",
                                     description="Make a CA and a server certificate it signs (TLS for python -m server).")
    parser.add_argument("--host", action="append", required=True,
                        help="a name or IP address devices use to reach this server (repeat for more); "
                             "localhost and 127.0.0.1 are always added")
    parser.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    parser.add_argument("--port", default="8080", help="the server port, for the commands printed")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    try:
        port = parse_port(args.port, "--port")
        out = args.out.resolve()
        files = credentials.make_certificates(out, args.host, force=args.force)
    except EdgecoreError as err:
        return _fail(err)
    print(f"wrote {files.ca}, {out / credentials.CA_KEY}, {files.cert}, {files.key}\n"
          f"keep ca.key and server.key on this machine (only its owner can read them).\n"
          f"give every device {files.ca} (the CA it trusts).\n"
          f"start the server with:\n  python -m server --host 0.0.0.0 --port {port} --certificates {out} "
          f"[--device-keys KEYS]\n"
          f"devices join with:\n  python -m client --server {args.host[0]}:{port} --root-certificates ca.crt "
          "--auth-key KEY --data ...")
    return 0


def register_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server register",
                                     description="Admit a device to a running python -m server (with --device-keys).")
    parser.add_argument("key", type=Path, help="the device's public key (KEY.pub from python -m client keygen), "
                                               "or a file/folder of them as for --device-keys")
    parser.add_argument("--flwr-home", type=Path, default=DEFAULT_HOME, help="the running server's --flwr-home")
    args = parser.parse_args(argv)
    try:
        keys = credentials.read_device_keys(args.key)
        _require_secure_connection(args.flwr_home)
        node_ids = processes.register_devices(keys, CONNECTION, processes.flower_env(args.flwr_home),
                                              args.flwr_home / "device-keys" / "added")
    except EdgecoreError as err:
        return _fail(err)
    for key, node_id in zip(keys, node_ids):
        print(f"registered {key.origin} as node {node_id}")
    return 0


def _require_secure_connection(flwr_home: Path) -> None:
    config = flwr_home / "config.toml"
    if not config.is_file():
        raise EdgecoreError(f"no running server's connection in {config}; start `python -m server --certificates DIR "
                            "--device-keys KEYS` first, or pass its --flwr-home")
    if "root-certificates" not in config.read_text():
        raise EdgecoreError(f"the server of {config} runs without TLS (--insecure), so it admits any device; restart "
                            "it with --certificates DIR --device-keys KEYS to authenticate devices")


def _fail(err: EdgecoreError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


HELPERS = {"certs": certs_main, "register": register_main}  # `python -m server WORD ...`


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in HELPERS:
        return HELPERS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", default="8080", help="the one port devices and tools connect to")
    parser.add_argument("--config", type=Path, default=None, help="experiment TOML (configs/experiments/*.toml); default: pyproject's [tool.flwr.app.config]")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-rounds=5 min-clients=3"')
    parser.add_argument("--flwr-home", type=Path, default=DEFAULT_HOME, help="Flower's state and logs for this server")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="give up on the run after this many seconds")
    parser.add_argument("--keep-alive", action="store_true", help="keep the SuperLink running after the run")
    tls = parser.add_argument_group("security (TLS unless --insecure)")
    tls.add_argument("--certificates", type=Path, default=None,
                     help="folder with ca.crt, server.pem, server.key (python -m server certs --host NAME --out DIR)")
    tls.add_argument("--ssl-ca-certfile", type=Path, default=None, help="instead of --certificates: the CA certificate")
    tls.add_argument("--ssl-certfile", type=Path, default=None, help="instead of --certificates: the server certificate")
    tls.add_argument("--ssl-keyfile", type=Path, default=None, help="instead of --certificates: the server's private key")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP, unencrypted, any device may join")
    tls.add_argument("--device-keys", type=Path, default=None,
                     help="admit only these devices: a file of OpenSSH public keys (one a line) or a folder of *.pub")
    args = parser.parse_args(argv)
    from server import run_config  # lazy, as in serve

    try:
        port = parse_port(args.port, "--port")
        experiment = run_config.pin_run_folder(run_config.resolve(args.config, args.run_config), "server")
        run_config.preflight(experiment)
        security = security_from(args)
        outcome = serve(args.host, port, experiment, args.flwr_home, args.keep_alive, args.timeout, security)
    except EdgecoreError as err:
        return _fail(err)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
