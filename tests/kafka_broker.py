"""A real Apache Kafka broker for the tests, and helpers to look at what is in it.

Loaded as a pytest plugin by ``tests/conftest.py``. Fixtures:

``kafka_bootstrap`` (session) -> ``"127.0.0.1:PORT"``
    ``$KAFKA_BOOTSTRAP_SERVERS`` when set; otherwise one broker started by
    ``deploy/local/kafka/kafka.sh`` for the whole run, on a free loopback port with a temporary
    data dir, stopped at the end (Ctrl-C included; a watchdog stops it if pytest dies hard).
    Without Java 17+ the Kafka tests skip on a laptop and fail under ``CI=true``.
``kafka_topics`` (function) -> :class:`KafkaTopics`
    Names no other test uses: ``.events``, ``.alerts``, ``.checkpoints``, ``.dlq``,
    ``.transactional_id``. Nothing is created; ``await kafka_topics.create(bootstrap)`` does.
``kafka_broker_factory`` (function) -> ``start_broker() -> KafkaBroker``
    A dedicated broker per call, for tests that stop, pause or kill -9 it; torn down after.
``kafka_pki`` (module) -> :class:`KafkaPki`
    A throwaway CA, a broker certificate for 127.0.0.1/localhost, a client certificate, and a
    second CA that signed nothing the broker has; PEM files made with the ``openssl`` CLI.
``secure_kafka`` (module) -> :class:`SecureKafka`
    A dedicated broker with a SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and an
    SSL listener that requires a client certificate, besides its plaintext one; credentials,
    PEM paths and ready-made bridge environments on the object.

Helpers: :func:`read_topic` (everything up to the end as of the call), :func:`wait_for_records`
(read until N records are there) and :func:`create_topics`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "local" / "kafka" / "kafka.sh"
HOST = "127.0.0.1"
# kafka.sh's exit status for "this machine cannot run Kafka" (no Java 17+, no Maven).
EX_UNAVAILABLE = 69


class KafkaBrokerError(RuntimeError):
    """kafka.sh could not fetch, start or stop the broker; the message is its output."""


class KafkaUnavailable(KafkaBrokerError):
    """No Java 17+ (or no Maven to fetch the jars): this machine cannot run Kafka."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _run_kafka_sh(command: str, env: dict[str, str], timeout_s: float) -> str:
    try:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(f"kafka.sh {command} took longer than {timeout_s:.0f} s") from exc
    if done.returncode == EX_UNAVAILABLE:
        raise KafkaUnavailable(done.stderr.strip())
    if done.returncode != 0:
        raise KafkaBrokerError(
            f"kafka.sh {command} failed (exit {done.returncode}):\n{done.stderr.strip()}"
        )
    return done.stdout.strip()


