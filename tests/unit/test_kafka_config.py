"""Settings -> TLS context, aiokafka and librdkafka configuration; refused combinations."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from stream_app.devtools.tls import TlsFiles, make_certificates
from stream_app.errors import ConfigError
from stream_app.kafka_config import (
    aiokafka_auth,
    aiokafka_client_kwargs,
    as_kafka_settings,
    describe_target,
    librdkafka_config,
    ssl_context,
)
from stream_app.settings import KafkaSettings, Settings

pytestmark = pytest.mark.unit

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _sasl(**extra: Any) -> dict[str, Any]:
    return {"sasl_username": "alice", "sasl_password": SecretStr("pw"), **extra}


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "SASL_SSL needs sasl_username"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "a"}, "needs sasl_password"),
        ({"sasl_username": "alice"}, "does not use SASL, so they would be ignored"),
        ({"security_protocol": "SSL", **_sasl()}, "does not use SASL"),
        ({"ssl_cafile": Path("/ca.pem")}, "ssl_cafile set but security_protocol=PLAINTEXT does not use TLS"),
        ({"security_protocol": "SASL_PLAINTEXT", "ssl_check_hostname": True, "ssl_certfile": Path("/c"), **_sasl()},
         "ssl_certfile set but"),
        ({"security_protocol": "SSL", "ssl_keyfile": Path("/k.pem")}, "ssl_keyfile needs ssl_certfile"),
        ({"security_protocol": "SSL", "ssl_key_password": SecretStr("x")}, "ssl_key_password needs ssl_certfile"),
        ({"bootstrap_servers": "broker1"}, "'broker1' is not host:port"),
        ({"bootstrap_servers": "b1:9092,,b2:9092"}, "'' is not host:port"),
        ({"bootstrap_servers": "b1:99999"}, "'b1:99999' is not host:port"),
    ],
)  # fmt: skip
def test_impossible_or_ignored_security_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"security_protocol": "SSL"},
        {"security_protocol": "SSL", "ssl_cafile": Path("/ca.pem"), "ssl_certfile": Path("/both.pem")},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", **_sasl()},
        {"security_protocol": "SASL_PLAINTEXT", **_sasl()},
        {"bootstrap_servers": "b1:9092, [::1]:9093,kafka://b3:9094"},
    ],
)
def test_workable_combinations_load(fields: dict[str, Any]) -> None:
    KafkaSettings(**fields)


def test_the_environment_reaches_the_security_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SSL_CAFILE", "/etc/ca.pem")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SSL_CHECK_HOSTNAME", "false")
    kafka = Settings().kafka
    assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == ("SASL_SSL", "SCRAM-SHA-256", "svc")
    assert kafka.ssl_cafile == Path("/etc/ca.pem")
    assert kafka.ssl_check_hostname is False
    assert "s3cret" not in repr(kafka)
    assert "s3cret" not in describe_target(kafka)


# ------------------------------------------------------------------------------------------- aiokafka
def test_plaintext_has_no_tls_and_no_sasl() -> None:
    kafka = KafkaSettings()
    assert ssl_context(kafka) is None
    assert aiokafka_auth(kafka) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_sends_the_mechanism_and_credentials_without_tls() -> None:
    kafka = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", **_sasl())
    assert aiokafka_auth(kafka) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "pw",
    }


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_protocols_carry_a_verifying_context(protocol: str) -> None:
    extra = _sasl() if protocol == "SASL_SSL" else {}
    kafka = KafkaSettings(security_protocol=protocol, **extra)  # type: ignore[arg-type]
    auth = aiokafka_auth(kafka)
    assert auth["security_protocol"] == protocol
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ("sasl_mechanism" in auth) is (protocol == "SASL_SSL")


def test_hostname_check_off_still_verifies_the_chain() -> None:
    context = ssl_context(KafkaSettings(security_protocol="SSL", ssl_check_hostname=False))
    assert context is not None
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_client_kwargs_add_bootstrap_and_client_id() -> None:
    kwargs = aiokafka_client_kwargs(KafkaSettings(bootstrap_servers="b:1", client_id="me"), client_id="me-admin")
    assert kwargs == {"bootstrap_servers": "b:1", "client_id": "me-admin", "security_protocol": "PLAINTEXT"}


def test_a_bare_bootstrap_string_means_plaintext() -> None:
    kafka = as_kafka_settings("127.0.0.1:9092")
    assert (kafka.bootstrap_servers, kafka.security_protocol) == ("127.0.0.1:9092", "PLAINTEXT")
    assert as_kafka_settings(kafka) is kafka


@needs_openssl
def test_the_ca_and_an_encrypted_client_key_are_loaded(certs: TlsFiles) -> None:
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=certs.ca_cert,
        ssl_certfile=certs.client_cert,
        ssl_keyfile=certs.client_key,
        ssl_key_password=SecretStr(certs.client_key_password),
    )
    context = ssl_context(kafka)
    assert context is not None
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "emotion-stream test ca"),),)]


@needs_openssl
def test_a_wrong_key_password_names_the_setting(certs: TlsFiles) -> None:
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=certs.ca_cert,
        ssl_certfile=certs.client_cert,
        ssl_keyfile=certs.client_key,
        ssl_key_password=SecretStr("wrong"),
    )
    with pytest.raises(ConfigError, match="ssl_key_password"):
        ssl_context(kafka)


@needs_openssl
def test_a_key_that_is_not_the_certificates_is_refused(certs: TlsFiles, tmp_path: Path) -> None:
    other = make_certificates(tmp_path)
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_certfile=certs.client_cert,
        ssl_keyfile=other.client_key,
        ssl_key_password=SecretStr(other.client_key_password),
    )
    with pytest.raises(ConfigError, match="cannot load the client certificate"):
        ssl_context(kafka)


@pytest.mark.parametrize("field", ["ssl_cafile", "ssl_certfile"])
def test_a_missing_file_names_the_setting(field: str, tmp_path: Path) -> None:
    kafka = KafkaSettings(security_protocol="SSL", **{field: tmp_path / "absent.pem"})
    with pytest.raises(ConfigError, match=f"{field} .*absent.pem does not exist"):
        ssl_context(kafka)


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ssl_cafile .* is not a PEM CA certificate"):
        ssl_context(KafkaSettings(security_protocol="SSL", ssl_cafile=junk))


# ------------------------------------------------------------------------------------------ librdkafka
def test_librdkafka_config_for_sasl_ssl_with_scram() -> None:
    kafka = KafkaSettings(
        bootstrap_servers="b:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        ssl_cafile=Path("/ca.pem"),
        ssl_check_hostname=False,
        **_sasl(),
    )
    assert librdkafka_config(kafka) == {
        "bootstrap.servers": "b:9093",
        "client.id": "emotion-stream",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "sasl.password": "pw",
        "ssl.ca.location": "/ca.pem",
        "ssl.endpoint.identification.algorithm": "none",
        "enable.ssl.certificate.verification": "true",
    }


def test_librdkafka_config_for_plaintext_has_no_security_keys() -> None:
    assert librdkafka_config(KafkaSettings(bootstrap_servers="b:1")) == {
        "bootstrap.servers": "b:1",
        "client.id": "emotion-stream",
        "security.protocol": "PLAINTEXT",
    }


@needs_openssl
def test_librdkafka_accepts_the_config_and_loads_the_client_certificate(certs: TlsFiles) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    good = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        security_protocol="SSL",
        ssl_cafile=certs.ca_cert,
        ssl_certfile=certs.client_cert,
        ssl_keyfile=certs.client_key,
        ssl_key_password=SecretStr(certs.client_key_password),
    )
    config = librdkafka_config(good)
    assert config["ssl.key.location"] == str(certs.client_key)
    # librdkafka checks every key and loads the TLS files when the client is created
    confluent_kafka.Producer(config)
    bad = good.model_copy(update={"ssl_key_password": SecretStr("wrong")})
    with pytest.raises(confluent_kafka.KafkaException, match="ssl"):
        confluent_kafka.Producer(librdkafka_config(bad))
