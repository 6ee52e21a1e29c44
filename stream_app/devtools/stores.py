"""An in-memory conversation state store, for benchmarks and tests that run the stage without Faust."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MemoryStateStore"]


class MemoryStateStore:
    """The conversation stage's ``StateStore`` (``stream_app.conversations.stage``) over dicts.

    The worker's store is a Faust RocksDB table partition with a changelog; this one holds everything in
    process memory and recovers nothing, so it measures and tests the stage alone.

    Args:
        changelog_topic: The topic the stage writes state changes to (names the store in its records).
        partitions: The partitions held here; None holds every partition asked for.
    """

    def __init__(self, changelog_topic: str, partitions: Iterable[int] | None = None) -> None:
        self.changelog_topic = changelog_topic
        self.held: set[int] | None = set(partitions) if partitions is not None else None
        self.data: dict[int, dict[bytes, bytes]] = {p: {} for p in self.held or ()}
        self.persisted: dict[int, int] = {}  # partition -> changelog offset applied locally

    def holds(self, partition: int) -> bool:
        return self.held is None or partition in self.held

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.data.get(partition, {}).get(key)

    def put_local(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.get(partition, {}).pop(key, None)
        else:
            self.data.setdefault(partition, {})[key] = value

    def set_persisted_offset(self, partition: int, offset: int) -> None:
        self.persisted[partition] = offset

    def items(self, partition: int) -> list[tuple[bytes, bytes]]:
        return list(self.data.get(partition, {}).items())

    def partitions(self) -> list[int]:
        return sorted(self.held if self.held is not None else self.data)
