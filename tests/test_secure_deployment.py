"""A secure deployment on loopback through the commands a user types: certificates, device keys, TLS, authentication.

`python -m server certs`, `python -m client keygen`, `python -m server --certificates
--device-keys`, two registered `python -m client --root-certificates --auth-key` that train two
rounds of tiny-5m, a device whose key nobody registered (refused in one line), and `python -m
server register` admitting it. Then the refusals that need no server: every bad flag or file is
named before anything starts.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import needs_bbc
from edgecore import profiles
from federation import credentials, processes
from federation.processes import free_port
from test_deployment import CONFIG, ROOT, _start
from test_federation import _overrides, _stop

import client.__main__ as client_cli
import server.__main__ as server_cli

REFUSED = 3  # python -m client's exit status for a device the server refused
# What this test is about is the transport, so the rounds are the cheapest that still train:
# dense LoRA on every device (no compression, no votes), one short step.
FAST = {"min-clients": 2, "pipeline": "plain", "local-steps": 1, "eval-samples": 8}


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class _Lines:
    """A process's output as it comes, so a test can wait for one line and still read them all."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None and time.monotonic() < deadline, f"no {text!r} in:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def text(self) -> str:
        if self.process.poll() is not None:
            self.reader.join(10)
        return "".join(self.lines)


def _keygen(path: Path) -> Path:
    done = _cli("-m", "client", "keygen", "--out", path)
    assert done.returncode == 0 and f"send {path.name}.pub to the server operator" in done.stdout, done.stderr
    return credentials.public_key_path(path)


