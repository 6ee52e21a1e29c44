"""One typed, frozen settings object for the whole worker.

Every field reads from the environment with the prefix ``EMOTION_STREAM_`` and ``__`` between a group
and its field, e.g. ``EMOTION_STREAM_BATCHING__MAX_WAIT_MS=10``. Settings are loaded and validated once
at start-up (:func:`load_settings`); components receive plain typed values, never this object's
environment lookups.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "BatchingSettings",
    "CacheSettings",
    "ConversationSettings",
    "DataSettings",
    "KafkaSettings",
    "MetricsSettings",
    "ModelSettings",
    "SaslMechanism",
    "SecurityProtocol",
    "Settings",
    "TopicSettings",
    "TracingSettings",
    "WorkerSettings",
    "default_cache_dir",
    "load_settings",
    "settings_reference",
]


def default_cache_dir() -> Path:
    """Where built artefacts (model folders, Kafka jars, venvs) live: outside the repository."""
    explicit = os.environ.get("EMOTION_STREAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emotion-stream"


def _default_data_dir() -> Path:
    """The GoEmotions Ekman folder beside the checkout (``../shared/data/goemotions-ekman``)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "goemotions-ekman"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(_Group):
    """How to reach and authenticate to the cluster.

    Every Kafka client of this project (the worker, ``emotion-stream topics``, the demo, replay and the
    tests' clients) is configured from this group through :mod:`stream_app.kafka_config`, so a
    security setting means the same thing everywhere. Combinations that cannot work, or settings that
    the chosen ``security_protocol`` would silently ignore, are refused when the settings load.
    """

    bootstrap_servers: str = Field(
        "",
        description="Kafka bootstrap servers, comma-separated host:port. Empty means: the demo starts a "
        "local Apache Kafka on loopback; the worker refuses to start without it.",
    )
    client_id: str = Field("emotion-stream", description="Client id sent to the brokers (appears in broker logs).")
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT",
        description="Kafka security.protocol. PLAINTEXT: no encryption, no authentication (a private "
        "network only). SSL: TLS encryption, the broker proven by its certificate, the client optionally by "
        "ssl_certfile (mutual TLS). SASL_SSL: TLS plus a SASL user and password; the usual choice for a "
        "shared or managed cluster. SASL_PLAINTEXT: SASL without TLS; with mechanism PLAIN the password "
        "crosses the network in clear text.",
    )
    sasl_mechanism: SaslMechanism = Field(
        "PLAIN",
        description="Kafka sasl.mechanism for SASL_*. PLAIN sends the password itself (safe only inside "
        "TLS); SCRAM-SHA-256/512 prove it by challenge-response, so a captured exchange does not reveal "
        "it, at the cost of a user the broker must know as a SCRAM credential.",
    )
    sasl_username: str = Field("", description="SASL user name; required with SASL_*, refused without.")
    sasl_password: SecretStr = Field(
        SecretStr(""), description="SASL password (never logged); required with SASL_*, refused without."
    )
    ssl_cafile: Path | None = Field(
        None,
        description="PEM file of the CA certificate(s) that signed the brokers' certificates (Kafka "
        "ssl.truststore.location with a PEM truststore; librdkafka ssl.ca.location). Unset: the system's "
        "trust store, right for a public CA; a private CA must be named here.",
    )
    ssl_certfile: Path | None = Field(
        None,
        description="PEM client certificate chain for mutual TLS (Kafka ssl.keystore.location; librdkafka "
        "ssl.certificate.location); it may also hold the key. Only for brokers that authenticate clients "
        "by certificate (ssl.client.auth=required).",
    )
    ssl_keyfile: Path | None = Field(
        None,
        description="PEM private key of ssl_certfile when it is not in that file (librdkafka "
        "ssl.key.location). Keep it readable by the worker's user only.",
    )
    ssl_key_password: SecretStr = Field(
        SecretStr(""),
        description="Password of an encrypted ssl_keyfile (Kafka ssl.key.password; never logged). Empty: "
        "the key is not encrypted, and file permissions alone protect it.",
    )
    ssl_check_hostname: bool = Field(
        True,
        description="Check that each broker's certificate names the host connected to (Kafka "
        "ssl.endpoint.identification.algorithm=https, its default). Turning it off (Kafka's empty value) "
        "still verifies the certificate chain against ssl_cafile, but any holder of a certificate from that "
        "CA can then impersonate a broker; only for certificates without the brokers' names.",
    )
    admin_timeout_s: float = Field(
        15.0,
        gt=0,
        description="Longest `emotion-stream topics` and the start-up topic checks wait for the cluster "
        "(connect, authenticate, metadata, topic creation) before failing with a one-line error (Kafka's "
        "default.api.timeout.ms for admin calls). Shorter fails fast on a wrong address; too short fails "
        "on a slow or distant cluster.",
    )
    session_timeout_s: float = Field(
        10.0,
        ge=6.0,
        description="Consumer group session timeout (Kafka session.timeout.ms in seconds). Lower detects a "
        "dead worker sooner and rebalances faster, but risks false evictions under GC or load.",
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="Consumer heartbeat interval; must be well under session_timeout_s."
    )
    producer_linger_ms: int = Field(
        2,
        ge=0,
        description="Producer linger.ms: waiting longer packs more events per request (throughput) at the "
        "cost of that much added latency.",
    )
    producer_acks: Literal["all", "1"] = Field(
        "all", description="Producer acks. 'all' is what makes 'acknowledged by the broker' mean durable."
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none",
        description="Kafka compression.type of what the worker produces. lz4 and zstd cut network and disk "
        "several-fold for JSON events at a little producer CPU; 'none' is cheapest on loopback. Input in "
        "any codec is always read (all five are checked at start-up).",
    )
    max_request_size_bytes: int = Field(
        1024 * 1024,
        ge=64 * 1024,
        description="Producer max.request.size, and the bound every dead letter is built under (its raw "
        "key and value are cut to fit). Keep it at or below the broker's and topics' max.message.bytes.",
    )
    max_poll_records: int = Field(
        2048,
        ge=1,
        description="Most records one fetch hands the pipeline (Kafka max.poll.records). Larger chunks "
        "amortise per-chunk work under a backlog; the in-flight bound still applies.",
    )
    metadata_max_age_s: float = Field(
        30.0,
        gt=0,
        description="Consumer metadata.max.age.ms in seconds: how soon partitions added to the input topic "
        "are noticed and consumed. Lower notices sooner at the cost of a metadata request that often.",
    )
    commit_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often acknowledged input offsets are committed. Longer commits less often but "
        "re-processes more messages after a crash (at-least-once).",
    )
    unavailable_timeout_s: float = Field(
        120.0,
        gt=0,
        description="The worker stops (non-zero exit, for its supervisor to restart it) when no broker "
        "answered for this long. Readiness turns 503 much sooner; this bounds how long a worker sits "
        "cut off holding partitions.",
    )

    @property
    def uses_ssl(self) -> bool:
        """True when connections are TLS-encrypted (SSL or SASL_SSL)."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        """True when connections authenticate with SASL (SASL_PLAINTEXT or SASL_SSL)."""
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSettings:
        problems = []
        protocol = f"security_protocol={self.security_protocol}"
        if self.uses_sasl:
            if not self.sasl_username:
                problems.append(f"{protocol} needs sasl_username (EMOTION_STREAM_KAFKA__SASL_USERNAME)")
            if not self.sasl_password.get_secret_value():
                problems.append(f"{protocol} needs sasl_password (EMOTION_STREAM_KAFKA__SASL_PASSWORD)")
        elif self.sasl_username or self.sasl_password.get_secret_value():
            problems.append(
                f"sasl_username/sasl_password are set but {protocol} does not use SASL, so they would be "
                "ignored; use SASL_SSL (or SASL_PLAINTEXT) or unset them"
            )
        if not self.uses_ssl:
            ignored = [
                name
                for name, value in (
                    ("ssl_cafile", self.ssl_cafile),
                    ("ssl_certfile", self.ssl_certfile),
                    ("ssl_keyfile", self.ssl_keyfile),
                    ("ssl_key_password", self.ssl_key_password.get_secret_value()),
                )
                if value
            ]
            if ignored:
                problems.append(
                    f"{', '.join(ignored)} set but {protocol} does not use TLS, so they would be ignored; use "
                    "SSL or SASL_SSL or unset them"
                )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            problems.append("ssl_keyfile needs ssl_certfile (the certificate that key belongs to)")
        if self.ssl_key_password.get_secret_value() and self.ssl_certfile is None:
            problems.append("ssl_key_password needs ssl_certfile (and ssl_keyfile unless the key is in it)")
        problems += _bootstrap_problems(self.bootstrap_servers)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _bootstrap_problems(servers: str) -> list[str]:
    """What is wrong with a comma-separated host:port list (empty is allowed: the demo starts a broker)."""
    if not servers.strip():
        return []
    problems = []
    for entry in servers.split(","):
        entry = entry.strip()
        host, sep, port = entry.rpartition(":")
        if not entry or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"bootstrap_servers entry {entry!r} is not host:port")
    return problems


class TopicSettings(_Group):
    input: str = Field("chat.messages.v1", description="Topic of chat_message.v1 records (key = conversation_id).")
    events: str = Field("emotion.events.v1", description="Topic of emotion_event.v1 records (key = conversation_id).")
    metrics: str = Field("emotion.metrics.v1", description="Topic of stage_metrics.v1 records, one per batch.")
    dead_letters: str = Field("chat.messages.dlq.v1", description="Topic of dead_letter.v1 records.")
    partitions: int = Field(
        4,
        ge=1,
        description="Partitions used when this process creates the topics (demo, tests). More partitions "
        "allow more workers in the group; the cache table is co-partitioned with the input.",
    )
    replication_factor: int = Field(1, ge=1, description="Replication factor for topics this process creates.")
    conversations: str = Field(
        "emotion.conversations.v1",
        description="Topic of conversation_state.v1 records (key = conversation_id; compaction suits it: the "
        "latest state per conversation).",
    )
    alerts: str = Field("emotion.alerts.v1", description="Topic of escalation.v1 records (key = conversation_id).")


class BatchingSettings(_Group):
    max_batch_size: int = Field(
        64, ge=1, description="Most messages in one inference batch. Larger raises throughput and latency."
    )
    max_batch_tokens: int = Field(
        2048,
        ge=1,
        description="Padded-token budget of one batch (longest sequence x batch size), as in "
        "text-embeddings-inference. Bounds memory and batch time independently of message count. On 2 CPU "
        "cores 1,024-2,048 is the sweet spot (4,096 cost INT8 a third of its throughput); a GPU wants far "
        "more (adaptive grows it toward the latency target).",
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        description="While a batch is being inferred, the next one starts at the latest this long after "
        "its oldest message arrived (earlier when full). An idle engine never waits: a lone message runs "
        "at once. Lower cuts latency at moderate load; higher packs fuller batches.",
    )
    queue_capacity: int = Field(
        4096,
        ge=1,
        description="Most messages read from Kafka and not yet acknowledged by the broker (queued, in "
        "batches or being produced). At the bound the consumer waits (backpressure) instead of growing "
        "memory; larger absorbs bursts and fills batches, but more is re-read after a crash.",
    )
    group_by_length: bool = Field(
        True, description="Fill a batch with messages of similar token length to cut padding."
    )
    adaptive: bool = Field(
        True,
        description="Adapt the token budget to keep batch time under target_batch_p99_ms (and within free "
        "device memory on a GPU).",
    )
    target_batch_p99_ms: float = Field(
        100.0,
        gt=0,
        description="Latency target for one batch's inference when adaptive is on. Too low shrinks batches "
        "below where the engine is efficient, which lowers throughput and lengthens queues under load.",
    )
    min_batch_tokens: int = Field(
        1024,
        ge=1,
        description="Lower bound of the adaptive token budget: keeps batches large enough to be efficient "
        "even when a busy machine slows single batches down.",
    )
    max_batch_tokens_ceiling: int = Field(16384, ge=1, description="Upper bound of the adaptive token budget.")
    concurrent_batches: int = Field(
        0,
        ge=0,
        le=16,
        description="Batches the engine runs at once, each in its own thread (ONNX Runtime and PyTorch are "
        "thread-safe). 0 = 2 on a CPU, 1 on CUDA. On 2 cores, two single-threaded batches drained 1,004 "
        "msg/s against 672 for one two-threaded batch at a time (single runs; benchmarks/host_ceiling.py "
        "--engine real --variants worker,worker-batch1 compares the two in alternating rounds): no fork-join "
        "inside a batch, and one core keeps computing while the other batch waits on the event loop. A "
        "second batch starts only when full or aged (max_wait_ms).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> BatchingSettings:
        if not self.min_batch_tokens <= self.max_batch_tokens <= self.max_batch_tokens_ceiling:
            raise ValueError("need min_batch_tokens <= max_batch_tokens <= max_batch_tokens_ceiling")
        return self


class ModelSettings(_Group):
    path: str = Field(
        "",
        description="A Hugging Face sequence-classification checkpoint: a local folder or a hub id. Empty "
        "means the model built by `emotion-stream model build` in the cache directory.",
    )
    engine: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="Inference engine: 'torch' (PyTorch), 'onnx', 'onnx-int8' (ONNX Runtime), or 'auto', which "
        "picks the fastest available engine that passes the parity check against PyTorch, and falls back to "
        "PyTorch if it fails to load or run.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run the model; 'auto' uses CUDA when it is available."
    )
    gpu_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision of the PyTorch engine on CUDA (CPU always runs float32)."
    )
    max_length_tokens: int = Field(
        128,
        ge=8,
        le=512,
        description="Token limit per message; longer texts are truncated or rejected. Part of the cache key: "
        "after a change, results cached under the old limit are not used (the L2 fills again).",
    )
    overlong: Literal["truncate", "reject"] = Field(
        "truncate",
        description="What to do with a text over max_length_tokens: truncate (and say so in the event) or "
        "send it to the dead-letter topic.",
    )
    max_text_chars: int = Field(
        10_000,
        ge=1,
        description="Texts longer than this (in characters) are cut to it before tokenisation when overlong="
        "'truncate', or dead-lettered when 'reject'; bounds the tokenizer's work on huge texts.",
    )
    max_message_bytes: int = Field(
        256 * 1024, ge=1024, description="Raw messages larger than this are dead-lettered without decoding."
    )
    num_threads: int = Field(
        0,
        ge=0,
        description="CPU intra-op threads per batch (torch/ONNX). 0 = (cores - 1) / concurrent_batches, at "
        "least 1: the consumer, tokenizer and producer need a core.",
    )
    cpu_spin_wait: bool = Field(
        False,
        description="Let idle ONNX Runtime CPU threads spin-wait between batches: slightly lower latency on a "
        "dedicated many-core machine, but on a small or shared one it starves the consumer and tokenizer.",
    )
    parity_min_top1_agreement: float = Field(
        0.97,
        ge=0,
        le=1,
        description="Engine parity gate: least top-1 agreement with PyTorch on the sample; a changed label "
        "where PyTorch's own top two were within parity_max_prob_diff counts as a near tie, not a miss.",
    )
    parity_max_prob_diff: float = Field(
        0.1, ge=0, le=1, description="Engine parity gate: largest absolute probability difference allowed."
    )
    parity_sample_size: int = Field(64, ge=1, description="Texts in the fixed parity sample.")


class CacheSettings(_Group):
    l1_enabled: bool = Field(True, description="In-process LRU of results, shared by all partitions.")
    l1_max_entries: int = Field(50_000, ge=1, description="Most entries in the L1 LRU (about 200 B each).")
    l1_ttl_s: float = Field(3600.0, gt=0, description="Seconds an L1 entry stays valid.")
    l2_enabled: bool = Field(
        True, description="RocksDB-backed Faust table of results, with a changelog; survives restarts."
    )
    l2_ttl_s: float = Field(86_400.0, gt=0, description="Seconds an L2 entry stays valid.")
    l2_max_entries_per_partition: int = Field(
        200_000, ge=1, description="Bound of L2 entries per input partition; the sweeper evicts beyond it."
    )
    admission: Literal["always", "second_sighting"] = Field(
        "second_sighting",
        description="L2 admission: 'second_sighting' admits a text only once it was seen twice recently "
        "(a small frequency sketch), so one-off texts do not evict popular ones.",
    )
    sweep_interval_s: float = Field(60.0, gt=0, description="How often expired L2 keys are deleted.")
    warm_file: Path | None = Field(
        None, description="Optional file of common phrases (one a line) inferred into L1 at start-up."
    )


class ConversationSettings(_Group):
    enabled: bool = Field(
        True,
        description="Keep a live state per conversation (window, decayed mood, dominant emotion, escalation "
        "rules) in a RocksDB table with a changelog, and produce conversation_state.v1 and escalation.v1. "
        "Costs some CPU per message and about 1 KB of table per active conversation.",
    )
    rules_file: Path | None = Field(
        None,
        description="TOML file of escalation rules (see docs/conversations.md); empty = the packaged default "
        "rules for support chats.",
    )
    window_s: float = Field(
        300.0, gt=0, description="Event-time length of the label-distribution window: longer is steadier, slower."
    )
    window_pane_s: float = Field(
        30.0,
        gt=0,
        description="The window slides by panes of this width: smaller gives a sharper edge but a larger state "
        "(at most 255 panes per window).",
    )
    allowed_lateness_s: float = Field(
        60.0,
        ge=0,
        description="A message sent this much before the conversation's latest event time still counts in its "
        "window; later ones are counted and ignored. Larger accepts slower clients, but a late message can "
        "change a picture already emitted.",
    )
    mood_half_life_s: float = Field(
        120.0, gt=0, description="Half-life of the decayed mood: shorter reacts faster, with more dominant flips."
    )
    recent_messages: int = Field(
        10, ge=1, le=255, description="Recent messages kept as evidence: the main driver of state size."
    )
    dominant_min_margin: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Mood-share lead a label needs to take over as the dominant emotion: lower reacts sooner, "
        "but near ties flip and emit.",
    )
    emit_interval_s: float = Field(
        60.0,
        ge=0,
        description="At most one conversation_state.v1 per conversation per this many seconds besides dominant "
        "changes (0: on every message); shorter keeps consumers fresher at more records.",
    )
    ttl_s: float = Field(
        86_400.0,
        gt=0,
        description="A conversation idle this long is deleted (a tombstone reaches the changelog): bounds memory "
        "and disk whatever the number of conversations; longer keeps episodes across long pauses.",
    )
    sweep_interval_s: float = Field(60.0, gt=0, description="How often idle conversations are looked for.")
    max_future_skew_s: float = Field(
        60.0,
        ge=0,
        description="A sent_at further ahead of the worker's clock is taken as the worker's time, so one bad "
        "client clock cannot make the conversation's later messages late.",
    )


class MetricsSettings(_Group):
    host: str = Field("127.0.0.1", description="Address of the Prometheus /metrics endpoint.")
    port: int = Field(9108, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")
    profile_sample_interval_s: float = Field(
        1.0, gt=0, description="How often the profiler samples CPU, memory and GPU (off the hot path)."
    )


class WorkerSettings(_Group):
    app_id: str = Field(
        "emotion-stream",
        description="Faust app id = Kafka consumer group; also prefixes the table changelog.",
    )
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this worker in stage metrics and events.",
    )
    state_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "state",
        description="Where the RocksDB tables live; one folder per worker (RocksDB takes a lock).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        description="Python's GIL switch interval in the worker. The tokenizer and engine threads need the "
        "GIL back when their native work ends; Python's default 5 ms adds up to that much to every batch.",
    )
    tokenizer_threads: int = Field(
        0,
        ge=0,
        description="Threads of the Rust tokenizer's pool (RAYON_NUM_THREADS, unless already set); 0 = "
        "min(4, cores). On a 16-core GPU host a pool on every core slowed the inference thread's kernel "
        "launches: fp16 p99 batch time 64 ms with all 16 cores vs 17 ms with 4 (benchmarks/gpu.py).",
    )

    advertised_url: str = Field(
        "",
        description="How other workers reach this one's HTTP port (metrics, probes, GET /conversations/{id}), "
        "e.g. http://10.0.3.7:9108; a request for a conversation held elsewhere is forwarded there. Empty = "
        "http://<hostname>:<metrics port>; on Kubernetes set it from the pod IP.",
    )
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="at_least_once: outputs are produced, then offsets committed; after a crash some "
        "outputs are produced again (same event_id). exactly_once: each partition's outputs, state "
        "changelog writes and consumed offsets are committed in one Kafka transaction (a transactional "
        "producer per input partition, zombies fenced), so read_committed consumers see every outcome "
        "once; costs a transaction per partition and flush (see docs/exactly-once.md).",
    )
    shutdown_timeout_s: float = Field(
        15.0,
        gt=0,
        description="Once the worker decided to stop (SIGTERM, SIGINT, a crash, a lost broker) the process "
        "exits within this long whatever state Faust and the broker are in; unacknowledged work stays "
        "uncommitted. Keep it under the supervisor's grace period (Kubernetes: 30 s by default).",
    )
    revoke_timeout_s: float = Field(
        5.0,
        gt=0,
        description="On a rebalance, how long revoked partitions' in-flight messages may finish and be "
        "committed before the rest is left to the next owner (re-read, at-least-once). Longer means fewer "
        "duplicates but a slower rebalance; keep it well under session_timeout_s.",
    )
    max_record_crashes: int = Field(
        3,
        ge=1,
        description="A record that was in native code (tokenizer, engine) each of this many times the "
        "process died is dead-lettered (reason crash_loop) instead of crash-looping its partition. "
        "Counted per worker in <state_dir>/crash-ledger.json; suspects are processed alone.",
    )

    def resolved_tokenizer_threads(self) -> int:
        """``tokenizer_threads``, with 0 resolved against this machine's cores."""
        return self.tokenizer_threads or min(4, os.cpu_count() or 1)


