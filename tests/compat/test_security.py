"""TLS and SASL: the worker and three third-party producers over the same secure listener.

Issue 10, item 5: ``SASL_SSL`` became SASL over plain TCP and ``SSL`` became PLAINTEXT. The
``secure_kafka`` broker (certificates and users made by the fixture) has SSL (mutual TLS) and SASL_SSL
listeners; here the worker is given only a secure listener's address and credentials, the topics are made
over it by confluent-kafka's AdminClient, confluent-kafka, aiokafka and kcat produce over it (kcat with
PLAIN where the others use SCRAM: see below), and the outputs are read over it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.devtools.kafka_local import LocalKafka
from stream_app.settings import SaslMechanism, SecurityProtocol
from tests.compat.conftest import ClosingTable, CompatTopics, Spawn, create_topics
from tests.compat.helpers import (
    Msg,
    OutputWatcher,
    account,
    chat,
    kcat_produce,
    locate,
    malformed,
    missing_report,
    produce_aiokafka,
    produce_confluent,
)
from tests.integration.helpers import dev_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 120.0


@pytest.mark.parametrize(
    ("protocol", "mechanism", "condition"),
    [
        ("SASL_SSL", "SCRAM-SHA-512", "TLS + SASL (SASL_SSL, SCRAM-SHA-512)"),
        ("SSL", "PLAIN", "mutual TLS (SSL, client certificate with an encrypted key)"),
    ],
    ids=["sasl_ssl-scram_sha_512", "ssl-mutual_tls"],
)
def test_worker_and_producers_over_a_secure_listener(
    secure_kafka: LocalKafka,
    spawn: Spawn,
    closing_table: ClosingTable,
    kcat: str,
    data_dir: Path,
    tmp_path: Path,
    protocol: SecurityProtocol,
    mechanism: SaslMechanism,
    condition: str,
) -> None:
    settings = secure_kafka.client_settings(protocol, mechanism)
    assert settings.bootstrap_servers != secure_kafka.bootstrap_servers  # not the PLAINTEXT listener
    topics = CompatTopics.fresh(f"sec{protocol.lower().replace('_', '')}")
    create_topics(settings, topics, 3)
    worker = spawn(settings, topics, EMOTION_STREAM_KAFKA__COMPRESSION_TYPE="zstd")
    assert worker.env["EMOTION_STREAM_KAFKA__SECURITY_PROTOCOL"] == protocol
    texts = dev_texts(data_dir, 40)
    with OutputWatcher(settings, topics.events, topics.dead_letters) as watcher:
        worker.wait_ready()
        lib = [chat(f"sec-lib-{i}", texts[i], conversation=f"c-{i % 4}") for i in range(12)]
        placed = produce_confluent(settings, topics.input, [*lib, malformed("sec-lib-bad")], compression="lz4")
        aio = [chat(f"sec-aio-{i}", texts[12 + i], conversation=f"c-{i % 4}") for i in range(12)]
        placed |= produce_aiokafka(settings, topics.input, [*aio, malformed("sec-aio-bad")], compression="gzip")
        by_kcat = [Msg(b"conv-1", m.value, m.expect, m.message_id)
                   for m in (chat(f"sec-kcat-{i}", texts[24 + i]) for i in range(4))]  # fmt: skip
        # kcat's librdkafka (Debian: 2.0.2) fails SCRAM against Kafka 4.x brokers (librdkafka < 2.6.1 sends a
        # nonce 4.x rejects; edenhill/kcat#462, confluentinc/librdkafka#4895): it logs in with PLAIN, over
        # the same TLS listener
        kcat_login = secure_kafka.client_settings(protocol, "PLAIN") if mechanism.startswith("SCRAM") else settings
        kcat_produce(kcat_login, topics.input, by_kcat, tmp_path / "kcat", compression="snappy")
        placed |= locate(settings, topics.input, by_kcat)
        waited = watcher.wait_for(placed, WAIT_S)
        row = closing_table.add(account(condition, placed, watcher, worker.restarts))
    assert waited >= 0, f"{missing_report(placed, watcher)}\n{worker.log_tail()}"
    assert row.ok, (row, worker.exit_codes, worker.log_tail())
    assert row.dead_letters == 2
    assert worker.alive, worker.log_tail()