@needs_bbc
@pytest.mark.slow
def test_registered_devices_train_over_tls_and_an_unregistered_one_is_refused_until_registered(tmp_path):
    made = _cli("-m", "server", "certs", "--host", "127.0.0.1", "--out", tmp_path / "certs")
    assert made.returncode == 0, made.stderr
    assert f"give every device {tmp_path / 'certs' / 'ca.crt'}" in made.stdout and "--certificates" in made.stdout
    ca = tmp_path / "certs" / "ca.crt"
    devices = [tmp_path / f"node{i}" / "key" for i in range(2)]
    listing = tmp_path / "devices.txt"  # what the operator keeps: one public key a line
    listing.write_text("# the lab's devices\n" + "".join(_keygen(key).read_text() for key in devices))
    stranger = tmp_path / "stranger" / "key"
    _keygen(stranger)

    port, link = free_port(), tmp_path / "link"
    server = _start(None, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--flwr-home", str(link),
                    "--certificates", str(tmp_path / "certs"), "--device-keys", str(listing),
                    "-c", _overrides({**CONFIG, **FAST, "run-dir": str(tmp_path / "runs")}))
    server_out = _Lines(server)
    clients = []
    try:
        # Devices join once the server has registered their keys (a device that is quicker is refused).
        server_out.wait_for("2 registered device keys", timeout_s=120)

        def join(key: Path, partition: int) -> subprocess.Popen:
            return _start(None, "-m", "client", "--server", f"127.0.0.1:{port}", "--data", "bbc",
                          "--partition-id", str(partition), "--num-partitions", "2", "--root-certificates", str(ca),
                          "--auth-key", str(key), "--runtime-port", str(free_port()),
                          "--flwr-home", str(key.parent / "flwr"))

        clients = [join(stranger, 0)] + [join(key, i) for i, key in enumerate(devices)]
        refused, _ = clients[0].communicate(timeout=120)
        assert clients[0].returncode == REFUSED, refused[-3000:]
        assert refused.strip().splitlines()[-1] == (
            f"error: the server refused this device: its public key {stranger}.pub is not registered (or another "
            "connected device uses the same key); ask the operator to run `python -m server register key.pub`")
        # The operator admits it; the run itself goes on with the two devices it waits for.
        admitted = _cli("-m", "server", "register", f"{stranger}.pub", "--flwr-home", link)
        assert admitted.returncode == 0 and "registered" in admitted.stdout, admitted.stderr
        nodes = processes.flwr(["supernode", "ls", "self", "--format", "json"], processes.flower_env(link))
        assert len(json.loads(nodes.stdout)["nodes"]) == 3

        server.wait(timeout=600)
    finally:
        for process in [server, *clients]:
            _stop(process)
    out = server_out.text()
    assert server.returncode == 0, out[-3000:] + "\n".join(c.stdout.read()[-1500:] for c in clients[1:])
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["status"] == "finished:completed"
    rounds = [json.loads(line) for line in (Path(outcome["run_folder"]) / "rounds.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in rounds[1:]] == [2, 2]
    assert "over TLS" in out
    for client in clients[1:]:
        assert "over TLS, authenticated" in client.stdout.read()


# ---------------------------------------------------------------- refused before anything starts


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return credentials.make_certificates(tmp_path_factory.mktemp("certs"), ["box.local"])


@pytest.mark.parametrize("flags, message", [
    ([], "needs TLS certificates or an explicit --insecure: make them with `python -m server certs"),
    (["--insecure", "--device-keys", "keys.txt"], "--device-keys needs TLS"),
    (["--insecure", "--certificates", "certs"], "--insecure contradicts --certificates"),
    (["--ssl-certfile", "server.pem"], "--ssl-ca-certfile, --ssl-keyfile missing"),
    (["--certificates", "nowhere"], "--certificates nowhere: no such folder"),
])
def test_the_server_refuses_an_unclear_transport_before_starting(capsys, flags, message):
    assert server_cli.main(["--port", str(free_port()), *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_server_checks_its_files_against_its_address(capsys, certs):
    assert server_cli.main(["--host", "10.0.0.7", "--certificates", str(certs.ca.parent)]) == 2
    assert f"{certs.cert} is not valid for 10.0.0.7" in capsys.readouterr().err


def test_plain_http_beyond_loopback_is_warned_about(capsys):
    def security(host):
        args = argparse.Namespace(host=host, insecure=True, certificates=None, ssl_ca_certfile=None,
                                  ssl_certfile=None, ssl_keyfile=None, device_keys=None)
        return server_cli.security_from(args)

    assert security("127.0.0.1").tls is None and capsys.readouterr().err == ""
    assert security("0.0.0.0").superlink_args() == ["--insecure"]
    assert "warning: --insecure on 0.0.0.0: traffic is unencrypted" in capsys.readouterr().err


def test_the_server_passes_tls_and_authentication_to_flower(certs, tmp_path):
    listing = tmp_path / "devices.txt"
    listing.write_text(credentials.make_device_key(tmp_path / "n0").read_text())
    args = argparse.Namespace(host="box.local", insecure=False, certificates=certs.ca.parent, ssl_ca_certfile=None,
                              ssl_certfile=None, ssl_keyfile=None, device_keys=listing)
    flags = server_cli.security_from(args).superlink_args()
    assert flags == ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
                     "--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]


def test_register_needs_a_running_secure_server(capsys, tmp_path):
    key = credentials.make_device_key(tmp_path / "n0")
    assert server_cli.main(["register", str(key), "--flwr-home", str(tmp_path / "home")]) == 2
    assert "no running server's connection" in capsys.readouterr().err
    processes.write_connection(tmp_path / "home", "self", "127.0.0.1:8080")
    assert server_cli.main(["register", str(key), "--flwr-home", str(tmp_path / "home")]) == 2
    assert "runs without TLS (--insecure)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--auth-key", "key"], "--auth-key needs TLS"),
    (["--root-certificates", "missing.crt"], "--root-certificates missing.crt: no such file; copy ca.crt"),
])
def test_the_client_refuses_bad_security_flags_before_connecting(capsys, flags, message):
    assert client_cli.main(["--server", "127.0.0.1:1", "--data", "bbc", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_client_checks_its_certificate_and_key_before_connecting(capsys, certs):
    base = ["--server", "127.0.0.1:1", "--data", "bbc"]
    assert client_cli.main([*base, "--root-certificates", str(certs.cert)]) == 2
    assert "is not a CA certificate" in capsys.readouterr().err
    assert client_cli.main([*base, "--root-certificates", str(certs.ca), "--auth-key", str(certs.key)]) == 2
    assert f"--auth-key {certs.key} is not an OpenSSH private key" in capsys.readouterr().err


def test_the_client_spells_the_local_profile_as_edgecore_does():
    assert client_cli.LOCAL_PROFILE == profiles.LOCAL  # kept apart so that `keygen` starts without torch


# Flower 1.41's last words, as the SuperNode printed them on this machine for each refusal.
FLOWER_SAYS = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n{}\n" \
              "The SuperNode could not establish a connection to the SuperLink.\n"


@pytest.mark.parametrize("said, tls, key, meaning", [
    ("[code: 2004] Failed to activate SuperNode.", True, True, "its public key dev.pub is not registered"),
    ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.", True, False,
     "admits only registered devices and this one has no key"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate", True, True,
     "not trusted by --root-certificates ca.crt"),
    ("[Errno 104] Connection reset by peer", False, False, "probably requires TLS"),
])
def test_each_refusal_flower_reports_becomes_one_line(said, tls, key, meaning):
    args = argparse.Namespace(root_certificates=Path("ca.crt") if tls else None, auth_key=Path("dev") if key else None)
    assert meaning in client_cli.refusal(FLOWER_SAYS.format(said).splitlines(keepends=True), args)
    # A device that was admitted is not refused by what happens later, e.g. a reset when the server stops.
    assert client_cli.refusal(["Connection reset by peer\n"], args) is None
