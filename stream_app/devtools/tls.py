"""Throw-away TLS material for the local broker: a CA, a broker certificate and a client certificate.

Made with the ``openssl`` command line at fixture time, in a temporary folder, valid for two days; no key
is ever committed. EC P-256 keys keep generation fast (a few milliseconds each). The broker's keystore
is a PEM file (certificate chain + unencrypted PKCS#8 key) that Kafka reads with ``ssl.keystore.type=PEM``;
the client key is encrypted, so a test that connects with it proves ``ssl_key_password`` is honoured.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stream_app.errors import InfrastructureError

__all__ = ["TlsFiles", "make_ca", "make_certificates"]

_DAYS = "2"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated files (all PEM)."""

    ca_cert: Path
    """The CA that signed both certificates: what a client names in ``ssl_cafile``."""
    server_keystore: Path
    """Broker certificate chain + its key, for ``ssl.keystore.location`` with ``ssl.keystore.type=PEM``."""
    client_cert: Path
    """Client certificate (for a listener with ``ssl.client.auth=required``)."""
    client_key: Path
    """The client's private key, encrypted with :attr:`client_key_password`."""
    client_key_password: str
    server_names: tuple[str, ...]
    """What the broker certificate names (subjectAltName): IP addresses and DNS names."""


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise InfrastructureError("the openssl command is needed to make TLS certificates for the local Kafka")
    proc = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InfrastructureError(f"openssl {args[0]} failed: {proc.stderr.strip()[-1000:]}")


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA in ``folder``: (certificate, unencrypted key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC, "-nodes", "-keyout", key.name, "-out", cert.name, "-days", _DAYS,
        "-subj", f"/CN=emotion-stream test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (folder / f"{name}{suffix}" for suffix in (".crt", ".key", ".csr", ".ext"))
    _openssl("req", *_EC, "-nodes", "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}", cwd=folder)
    key.chmod(0o600)
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", cert.name, "-days", _DAYS, "-extfile", ext.name,
        cwd=folder,
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return cert, key


def make_certificates(folder: Path, *, server_names: tuple[str, ...] = ("127.0.0.1",)) -> TlsFiles:
    """A CA, a broker certificate for ``server_names`` and a client certificate, in ``folder``.

    Names that parse as IPv4 addresses become ``IP:`` entries of the subjectAltName, others ``DNS:``.
    The default names only ``127.0.0.1``: connecting to ``localhost`` then fails hostname verification,
    which is how the tests tell ``ssl_check_hostname`` on from off.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder)
    sans = ",".join(
        f"IP:{n}" if n.replace(".", "").isdigit() and n.count(".") == 3 else f"DNS:{n}" for n in server_names
    )
    server_cert, server_key = _signed(
        folder, "broker", ca, f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
    )
    keystore = folder / "broker-keystore.pem"
    keystore.write_text(server_cert.read_text() + ca[0].read_text() + server_key.read_text())
    keystore.chmod(0o600)
    client_cert, client_plain_key = _signed(
        folder, "client", ca, "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"
    )
    password = secrets.token_urlsafe(12)
    client_key = folder / "client-encrypted.key"
    _openssl(
        "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", client_plain_key.name, "-out", client_key.name,
        "-passout", f"pass:{password}",
        cwd=folder,
    )  # fmt: skip
    client_plain_key.unlink()
    client_key.chmod(0o600)
    return TlsFiles(ca[0], keystore, client_cert, client_key, password, server_names)