class DataSettings(_Group):
    goemotions_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder with the GoEmotions Ekman train.tsv, dev.tsv and labels.txt.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Cache for built models, Kafka jars and other artefacts (outside the repository).",
    )


class TracingSettings(_Group):
    """OpenTelemetry spans per inference batch (off unless ``otlp_endpoint`` is set).

    Names follow OpenTelemetry's own variables (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME``,
    ``OTEL_BSP_MAX_QUEUE_SIZE``), with units in the names.
    """

    otlp_endpoint: str = Field(
        "",
        description="OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces (OpenTelemetry's "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Empty: tracing is off and OpenTelemetry is not even imported. "
        "Set: one span per inference batch, linked to the trace context (traceparent) of each message in "
        "it, exported in the background; costs a span and its links per batch, never a wait on the exporter.",
    )
    otlp_headers: SecretStr = Field(
        SecretStr(""),
        description="Headers sent with each export, 'key1=value1,key2=value2' (OTEL_EXPORTER_OTLP_HEADERS), "
        "e.g. a collector's API key; never logged.",
    )
    otlp_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest one export may take (OTEL_EXPORTER_OTLP_TIMEOUT, in seconds here). When the "
        "worker stops, the last spans get at most 5 s of that.",
    )
    service_name: str = Field(
        "emotion-stream",
        description="service.name of the spans (OTEL_SERVICE_NAME); the worker id is service.instance.id.",
    )
    max_queue_spans: int = Field(
        2048,
        ge=1,
        description="Spans waiting for export (OTEL_BSP_MAX_QUEUE_SIZE). Beyond it new spans are dropped, "
        "never buffered without bound: a slow or absent collector costs spans, not memory or latency.",
    )


