"""The worker's Kafka credentials as Faust wants them (``faust.App(broker_credentials=...)``).

Faust's aiokafka driver turns the credentials object into aiokafka arguments in
``faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth`` (faust-streaming 0.15.3):
``SSLCredentials`` -> ``security_protocol=SSL`` with its context; ``SASLCredentials`` ->
``SASL_SSL`` when it carries an ``ssl_context``, else ``SASL_PLAINTEXT``; ``None`` -> ``PLAINTEXT``.
So the TLS context must ride inside ``SASLCredentials`` for SASL_SSL; passing ``ssl_context=None`` (as
the worker did) silently downgraded SASL_SSL to SASL over plain TCP. ``tests/unit/worker`` checks that
this mapping gives exactly :func:`stream_app.kafka_config.aiokafka_auth` for all four protocols.
"""

from __future__ import annotations

import ssl

import faust
from faust.types.auth import CredentialsT

from stream_app.kafka_config import ssl_context as build_ssl_context
from stream_app.settings import KafkaSettings

__all__ = ["faust_credentials"]


def faust_credentials(kafka: KafkaSettings, context: ssl.SSLContext | None = None) -> CredentialsT | None:
    """Faust credentials for ``kafka.security_protocol`` (None for PLAINTEXT).

    ``context`` reuses a TLS context already built by :func:`stream_app.kafka_config.ssl_context`.

    Raises:
        ConfigError: a TLS file that cannot be loaded (see :func:`~stream_app.kafka_config.ssl_context`).
    """
    if kafka.uses_ssl and context is None:
        context = build_ssl_context(kafka)
    if kafka.security_protocol == "PLAINTEXT":
        return None
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism,
        # SASLCredentials picks SASL_SSL exactly when it has a context: None here means SASL_PLAINTEXT
        ssl_context=context if kafka.security_protocol == "SASL_SSL" else None,
    )
