"""TLS certificates and device keys for a secure deployment: made, read, and checked before anything starts.

- The server certificate always names localhost and 127.0.0.1 (and ::1): the SuperLink's own
  ServerApp process dials the SuperLink over TLS, at 127.0.0.1 when it listens on every interface.
- Device keys are EC (P-384) in OpenSSH format, what `flower-supernode --auth-supernode-private-key`
  and `flwr supernode register` read.
- Private keys are written 0600; an existing file is never overwritten unless asked (force).
- Every check raises an EdgecoreError naming the file and the fix, so a bad file fails in a
  second, before a SuperLink or a SuperNode starts and fails with a stack trace.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgecore.errors import EdgecoreError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
BIND_ALL = ("0.0.0.0", "::", "")
VALID_DAYS = 825  # the longest server-certificate life that browsers and TLS stacks still accept
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower's SuperNode auth accepts
MAKE_CERTS = "python -m server certs --host NAME_OR_IP --out DIR"
MAKE_KEY = "python -m client keygen --out PATH"
FIX_CERTS, FIX_KEY = f"make it with `{MAKE_CERTS}`", f"make it with `{MAKE_KEY}`"
FIX_CA = "copy ca.crt from the server operator (`python -m server certs` writes it)"


@dataclass(frozen=True)
class ServerFiles:
    """The three files a TLS SuperLink needs, each with the flag that names it."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "ServerFiles":
        """The files `python -m server certs` writes into one folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise EdgecoreError(f"--certificates {folder}: no such folder; make it with `{MAKE_CERTS}`")
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)

    def flags(self) -> list[tuple[str, Path]]:
        return [("--ssl-ca-certfile", self.ca), ("--ssl-certfile", self.cert), ("--ssl-keyfile", self.key)]

    def superlink_args(self) -> list[str]:
        return [part for flag, path in self.flags() for part in (flag, str(Path(path).resolve()))]


@dataclass(frozen=True)
class DeviceKey:
    """One device's OpenSSH public key and where it was read (file, or file:line)."""

    origin: str
    text: str


# ---------------------------------------------------------------- making


