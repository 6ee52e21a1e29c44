"""Start and stop a single-node Apache Kafka (KRaft) on loopback, for the demo and the tests.

The broker is the real Apache Kafka, resolved once from Maven Central into the cache folder
(``<cache>/kafka-<version>/libs``) by Maven, and run with the installed JDK (17+). Nothing here is
used when the user gives ``EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS``.

With a :class:`BrokerSecurity` the broker also listens with TLS and SASL, beside its PLAINTEXT listener
(which the demo and most tests keep using):

- ``SSL``: TLS with a certificate from a CA made at start-up; clients must present a certificate from
  the same CA (``ssl.client.auth=required``, i.e. mutual TLS);
- ``SASL_SSL`` and ``SASL_PLAINTEXT``: SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, one user per mechanism
  with a random password (SCRAM users are written at ``kafka-storage format`` time with ``--add-scram``).

:meth:`LocalKafka.client_settings` gives ready :class:`~stream_app.settings.KafkaSettings` for any
listener and user; :func:`kafka_env` turns those into ``EMOTION_STREAM_KAFKA__*`` variables for a child.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args

from pydantic import SecretStr

from stream_app.devtools.processes import terminate
from stream_app.devtools.tls import TlsFiles, make_certificates
from stream_app.errors import InfrastructureError
from stream_app.settings import KafkaSettings, SaslMechanism, SecurityProtocol

__all__ = [
    "KAFKA_CONNECTION_FIELDS",
    "KAFKA_VERSION",
    "BrokerSecurity",
    "LocalKafka",
    "SaslUser",
    "ensure_kafka_libs",
    "free_port",
    "kafka_env",
    "local_kafka",
    "without_kafka_connection",
]

KAFKA_VERSION = "4.4.0"
_log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_kafka_libs(cache_dir: Path) -> Path:
    """Resolve the Kafka jars with Maven into the cache once; later calls return at once."""
    libs = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise InfrastructureError(
            "Maven (mvn) is needed once to fetch Apache Kafka; install it or set bootstrap servers"
        )
    work = Path(tempfile.mkdtemp(prefix="kafka-pom-"))
    try:
        pom = resources.files("stream_app").joinpath("kafka/pom.xml").read_text()
        (work / "pom.xml").write_text(pom)
        staging = libs.with_name("libs.partial")
        shutil.rmtree(staging, ignore_errors=True)
        _log.info("resolving Apache Kafka %s from Maven Central into %s", KAFKA_VERSION, libs)
        proc = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy-dependencies",
                f"-Dkafka.version={KAFKA_VERSION}",
                f"-DoutputDirectory={staging}",
            ],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise InfrastructureError(f"mvn could not resolve Kafka: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.touch()
        return libs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _metadata_request_ok(host: str, port: int, timeout_s: float) -> bool:
    """True when the port answers a Kafka ApiVersions request (not merely a TCP connect)."""
    client_id = b"emotion-stream-probe"
    # ApiVersions v0: api_key=18, api_version=0, correlation_id=1, client_id (int16 len + bytes)
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            header = s.recv(4)
            if len(header) < 4:
                return False
            size = struct.unpack(">i", header)[0]
            payload = b""
            while len(payload) < size:
                chunk = s.recv(size - len(payload))
                if not chunk:
                    return False
                payload += chunk
            correlation_id, error_code = struct.unpack(">ih", payload[:6])
            return bool(correlation_id == 1 and error_code == 0)
    except OSError:
        return False


@dataclass(frozen=True)
class SaslUser:
    """A SASL user the local broker knows, for one mechanism."""

    mechanism: SaslMechanism
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BrokerSecurity:
    """TLS material and SASL users of a local broker's secure listeners."""

    certs: TlsFiles
    users: tuple[SaslUser, ...]

    @classmethod
    def generate(cls, folder: Path) -> BrokerSecurity:
        """Fresh certificates in ``folder`` and one user per SASL mechanism, each with a random password."""
        users = tuple(
            SaslUser(m, f"{m.lower().replace('-', '')}-user", secrets.token_urlsafe(16))
            for m in get_args(SaslMechanism)
        )
        return cls(make_certificates(folder), users)

    def user(self, mechanism: SaslMechanism) -> SaslUser:
        """The user of ``mechanism``."""
        return next(u for u in self.users if u.mechanism == mechanism)

    def properties(self) -> dict[str, str]:
        """Broker settings for the secure listeners (the listener lists themselves are the broker's)."""
        props = {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.certs.server_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.certs.ca_cert),
            "listener.name.ssl.ssl.client.auth": "required",
            "sasl.enabled.mechanisms": ",".join(get_args(SaslMechanism)),
        }
        plain = " ".join(f'user_{u.username}="{u.password}"' for u in self.users if u.mechanism == "PLAIN")
        for listener in ("sasl_ssl", "sasl_plaintext"):
            props[f"listener.name.{listener}.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};"
            )
            for mechanism in ("scram-sha-256", "scram-sha-512"):
                props[f"listener.name.{listener}.{mechanism}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        return props

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM users."""
        args = []
        for u in self.users:
            if u.mechanism.startswith("SCRAM"):
                args += ["--add-scram", f"{u.mechanism}=[name={u.username},password={u.password}]"]
        return args


@dataclass
class LocalKafka:
    """A running single-node broker+controller; use :func:`local_kafka` or :meth:`start`/:meth:`stop`."""

    libs: Path
    run_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    heap_mb: int = 512
    process: subprocess.Popen[bytes] | None = None
    security: BrokerSecurity | None = None
    """With it, the broker also listens on :attr:`secure_ports` (SSL, SASL_SSL, SASL_PLAINTEXT)."""
    secure_ports: dict[SecurityProtocol, int] = field(
        default_factory=lambda: {p: free_port() for p in ("SSL", "SASL_SSL", "SASL_PLAINTEXT")}
    )

    @property
    def bootstrap_servers(self) -> str:
        """The PLAINTEXT listener."""
        return f"127.0.0.1:{self.port}"

    @property
    def listeners(self) -> dict[SecurityProtocol, str]:
        """``host:port`` of every listener, by security protocol (PLAINTEXT only without security)."""
        found: dict[SecurityProtocol, str] = {"PLAINTEXT": self.bootstrap_servers}
        if self.security is not None:
            found |= {protocol: f"127.0.0.1:{port}" for protocol, port in self.secure_ports.items()}
        return found

    def bootstrap(self, protocol: SecurityProtocol = "PLAINTEXT", host: str = "127.0.0.1") -> str:
        """``host:port`` of the listener for ``protocol``."""
        if protocol == "PLAINTEXT":
            return f"{host}:{self.port}"
        if self.security is None:
            raise InfrastructureError(f"this local Kafka has no {protocol} listener (started without security)")
        return f"{host}:{self.secure_ports[protocol]}"

    def client_settings(
        self,
        protocol: SecurityProtocol = "PLAINTEXT",
        mechanism: SaslMechanism = "PLAIN",
        *,
        client_cert: bool = True,
        **overrides: Any,
    ) -> KafkaSettings:
        """Client settings that work against the listener for ``protocol`` (as user of ``mechanism`` for
        SASL, with the client certificate for SSL unless ``client_cert=False``); ``overrides`` replace
        any field, e.g. a wrong ``sasl_password`` or another ``ssl_cafile``."""
        values: dict[str, Any] = {"bootstrap_servers": self.bootstrap(protocol), "security_protocol": protocol}
        if self.security is not None and protocol in ("SSL", "SASL_SSL"):
            values["ssl_cafile"] = self.security.certs.ca_cert
            if protocol == "SSL" and client_cert:
                values["ssl_certfile"] = self.security.certs.client_cert
                values["ssl_keyfile"] = self.security.certs.client_key
                values["ssl_key_password"] = SecretStr(self.security.certs.client_key_password)
        if self.security is not None and protocol in ("SASL_SSL", "SASL_PLAINTEXT"):
            user = self.security.user(mechanism)
            values |= {"sasl_mechanism": mechanism, "sasl_username": user.username,
                       "sasl_password": SecretStr(user.password)}  # fmt: skip
        return KafkaSettings(**(values | overrides))

    def _listeners(self) -> dict[str, int]:
        listeners: dict[str, int] = {"PLAINTEXT": self.port}
        if self.security is not None:
            listeners.update({str(name): port for name, port in self.secure_ports.items()})
        return listeners

    def write_config(self) -> Path:
        """Write ``server.properties`` (and the log4j2 configuration) into :attr:`run_dir`; its path."""
        log_dirs = self.run_dir / "data"
        log_dirs.mkdir(parents=True, exist_ok=True)
        listeners = self._listeners()
        advertised = ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items())
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"{advertised},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": ",".join(f"{n}:{n}" for n in [*listeners, "CONTROLLER"]).replace(
                "CONTROLLER:CONTROLLER", "CONTROLLER:PLAINTEXT"
            ),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(log_dirs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "group.initial.rebalance.delay.ms": "0",
            "group.consumer.min.session.timeout.ms": "1000",
            "group.classic.min.session.timeout.ms": "1000",
            "auto.create.topics.enable": "false",
            "log.flush.interval.messages": "9223372036854775807",
            **(self.security.properties() if self.security is not None else {}),
        }
        cfg = self.run_dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = resources.files("stream_app").joinpath("kafka/log4j2.xml").read_text()
        (self.run_dir / "log4j2.xml").write_text(log4j)
        return cfg

    def _java(self, *args: str, heap: bool = False) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise InfrastructureError("a Java 17+ runtime is needed to run the local Kafka")
        opts = [
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.run_dir}",
        ]
        if heap:
            opts += [f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m", "-XX:+UseSerialGC"]
        return [java, *opts, "-cp", f"{self.libs}/*", *args]

    def start(self, timeout_s: float = 90.0) -> LocalKafka:
        """Start the broker; its storage is formatted on the first start only (a restart keeps the data)."""
        cfg = self.write_config()
        if not (self.run_dir / "data" / "meta.properties").exists():
            scram = self.security.format_args() if self.security is not None else []
            fmt = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", "--standalone", "-t", str(uuid.uuid4()), "-c", str(cfg), *scram
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise InfrastructureError(f"kafka storage format failed: {fmt.stderr[-2000:]}")
        out = (self.run_dir / "stdout.log").open("wb")
        # start_new_session: Ctrl-C in a terminal reaches us, and we stop the broker in order
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(cfg), heap=True),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.run_dir / "stdout.log").read_text(errors="replace")[-3000:]
                raise InfrastructureError(f"kafka exited with {self.process.returncode}: {tail}")
            if _metadata_request_ok("127.0.0.1", self.port, 1.0):
                _log.info("local Apache Kafka %s ready on %s", KAFKA_VERSION, self.bootstrap_servers)
                return self
            time.sleep(0.2)
        self.stop()
        raise InfrastructureError(f"kafka did not answer on {self.bootstrap_servers} within {timeout_s}s")

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            terminate(proc, timeout_s)


@contextlib.contextmanager
def local_kafka(
    cache_dir: Path, run_dir: Path | None = None, *, heap_mb: int = 512, secure: bool = False
) -> Iterator[LocalKafka]:
    """Run a local broker for the duration of the ``with`` block; its data folder is removed afterwards.

    ``secure=True`` adds the SSL, SASL_SSL and SASL_PLAINTEXT listeners, with certificates and users made
    now in ``<run_dir>/tls`` (see :class:`BrokerSecurity`).
    """
    libs = ensure_kafka_libs(cache_dir)
    owned = run_dir is None
    folder = Path(tempfile.mkdtemp(prefix="emotion-kafka-")) if run_dir is None else run_dir
    security = BrokerSecurity.generate(folder / "tls") if secure else None
    kafka = LocalKafka(libs=libs, run_dir=folder, heap_mb=heap_mb, security=security)
    try:
        yield kafka.start()
    finally:
        kafka.stop()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


KAFKA_CONNECTION_FIELDS = (
    "bootstrap_servers",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_key_password",
    "ssl_check_hostname",
)
"""The :class:`~stream_app.settings.KafkaSettings` fields that say where the cluster is and how to log in."""


def kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """``EMOTION_STREAM_KAFKA__*`` variables that make a child process (a worker) load ``kafka``'s
    connection and security fields (secrets included: keep the mapping out of logs).

    Unset file settings are left out (an empty variable would read as a path); a caller that starts from
    its own environment should drop inherited ``KAFKA_CONNECTION_FIELDS`` variables first
    (:func:`without_kafka_connection`).
    """
    env = {}
    for name in KAFKA_CONNECTION_FIELDS:
        value = getattr(kafka, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"EMOTION_STREAM_KAFKA__{name.upper()}"] = str(value)
    return env


def without_kafka_connection(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables of :data:`KAFKA_CONNECTION_FIELDS` (other settings are kept)."""
    drop = {f"EMOTION_STREAM_KAFKA__{name.upper()}" for name in KAFKA_CONNECTION_FIELDS}
    return {k: v for k, v in env.items() if k.upper() not in drop}
