"""federation.credentials: certificates and device keys that Flower accepts, and errors that name the file and the fix."""

import contextlib
import os
import shutil
import socket
import subprocess
import ssl
import threading
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flwr.cli.supernode.register import try_load_public_key

from edgecore.errors import EdgecoreError
from federation import credentials
from federation.addresses import wait_reachable
from federation.processes import write_connection


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return credentials.make_certificates(tmp_path_factory.mktemp("certs"), ["box.local", "192.168.1.20"])


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second, unrelated set: its CA and key belong to nobody above."""
    return credentials.make_certificates(tmp_path_factory.mktemp("other"), ["box.local"])


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(EdgecoreError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- certificates


def test_certificates_name_the_hosts_and_the_local_addresses_and_keep_keys_private(certs):
    folder = certs.ca.parent
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    assert _mode(folder / "ca.key") == _mode(certs.key) == 0o600
    assert _mode(certs.ca) == _mode(certs.cert) == 0o644
    names = credentials.certificate_names(x509.load_pem_x509_certificate(certs.cert.read_bytes()))
    assert names == {"box.local", "192.168.1.20", "localhost", "127.0.0.1", "::1"}
    for host in ("0.0.0.0", "192.168.1.20", "box.local", "127.0.0.1"):
        credentials.check_server_files(certs, host)
    credentials.check_root_certificates(certs.ca)


@contextlib.contextmanager
def _tls_server(files: credentials.ServerFiles, host: str = "127.0.0.1"):
    """A real TLS listener with the server's certificate, answering handshakes until closed; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    listener = socket.create_server((host, 0))

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_a_real_tls_handshake_trusts_the_ca_and_checks_the_name(certs, other):
    with _tls_server(certs) as port:
        wait_reachable("127.0.0.1", port, tries=1, root_certificates=certs.ca)
        wait_reachable("localhost", port, tries=1, root_certificates=certs.ca)
        message = _error(wait_reachable, "127.0.0.1", port, tries=1, root_certificates=other.ca)
        assert "does not trust" in message and str(other.ca) in message and "ca.crt" in message
    with _tls_server(certs, "127.0.0.2") as port:  # loopback too, but not in the certificate
        message = _error(wait_reachable, "127.0.0.2", port, tries=1, root_certificates=certs.ca)
        assert "not valid for '127.0.0.2'" in message and "python -m server certs --host 127.0.0.2" in message


def test_a_device_without_tls_against_a_tls_server_is_told(certs):
    with _tls_server(certs) as port:
        message = _error(wait_reachable, "127.0.0.1", port, tries=1)
    assert f"the server at 127.0.0.1:{port} speaks TLS; pass --root-certificates ca.crt" in message


def test_a_device_using_tls_against_a_plain_server_is_told(certs):
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: listener.accept()[0].sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), daemon=True).start()
    try:
        message = _error(wait_reachable, "127.0.0.1", listener.getsockname()[1], tries=1, root_certificates=certs.ca)
    finally:
        listener.close()
    assert "no TLS handshake" in message and "--insecure" in message


def test_no_file_is_overwritten_unless_forced_and_a_refusal_writes_nothing(tmp_path):
    (tmp_path / "server.key").write_text("mine")
    message = _error(credentials.make_certificates, tmp_path, ["box.local"])
    assert str(tmp_path / "server.key") in message and "--force" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]  # not even the CA was written
    files = credentials.make_certificates(tmp_path, ["box.local"], force=True)
    credentials.check_server_files(files, "box.local")
    assert _mode(files.key) == 0o600


@pytest.mark.parametrize("host, message", [
    ("0.0.0.0", "is a listen address"),
    ("::", "is a listen address"),
    ("bad_name!", "neither an IP address nor a DNS name"),
])
def test_certificates_refuse_hosts_devices_cannot_dial(tmp_path, host, message):
    assert message in _error(credentials.make_certificates, tmp_path, [host])


def test_a_missing_or_misplaced_certificate_folder_says_how_to_make_one(tmp_path):
    message = _error(credentials.ServerFiles.in_folder, tmp_path / "nowhere")
    assert "nowhere" in message and "python -m server certs" in message
    message = _error(credentials.check_server_files, credentials.ServerFiles.in_folder(tmp_path), "0.0.0.0")
    assert str(tmp_path / "ca.crt") in message and "no such file" in message and "python -m server certs" in message


def test_a_file_that_is_not_pem_is_named(tmp_path, certs):
    bad = tmp_path / "server.pem"
    bad.write_text("hello")
    message = _error(credentials.check_server_files, credentials.ServerFiles(certs.ca, bad, certs.key), "0.0.0.0")
    assert message.startswith(f"--ssl-certfile {bad} is not a PEM certificate")
    message = _error(credentials.check_server_files, credentials.ServerFiles(certs.ca, certs.cert, bad), "0.0.0.0")
    assert message.startswith(f"--ssl-keyfile {bad} is not a PEM private key")


def test_a_key_of_another_certificate_is_refused(certs, other):
    message = _error(credentials.check_server_files, credentials.ServerFiles(certs.ca, certs.cert, other.key), "0.0.0.0")
    assert f"--ssl-keyfile {other.key} does not match --ssl-certfile {certs.cert}" in message


