"""The Faust and aiokafka internals stream_app/worker/faust_glue.py relies on, checked against the installed
versions: an upgrade that renames or reshapes one fails here, loudly, instead of in production."""

from __future__ import annotations

import inspect

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.consumer.fetcher import Fetcher, OffsetResetStrategy
from aiokafka.consumer.subscription_state import Assignment, TopicPartitionState
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.assignor.partition_assignor import PartitionAssignor
from faust.stores import STORES
from faust.stores.rocksdb import Store as RocksStore
from faust.tables.base import Collection
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Worker as ModeWorker

from stream_app.worker import faust_glue

pytestmark = pytest.mark.unit

VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}


def test_the_versions_the_glue_was_written_for() -> None:
    import importlib.metadata as md

    # Not a pin of the project (pyproject does that): a reminder to re-read faust_glue when they move.
    assert {name: md.version(name) for name in VERSIONS} == VERSIONS, (
        "faust-streaming or aiokafka changed: check every internal listed in stream_app/worker/faust_glue.py"
    )


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_consumer_internals_of_the_chunk_path() -> None:
    base = faust_consumer.Consumer
    assert inspect.iscoroutinefunction(base._drain_messages)
    assert _params(base._drain_messages) == ["self", "fetcher"]
    assert inspect.iscoroutinefunction(base._wait_next_records)
    assert _params(base._wait_next_records) == ["self", "timeout"]
    assert _params(faust_aiokafka.Consumer._to_message) == ["self", "tp", "record"]
    assert inspect.iscoroutinefunction(faust_consumer.ThreadDelegateConsumer._commit)
    assert _params(faust_consumer.ThreadDelegateConsumer._commit) == ["self", "offsets"]
    source = inspect.getsource(base.__init__)
    for attr in ("_read_offset", "_committed_offset", "_buffered_partitions"):
        assert f"self.{attr}" in source, attr
    assert "flow_active" in inspect.getsource(base)
    # the Fetcher service calls exactly this method, so overriding it takes over the loop
    assert "consumer._drain_messages(self)" in inspect.getsource(faust_consumer.Fetcher)


def test_the_consumer_thread_and_aiokafka_isolation_level() -> None:
    assert _params(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer) == ["self", "transport"]
    assert "self._isolation_level = isolation_level" in inspect.getsource(AIOKafkaConsumer.__init__)
    assert "isolation_level=self._isolation_level" in inspect.getsource(AIOKafkaConsumer.start)
    assert "_new_consumer_thread" in inspect.getsource(faust_aiokafka.Consumer)
    assert faust_aiokafka.Transport.Consumer is faust_aiokafka.Consumer


def test_aiokafka_state_read_for_lag_positions_and_partition_counts() -> None:
    assert "_tp_state" in inspect.getsource(Assignment) and hasattr(Assignment, "state_value")
    for name in ("has_valid_position", "position"):
        assert isinstance(inspect.getattr_static(TopicPartitionState, name), property), name
    assert "self.lso" in inspect.getsource(TopicPartitionState)
    assert "self._client" in inspect.getsource(AIOKafkaConsumer.__init__)
    assert "self._subscription" in inspect.getsource(AIOKafkaConsumer.__init__)


def test_the_app_hooks() -> None:
    assert _params(faust.App._new_transport) == ["self"]
    assert inspect.iscoroutinefunction(faust.App.on_start)
    assert "self.on_before_shutdown.send()" in inspect.getsource(faust.App.on_stop)
    # app.task / app.timer start only after the first table recovery: why the glue has early_tasks
    assert "_wait_for_table_recovery_completed" in inspect.getsource(faust.App.on_started)


def test_the_store_registry_and_rocksdb_store() -> None:
    assert hasattr(STORES, "aliases") and "rocksdb" in STORES.aliases
    url = faust_glue.register_store()
    assert STORES.by_url(url) is faust_glue.ConsistentRocksStore
    assert RocksStore.offset_key == b"__faust\x00offset__"
    for name in ("partition_path", "persisted_offset", "set_persisted_offset", "assign_partitions"):
        assert callable(getattr(RocksStore, name)), name
    assert _params(RocksStore.assign_partitions)[:3] == ["self", "table", "tps"]
    source = inspect.getsource(RocksStore.__init__)
    assert "self._dbs" in source and "self._key_index" in source


def test_the_table_and_assignor_internals() -> None:
    assert _params(Collection.send_changelog)[:4] == ["self", "partition", "key", "value"]
    assert isinstance(inspect.getattr_static(Collection, "changelog_topic_name"), property)
    assert "self._tps_url" in inspect.getsource(PartitionAssignor.__init__)
    assert "TP(topic, partition): url" in inspect.getsource(PartitionAssignor)


def test_the_recovery_internals_for_transactional_changelogs() -> None:
    source = inspect.getsource(Recovery)
    for name in ("active_highwaters", "active_offsets", "in_recovery", "detect_aborted_tx"):
        assert name in source, name
    # what Faust's changelog loop does once nothing remains, and only after its 5 s wait when no record comes
    for step in ("self.flush_buffers()", "self._set_recovery_ended()", "self.signal_recovery_end.set()",
                 "not self.need_recovery()", "changelog_queue.get(), timeout=5.0"):  # fmt: skip
        assert step in source, step
    assert "await self._wait(self.signal_recovery_end.wait())" in source
    assert "changelog_queue" in inspect.getsource(faust.tables.manager.TableManager)


def test_the_worker_signal_hook() -> None:
    assert _params(ModeWorker._schedule_shutdown) == ["self", "signal"]


