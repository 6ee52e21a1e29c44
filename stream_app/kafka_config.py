"""One place that turns :class:`~stream_app.settings.KafkaSettings` into Kafka client configuration.

Every client of this project takes its security settings from here, so ``SSL`` means TLS and
``SASL_SSL`` means SASL inside TLS for all of them alike:

- :func:`ssl_context` builds the :class:`ssl.SSLContext` (or None without TLS) that aiokafka and Faust use;
- :func:`aiokafka_auth` gives the aiokafka keyword arguments (``security_protocol``, ``ssl_context``,
  ``sasl_*``), the same for producer, consumer and admin client, and for PLAIN and SCRAM alike;
- :func:`aiokafka_client_kwargs` adds the bootstrap servers and client id;
- :func:`librdkafka_config` gives the confluent-kafka / librdkafka configuration dict (e.g. for the
  compatibility tests and any librdkafka tool an operator points at the same cluster).

The Faust worker converts the same settings into Faust's credentials object in
``stream_app.worker.credentials``; nothing here imports Faust or a Kafka client.

A value of type :data:`KafkaTarget` is either the settings or a bare ``host:port`` string, which means a
PLAINTEXT cluster (the local broker of the demo and the tests).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from stream_app.errors import ConfigError
from stream_app.settings import KafkaSettings

__all__ = [
    "KafkaTarget",
    "aiokafka_auth",
    "aiokafka_client_kwargs",
    "as_kafka_settings",
    "describe_target",
    "librdkafka_config",
    "ssl_context",
]

KafkaTarget = KafkaSettings | str


def as_kafka_settings(target: KafkaTarget) -> KafkaSettings:
    """``target`` itself, or for a bare bootstrap string the PLAINTEXT settings of that cluster."""
    if isinstance(target, KafkaSettings):
        return target
    return KafkaSettings(bootstrap_servers=target)


def describe_target(kafka: KafkaSettings) -> str:
    """A short, secret-free description for error messages, e.g. ``127.0.0.1:9093 (SASL_SSL, SCRAM-SHA-256,
    user 'alice')``."""
    parts: list[str] = [kafka.security_protocol]
    if kafka.uses_sasl:
        parts += [kafka.sasl_mechanism, f"user {kafka.sasl_username!r}"]
    if kafka.uses_ssl and kafka.ssl_cafile is not None:
        parts.append(f"CA {kafka.ssl_cafile}")
    return f"{kafka.bootstrap_servers or '(no bootstrap servers)'} ({', '.join(parts)})"


def _readable(path: Path, setting: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{setting} {path} does not exist or is not a file")
    return str(path)


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL`` and ``SASL_SSL`` (None otherwise).

    It verifies the broker's certificate chain against ``ssl_cafile`` (or the system's trust store) and,
    with ``ssl_check_hostname``, that the certificate names the host connected to; TLS 1.2 at least.
    A client certificate (``ssl_certfile``/``ssl_keyfile``/``ssl_key_password``) is loaded for mutual TLS.

    Raises:
        ConfigError: a file that is missing or cannot be read as PEM, or a wrong key password; the
            message names the setting.
    """
    if not kafka.uses_ssl:
        return None
    cafile = None if kafka.ssl_cafile is None else _readable(kafka.ssl_cafile, "ssl_cafile")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as exc:
        raise ConfigError(f"ssl_cafile {kafka.ssl_cafile} is not a PEM CA certificate: {exc}") from exc
    # Kafka's ssl.endpoint.identification.algorithm: empty turns off the name check, never the chain check
    context.check_hostname = kafka.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if kafka.ssl_certfile is not None:
        certfile = _readable(kafka.ssl_certfile, "ssl_certfile")
        keyfile = None if kafka.ssl_keyfile is None else _readable(kafka.ssl_keyfile, "ssl_keyfile")
        password = kafka.ssl_key_password.get_secret_value() or None
        try:
            context.load_cert_chain(certfile, keyfile, password)
        except ssl.SSLError as exc:
            hint = " (wrong or missing ssl_key_password?)" if keyfile or password else ""
            raise ConfigError(
                f"cannot load the client certificate ssl_certfile={certfile}"
                f"{f' ssl_keyfile={keyfile}' if keyfile else ''}{hint}: {exc}"
            ) from exc
    return context


def aiokafka_auth(kafka: KafkaSettings, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """aiokafka's security keyword arguments for producer, consumer and admin client.

    aiokafka takes ``sasl_plain_username``/``sasl_plain_password`` for SCRAM as well as for PLAIN.
    ``context`` reuses an already built :func:`ssl_context` (one TLS context per process is enough).
    """
    auth: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.uses_ssl:
        auth["ssl_context"] = context if context is not None else ssl_context(kafka)
    if kafka.uses_sasl:
        auth["sasl_mechanism"] = kafka.sasl_mechanism
        auth["sasl_plain_username"] = kafka.sasl_username
        auth["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return auth


def aiokafka_client_kwargs(kafka: KafkaSettings, *, client_id: str | None = None) -> dict[str, Any]:
    """:func:`aiokafka_auth` plus ``bootstrap_servers`` and ``client_id`` (the settings' unless given)."""
    return {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": client_id or kafka.client_id,
        **aiokafka_auth(kafka),
    }


def librdkafka_config(kafka: KafkaSettings, *, client_id: str | None = None) -> dict[str, str]:
    """The confluent-kafka / librdkafka configuration for the same cluster and credentials.

    Without ``ssl_cafile``, ``ssl.ca.location=probe`` makes librdkafka look for the system's CA bundle
    (the confluent-kafka wheels carry their own OpenSSL, which does not know where the system keeps it).
    """
    config = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": client_id or kafka.client_id,
        "security.protocol": kafka.security_protocol,
    }
    if kafka.uses_sasl:
        config["sasl.mechanism"] = kafka.sasl_mechanism
        config["sasl.username"] = kafka.sasl_username
        config["sasl.password"] = kafka.sasl_password.get_secret_value()
    if kafka.uses_ssl:
        config["ssl.ca.location"] = str(kafka.ssl_cafile) if kafka.ssl_cafile is not None else "probe"
        config["ssl.endpoint.identification.algorithm"] = "https" if kafka.ssl_check_hostname else "none"
        config["enable.ssl.certificate.verification"] = "true"
        if kafka.ssl_certfile is not None:
            config["ssl.certificate.location"] = str(kafka.ssl_certfile)
            # librdkafka wants the key on its own; a combined PEM file serves as both
            config["ssl.key.location"] = str(kafka.ssl_keyfile or kafka.ssl_certfile)
        if kafka.ssl_key_password.get_secret_value():
            config["ssl.key.password"] = kafka.ssl_key_password.get_secret_value()
    return config
