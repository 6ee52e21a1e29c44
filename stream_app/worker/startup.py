"""What the worker checks and prepares before it joins the group.

* every Kafka codec is usable (a missing library is a start-up error, not a crash on the first batch);
* the input topic exists, and its real partition count is what the cache table gets
  (:func:`stream_app.topics.fetch_partition_counts`, the same call ``emotion-stream topics`` reports with);
* the cache changelog has the input's partition count: grown when the input grew, re-created when it
  has more (it is only a cache; its local copies are then discarded by the store's consistency check).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import codec
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from stream_app.errors import ConfigError, InfrastructureError
from stream_app.kafka_config import aiokafka_client_kwargs
from stream_app.settings import Settings
from stream_app.topics import app_topic_names, fetch_partition_counts

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


async def input_partitions(settings: Settings) -> int:
    """The input topic's partition count, after checking every topic the worker writes to exists.

    Raises:
        InfrastructureError, ConfigError: the cluster cannot be used (one-line reason), or the input topic or
            an output topic does not exist (the worker never creates them: their partition counts and
            retention are the operator's choice).
    """
    names = app_topic_names(settings)
    counts = await fetch_partition_counts(settings.kafka, names)
    missing = [name for name in names if not counts.get(name)]
    if missing:
        raise InfrastructureError(
            f"topic(s) {', '.join(missing)} do not exist: create them first "
            "(`emotion-stream topics`, or your own tooling)"
        )
    n = counts[settings.topics.input]
    assert n is not None
    return n


async def align_changelog(settings: Settings, changelog: str, partitions: int, *, disposable: bool = True) -> str:
    """Give a table changelog ``partitions`` partitions; returns what was done (``ok``, ``grown``,
    ``recreated``, ``absent``, ``kept``).

    Fewer partitions than the input: partitions are added (existing ones keep their records). More: a
    ``disposable`` changelog (the cache) is re-created; a state changelog is kept as it is, with a warning
    (its partitions can no longer follow the input's; re-create it deliberately if that is wanted).
    """
    current = (await fetch_partition_counts(settings.kafka, [changelog])).get(changelog)
    if current is None or current == partitions:
        return "absent" if current is None else "ok"
    if current > partitions and not disposable:
        _log.warning("state changelog %s has %d partitions, the input only %d: keeping it; states of "
                     "partitions the input lacks are never read", changelog, current, partitions)  # fmt: skip
        return "kept"
    timeout_s = settings.kafka.admin_timeout_s
    admin = AIOKafkaAdminClient(
        **aiokafka_client_kwargs(settings.kafka, client_id=f"{settings.kafka.client_id}-admin"),
        request_timeout_ms=int(timeout_s * 1000),
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        if current < partitions:
            _log.warning("table changelog %s has %d partitions, the input %d: adding partitions", changelog,
                         current, partitions)  # fmt: skip
            await admin.create_partitions({changelog: NewPartitions(total_count=partitions)})
            return "grown"
        _log.warning("cache changelog %s has %d partitions, the input only %d: re-creating it (a cache; it "
                     "refills)", changelog, current, partitions)  # fmt: skip
        await admin.delete_topics([changelog])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=changelog,
                        num_partitions=partitions,
                        replication_factor=settings.topics.replication_factor,
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ]
            )
            code = response.topic_errors[0][1]
            if code == 0:
                return "recreated"
            if for_code(code) is not TopicAlreadyExistsError:
                raise InfrastructureError(f"cannot re-create {changelog}: {for_code(code).message}")
            await asyncio.sleep(0.5)  # the deletion is still in progress
        raise InfrastructureError(f"could not re-create {changelog} within {timeout_s:.0f} s")
    finally:
        await admin.close()


async def prepare(
    settings: Settings, cache_changelog: str | None, state_changelog: str | None = None
) -> tuple[int, str | None]:
    """Codecs, the topics and the input's partition count, and the table changelogs aligned to it.

    Returns the input's partition count and what was done to the cache changelog (None without L2).
    """
    check_codecs()
    n = await input_partitions(settings)
    action = await align_changelog(settings, cache_changelog, n) if cache_changelog is not None else None
    if state_changelog is not None:
        await align_changelog(settings, state_changelog, n, disposable=False)
    return n, action
