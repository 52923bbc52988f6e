"""Parsing and probing HOST:PORT addresses, with errors that say what to type instead."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from edgecore.errors import EdgecoreError
from federation import credentials


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """'host:port', '1.2.3.4:8080' or '[::1]:8080' -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text:
        raise EdgecoreError(f"{flag} {text!r} is not HOST:PORT (for example 192.168.1.20:8080 or localhost:8080)")
    return host, parse_port(port_text, flag)


def parse_port(text: str | int, flag: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise EdgecoreError(f"{flag}: port {text!r} is not a number; use 1-65535 (e.g. 8080)") from None
    if not 0 < port < 65536:
        raise EdgecoreError(f"{flag}: port {port} is out of range; use 1-65535 (e.g. 8080)")
    return port


def wait_reachable(host: str, port: int, tries: int, wait_s: float = 2.0, root_certificates: Path | None = None) -> None:
    """Open a TCP connection to host:port, retrying a bounded number of times.

    With root_certificates, also complete a TLS handshake that checks the server's certificate
    against that CA and host, so a wrong CA, a certificate for another name or a server without
    TLS fails here in a second with the fix, not after the SuperNode's retries.
    """
    last = None
    for attempt in range(max(tries, 1)):
        try:
            with socket.create_connection((host, port), timeout=3) as sock:
                if root_certificates:
                    _handshake(sock, host, port, root_certificates)
                elif _speaks_tls(sock, host):
                    raise EdgecoreError(f"the server at {host}:{port} speaks TLS; pass --root-certificates ca.crt "
                                        "(from the server operator) to connect over TLS")
                return
        except ssl.SSLError as err:
            raise _tls_refusal(host, port, root_certificates, err) from None
        except OSError as err:
            last = err
            if attempt + 1 < tries:
                time.sleep(wait_s)
    raise EdgecoreError(
        f"cannot reach the server at {host}:{port} after {tries} tries ({last}); "
        "is `python -m server` running there, is the port open in its firewall, and is the address right?"
    )


def _handshake(sock: socket.socket, host: str, port: int, root_certificates: Path) -> None:
    with credentials.tls_context(root_certificates).wrap_socket(sock, server_hostname=host):
        pass


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether a TLS handshake (trusting anything: only the protocol is asked) succeeds.

    Without this a plain-HTTP device at a TLS server sees only connection resets, which the
    SuperNode retries for --max-wait-time before it gives up with no hint.
    """
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        with probe.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def _tls_refusal(host: str, port: int, ca: Path, err: ssl.SSLError) -> EdgecoreError:
    if isinstance(err, ssl.SSLCertVerificationError) and "match" in str(err.verify_message or err).lower():
        return EdgecoreError(f"the server's certificate is not valid for {host!r} ({err.verify_message}); connect with "
                             "a name or address its certificate holds, or ask the operator to make it with "
                             f"`python -m server certs --host {host} ...`")
    if isinstance(err, ssl.SSLCertVerificationError):
        return EdgecoreError(f"the server at {host}:{port} presents a certificate that --root-certificates {ca} does "
                             f"not trust ({err.verify_message}); ask the operator for this server's ca.crt")
    return EdgecoreError(f"no TLS handshake with {host}:{port} ({err.reason or err}); the server may run without TLS "
                         "(--insecure): then drop --root-certificates and --auth-key, or ask the operator to use --certificates")
