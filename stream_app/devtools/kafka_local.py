"""Start and stop a single-node Apache Kafka (KRaft) on loopback, for the demo and the tests.

The broker is the real Apache Kafka, resolved once from Maven Central into the cache folder
(``<cache>/kafka-<version>/libs``) by Maven, and run with the installed JDK (17+). Nothing here is
used when the user gives ``EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from stream_app.devtools.processes import terminate
from stream_app.errors import InfrastructureError

__all__ = ["KAFKA_VERSION", "LocalKafka", "ensure_kafka_libs", "free_port", "local_kafka"]

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


@dataclass
class LocalKafka:
    """A running single-node broker+controller; use :func:`local_kafka` or :meth:`start`/:meth:`stop`."""

    libs: Path
    run_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    heap_mb: int = 512
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        log_dirs = self.run_dir / "data"
        log_dirs.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
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
        cfg = self._write_config()
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "--standalone", "-t", str(uuid.uuid4()), "-c", str(cfg)),
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
def local_kafka(cache_dir: Path, run_dir: Path | None = None, *, heap_mb: int = 512) -> Iterator[LocalKafka]:
    """Run a local broker for the duration of the ``with`` block; its data folder is removed afterwards."""
    libs = ensure_kafka_libs(cache_dir)
    owned = run_dir is None
    folder = Path(tempfile.mkdtemp(prefix="emotion-kafka-")) if run_dir is None else run_dir
    kafka = LocalKafka(libs=libs, run_dir=folder, heap_mb=heap_mb)
    try:
        yield kafka.start()
    finally:
        kafka.stop()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
