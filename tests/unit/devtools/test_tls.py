"""The fixture's certificates do what the secure broker needs, checked with real TLS handshakes.

A TLS server on loopback presents the broker keystore (and asks for the client certificate); the client
is the context :mod:`stream_app.kafka_config` builds from settings, as every Kafka client of the project
uses it.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream_app.devtools.tls import TlsFiles, make_ca, make_certificates
from stream_app.kafka_config import ssl_context
from stream_app.settings import KafkaSettings

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed"),
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _client(certs: TlsFiles, *, cafile: Path | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl_context(
        KafkaSettings(
            security_protocol="SSL",
            ssl_cafile=cafile or certs.ca_cert,
            ssl_certfile=certs.client_cert,
            ssl_keyfile=certs.client_key,
            ssl_key_password=SecretStr(certs.client_key_password),
            ssl_check_hostname=check_hostname,
        )
    )
    assert context is not None
    return context


async def _handshake(certs: TlsFiles, client: ssl.SSLContext, server_hostname: str) -> str:
    """Connect to a mutual-TLS server using the broker keystore; the client certificate's CN it saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_keystore)
    server_ctx.load_verify_locations(certs.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.set_result(dict(x[0] for x in peer["subject"])["commonName"])
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_mutual_tls_works_with_the_encrypted_client_key(certs: TlsFiles) -> None:
    assert await _handshake(certs, _client(certs), "127.0.0.1") == "client"


async def test_the_broker_certificate_names_only_its_address(certs: TlsFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await _handshake(certs, _client(certs), "localhost")
    # without the name check the chain is still verified, and the handshake completes
    assert await _handshake(certs, _client(certs, check_hostname=False), "localhost") == "client"


async def test_another_ca_is_not_trusted(certs: TlsFiles, tmp_path: Path) -> None:
    other, _ = make_ca(tmp_path, "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"):
        await _handshake(certs, _client(certs, cafile=other), "127.0.0.1")


def test_keys_are_private_and_the_client_key_is_encrypted(certs: TlsFiles) -> None:
    assert certs.client_key.stat().st_mode & 0o077 == 0
    assert certs.server_keystore.stat().st_mode & 0o077 == 0
    assert certs.client_key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    # Kafka's PEM keystore: the certificate chain, then one unencrypted PKCS#8 key
    blocks = [line for line in certs.server_keystore.read_text().splitlines() if line.startswith("-----BEGIN")]
    assert blocks == ["-----BEGIN CERTIFICATE-----"] * 2 + ["-----BEGIN PRIVATE KEY-----"]


def test_two_runs_make_different_cas(certs: TlsFiles, tmp_path: Path) -> None:
    again = make_certificates(tmp_path)
    assert again.ca_cert.read_text() != certs.ca_cert.read_text()
    assert again.client_key_password != certs.client_key_password
