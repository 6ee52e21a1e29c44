"""Topic administration for the demo, the tests and ``emotion-stream topics`` (aiokafka's admin client)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream_app.settings import Settings

__all__ = ["create_topics", "ensure_topics"]

_log = logging.getLogger(__name__)


async def create_topics(bootstrap_servers: str, names: list[str], partitions: int, replication_factor: int = 1) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="emotion-stream-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(name=n, num_partitions=partitions, replication_factor=replication_factor)
                        for n in missing
                    ]
                )
            _log.info("created topics %s with %d partitions", missing, partitions)
        # metadata can lag the creation by a moment; wait until every topic is visible
        for _ in range(100):
            if set(names) <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def ensure_topics(settings: Settings, bootstrap_servers: str | None = None) -> None:
    """Create the input, events, metrics and dead-letter topics of ``settings``."""
    t = settings.topics
    asyncio.run(
        create_topics(
            bootstrap_servers or settings.kafka.bootstrap_servers,
            [t.input, t.events, t.metrics, t.dead_letters],
            t.partitions,
            t.replication_factor,
        )
    )
