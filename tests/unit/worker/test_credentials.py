"""The worker's Faust credentials reach aiokafka as exactly the security the settings ask for.

Faust turns ``broker_credentials`` into aiokafka arguments in its aiokafka driver
(``credentials_to_aiokafka_auth``), for the consumer, the producer and the topic admin alike; this checks
that path, through a real ``faust.App``'s settings, for all four security protocols.
"""

from __future__ import annotations

from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from stream_app.kafka_config import aiokafka_auth, ssl_context
from stream_app.settings import KafkaSettings, SaslMechanism, SecurityProtocol
from stream_app.worker.credentials import faust_credentials

pytestmark = pytest.mark.unit

CASES: list[tuple[SecurityProtocol, SaslMechanism]] = [
    ("PLAINTEXT", "PLAIN"),
    ("SSL", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SASL_SSL", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_SSL", "SCRAM-SHA-512"),
]


def _settings(protocol: SecurityProtocol, mechanism: SaslMechanism) -> KafkaSettings:
    sasl: dict[str, Any] = {}
    if protocol.startswith("SASL"):
        sasl = {"sasl_mechanism": mechanism, "sasl_username": "svc", "sasl_password": SecretStr("pw")}
    return KafkaSettings(bootstrap_servers="b:9093", security_protocol=protocol, **sasl)


@pytest.mark.parametrize(("protocol", "mechanism"), CASES)
def test_faust_passes_aiokafka_the_same_security_as_every_other_client(
    protocol: SecurityProtocol, mechanism: SaslMechanism
) -> None:
    kafka = _settings(protocol, mechanism)
    context = ssl_context(kafka)
    app = faust.App("credentials-test", broker="kafka://b:9093", broker_credentials=faust_credentials(kafka, context))

    through_faust = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)

    assert through_faust["security_protocol"] == protocol
    assert {k: v for k, v in through_faust.items() if v is not None} == aiokafka_auth(kafka, context)
    if protocol in ("SSL", "SASL_SSL"):
        assert through_faust["ssl_context"] is context  # TLS is really on, with our verifying context
    else:
        assert through_faust.get("ssl_context") is None


def test_a_context_is_built_when_none_is_given() -> None:
    credentials = faust_credentials(_settings("SASL_SSL", "SCRAM-SHA-512"))
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["ssl_context"] is not None
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
