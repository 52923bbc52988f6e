"""Parsing and probing HOST:PORT addresses, with errors that say what to type instead."""

from __future__ import annotations

import socket
import time

from edgecore.errors import EdgecoreError


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


def wait_reachable(host: str, port: int, tries: int, wait_s: float = 2.0) -> None:
    """Open a TCP connection to host:port, retrying a bounded number of times."""
    last = None
    for attempt in range(max(tries, 1)):
        try:
            with socket.create_connection((host, port), timeout=3):
                return
        except OSError as err:
            last = err
            if attempt + 1 < tries:
                time.sleep(wait_s)
    raise EdgecoreError(
        f"cannot reach the server at {host}:{port} after {tries} tries ({last}); "
        "is `python -m server` running there, is the port open in its firewall, and is the address right?"
    )