def make_certificates(out: Path, hosts: list[str], force: bool = False, days: int = VALID_DAYS) -> ServerFiles:
    """A CA and a server certificate it signs, valid for hosts plus the local names; returns the files."""
    out = Path(out)
    names = _subject_names(hosts)
    files = ServerFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)
    _refuse_existing([files.ca, out / CA_KEY, files.cert, files.key], force)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("edgecore federation CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        _builder(_name(names[0]), ca_name, server_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.ca, ca.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    _write(out / CA_KEY, _pem_private(ca_key), private=True, force=force)
    _write(files.cert, server.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    _write(files.key, _pem_private(server_key), private=True, force=force)
    return files


def make_device_key(path: Path, force: bool = False) -> Path:
    """An EC P-384 key pair: PATH (OpenSSH private, 0600) and PATH.pub; returns the .pub."""
    path = Path(path)
    public = public_key_path(path)
    _refuse_existing([path, public], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path, private_bytes, private=True, force=force)
    _write(public, public_bytes + f" {path.name}\n".encode(), private=False, force=force)
    return public


def public_key_path(private: Path) -> Path:
    return Path(f"{private}.pub")


def _subject_names(hosts: list[str]) -> list[str]:
    """The names the certificate holds, the user's first (its common name), then the local ones."""
    names = []
    for host in hosts:
        host = host.strip().strip("[]")
        if host in BIND_ALL:
            raise EdgecoreError(f"--host {host!r} is a listen address, not a name devices dial; give the address "
                                "devices use to reach the server (e.g. --host 192.168.1.20 or --host myserver.local)")
        _general_name(host)  # fails now, naming the host, if it is neither an IP address nor a DNS name
        names.append(host.lower())
    return list(dict.fromkeys([*names, *LOCAL_NAMES]))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not all(label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels):
        raise EdgecoreError(f"--host {host!r} is neither an IP address nor a DNS name (letters, digits, '-' and '.')")
    return x509.DNSName(host)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a device clock a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every target before writing any, so a refusal never leaves half a set behind."""
    for path in paths:
        if path.exists() and not force:
            raise EdgecoreError(f"{path} already exists; not overwriting it. Move it away, choose another --out, "
                                "or pass --force to replace it")


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    # O_EXCL closes the race between the existence check and the write; the mode is set at creation,
    # so a private key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL), mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # a replaced file (--force) keeps its old mode otherwise


# ---------------------------------------------------------------- reading and checking


def read_device_keys(source: Path) -> list[DeviceKey]:
    """Device public keys: a file with one OpenSSH key a line (# comments, blank lines), or a folder of *.pub."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.pub"))
        if not files:
            raise EdgecoreError(f"--device-keys {source}: the folder holds no *.pub files; put each device's "
                                f"public key there (made on the device with `{MAKE_KEY}`)")
    else:
        files = [source]
    keys, seen = [], {}
    for path in files:
        for number, line in enumerate(_read(path, "--device-keys", FIX_KEY).decode(errors="replace").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key = DeviceKey(f"{path}:{number}", _parse_public_key(line, f"{path}:{number}"))
            if key.text in seen:
                raise EdgecoreError(f"--device-keys {key.origin} repeats the key of {seen[key.text]}; remove one")
            seen[key.text] = key.origin
            keys.append(key)
    if not keys:
        raise EdgecoreError(f"--device-keys {source}: no keys in it; add one OpenSSH public key a line "
                            f"(each device makes its own with `{MAKE_KEY}`)")
    return keys


def check_device_private_key(path: Path, flag: str = "--auth-key") -> str:
    """A device's private key, checked as the SuperNode will read it; returns its OpenSSH public key."""
    data = _read(path, flag, FIX_KEY)
    if data.lstrip().startswith((b"ecdsa-", b"ssh-")):
        raise EdgecoreError(f"{flag} {path} is a public key; pass the private key (the file without .pub)")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except TypeError:
        raise EdgecoreError(f"{flag} {path} has a passphrase; Flower needs a key without one ({MAKE_KEY})") from None
    except (ValueError, UnsupportedAlgorithm):
        raise EdgecoreError(f"{flag} {path} is not an OpenSSH private key; make one with `{MAKE_KEY}`") from None
    _require_nist_ec(key.public_key(), f"{flag} {path}")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def check_root_certificates(path: Path, flag: str = "--root-certificates") -> None:
    """The CA certificate a device trusts: present, PEM, and a CA (not the server's own certificate)."""
    cert = _certificate(path, flag, FIX_CA)
    if not _is_ca(cert):
        raise EdgecoreError(f"{flag} {path} is not a CA certificate (it looks like a server's own certificate); "
                            f"pass the CA file, ca.crt, from the folder `python -m server certs` wrote")
    _check_dates(cert, flag, path)


def check_server_files(files: ServerFiles, host: str) -> None:
    """The SuperLink's files: readable PEM, the key matches the certificate, the CA signed it, valid for host."""
    flag_ca, flag_cert, flag_key = (flag for flag, _ in files.flags())
    ca = _certificate(files.ca, flag_ca, FIX_CERTS)
    cert = _certificate(files.cert, flag_cert, FIX_CERTS)
    key = _private_key(files.key, flag_key)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise EdgecoreError(f"{flag_key} {files.key} does not match {flag_cert} {files.cert}; use the key written "
                            f"with that certificate, or make both again with `{MAKE_CERTS}`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EdgecoreError(f"{flag_cert} {files.cert} was not signed by {flag_ca} {files.ca}, so devices trusting "
                            f"that CA would refuse the server; make both together with `{MAKE_CERTS}`") from None
    _check_dates(ca, flag_ca, files.ca)
    _check_dates(cert, flag_cert, files.cert)
    names = certificate_names(cert)
    needed = ["127.0.0.1"] + ([] if host in BIND_ALL else [host.strip("[]").lower()])
    missing = [name for name in needed if name not in names]
    if missing:
        raise EdgecoreError(f"{flag_cert} {files.cert} is not valid for {', '.join(missing)} (it names "
                            f"{', '.join(sorted(names)) or 'nothing'}); make it with "
                            f"`python -m server certs --host {needed[-1]} --out DIR`")


def certificate_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses in the certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def tls_context(ca: Path) -> ssl.SSLContext:
    """A client context that trusts only this CA and checks the host name, as a SuperNode does."""
    return ssl.create_default_context(cafile=str(ca))


def _read(path: Path, flag: str, fix: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise EdgecoreError(f"{flag} {path} is a folder, not a file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EdgecoreError(f"{flag} {path}: no such file; {fix}") from None
    except PermissionError:
        raise EdgecoreError(f"{flag} {path}: cannot read it (permission denied); run as its owner or fix its "
                            "permissions (chmod 600 for a key)") from None


def _certificate(path: Path, flag: str, fix: str) -> x509.Certificate:
    data = _read(path, flag, fix)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise EdgecoreError(f"{flag} {path} is not a PEM certificate (it should begin with -----BEGIN CERTIFICATE-----); "
                            f"{fix}") from None


def _private_key(path: Path, flag: str):
    data = _read(path, flag, FIX_CERTS)
    try:
        return serialization.load_pem_private_key(data, None)
    except TypeError:
        raise EdgecoreError(f"{flag} {path} is encrypted with a passphrase; the SuperLink needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise EdgecoreError(f"{flag} {path} is not a PEM private key (it should begin with -----BEGIN PRIVATE KEY-----); "
                            f"{FIX_CERTS}") from None


def _parse_public_key(text: str, origin: str) -> str:
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise EdgecoreError(f"--device-keys {origin}: not an OpenSSH public key ({text[:40]}...); each line should "
                            f"look like `ecdsa-sha2-nistp384 AAAA... name`, as `{MAKE_KEY}` writes it") from None
    _require_nist_ec(key, f"--device-keys {origin}")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _require_nist_ec(key, where: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        kind = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__.replace("PublicKey", "")
        raise EdgecoreError(f"{where} is a {kind} key; Flower's device authentication needs an EC key on a NIST "
                            f"curve: make one with `{MAKE_KEY}` (or `ssh-keygen -t ecdsa -b 384`)")


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_dates(cert: x509.Certificate, flag: str, path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise EdgecoreError(f"{flag} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; make new files with "
                            f"`{MAKE_CERTS}` and give devices the new ca.crt")
    if now < cert.not_valid_before_utc:
        raise EdgecoreError(f"{flag} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                            "is this machine's clock right?")
