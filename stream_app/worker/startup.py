"""What the worker checks and prepares before it joins the group.

* every Kafka codec is usable (a missing library is a start-up error, not a crash on the first batch);
* the input topic exists, and its real partition count is what the cache table gets;
* the cache changelog has the input's partition count: grown when the input grew, re-created when it
  has more (it is only a cache; its local copies are then discarded by the store's consistency check).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import codec
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from stream_app.errors import ConfigError, InfrastructureError
from stream_app.settings import Settings

__all__ = ["align_changelog", "check_codecs", "input_partitions", "prepare"]

_log = logging.getLogger(__name__)


def check_codecs() -> None:
    """Raise :class:`ConfigError` unless aiokafka can decode and encode gzip, snappy, lz4 and zstd."""
    missing = [
        name
        for name, available in (
            ("gzip", codec.has_gzip()),
            ("snappy", codec.has_snappy()),
            ("lz4", codec.has_lz4()),
            ("zstd", codec.has_zstd()),
        )
        if not available
    ]
    if missing:
        raise ConfigError(
            f"Kafka compression codecs unavailable: {', '.join(missing)}; producers may use any codec, so "
            "the worker refuses to start without them (install cramjam: pip install cramjam)"
        )


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    kafka = settings.kafka
    return AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=f"{kafka.client_id}-admin",
        request_timeout_ms=10_000,
        **_security_kwargs(settings),
    )


def _security_kwargs(settings: Settings) -> dict[str, Any]:
    kafka = settings.kafka
    if kafka.security_protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        out.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password.get_secret_value(),
        )
    return out


async def _partitions(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int | None]:
    described = await admin.describe_topics(topics)
    out: dict[str, int | None] = {}
    for doc in described:
        name = doc.get("topic")
        if doc.get("error_code", 0) != 0 or not doc.get("partitions"):
            out[name] = None
        else:
            out[name] = len(doc["partitions"])
    return out


async def input_partitions(settings: Settings, timeout_s: float = 30.0) -> int:
    """The input topic's partition count.

    Raises:
        InfrastructureError: no broker answered within ``timeout_s``, or the topic does not exist.
    """
    admin = _admin(settings)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        counts = await asyncio.wait_for(_partitions(admin, [settings.topics.input]), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise InfrastructureError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers} within {timeout_s:.0f} s: {exc!r}"
        ) from exc
    finally:
        await admin.close()
    n = counts.get(settings.topics.input)
    if not n:
        raise InfrastructureError(
            f"input topic {settings.topics.input} does not exist: create it first "
            "(`emotion-stream topics`, or your own tooling)"
        )
    return n


async def align_changelog(settings: Settings, changelog: str, partitions: int, timeout_s: float = 30.0) -> str:
    """Give the cache changelog ``partitions`` partitions; returns what was done (``ok``, ``grown``,
    ``recreated``, ``absent``)."""
    admin = _admin(settings)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        current = (await _partitions(admin, [changelog])).get(changelog)
        if current is None or current == partitions:
            return "absent" if current is None else "ok"
        if current < partitions:
            _log.warning("cache changelog %s has %d partitions, the input %d: adding partitions", changelog,
                         current, partitions)  # fmt: skip
            await admin.create_partitions({changelog: NewPartitions(total_count=partitions)})
            return "grown"
        _log.warning("cache changelog %s has %d partitions, the input only %d: re-creating it (a cache; it "
                     "refills)", changelog, current, partitions)  # fmt: skip
        await admin.delete_topics([changelog])
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=changelog,
                            num_partitions=partitions,
                            replication_factor=settings.topics.replication_factor,
                            topic_configs={"cleanup.policy": "compact"},
                        )
                    ]
                )
                return "recreated"
            except TopicAlreadyExistsError:  # deletion still in progress
                await asyncio.sleep(0.5)
        raise InfrastructureError(f"could not re-create {changelog} within {timeout_s:.0f} s")
    finally:
        await admin.close()


async def prepare(settings: Settings, changelog: str | None) -> tuple[int, str | None]:
    """Codecs, the input's partition count, and the changelog aligned to it (when L2 is on)."""
    check_codecs()
    n = await input_partitions(settings)
    action = await align_changelog(settings, changelog, n) if changelog is not None else None
    return n, action