def fetch_jars(timeout_s: float = 600) -> None:
    """Download the Kafka jars once; a no-op (no network) when they are cached."""
    _run_kafka_sh("fetch", {}, timeout_s)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on 127.0.0.1: the client and controller ports.

    Picked below the ephemeral range: a broker that is down for a while must not find its port
    taken by the outgoing connection of a client that keeps reconnecting to it.
    """
    top = min(_ephemeral_range()[0], 32768) - 2
    for _ in range(200):
        port = random.randrange(15000, top)
        if all(_bindable(p) for p in (port, port + 1)):
            return port
    raise KafkaBrokerError("no free pair of loopback ports found")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


class KafkaBroker:
    """One single-node Kafka driven through ``kafka.sh``: same port and data dir across restarts.

    The blocking methods take seconds; from async tests use the ``a``-prefixed twins, which run
    them in a worker thread so the event loop (and an in-process bridge) keeps running.
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, *, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = port if port is not None else free_port_pair()
        self.controller_port = self.port + 1
        self.data_dir = Path(data_dir)
        #: more kafka.sh knobs (the secure listeners), passed on every start/stop/status
        self.extra_env = dict(env or {})

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap}, data_dir={str(self.data_dir)!r})"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's log4j log; appended to across restarts."""
        return self.data_dir / "logs" / "server.log"

    @property
    def pid(self) -> int | None:
        """The broker's pid while it is alive (from kafka.sh's pid file, checked)."""
        try:
            pid = int((self.data_dir / "kafka.pid").read_text())
        except (OSError, ValueError):
            return None
        # The pid file outlives a kill -9; never signal whoever got the pid next.
        ours = f"kafka.Kafka {self.data_dir / 'server.properties'}"
        return pid if ours in _command_line(pid) and _alive(pid) else None

    def _env(self) -> dict[str, str]:
        return {
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "KAFKA_DATA_DIR": str(self.data_dir),
            # If pytest dies without tearing down, kafka.sh's watchdog stops the broker.
            "KAFKA_OWNER_PID": str(os.getpid()),
            **self.extra_env,
        }

    def start(self, timeout_s: float = 90) -> None:
        """Start (formatting the data dir the first time) and wait until it serves requests."""
        env = {**self._env(), "KAFKA_START_TIMEOUT_S": str(int(timeout_s))}
        try:
            _run_kafka_sh("start", env, timeout_s + 30)
        except BaseException:
            # kafka.sh cleans up after itself, unless it was killed (timeout, Ctrl-C) first.
            self.kill()
            raise

    def stop(self, timeout_s: float = 30) -> None:
        """Clean shutdown (SIGTERM); SIGKILL if it takes longer than ``timeout_s``."""
        _run_kafka_sh(
            "stop", {**self._env(), "KAFKA_STOP_TIMEOUT_S": str(int(timeout_s))}, timeout_s + 30
        )

    def kill(self) -> None:
        """kill -9: no clean shutdown, unflushed state left for the next start to recover.

        The next start takes ~12 s: the controller waits out the dead incarnation's session
        (broker.session.timeout.ms, 9 s) before it lets the broker register again.

        Kafka 4.1+ (4.3.1 included) bug, KAFKA-20734: a transaction whose commit markers were not
        yet written when the broker died (the ~20 ms after ``commit_transaction()`` returns)
        hangs after the restart. While the restarted single node waits to re-register, its
        partitions have no leader; KRaftMetadataCache.getPartitionLeaderEndpoint then answers
        "no such partition" and the coordinator drops the markers as if the topic were deleted.
        read_committed consumers stop at that transaction for good (records are there, read
        uncommitted; ``kafka-transactions describe-producers`` shows it open).
        """
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)
        (self.data_dir / "kafka.pid").unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: the broker holds its connections but answers nothing (a hung broker)."""
        if (pid := self.pid) is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        if (pid := self.pid) is not None:
            os.kill(pid, signal.SIGCONT)

    def restart(self, *, down_s: float = 0, hard: bool = False) -> None:
        """Stop (or kill -9 when ``hard``), stay down ``down_s`` seconds, start on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        time.sleep(down_s)
        self.start()

    def is_running(self) -> bool:
        try:
            _run_kafka_sh("status", self._env(), 30)
        except KafkaBrokerError:
            return False
        return True

    async def astart(self, timeout_s: float = 90) -> None:
        await anyio.to_thread.run_sync(lambda: self.start(timeout_s))

    async def astop(self, timeout_s: float = 30) -> None:
        await anyio.to_thread.run_sync(lambda: self.stop(timeout_s))

    async def akill(self) -> None:
        await anyio.to_thread.run_sync(self.kill)

    async def arestart(self, *, down_s: float = 0, hard: bool = False) -> None:
        if hard:
            await self.akill()
        else:
            await self.astop()
        await anyio.sleep(down_s)
        await self.astart()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        pass
    try:  # no /proc (macOS)
        return subprocess.run(
            ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited broker can linger as a zombie when nobody reaps orphans
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"broker pid {pid} still alive {timeout_s} s after SIGKILL")
        time.sleep(0.05)


