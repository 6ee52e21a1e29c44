"""Kafka security settings as Faust credentials."""

from __future__ import annotations

from typing import Any

import faust

from stream_app.settings import KafkaSettings

__all__ = ["faust_credentials"]


def faust_credentials(kafka: KafkaSettings) -> Any:
    """The ``broker_credentials`` Faust needs for ``kafka.security_protocol`` (None for PLAINTEXT)."""
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=None,
        )
    return None
