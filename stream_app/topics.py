"""Topic administration: what ``emotion-stream topics`` does, and what the worker checks at start-up.

Production code (not a dev tool): it runs against the user's cluster with the user's security settings
(through :mod:`stream_app.kafka_config`), and every call is bounded by ``kafka.admin_timeout_s``.

- :func:`fetch_partition_counts` (async) / :func:`partition_counts` (sync): each topic's real partition
  count, or None where it does not exist. It never creates a topic: a plain metadata request for a
  missing topic makes a broker with ``auto.create.topics.enable=true`` (Kafka's default) create it with
  the broker's default partition count, so missing names are found from the topic list first.
- :func:`ensure_topics`: creates the missing topics and reports, never silently ignores, existing ones
  whose partition count differs from the one asked for (:class:`TopicsReport`).

A cluster that cannot be used raises one exception with a one-line message that says why: nothing
listening, a name that does not resolve, no answer in time (:class:`~stream_app.errors.InfrastructureError`),
or a TLS certificate not trusted, a hostname mismatch, a TLS/plaintext mix-up, a SASL login refused
(:class:`~stream_app.errors.ConfigError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)

from stream_app.errors import ConfigError, EmotionStreamError, InfrastructureError
from stream_app.kafka_config import KafkaTarget, aiokafka_auth, as_kafka_settings, describe_target
from stream_app.settings import KafkaSettings, Settings

__all__ = [
    "TopicsReport",
    "app_topic_names",
    "check_connection",
    "ensure_app_topics",
    "ensure_topics",
    "fetch_partition_counts",
    "partition_counts",
]

_log = logging.getLogger(__name__)
_TLS_CLOSE_GRACE_S = 0.2


@dataclass(frozen=True)
class TopicsReport:
    """What :func:`ensure_topics` found and did."""

    requested_partitions: int
    created: tuple[str, ...] = ()
    existing: dict[str, int] = field(default_factory=dict)
    """Topics that were already there, with their real partition counts."""

    @property
    def mismatched(self) -> dict[str, int]:
        """Existing topics whose partition count is not the one requested (left unchanged)."""
        return {name: n for name, n in self.existing.items() if n != self.requested_partitions}

    def lines(self) -> list[str]:
        """One human-readable line per topic."""
        out = [f"created {name} ({self.requested_partitions} partitions)" for name in self.created]
        for name, n in self.existing.items():
            note = "" if n == self.requested_partitions else f", not {self.requested_partitions}: left unchanged"
            out.append(f"exists  {name} ({n} partitions{note})")
        return out


def app_topic_names(settings: Settings) -> list[str]:
    """The input, events, metrics and dead-letter topics of ``settings``, and the conversation state and
    alert topics when conversation state is on."""
    t = settings.topics
    names = [t.input, t.events, t.metrics, t.dead_letters]
    if settings.conversations.enabled:
        names += [t.conversations, t.alerts]
    return names


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _hosts(kafka: KafkaSettings) -> list[tuple[str, int]]:
    hosts = []
    for entry in kafka.bootstrap_servers.split(","):
        entry = entry.strip().split("://", 1)[-1]
        host, _, port = entry.rpartition(":")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


async def _why_unusable(kafka: KafkaSettings, timeout_s: float) -> EmotionStreamError:
    """Connect to each bootstrap server alone to learn why bootstrapping failed (aiokafka only logs it)."""
    auth = aiokafka_auth(kafka)
    reasons: list[str] = []
    config_problem = False
    for host, port in _hosts(kafka):
        where = f"{host}:{port}"
        try:
            conn = await create_conn(host, port, request_timeout_ms=int(timeout_s * 1000), **auth)
        except ssl.SSLCertVerificationError as exc:
            config_problem = True
            hint = (
                "check ssl_check_hostname and the certificate's names"
                if "hostname" in (exc.verify_message or "").lower()
                else "check ssl_cafile"
            )
            reasons.append(f"{where}: the broker's TLS certificate was not accepted ({exc.verify_message}); {hint}")
        except ssl.SSLError as exc:
            config_problem = True
            reasons.append(
                f"{where}: TLS handshake failed ({_one_line(exc.reason or exc)}); is this a TLS listener "
                f"(security_protocol={kafka.security_protocol})?"
            )
        except SaslAuthenticationFailed as exc:
            config_problem = True
            reasons.append(
                f"{where}: SASL authentication failed for user {kafka.sasl_username!r} with "
                f"{kafka.sasl_mechanism}: {_one_line(exc)}"
            )
        except UnsupportedSaslMechanismError as exc:
            config_problem = True
            reasons.append(f"{where}: {_one_line(exc)}")
        except ConnectionRefusedError:
            reasons.append(f"{where}: connection refused (nothing listens there)")
        except socket.gaierror as exc:
            reasons.append(f"{where}: host name does not resolve ({exc.strerror})")
        except TimeoutError:
            reasons.append(f"{where}: no answer within {timeout_s:g} s")
        except (KafkaConnectionError, ConnectionResetError) as exc:
            # the broker hung up: typically TLS to a plaintext port or the reverse, or a listener that
            # requires a client certificate (ssl_certfile) that was not given
            config_problem = True
            reasons.append(
                f"{where}: the broker closed the connection ({type(exc).__name__}: {_one_line(exc)}); does "
                f"security_protocol={kafka.security_protocol} match this listener (TLS or not), and does it "
                "require a client certificate?"
            )
        except (OSError, KafkaError) as exc:
            reasons.append(f"{where}: {type(exc).__name__}: {_one_line(exc)}")
        else:
            conn.close()
            reasons.append(f"{where}: connects and authenticates, but the cluster metadata request failed")
    message = f"cannot use Kafka at {describe_target(kafka)}: {'; '.join(reasons)}"
    return ConfigError(message) if config_problem else InfrastructureError(message)


@contextlib.asynccontextmanager
async def _admin(kafka: KafkaSettings, timeout_s: float) -> AsyncIterator[AIOKafkaAdminClient]:
    if not kafka.bootstrap_servers:
        raise ConfigError("no Kafka bootstrap servers given (set EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS)")
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=f"{kafka.client_id}-admin",
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
        **aiokafka_auth(kafka),
    )
    try:
        try:
            await admin.start()
        except KafkaConnectionError:
            reason = await _why_unusable(kafka, timeout_s)
            # A refused TLS connection is closed with a TLS shutdown that takes a few loop turns; a
            # caller's loop that ended at once would leave its socket open until garbage collection.
            await asyncio.sleep(_TLS_CLOSE_GRACE_S)
            raise reason from None
        yield admin
    finally:
        await admin.close()


async def _bounded(kafka: KafkaSettings, timeout_s: float | None, what: str, work: Any) -> Any:
    """Run the coroutine ``work`` within the admin timeout; a timeout becomes a one-line error."""
    limit = kafka.admin_timeout_s if timeout_s is None else timeout_s
    try:
        async with asyncio.timeout(limit):
            return await work
    except TimeoutError:
        raise InfrastructureError(
            f"no answer from Kafka at {describe_target(kafka)} within {limit:g} s while {what} "
            "(kafka.admin_timeout_s; is the address right and the cluster up?)"
        ) from None
    except KafkaError as exc:
        raise InfrastructureError(
            f"Kafka at {describe_target(kafka)} failed while {what}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


async def check_connection(kafka: KafkaTarget, *, timeout_s: float | None = None) -> None:
    """Connect, authenticate and read the cluster metadata once; raise the reason when that fails."""
    settings = as_kafka_settings(kafka)

    async def work() -> None:
        async with _admin(settings, settings.admin_timeout_s if timeout_s is None else timeout_s) as admin:
            await admin.describe_cluster()

    await _bounded(settings, timeout_s, "connecting", work())


async def _counts(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, int | None]:
    listed = set(await admin.list_topics())
    counts: dict[str, int | None] = dict.fromkeys(names)
    present = [n for n in names if n in listed]
    if present:
        for desc in await admin.describe_topics(present):
            name, code = desc["topic"], desc["error_code"]
            if code and not desc.get("partitions"):
                error = for_code(code)
                raise (ConfigError if "AUTHORIZATION" in error.message else InfrastructureError)(
                    f"cannot describe topic {name!r}: {error.message}"
                )
            counts[name] = len(desc["partitions"])
    return counts


async def fetch_partition_counts(
    kafka: KafkaTarget, names: Sequence[str], *, timeout_s: float | None = None
) -> dict[str, int | None]:
    """The real partition count of each topic in ``names``; None for a topic that does not exist.

    Never creates a topic, even on a cluster with ``auto.create.topics.enable``. A topic the client is not
    authorized to see reads as missing (Kafka does not tell the two apart in a topic listing).

    Raises:
        ConfigError, InfrastructureError: the cluster cannot be used (one-line reason), or a topic
            cannot be described.
    """
    settings = as_kafka_settings(kafka)
    limit = settings.admin_timeout_s if timeout_s is None else timeout_s

    async def work() -> dict[str, int | None]:
        async with _admin(settings, limit) as admin:
            return await _counts(admin, names)

    result: dict[str, int | None] = await _bounded(settings, limit, "reading topic metadata", work())
    return result


def partition_counts(
    kafka: KafkaTarget, names: Sequence[str], *, timeout_s: float | None = None
) -> dict[str, int | None]:
    """:func:`fetch_partition_counts` for synchronous start-up code (runs its own event loop; call it before
    the worker's loop starts, never from inside a running loop)."""
    return asyncio.run(fetch_partition_counts(kafka, names, timeout_s=timeout_s))


def _raise_create_errors(response: Any) -> list[str]:
    """Topics the race lost to another creator; raise for any other per-topic error."""
    raced = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 and entry[2] else ""
        if code == 0:
            continue
        error = for_code(code)
        if error is TopicAlreadyExistsError:
            raced.append(name)
            continue
        kind = ConfigError if "AUTHORIZATION" in error.message or "INVALID" in error.message else InfrastructureError
        raise kind(f"cannot create topic {name!r}: {error.message}{f': {message}' if message else ''}")
    return raced


async def ensure_topics(
    kafka: KafkaTarget,
    names: Sequence[str],
    partitions: int,
    replication_factor: int = 1,
    *,
    timeout_s: float | None = None,
) -> TopicsReport:
    """Create the topics of ``names`` that do not exist with ``partitions`` partitions; report the rest.

    Existing topics are left unchanged, with their real partition counts in the report (see
    :attr:`TopicsReport.mismatched`: the caller decides whether a mismatch is an error). Returns once
    every topic is visible in the cluster metadata.

    Raises:
        ConfigError: bad credentials or TLS, a replication factor the cluster cannot meet, a missing ACL.
        InfrastructureError: the cluster cannot be reached, or did not finish within the timeout.
    """
    settings = as_kafka_settings(kafka)
    limit = settings.admin_timeout_s if timeout_s is None else timeout_s

    async def work() -> TopicsReport:
        async with _admin(settings, limit) as admin:
            counts = await _counts(admin, names)
            missing = [n for n in names if counts[n] is None]
            raced: list[str] = []
            if missing:
                response = await admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor) for n in missing]
                )
                raced = _raise_create_errors(response)
            # metadata can lag the creation by a moment; poll it (bounded by the outer timeout)
            counts = await _counts(admin, names)
            while None in counts.values():
                await asyncio.sleep(0.1)
                counts = await _counts(admin, names)
        created = tuple(n for n in missing if n not in raced)
        existing = {n: c for n, c in counts.items() if n not in created and c is not None}
        _log.debug("created topics %s with %d partitions", list(created), partitions)
        return TopicsReport(partitions, created, existing)

    report: TopicsReport = await _bounded(settings, limit, "creating topics", work())
    return report


def ensure_app_topics(
    settings: Settings,
    *,
    kafka: KafkaTarget | None = None,
    partitions: int | None = None,
    timeout_s: float | None = None,
) -> TopicsReport:
    """Create the input, events, metrics and dead-letter topics of ``settings`` (synchronous).

    ``kafka`` replaces ``settings.kafka`` (e.g. a local broker's address); ``partitions`` replaces
    ``settings.topics.partitions``.
    """
    return asyncio.run(
        ensure_topics(
            settings.kafka if kafka is None else kafka,
            app_topic_names(settings),
            partitions or settings.topics.partitions,
            settings.topics.replication_factor,
            timeout_s=timeout_s,
        )
    )