class Settings(BaseSettings):
    """Every setting of emotion-stream; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="EMOTION_STREAM_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    conversations: ConversationSettings = Field(default_factory=ConversationSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once, validate, and return the frozen settings."""
    return Settings(**overrides)


_DOC_DEFAULTS = {
    "WORKER__WORKER_ID": "<hostname>-<pid>",
    "WORKER__STATE_DIR": "<cache_dir>/state",
    "DATA__GOEMOTIONS_DIR": "../shared/data/goemotions-ekman",
    "DATA__CACHE_DIR": "~/.cache/emotion-stream (or $EMOTION_STREAM_CACHE_DIR)",
}


def settings_reference() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, in declaration order."""
    rows = []
    defaults = Settings.model_construct()
    for group_name in Settings.model_fields:
        group = getattr(defaults, group_name, None)
        if group is None:
            group = Settings.model_fields[group_name].get_default(call_default_factory=True)
        for field_name, info in type(group).model_fields.items():
            key = f"{group_name.upper()}__{field_name.upper()}"
            value = getattr(group, field_name)
            shown = "(empty)" if isinstance(value, SecretStr) or value == "" else str(value)
            rows.append((f"EMOTION_STREAM_{key}", _DOC_DEFAULTS.get(key, shown), info.description or ""))
    return rows
