"""The local broker's configuration with and without its secure listeners (no broker started here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import (
    BrokerSecurity,
    LocalKafka,
    kafka_env,
    without_kafka_connection,
)
from stream_app.errors import InfrastructureError
from stream_app.settings import SaslMechanism, SecurityProtocol, Settings

pytestmark = pytest.mark.unit

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def _properties(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> BrokerSecurity:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return BrokerSecurity.generate(tmp_path_factory.mktemp("tls"))


def test_without_security_only_plaintext_and_the_controller_listen(tmp_path: Path) -> None:
    kafka = LocalKafka(libs=tmp_path, run_dir=tmp_path, port=9001, controller_port=9002)
    props = _properties(kafka.write_config())
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9001,CONTROLLER://127.0.0.1:9002"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9001"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not any(k.startswith(("ssl.", "sasl.", "listener.name.")) for k in props)
    assert kafka.listeners == {"PLAINTEXT": "127.0.0.1:9001"}
    with pytest.raises(InfrastructureError, match="no SASL_SSL listener"):
        kafka.bootstrap("SASL_SSL")


@needs_openssl
def test_secure_listeners_are_configured(tmp_path: Path, security: BrokerSecurity) -> None:
    ports: dict[SecurityProtocol, int] = {"SSL": 9011, "SASL_SSL": 9012, "SASL_PLAINTEXT": 9013}
    kafka = LocalKafka(
        libs=tmp_path, run_dir=tmp_path, port=9001, controller_port=9002, security=security, secure_ports=ports
    )
    props = _properties(kafka.write_config())

    assert props["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:9001,SSL://127.0.0.1:9011,SASL_SSL://127.0.0.1:9012,SASL_PLAINTEXT://127.0.0.1:9013"
    )
    assert props["listeners"].endswith(",CONTROLLER://127.0.0.1:9002")
    assert props["listener.security.protocol.map"] == (
        "PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
    )
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["ssl.keystore.type"] == "PEM"
    assert props["ssl.keystore.location"] == str(security.certs.server_keystore)
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert props["sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    plain = security.user("PLAIN")
    for listener in ("sasl_ssl", "sasl_plaintext"):
        assert f'user_{plain.username}="{plain.password}"' in props[f"listener.name.{listener}.plain.sasl.jaas.config"]
        assert "ScramLoginModule" in props[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"]
    assert kafka.listeners == {"PLAINTEXT": "127.0.0.1:9001", "SSL": "127.0.0.1:9011", "SASL_SSL": "127.0.0.1:9012",
                               "SASL_PLAINTEXT": "127.0.0.1:9013"}  # fmt: skip


@needs_openssl
def test_scram_users_are_added_at_format_time_and_plain_users_are_not(security: BrokerSecurity) -> None:
    args = security.format_args()
    assert args[::2] == ["--add-scram", "--add-scram"]
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        user = security.user(mechanism)  # type: ignore[arg-type]
        assert f"{mechanism}=[name={user.username},password={user.password}]" in args
    assert security.user("PLAIN").username not in " ".join(args)
    assert len({u.password for u in security.users}) == 3
    assert all(u.password not in repr(u) for u in security.users)


@needs_openssl
@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("PLAINTEXT", "PLAIN"), ("SSL", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_PLAINTEXT", "PLAIN")],
)
def test_client_settings_pass_to_a_child_through_the_environment(
    tmp_path: Path,
    security: BrokerSecurity,
    monkeypatch: pytest.MonkeyPatch,
    protocol: SecurityProtocol,
    mechanism: SaslMechanism,
) -> None:
    kafka = LocalKafka(libs=tmp_path, run_dir=tmp_path, security=security)
    settings = kafka.client_settings(protocol, mechanism)
    assert settings.bootstrap_servers == kafka.listeners[protocol]
    # a parent configured for another cluster: its connection variables must not leak into the child
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SSL_CAFILE", "/elsewhere/ca.pem")
    monkeypatch.setenv("EMOTION_STREAM_KAFKA__SESSION_TIMEOUT_S", "7")
    child = {**without_kafka_connection(os.environ), **kafka_env(settings)}
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in child.items():
        monkeypatch.setenv(name, value)

    loaded = Settings().kafka
    assert loaded == settings.model_copy(update={"session_timeout_s": 7.0})