def test_aiokafka_batch_api_used_by_the_sink() -> None:
    assert _params(AIOKafkaProducer.send_batch) == ["self", "batch", "topic", "partition"]
    assert _params(BatchBuilder.append) == ["self", "timestamp", "key", "value", "headers"]
    assert inspect.iscoroutinefunction(AIOKafkaProducer.send_offsets_to_transaction)
    assert "_txn_manager" in inspect.getsource(AIOKafkaProducer.__init__)


def test_what_places_a_newly_assigned_partition() -> None:
    """The start of a new partition is read from the broker through the consumer thread, and a position left
    past dropped records is moved with Faust's seek; aiokafka's seek_to_committed skips partitions without a
    committed offset (or with 0), which is why the glue replaces it and the worker checks the first record."""
    assert inspect.iscoroutinefunction(faust_consumer.Consumer.seek)
    assert _params(faust_consumer.Consumer.seek) == ["self", "partition", "offset"]
    assert inspect.iscoroutinefunction(faust_consumer.ThreadDelegateConsumer.earliest_offsets)
    assert inspect.iscoroutinefunction(faust_aiokafka.AIOKafkaConsumerThread.call_thread)
    assert "_ensure_consumer" in dir(faust_aiokafka.AIOKafkaConsumerThread)
    assert inspect.iscoroutinefunction(AIOKafkaConsumer.committed)
    assert _params(AIOKafkaConsumer.committed) == ["self", "partition"]
    assert "if offset and offset > 0:" in inspect.getsource(AIOKafkaConsumer.seek_to_committed)


def test_the_seek_after_a_rebalance_goes_through_the_glue() -> None:
    """Recovery seeks stream partitions with ``perform_seek``, which reaches the consumer thread's
    ``seek_to_committed``; the glue's thread replaces that one (aiokafka's skips partitions without a
    committed offset, or at 0, and Faust dropped what it fetched for them meanwhile)."""
    assert "consumer.perform_seek()" in inspect.getsource(Recovery._resume_streams)
    assert "await self.seek_to_committed()" in inspect.getsource(faust_consumer.Consumer.perform_seek)
    assert "self._thread.seek_to_committed()" in inspect.getsource(
        faust_consumer.ThreadDelegateConsumer.seek_to_committed
    )
    assert "seek_to_committed" in vars(faust_aiokafka.AIOKafkaConsumerThread)
    assert "seek_to_committed" in vars(faust_glue.EmotionConsumerThread)
    assert issubclass(faust_glue.EmotionConsumerThread, faust_aiokafka.AIOKafkaConsumerThread)
    assert inspect.iscoroutinefunction(AIOKafkaConsumer.seek_to_committed)
    assert _params(AIOKafkaConsumer.seek_to_committed) == ["self", "partitions"]
    for method in (AIOKafkaConsumer.beginning_offsets, AIOKafkaConsumer.end_offsets):
        assert inspect.iscoroutinefunction(method)
        assert _params(method) == ["self", "partitions"]
    assert _params(AIOKafkaConsumer.seek) == ["self", "partition", "offset"]
    assert "self._default_reset_strategy = " in inspect.getsource(Fetcher.__init__)
    assert {OffsetResetStrategy.EARLIEST, OffsetResetStrategy.LATEST} <= set(vars(OffsetResetStrategy).values())


def test_the_generation_a_chunk_is_checked_against() -> None:
    """The app's ``consumer_generation_id`` is set at every assignment (before the recovery and its seek),
    and Faust's own streams drop a message of another generation, as the chunk handler does."""
    from faust.streams import Stream
    from faust.types.app import AppT

    assert "app.consumer_generation_id = generation" in inspect.getsource(faust_aiokafka.ConsumerRebalanceListener)
    assert "message.generation_id != self.app.consumer_generation_id" in inspect.getsource(Stream)
    assert AppT.consumer_generation_id == 0
    drain = inspect.getsource(faust_glue.EmotionConsumer._drain_messages)
    assert "generation = self.app.consumer_generation_id" in drain


def test_the_livelock_detector_the_glue_guards() -> None:
    """Faust's livelock detector reaches the thread's ``verify_event_path``, which reads aiokafka's
    ``position`` (an assertion when there is none); the glue's thread checks ``has_valid_position`` first."""
    assert "self.verify_event_path(now, tp)" in inspect.getsource(faust_consumer.Consumer.verify_all_partitions_active)
    assert "self._thread.verify_event_path(now, tp)" in inspect.getsource(faust_aiokafka.Consumer.verify_event_path)
    assert "tp_state.position" in inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread.verify_event_path)
    assert "verify_event_path" in vars(faust_glue.EmotionConsumerThread)
    assert "assert self._position is not None" in inspect.getsource(TopicPartitionState)
    assert isinstance(TopicPartitionState.has_valid_position, property)
    assert _params(Assignment.state_value) == ["self", "tp"]
    assert "self._subscription = " in inspect.getsource(AIOKafkaConsumer.__init__)


def test_the_producer_metadata_the_sink_names_its_topics_in() -> None:
    """KafkaSink names every topic it produces to (aiokafka narrows metadata to named topics once one is)."""
    from aiokafka.client import AIOKafkaClient

    assert _params(AIOKafkaClient.set_topics) == ["self", "topics"]
    assert "self._topics = set(topics)" in inspect.getsource(AIOKafkaClient.set_topics)
    assert "self._topics.add(topic)" in inspect.getsource(AIOKafkaClient.add_topic)