def _start_or_give_up(broker: KafkaBroker) -> None:
    """Start, turning "no Java here" into a skip on a laptop and a failure in CI."""
    try:
        fetch_jars()
        broker.start()
    except KafkaUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI needs a real Kafka broker: {exc}", pytrace=False)
        pytest.skip(f"no local Kafka broker possible: {exc}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of the broker every Kafka test of this run shares."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-session"))
    _start_or_give_up(broker)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@dataclass(frozen=True)
class KafkaTopics:
    """Topic names and a transactional id that belong to one test."""

    events: str
    alerts: str
    checkpoints: str
    dlq: str
    transactional_id: str

    @property
    def group(self) -> str:
        """The test's own BRIDGE_GROUP_ID: its bridges share shards with nobody else's."""
        return self.transactional_id.removesuffix(".txn") + ".group"

    @classmethod
    def unique(cls, label: str) -> KafkaTopics:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:80] or "test"
        stem = f"{stem}.{uuid.uuid4().hex[:8]}"
        return cls(
            events=f"t.{stem}.events",
            alerts=f"t.{stem}.alerts",
            checkpoints=f"t.{stem}.checkpoints",
            dlq=f"t.{stem}.dlq",
            transactional_id=f"t.{stem}.txn",
        )

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.events, self.alerts, self.checkpoints, self.dlq

    async def create(self, bootstrap: str, *, partitions: int = 3) -> None:
        """Create the four topics the way the bridge would: checkpoints compacted."""
        await create_topics(bootstrap, [self.events, self.alerts, self.dlq], partitions=partitions)
        # The checkpoint topic's partitions are the bridge's 32 shards, always.
        await create_topics(bootstrap, [self.checkpoints], partitions=32, compacted=True)


@pytest.fixture
def kafka_topics(request: pytest.FixtureRequest) -> KafkaTopics:
    return KafkaTopics.unique(request.node.name)


@pytest.fixture
def kafka_broker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., KafkaBroker]]:
    """``start_broker(start=True) -> KafkaBroker``: a broker of its own, removed after the test."""
    brokers: list[KafkaBroker] = []

    def start_broker(*, start: bool = True) -> KafkaBroker:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka-dedicated"))
        brokers.append(broker)
        if start:
            _start_or_give_up(broker)
        return broker

    yield start_broker
    for broker in brokers:
        broker.resume()  # a paused JVM would ignore everything but SIGKILL until then
        broker.kill()  # throwaway data: no need for a clean shutdown


@dataclass(frozen=True)
class KafkaPki:
    """PEM files of a throwaway PKI (unencrypted keys)."""

    ca: Path  #: the CA that signed the broker and client certificates
    broker_cert: Path  #: leaf, subjectAltName IP:127.0.0.1 and DNS:localhost
    broker_key: Path
    client_cert: Path  #: CN=qoder-kafka-bridge-test-client, extendedKeyUsage clientAuth
    client_key: Path
    other_ca: Path  #: a CA that signed nothing here: trusting only it must fail verification


_CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
_LEAF_EXT = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
)


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *map(str, args)],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise KafkaBrokerError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_pki(directory: Path) -> KafkaPki:
    """Generate :class:`KafkaPki` in ``directory`` with the ``openssl`` CLI (EC P-256, 2 days).

    Raises KafkaUnavailable when there is no ``openssl``.
    """
    if shutil.which("openssl") is None:
        raise KafkaUnavailable("the openssl command is needed to make test certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def key(name: str) -> Path:
        _openssl(
            "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d
        )
        return d / f"{name}.key"

    def cert(name: str, subject: str, ext: str, ca: str | None) -> Path:
        key(name)
        (d / f"{name}.ext").write_text(ext)
        _openssl(
            "req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=d
        )
        signer = ["-signkey", f"{name}.key"]
        if ca is not None:
            signer = ["-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"]
        serial = f"0x{uuid.uuid4().hex}"
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", *signer, "-set_serial", serial,
            "-extfile", f"{name}.ext", "-days", "2", "-out", f"{name}.pem", cwd=d,
        )  # fmt: skip
        return d / f"{name}.pem"

    ca = cert("ca", "/CN=qoder-kafka-bridge test CA", _CA_EXT, None)
    broker = cert(
        "broker",
        "/CN=localhost",
        _LEAF_EXT + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        "ca",
    )
    client = cert(
        "client",
        "/CN=qoder-kafka-bridge-test-client",
        _LEAF_EXT + "extendedKeyUsage=clientAuth\n",
        "ca",
    )
    other = cert("other-ca", "/CN=some other CA", _CA_EXT, None)
    return KafkaPki(
        ca=ca,
        broker_cert=broker,
        broker_key=d / "broker.key",
        client_cert=client,
        client_key=d / "client.key",
        other_ca=other,
    )