def test_a_certificate_signed_by_another_ca_is_refused(certs, other):
    message = _error(credentials.check_server_files, credentials.ServerFiles(other.ca, certs.cert, certs.key), "0.0.0.0")
    assert f"{certs.cert} was not signed by --ssl-ca-certfile {other.ca}" in message


def test_a_certificate_for_another_address_is_refused_with_the_command_to_fix_it(certs):
    message = _error(credentials.check_server_files, certs, "10.0.0.7")
    assert f"{certs.cert} is not valid for 10.0.0.7" in message and "box.local" in message
    assert "python -m server certs --host 10.0.0.7" in message


def test_an_expired_certificate_is_refused(tmp_path):
    files = credentials.make_certificates(tmp_path, ["box.local"], days=0)  # expires 5 minutes after it starts: now
    assert "expired on" in _error(credentials.check_server_files, files, "box.local")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_named(tmp_path, certs):
    key = tmp_path / "server.key"
    key.write_bytes(certs.key.read_bytes())
    key.chmod(0)
    message = _error(credentials.check_server_files, credentials.ServerFiles(certs.ca, certs.cert, key), "0.0.0.0")
    assert str(key) in message and "permission denied" in message


def test_a_device_given_the_server_certificate_instead_of_the_ca_is_told(certs):
    message = _error(credentials.check_root_certificates, certs.cert)
    assert f"--root-certificates {certs.cert} is not a CA certificate" in message and "ca.crt" in message


# ---------------------------------------------------------------- device keys


def test_a_device_key_pair_is_what_flower_reads(tmp_path):
    public = credentials.make_device_key(tmp_path / "node0")
    assert public == tmp_path / "node0.pub"
    assert _mode(tmp_path / "node0") == 0o600 and _mode(public) == 0o644
    # The SuperNode reads the private key this way, `flwr supernode register` the public one.
    private = serialization.load_ssh_private_key((tmp_path / "node0").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(public)
    assert public.read_text().startswith(credentials.check_device_private_key(tmp_path / "node0"))
    assert str(tmp_path / "node0") in _error(credentials.make_device_key, tmp_path / "node0")


def test_device_keys_come_from_a_list_with_comments_or_a_folder(tmp_path):
    keys = [credentials.make_device_key(tmp_path / "keys" / f"n{i}").read_text().strip() for i in range(2)]
    listing = tmp_path / "devices.txt"
    listing.write_text(f"# the lab's boards\n\n{keys[0]}\n   # spare\n{keys[1]}\n")
    read = credentials.read_device_keys(listing)
    assert [k.origin for k in read] == [f"{listing}:3", f"{listing}:5"]
    assert [k.text for k in read] == [" ".join(k.split()[:2]) for k in keys]
    assert [k.text for k in credentials.read_device_keys(tmp_path / "keys")] == [k.text for k in read]


def _rsa_public_line() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize("content, message", [
    ("# nobody yet\n", "no keys in it"),
    ("ecdsa-sha2-nistp384 AAAAnotbase64 x\n", ":1: not an OpenSSH public key"),
    ("RSA\n", ":1: not an OpenSSH public key"),
])
def test_a_bad_device_key_list_names_the_line(tmp_path, content, message):
    listing = tmp_path / "devices.txt"
    listing.write_text(content)
    assert message in _error(credentials.read_device_keys, listing)


def test_a_non_ec_or_repeated_device_key_is_refused(tmp_path):
    listing = tmp_path / "devices.txt"
    listing.write_text(_rsa_public_line() + "\n")
    message = _error(credentials.read_device_keys, listing)
    assert f"{listing}:1 is a RSA key" in message and "python -m client keygen" in message
    key = credentials.make_device_key(tmp_path / "n0").read_text()
    listing.write_text(key + key)
    assert f"{listing}:2 repeats the key of {listing}:1" in _error(credentials.read_device_keys, listing)


def test_missing_or_empty_key_sources_say_what_to_do(tmp_path):
    assert "no such file" in _error(credentials.read_device_keys, tmp_path / "devices.txt")
    assert "holds no *.pub files" in _error(credentials.read_device_keys, tmp_path)


def test_a_bad_device_private_key_is_named_before_connecting(tmp_path):
    public = credentials.make_device_key(tmp_path / "n0")
    assert f"--auth-key {public} is a public key" in _error(credentials.check_device_private_key, public)
    garbage = tmp_path / "garbage"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n")
    assert "is not an OpenSSH private key; make one with `python -m client keygen" in _error(
        credentials.check_device_private_key, garbage)
    assert "no such file" in _error(credentials.check_device_private_key, tmp_path / "absent")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen makes the passphrase key (cryptography needs bcrypt)")
def test_a_device_key_with_a_passphrase_is_refused(tmp_path):
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(locked)], check=True)
    assert f"--auth-key {locked} has a passphrase" in _error(credentials.check_device_private_key, locked)
    credentials.read_device_keys(tmp_path / "locked.pub")  # ssh-keygen's public key is read as ours


# ---------------------------------------------------------------- the flwr connection


def test_the_flwr_connection_trusts_the_ca_under_tls_and_is_insecure_only_without_it(tmp_path, certs):
    write_connection(tmp_path, "self", "127.0.0.1:8080", root_certificates=certs.ca)
    connection = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["self"]
    assert connection == {"address": "127.0.0.1:8080", "root-certificates": str(certs.ca.resolve())}
    write_connection(tmp_path, "self", "127.0.0.1:8080")
    assert tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["self"]["insecure"] is True
