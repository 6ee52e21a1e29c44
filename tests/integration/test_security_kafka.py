"""TLS and SASL against a real broker: every client of the project honours the security settings.

The ``secure_kafka`` broker listens with PLAINTEXT, SSL (mutual TLS), SASL_SSL and SASL_PLAINTEXT; its
certificates and users are made by the fixture. The PLAINTEXT listener serves as an independent view of
what the secure clients did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from stream_app.devtools.clients import Received, chat_message, consume, produce_all
from stream_app.devtools.kafka_local import LocalKafka, kafka_env, without_kafka_connection
from stream_app.devtools.tls import make_ca
from stream_app.errors import ConfigError
from stream_app.kafka_config import librdkafka_config
from stream_app.settings import KafkaSettings, SaslMechanism, SecurityProtocol
from stream_app.topics import ensure_topics, partition_counts

pytestmark = pytest.mark.integration

SECURE_LOGINS: list[tuple[SecurityProtocol, SaslMechanism]] = [
    ("SASL_SSL", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_SSL", "SCRAM-SHA-512"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SSL", "PLAIN"),  # mutual TLS; the mechanism is unused
]


def _name(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def _collect(kafka: KafkaSettings | str, topic: str, n: int, timeout_s: float = 60.0) -> list[Received]:
    async def run() -> list[Received]:
        got: list[Received] = []
        async with contextlib.aclosing(consume(kafka, [topic], idle_timeout_s=timeout_s)) as records:
            async for rec in records:
                got.append(rec)
                if len(got) >= n:
                    break
        return got

    return asyncio.run(asyncio.wait_for(run(), timeout_s))


@pytest.mark.parametrize(("protocol", "mechanism"), SECURE_LOGINS)
def test_topics_are_created_and_read_back_over_each_secure_listener(
    secure_kafka: LocalKafka, protocol: SecurityProtocol, mechanism: SaslMechanism
) -> None:
    settings = secure_kafka.client_settings(protocol, mechanism)
    names = [_name("sec.a"), _name("sec.b")]

    report = asyncio.run(ensure_topics(settings, names, 3))

    assert report.created == tuple(names)
    assert partition_counts(secure_kafka.bootstrap_servers, names) == dict.fromkeys(names, 3)
    # asked again with another count: nothing changes, and the difference is reported, not ignored
    again = asyncio.run(ensure_topics(settings, names, 5))
    assert again.created == ()
    assert again.mismatched == dict.fromkeys(names, 3)
    assert partition_counts(settings, [*names, "sec.never-created"]) == {**dict.fromkeys(names, 3),
                                                                         "sec.never-created": None}  # fmt: skip


@pytest.mark.parametrize(("protocol", "mechanism"), SECURE_LOGINS)
def test_aiokafka_clients_produce_and_consume_over_each_secure_listener(
    secure_kafka: LocalKafka, protocol: SecurityProtocol, mechanism: SaslMechanism
) -> None:
    settings = secure_kafka.client_settings(protocol, mechanism)
    topic = _name("sec.rt")
    asyncio.run(ensure_topics(secure_kafka.bootstrap_servers, [topic], 2))
    records = [chat_message(f"m-{i}", f"c-{i % 3}", f"text {i}") for i in range(20)]

    assert asyncio.run(produce_all(settings, topic, records)) == 20
    got = _collect(settings, topic, 20)

    assert sorted(r.value for r in got) == sorted(v for _, v in records)


def test_confluent_kafka_and_aiokafka_read_each_others_records_over_sasl_ssl(secure_kafka: LocalKafka) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    scram = secure_kafka.client_settings("SASL_SSL", "SCRAM-SHA-512")
    plain = secure_kafka.client_settings("SASL_SSL", "PLAIN")
    topic = _name("sec.librdkafka")
    asyncio.run(ensure_topics(plain, [topic], 2))

    # librdkafka produces over SASL_SSL + SCRAM-SHA-512 ...
    errors: list[Any] = []
    producer = confluent_kafka.Producer({**librdkafka_config(scram), "acks": "all", "error_cb": errors.append})
    for i in range(10):
        key, value = chat_message(f"lib-{i}", "c-1", f"from librdkafka {i}")
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0, errors
    # ... aiokafka produces over SASL_SSL + PLAIN ...
    asyncio.run(produce_all(plain, topic, [chat_message(f"aio-{i}", "c-2", f"from aiokafka {i}") for i in range(10)]))
    # ... and each client reads all 20 back
    assert len(_collect(scram, topic, 20)) == 20
    consumer = confluent_kafka.Consumer(
        {**librdkafka_config(scram), "group.id": _name("sec-group"), "auto.offset.reset": "earliest"}
    )
    try:
        consumer.subscribe([topic])
        seen: set[bytes] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 20 and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                seen.add(msg.value())
    finally:
        consumer.close()
    assert len(seen) == 20
    assert not errors


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_a_wrong_password_is_a_clear_error(secure_kafka: LocalKafka, mechanism: SaslMechanism) -> None:
    settings = secure_kafka.client_settings("SASL_SSL", mechanism, sasl_password=SecretStr("not-the-password"))
    user = secure_kafka.client_settings("SASL_SSL", mechanism).sasl_username

    with pytest.raises(ConfigError, match=f"SASL authentication failed for user '{user}' with {mechanism}") as info:
        asyncio.run(ensure_topics(settings, [_name("sec.denied")], 1, timeout_s=20))
    assert "not-the-password" not in str(info.value)
    assert "\n" not in str(info.value)


def test_a_certificate_from_another_ca_is_a_clear_error(secure_kafka: LocalKafka, tmp_path: Path) -> None:
    other_ca, _ = make_ca(tmp_path, "other-ca")
    for protocol in ("SSL", "SASL_SSL"):
        settings = secure_kafka.client_settings(protocol, "SCRAM-SHA-256", ssl_cafile=other_ca)
        with pytest.raises(ConfigError, match=r"TLS certificate was not accepted .*check ssl_cafile"):
            partition_counts(settings, ["anything"], timeout_s=20)


def test_hostname_verification_follows_ssl_check_hostname(secure_kafka: LocalKafka) -> None:
    # the broker's certificate names 127.0.0.1 only; "localhost" reaches the same listener
    by_name = secure_kafka.bootstrap("SASL_SSL", host="localhost")
    checked = secure_kafka.client_settings("SASL_SSL", "SCRAM-SHA-256", bootstrap_servers=by_name)
    with pytest.raises(ConfigError, match=r"Hostname mismatch.*ssl_check_hostname"):
        partition_counts(checked, ["anything"], timeout_s=20)

    unchecked = checked.model_copy(update={"ssl_check_hostname": False})
    assert partition_counts(unchecked, ["anything"], timeout_s=20) == {"anything": None}


def test_the_ssl_listener_requires_the_client_certificate(secure_kafka: LocalKafka) -> None:
    without = secure_kafka.client_settings("SSL", client_cert=False)
    with pytest.raises(ConfigError, match=r"closed the connection.*client certificate"):
        partition_counts(without, ["anything"], timeout_s=20)


def test_sasl_ssl_never_falls_back_to_sasl_over_plain_tcp(secure_kafka: LocalKafka) -> None:
    # SASL_SSL pointed at the SASL_PLAINTEXT listener must fail the TLS handshake, not log in without TLS
    settings = secure_kafka.client_settings(
        "SASL_SSL", "SCRAM-SHA-256", bootstrap_servers=secure_kafka.bootstrap("SASL_PLAINTEXT")
    )
    with pytest.raises(ConfigError, match=r"closed the connection.*match this listener \(TLS or not\)"):
        partition_counts(settings, ["anything"], timeout_s=20)


def _topics_cli(env: dict[str, str], *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "topics", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_the_topics_command_uses_the_security_settings(secure_kafka: LocalKafka) -> None:
    tag = uuid.uuid4().hex[:8]
    names = {part: f"cli.{part}.{tag}" for part in ("INPUT", "EVENTS", "METRICS", "DEAD_LETTERS")}
    env = {
        **without_kafka_connection(os.environ),
        **kafka_env(secure_kafka.client_settings("SASL_SSL", "SCRAM-SHA-256")),
        **{f"EMOTION_STREAM_TOPICS__{part}": name for part, name in names.items()},
    }

    done = _topics_cli(env, "--partitions", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("topics ready")
    assert partition_counts(secure_kafka.bootstrap_servers, list(names.values())) == dict.fromkeys(names.values(), 3)

    mismatch = _topics_cli(env, "--partitions", "6")
    assert mismatch.returncode == 1
    assert "already exist with another partition count than --partitions 6" in mismatch.stderr
    assert f"{names['INPUT']} (3)" in mismatch.stderr

    wrong = _topics_cli({**env, "EMOTION_STREAM_KAFKA__SASL_PASSWORD": "wrong"})
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith("Error: cannot use Kafka at ")
    assert "SASL authentication failed" in wrong.stderr


def test_a_topic_the_cluster_cannot_create_is_a_clear_error(secure_kafka: LocalKafka) -> None:
    settings = secure_kafka.client_settings("SASL_SSL", "PLAIN")
    name = _name("sec.rf3")
    with pytest.raises(ConfigError, match=f"cannot create topic '{name}': INVALID_REPLICATION_FACTOR"):
        asyncio.run(ensure_topics(settings, [name], 1, replication_factor=3, timeout_s=20))
    assert partition_counts(settings, [name]) == {name: None}