@pytest.fixture(scope="module")
def kafka_pki(tmp_path_factory: pytest.TempPathFactory) -> KafkaPki:
    try:
        return make_pki(tmp_path_factory.mktemp("kafka-pki"))
    except KafkaUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI needs openssl: {exc}", pytrace=False)
        pytest.skip(str(exc))


@dataclass(frozen=True)
class SecureKafka:
    """A broker with a SASL_SSL and an SSL (client certificate required) listener."""

    broker: KafkaBroker
    bootstrap: str  #: the SASL_SSL listener: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    ssl_bootstrap: str  #: the SSL listener: mutual TLS, no SASL
    pki: KafkaPki
    scram_user: str
    scram_password: str
    plain_user: str
    plain_password: str

    @property
    def plaintext_bootstrap(self) -> str:
        """The same broker without TLS or SASL: for the test helpers (topics, read_topic)."""
        return self.broker.bootstrap

    def sasl_env(
        self, mechanism: str, *, password: str | None = None, cafile: Path | None = None
    ) -> dict[str, str]:
        """The bridge's settings (environment) for the SASL_SSL listener with ``mechanism``."""
        plain = mechanism == "PLAIN"
        user = self.plain_user if plain else self.scram_user
        if password is None:
            password = self.plain_password if plain else self.scram_password
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": mechanism,
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": password,
            "KAFKA_SSL_CAFILE": str(cafile or self.pki.ca),
        }

    def mtls_env(self, *, client_cert: bool = True) -> dict[str, str]:
        """The bridge's settings for the SSL listener, with the client certificate or without."""
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.ssl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(self.pki.ca),
        }
        if client_cert:
            env["KAFKA_SSL_CERTFILE"] = str(self.pki.client_cert)
            env["KAFKA_SSL_KEYFILE"] = str(self.pki.client_key)
        return env


def free_port_block(count: int) -> int:
    """A port P such that P .. P+count-1 are free on 127.0.0.1 (below the ephemeral range)."""
    top = min(_ephemeral_range()[0], 32768) - count
    for _ in range(200):
        port = random.randrange(15000, top)
        if all(_bindable(p) for p in range(port, port + count)):
            return port
    raise KafkaBrokerError(f"no {count} free consecutive loopback ports found")


@pytest.fixture(scope="module")
def secure_kafka(
    tmp_path_factory: pytest.TempPathFactory, kafka_pki: KafkaPki
) -> Iterator[SecureKafka]:
    """A dedicated broker with TLS and SASL listeners, for one test module; killed after.

    Ports P (plaintext), P+1 (controller), P+2 (SASL_SSL), P+3 (SSL with client certificate).
    """
    port = free_port_block(4)
    creds = {
        "scram_user": "bridge-scram",
        "scram_password": f"scram-{uuid.uuid4().hex}",
        "plain_user": "bridge-plain",
        "plain_password": f"plain-{uuid.uuid4().hex}",
    }
    env = {
        "KAFKA_SASL_SSL_PORT": str(port + 2),
        "KAFKA_SSL_PORT": str(port + 3),
        "KAFKA_TLS_CERT": str(kafka_pki.broker_cert),
        "KAFKA_TLS_KEY": str(kafka_pki.broker_key),
        "KAFKA_TLS_CLIENT_CA": str(kafka_pki.ca),
        "KAFKA_SCRAM_USERS": f"{creds['scram_user']}:{creds['scram_password']}",
        "KAFKA_PLAIN_USERS": f"{creds['plain_user']}:{creds['plain_password']}",
    }
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-secure"), port, env=env)
    _start_or_give_up(broker)
    try:
        yield SecureKafka(
            broker=broker,
            bootstrap=f"{HOST}:{port + 2}",
            ssl_bootstrap=f"{HOST}:{port + 3}",
            pki=kafka_pki,
            **creds,
        )
    finally:
        broker.kill()  # throwaway data: no need for a clean shutdown


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    compacted: bool = False,
    *,
    configs: dict[str, str] | None = None,
    exist_ok: bool = False,
    timeout_s: float = 30,
) -> None:
    """Create topics (replication factor 1) and wait until every partition has a leader."""
    names = list(names)
    topic_configs = {"cleanup.policy": "compact"} if compacted else {}
    topic_configs.update(configs or {})
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            response = await admin.create_topics(
                [NewTopic(n, partitions, 1, topic_configs=dict(topic_configs)) for n in names]
            )
            # aiokafka returns per-topic errors in the response instead of raising them.
            for topic, code, *message in response.topic_errors:
                if code == 0 or (exist_ok and code == TopicAlreadyExistsError.errno):
                    continue
                detail = message[-1] if message else ""
                raise KafkaBrokerError(f"cannot create topic {topic!r}: error {code} {detail}")
            while not await _all_have_leaders(admin, names):
                await anyio.sleep(0.05)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()


