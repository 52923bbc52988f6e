"""Starting and watching Flower processes safely: one place for the environment and the traps.

- Every Flower process gets a project-local FLWR_HOME, no telemetry, no update check, and no
  runtime dependency installation (which would reach for the network on every run).
- Flower starts helper processes by name, so the interpreter's bin folder goes first on PATH.
- `flwr run --stream` exits 0 even when the run failed: `run_status` asks `flwr ls`.
- Processes we start are stopped by their PID, never by name.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from edgecore.errors import EdgecoreError
from federation import credentials

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(Path(flwr_home).resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_DEDUP_LOGS="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """A named SuperLink connection in FLWR_HOME/config.toml (never in pyproject.toml): TLS when given a CA."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    # json.dumps quotes a path the way a TOML basic string needs it (backslashes, quotes).
    transport = (f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}" if root_certificates
                 else "insecure = true")
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{transport}\n'
    )


def wait_healthy(address: str, process: subprocess.Popen, timeout_s: float, log_file: Path,
                 root_certificates: Path | None = None) -> None:
    """Poll the SuperLink's /health until it answers; fail fast if the process died.

    Under TLS the SuperLink's one uvicorn port serves /health over HTTPS only (plain HTTP on it
    is reset), so the poll speaks HTTPS and trusts only the SuperLink's own CA.
    """
    scheme, context = ("https", credentials.tls_context(root_certificates)) if root_certificates else ("http", None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EdgecoreError(f"the SuperLink exited with code {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError as err:
            if isinstance(getattr(err, "reason", err), ssl.SSLCertVerificationError):
                raise EdgecoreError(f"the SuperLink at {address} presents a certificate {root_certificates} does not "
                                    f"accept ({getattr(err, 'reason', err)}); use the ca.crt written with its server.pem") from None
            time.sleep(0.3)
    raise EdgecoreError(f"the SuperLink at {address} did not become healthy within {timeout_s:.0f} s; see {log_file}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop the Flower processes we started.

    Those run in their own sessions; without this, `kill PID` (or a service manager stopping
    the wrapper) ends the wrapper at once and leaves them running, orphaned.
    """
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop(process: subprocess.Popen | None, grace_s: float = 10) -> None:
    """Stop a process we started and its process group, by PID.

    The group matters: a SuperLink's simulation runtime (and its Ray workers) can outlive the
    SuperLink itself, so whatever is left of the group after the grace period gets SIGKILL.
    """
    if process is None:
        return
    group = process.pid
    if process.poll() is None:
        try:
            os.killpg(group, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace_s
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        os.killpg(group, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def flwr(args: list[str], env: dict[str, str], timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


def submit_run(app_dir: Path, connection: str, env: dict[str, str], run_config: str = "", federation_config: str = "") -> int:
    """`flwr run` without streaming; returns the run id."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    done = flwr(args, env, cwd=app_dir)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success", False) or "run-id" not in reply:
        raise EdgecoreError(f"flwr run failed (exit {done.returncode}): {done.stdout.strip()[-1500:]} {done.stderr.strip()[-1500:]}")
    return int(reply["run-id"])


def run_status(run_id: int, connection: str, env: dict[str, str]) -> str:
    """The run's status as `flwr ls` reports it, e.g. 'running' or 'finished:completed'."""
    done = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env)
    try:
        runs = json.loads(done.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise EdgecoreError(f"flwr ls gave no JSON: {done.stdout[-500:]} {done.stderr[-500:]}") from None
    return runs[0]["status"] if runs else "unknown"


def await_completion(
    run_id: int, connection: str, env: dict[str, str], timeout_s: float,
    on_poll: Callable[[], None] | None = None, poll_s: float = 2.0, status_s: float = 10.0,
) -> str:
    """Block until the run finishes; raise with its log unless it completed.

    on_poll runs every poll_s; the status is asked every status_s, because each `flwr ls`
    starts a Python process that costs about a CPU-second, which a 2-core machine feels.
    """
    deadline = time.monotonic() + timeout_s
    status, asked = "unknown", -math.inf
    while time.monotonic() < deadline:
        if time.monotonic() - asked >= status_s:
            status, asked = run_status(run_id, connection, env), time.monotonic()
        if on_poll:
            on_poll()
        if status.startswith("finished"):
            break
        time.sleep(poll_s)
    else:
        raise EdgecoreError(f"run {run_id} did not finish within {timeout_s:.0f} s (status {status})")
    if status != "finished:completed":
        logs = flwr(["log", str(run_id), connection, "--show"], env).stdout
        raise EdgecoreError(f"run {run_id} ended as {status}; the end of its log:\n{logs[-4000:]}")
    return status


def register_devices(keys: list[credentials.DeviceKey], connection: str, env: dict[str, str], folder: Path) -> list[int]:
    """Register each device key with the SuperLink (`flwr supernode register`); returns the node ids.

    flwr reads a key from a file, so each key is written to its own .pub in folder first.
    `--format json` exits 0 even when the SuperLink refuses, so success is read from the JSON.
    """
    folder.mkdir(parents=True, exist_ok=True)
    node_ids = []
    for number, key in enumerate(keys):
        key_file = folder / f"device-{number}.pub"
        key_file.write_text(key.text + "\n")
        done = flwr(["supernode", "register", str(key_file), connection, "--format", "json"], env)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"error-message": f"{done.stdout.strip()[-500:]} {done.stderr.strip()[-500:]}"}
        if not reply.get("success"):
            message = reply.get("error-message", "").replace("\n", " ").strip()
            raise EdgecoreError(f"the server did not register the key {key.origin}: {message}")
        node_ids.append(int(reply["node-id"]))
    return node_ids