async def _all_have_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> bool:
    described = await admin.describe_topics(names)
    return len(described) == len(names) and all(
        t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
        for t in described
    )


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    """Partition ids of ``topic``; empty when it does not exist.

    From an admin client: the consumer's ``topics()`` does not fill ``partitions_for_topic``.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        (described,) = await admin.describe_topics([topic])
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()
    if described["error_code"] == UnknownTopicOrPartitionError.errno:
        return []
    if described["error_code"] != 0:
        raise KafkaBrokerError(f"cannot describe topic {topic!r}: error {described['error_code']}")
    return sorted(p["partition"] for p in described["partitions"])


async def lower_topic_limit(bootstrap: str, topic: str, limit: int) -> None:
    """An operator lowers ``max.message.bytes`` of ``topic`` while the bridge runs; returns
    once the broker applies it (within its metadata round, about a second)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        config = {"max.message.bytes": str(limit)}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, config)])
    finally:
        await admin.close()
    await anyio.sleep(1)


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    isolation_level: str = "read_committed",
    timeout_s: float = 30,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning to its end as of the call, all partitions.

    The end is the last stable offset for ``read_committed`` (so an open transaction does not
    make this wait) and the high watermark for ``read_uncommitted``. Records come partition by
    partition, each in offset order. A topic that does not exist (yet) reads as empty.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        fetch_max_wait_ms=100,
    )
    records: dict[int, list[ConsumerRecord[bytes, bytes]]] = {}
    try:
        with anyio.fail_after(timeout_s):
            partitions = await _partitions(bootstrap, topic)
            if not partitions:
                return []
            await consumer.start()
            tps = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(tps)
            end = await consumer.end_offsets(tps)
            start = await consumer.beginning_offsets(tps)
            pending = {tp for tp in tps if end[tp] > start[tp]}
            for tp in pending:
                consumer.seek(tp, start[tp])
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=200)
                for tp, batch in batches.items():
                    records.setdefault(tp.partition, []).extend(
                        r for r in batch if r.offset < end[tp]
                    )
                # Positions, not record offsets: transaction markers and aborted batches take
                # offsets but yield no records.
                for tp in list(pending):
                    if await consumer.position(tp) >= end[tp]:
                        pending.discard(tp)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()
    return [r for p in sorted(records) for r in records[p]]


async def wait_for_records(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    isolation_level: str = "read_committed",
    timeout_s: float = 30,
) -> list[ConsumerRecord[bytes, bytes]]:
    """:func:`read_topic` again and again until it returns at least ``count`` records.

    ``commit_transaction()`` returns once the coordinator has logged the commit, before the
    markers reach the partitions: until they do, read_committed stops short of the new records.
    """
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        with anyio.fail_after(timeout_s):
            while True:
                records = await read_topic(bootstrap, topic, isolation_level=isolation_level)
                if len(records) >= count:
                    return records
                await anyio.sleep(0.1)
    except TimeoutError:
        raise TimeoutError(
            f"{topic}: {len(records)} of {count} records ({isolation_level}) after {timeout_s} s"
        ) from None
