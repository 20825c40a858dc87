"""Frozen, validated settings, built once from flags, the environment and a TOML file.

Precedence: flag > environment > config file > default. One table, :data:`ENV_VARS`, names
every setting once and drives all three sources: the config file's keys are the variable names
lower-cased, the flags are the names without the ``BRIDGE_`` prefix in kebab case
(``BRIDGE_HTTP_PORT`` -> ``--http-port``), and the README's table comes from
:func:`config_table_markdown`. An empty value (``FOO=``) counts as unset, except where an empty
value means something (``BRIDGE_ALERTS_TOPIC=`` disables alerts).

One family of settings is open-ended: ``KAFKA_PRODUCER_<PROPERTY>`` passes a Kafka producer
property (``KAFKA_PRODUCER_CLIENT_ID`` -> ``client.id``) to the producer, the way Kafka Connect's
``producer.override.*`` does; on the command line ``--kafka-producer client.id=x``, in the file
a ``[kafka_producer]`` table with Kafka's names. Only the properties in
:data:`PRODUCER_PROPERTIES` are accepted; the ones the bridge decides are refused by name.

Nothing else in the bridge reads ``os.environ``. Errors name the setting, where the value came
from and what is accepted; secret values are never quoted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from bridge.errors import ConfigError
from bridge.secrets import Secret

__all__ = [
    "ENV_VARS",
    "PRODUCER_CONFIG_TABLE",
    "PRODUCER_ENV_PREFIX",
    "PRODUCER_FLAG",
    "PRODUCER_PROPERTIES",
    "ApiSettings",
    "DeliverySettings",
    "EnvVar",
    "HttpSettings",
    "KafkaSettings",
    "LogSettings",
    "Settings",
    "ShutdownSettings",
    "config_table_markdown",
    "env_token",
    "load_settings",
    "producer_env_name",
    "require_token",
]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
COMPRESSIONS = ("gzip", "lz4", "zstd", "snappy", "none")
DELIVERY_MODES = ("exactly_once", "at_least_once")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ApiSettings:
    url: str = "https://api.qoder.com/api/v1/cloud"
    token: Secret | None = None
    token_file: Path | None = None
    sessions: tuple[str, ...] = ()
    max_streams: int = 2000
    max_requests_per_s: float = 50.0
    poll_interval_s: float = 15.0
    full_scan_interval_s: float = 120.0
    list_poll_interval_s: float = 5.0
    stall_timeout_s: float = 45.0
    request_timeout_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_event_bytes: int = 16777216

    @property
    def uses_simulator(self) -> bool:
        """No credentials: ``run`` and ``check`` refuse; ``make run`` serves the simulator."""
        return self.token is None and self.token_file is None


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "localhost:9092"
    topic: str = "qoder.events"
    alerts_topic: str | None = "qoder.alerts"
    checkpoint_topic: str = "qoder.bridge.checkpoints"
    dlq_topic: str = "qoder.bridge.dlq"
    security_protocol: str = "PLAINTEXT"
    # Set to PLAIN when a SASL protocol is chosen without a mechanism.
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    topic_partitions: int = 6
    alerts_topic_partitions: int = 1
    dlq_topic_partitions: int = 1
    replication_factor: int = 1
    # Topic configs (retention.ms, min.insync.replicas, ...) for topics the bridge creates.
    topic_config: tuple[tuple[str, str], ...] = ()
    alerts_topic_config: tuple[tuple[str, str], ...] = ()
    checkpoint_topic_config: tuple[tuple[str, str], ...] = ()
    dlq_topic_config: tuple[tuple[str, str], ...] = ()
    # zstd: smaller than gzip, a tenth of its CPU (aiokafka gzips at level 9); cramjam ships it.
    compression: str | None = "zstd"
    max_request_bytes: int = 1048576
    # 0: the publisher batches itself (a collection window, then every record in one go); a
    # linger would only delay each batch, twice in at_least_once (records, then checkpoints).
    linger_ms: int = 0
    # KAFKA_PRODUCER_*: Kafka producer property -> typed value, see PRODUCER_PROPERTIES.
    producer_overrides: tuple[tuple[str, str | int], ...] = ()
    # The consumer group every running bridge is a live member of (bridge/membership.py).
    group_id: str = "qoder-kafka-bridge"


@dataclass(frozen=True)
class DeliverySettings:
    mode: Literal["exactly_once", "at_least_once"] = "exactly_once"
    transactional_id: str = "qoder-kafka-bridge-0"
    commit_interval_ms: int = 100
    batch_max_records: int = 2000
    max_in_flight_bytes: int = 33554432
    transaction_timeout_ms: int = 60000
    publish_deltas: bool = False


@dataclass(frozen=True)
class HttpSettings:
    host: str = "0.0.0.0"
    port: int = 8080  # 0 = an ephemeral port (tests)


@dataclass(frozen=True)
class ShutdownSettings:
    drain_timeout_s: float = 20.0


@dataclass(frozen=True)
class LogSettings:
    format: Literal["json", "console"] = "json"
    level: str = "info"
    summary_interval_s: float = 60.0  # 0 = no periodic bridge.summary line


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = dataclasses.field(default_factory=ApiSettings)
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    delivery: DeliverySettings = dataclasses.field(default_factory=DeliverySettings)
    http: HttpSettings = dataclasses.field(default_factory=HttpSettings)
    shutdown: ShutdownSettings = dataclasses.field(default_factory=ShutdownSettings)
    log: LogSettings = dataclasses.field(default_factory=LogSettings)


# -- parsers: str -> value, or _Invalid(what is accepted) ---------------------------------------


class _Invalid(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _Invalid(expected) from None
        if value < lo or (hi is not None and value > hi):
            raise _Invalid(expected)
        return value

    return parse


def _seconds(raw: str) -> float:
    expected = "a number of seconds > 0"
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid(expected) from None
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(expected)
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid("a number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise _Invalid("a number > 0")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _Invalid("true or false (also 1/0, yes/no, on/off)")


def _choice(values: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    """Case-insensitive choice; the accepted spellings are the canonical ones only."""

    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in values:
            raise _Invalid("one of " + ", ".join(values))
        return value

    return parse


def _compression(raw: str) -> str | None:
    value = _choice(COMPRESSIONS)(raw)
    return None if value == "none" else value


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    return _choice(LOG_LEVELS)("warning" if value == "warn" else value)


def _text(raw: str) -> str:
    value = raw.strip()
    if not value or not value.isprintable():
        raise _Invalid("a non-empty printable string")
    return value


def _secret(raw: str) -> Secret:
    return Secret(raw.strip())


def _path(raw: str) -> Path:
    return Path(raw.strip()).expanduser()


def _url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    expected = "an http:// or https:// URL such as https://api.qoder.com/api/v1/cloud"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise _Invalid(expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(expected)
    if parts.username or parts.password:
        raise _Invalid(expected + ", without credentials (use QODER_ACCESS_TOKEN)")
    if parts.query or parts.fragment:
        raise _Invalid(expected + ", without a query string or fragment")
    return value


_SESSION_ID = re.compile(r"sess_[A-Za-z0-9][A-Za-z0-9_-]*")


def _sessions(raw: str) -> tuple[str, ...]:
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    for sid in ids:
        if not _SESSION_ID.fullmatch(sid):
            raise _Invalid(
                f"a comma-separated list of session ids starting with sess_ "
                f"(letters, digits, _ and - only); {sid[:60]!r} is not one"
            )
    return tuple(dict.fromkeys(ids))  # de-duplicated, order kept


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _topic(raw: str) -> str:
    value = raw.strip()
    if not _TOPIC.fullmatch(value) or value in (".", ".."):
        raise _Invalid("a Kafka topic name: 1-249 of letters, digits, '.', '_' and '-'")
    return value


def _optional_topic(raw: str) -> str | None:
    return _topic(raw) if raw.strip() else None


_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?")


def _bootstrap(raw: str) -> str:
    expected = "a comma-separated list of host:port, such as kafka-0:9092,kafka-1:9092"
    servers = [part.strip() for part in raw.split(",") if part.strip()]
    if not servers:
        raise _Invalid(expected)
    for server in servers:
        match = _HOST_PORT.fullmatch(server)
        if not match or (match.group(1) and not 1 <= int(match.group(1)) <= 65535):
            raise _Invalid(expected)
    return ",".join(servers)


def _seconds_or_off(raw: str) -> float:
    expected = "a number of seconds >= 0 (0 turns it off)"
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid(expected) from None
    if not math.isfinite(value) or value < 0:
        raise _Invalid(expected)
    return value


_CONFIG_NAME = re.compile(r"[a-z][a-z0-9]*(?:[._-][a-z0-9]+)*")


def _topic_config(raw: str) -> tuple[tuple[str, str], ...]:
    """``retention.ms=604800000,min.insync.replicas=2``. A part without ``=`` continues the
    previous value, so list-valued configs read naturally: ``cleanup.policy=compact,delete``."""
    expected = (
        "a comma-separated list of Kafka topic configs, name=value, such as "
        "retention.ms=604800000,min.insync.replicas=2"
    )
    pairs: list[list[str]] = []
    for piece in raw.split(","):
        part = piece.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if sep:
            name = name.strip()
            if not _CONFIG_NAME.fullmatch(name) or not value.strip():
                raise _Invalid(expected + f"; {part[:60]!r} is not one")
            pairs.append([name, value.strip()])
        elif pairs:
            pairs[-1][1] += "," + part
        else:
            raise _Invalid(expected + f"; {part[:60]!r} has no '='")
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in seen and seen[name] != value:
            raise _Invalid(expected + f"; {name} is given twice")
        seen[name] = value
    return tuple(seen.items())


# -- Kafka producer pass-through (KAFKA_PRODUCER_<PROPERTY>) ------------------------------------

#: Kafka producer properties passed through to aiokafka's AIOKafkaProducer: name -> (keyword
#: argument, parser). ``KAFKA_PRODUCER_REQUEST_TIMEOUT_MS`` sets ``request.timeout.ms``.
PRODUCER_PROPERTIES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "client.id": ("client_id", _text),
    "request.timeout.ms": ("request_timeout_ms", _int(1)),
    "metadata.max.age.ms": ("metadata_max_age_ms", _int(0)),
    "batch.size": ("max_batch_size", _int(1)),
    "retry.backoff.ms": ("retry_backoff_ms", _int(0)),
    "connections.max.idle.ms": ("connections_max_idle_ms", _int(1)),
}
#: Producer properties that have a setting of their own: the pass-through name is an alias of it.
PRODUCER_PROPERTY_SETTINGS: dict[str, str] = {
    "linger.ms": "KAFKA_LINGER_MS",
    "compression.type": "KAFKA_COMPRESSION",
    "max.request.size": "KAFKA_MAX_REQUEST_BYTES",
}
#: Producer properties the bridge decides, with the setting that does it.
PRODUCER_PROPERTIES_RESERVED: dict[str, str] = {
    "acks": "the bridge always uses acks=all (see BRIDGE_DELIVERY)",
    "enable.idempotence": "the bridge always uses an idempotent producer (see BRIDGE_DELIVERY)",
    "transactional.id": "set BRIDGE_TRANSACTIONAL_ID",
    "transaction.timeout.ms": "set BRIDGE_TRANSACTION_TIMEOUT_MS",
    "isolation.level": "a consumer setting; the bridge reads checkpoints read_committed",
    "bootstrap.servers": "set KAFKA_BOOTSTRAP_SERVERS",
    "security.protocol": "set KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "set KAFKA_SASL_MECHANISM",
    "sasl.jaas.config": "set KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD",
    "ssl.truststore.location": "set KAFKA_SSL_CAFILE (PEM)",
    "ssl.keystore.location": "set KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE (PEM)",
    "key.serializer": "the bridge writes bytes",
    "value.serializer": "the bridge writes bytes",
    "partitioner.class": "the bridge keys records by session/thread (Kafka's murmur2)",
}
#: Java client properties the Python client (aiokafka) has no equivalent for.
_PRODUCER_JAVA_ONLY = frozenset(
    {
        "buffer.memory",
        "max.in.flight.requests.per.connection",
        "delivery.timeout.ms",
        "retries",
        "max.block.ms",
        "send.buffer.bytes",
        "receive.buffer.bytes",
        "reconnect.backoff.ms",
        "reconnect.backoff.max.ms",
        "interceptor.classes",
        "metric.reporters",
        "client.dns.lookup",
        "partitioner.ignore.keys",
        "partitioner.adaptive.partitioning.enable",
        "compression.gzip.level",
        "compression.lz4.level",
        "compression.zstd.level",
    }
)
PRODUCER_ENV_PREFIX = "KAFKA_PRODUCER_"
PRODUCER_CONFIG_TABLE = "kafka_producer"  # [kafka_producer] in the TOML file, Kafka's names
PRODUCER_FLAG = "--kafka-producer"


def producer_env_name(prop: str) -> str:
    """``request.timeout.ms`` -> ``KAFKA_PRODUCER_REQUEST_TIMEOUT_MS``."""
    return PRODUCER_ENV_PREFIX + prop.upper().replace(".", "_").replace("-", "_")


def _producer_property(env_name: str) -> str:
    return env_name.removeprefix(PRODUCER_ENV_PREFIX).lower().replace("_", ".")


# -- the table ----------------------------------------------------------------------------------

_GROUPS: dict[str, type[Any]] = {
    "api": ApiSettings,
    "kafka": KafkaSettings,
    "delivery": DeliverySettings,
    "http": HttpSettings,
    "shutdown": ShutdownSettings,
    "log": LogSettings,
}


@dataclass(frozen=True)
class EnvVar:
    """One setting: its variable, the field it fills, what it means and how it is parsed."""

    name: str
    field: str  # "group.attribute" in Settings
    meaning: str
    parse: Callable[[str], Any] = dataclasses.field(repr=False)
    aliases: tuple[str, ...] = ()
    secret: bool = False
    empty_is_value: bool = False  # "" is a meaningful value rather than "unset"
    default_text: str | None = None  # markdown shown as the default, when not the literal value

    @property
    def flag(self) -> str:
        return "--" + self.name.removeprefix("BRIDGE_").lower().replace("_", "-")

    @property
    def config_key(self) -> str:
        return self.name.lower()

    @property
    def default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        group, attr = self.field.split(".")
        value = next(f for f in dataclasses.fields(_GROUPS[group]) if f.name == attr).default
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("QODER_API_URL", "api.url", "Qoder API base URL", _url),
    EnvVar(
        "QODER_ACCESS_TOKEN",
        "api.token",
        "bearer token (PAT or SAT); never logged. `run` and `check` refuse to start without "
        "it or a token file",
        _secret,
        aliases=("QODER_PAT",),
        secret=True,
    ),
    EnvVar(
        "QODER_ACCESS_TOKEN_FILE",
        "api.token_file",
        "file holding the token (Kubernetes secret mount); re-read when it is rotated",
        _path,
    ),
    EnvVar(
        "BRIDGE_SESSIONS",
        "api.sessions",
        "comma-separated `sess_` ids to follow; empty = every session the token can list",
        _sessions,
        default_text="empty",
    ),
    EnvVar("BRIDGE_MAX_STREAMS", "api.max_streams", "most thread streams open at once", _int(1)),
    EnvVar(
        "BRIDGE_API_MAX_RPS",
        "api.max_requests_per_s",
        "API request budget per second (JSON GETs and stream opens)",
        _positive_float,
    ),
    EnvVar(
        "BRIDGE_POLL_INTERVAL_S",
        "api.poll_interval_s",
        "seconds between safety-net looks at each followed session's threads",
        _seconds,
    ),
    EnvVar(
        "BRIDGE_FULL_SCAN_INTERVAL_S",
        "api.full_scan_interval_s",
        "how often the whole session history (archived too) is listed, by the deployment as a "
        "whole (a member owning 1/N of the shards lists it every N intervals); running "
        "sessions are listed every 2 s by every member",
        _seconds,
    ),
    EnvVar(
        "BRIDGE_LIST_POLL_INTERVAL_S",
        "api.list_poll_interval_s",
        "a running thread without a stream (BRIDGE_MAX_STREAMS reached, or the API refusing "
        "more connections) is read through the JSON list this often",
        _seconds,
    ),
    EnvVar(
        "BRIDGE_STALL_TIMEOUT_S",
        "api.stall_timeout_s",
        "a stream silent this long (not even a heartbeat) is reconnected",
        _seconds,
    ),
    EnvVar("BRIDGE_API_TIMEOUT_S", "api.request_timeout_s", "API request timeout", _seconds),
    EnvVar(
        "BRIDGE_BACKOFF_INITIAL_S",
        "api.backoff_initial_s",
        "first reconnect delay (full jitter, doubling)",
        _seconds,
    ),
    EnvVar("BRIDGE_BACKOFF_MAX_S", "api.backoff_max_s", "longest reconnect delay", _seconds),
    EnvVar(
        "BRIDGE_MAX_EVENT_BYTES",
        "api.max_event_bytes",
        "largest SSE frame or list item read from the API; a larger one goes to the DLQ as an "
        "excerpt",
        _int(65536),
    ),
    EnvVar(
        "KAFKA_BOOTSTRAP_SERVERS",
        "kafka.bootstrap_servers",
        "comma-separated host:port of Kafka brokers",
        _bootstrap,
    ),
    EnvVar("BRIDGE_TOPIC", "kafka.topic", "topic receiving every event", _topic),
    EnvVar(
        "BRIDGE_ALERTS_TOPIC",
        "kafka.alerts_topic",
        "alert-worthy events and the bridge's own alerts; empty disables",
        _optional_topic,
        empty_is_value=True,
    ),
    EnvVar(
        "BRIDGE_CHECKPOINT_TOPIC",
        "kafka.checkpoint_topic",
        "compacted topic holding each thread's cursor",
        _topic,
    ),
    EnvVar(
        "BRIDGE_DLQ_TOPIC",
        "kafka.dlq_topic",
        "frames that cannot be published as events (not JSON, too large), with the reason",
        _topic,
    ),
    EnvVar(
        "KAFKA_SECURITY_PROTOCOL",
        "kafka.security_protocol",
        "one of " + ", ".join(SECURITY_PROTOCOLS),
        _choice(SECURITY_PROTOCOLS, upper=True),
    ),
    EnvVar(
        "KAFKA_SASL_MECHANISM",
        "kafka.sasl_mechanism",
        "one of " + ", ".join(SASL_MECHANISMS) + "; PLAIN when a SASL protocol is set without one",
        _choice(SASL_MECHANISMS, upper=True),
    ),
    EnvVar("KAFKA_SASL_USERNAME", "kafka.sasl_username", "SASL username", _text),
    EnvVar(
        "KAFKA_SASL_PASSWORD",
        "kafka.sasl_password",
        "SASL password; never logged",
        _secret,
        secret=True,
    ),
    EnvVar(
        "KAFKA_SSL_CAFILE",
        "kafka.ssl_cafile",
        "PEM CA bundle for the brokers' certificates (default: the system trust store)",
        _path,
    ),
    EnvVar(
        "KAFKA_SSL_CERTFILE", "kafka.ssl_certfile", "PEM client certificate (mutual TLS)", _path
    ),
    EnvVar("KAFKA_SSL_KEYFILE", "kafka.ssl_keyfile", "PEM client private key (mutual TLS)", _path),
    EnvVar(
        "BRIDGE_TOPIC_PARTITIONS",
        "kafka.topic_partitions",
        "partitions of the events topic when the bridge creates it",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_ALERTS_TOPIC_PARTITIONS",
        "kafka.alerts_topic_partitions",
        "partitions of the alerts topic when the bridge creates it",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_DLQ_TOPIC_PARTITIONS",
        "kafka.dlq_topic_partitions",
        "partitions of the DLQ topic when the bridge creates it",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_REPLICATION_FACTOR",
        "kafka.replication_factor",
        "replication factor of the topics the bridge creates",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_TOPIC_CONFIG",
        "kafka.topic_config",
        "topic configs of the events topic when the bridge creates it, `name=value,...` "
        "(e.g. `retention.ms=604800000,min.insync.replicas=2`)",
        _topic_config,
        default_text="empty",
    ),
    EnvVar(
        "BRIDGE_ALERTS_TOPIC_CONFIG",
        "kafka.alerts_topic_config",
        "topic configs of the alerts topic when the bridge creates it",
        _topic_config,
        default_text="empty",
    ),
    EnvVar(
        "BRIDGE_CHECKPOINT_TOPIC_CONFIG",
        "kafka.checkpoint_topic_config",
        "topic configs of the checkpoint topic, over `cleanup.policy=compact,"
        "min.compaction.lag.ms=60000` (compact must stay)",
        _topic_config,
        default_text="empty",
    ),
    EnvVar(
        "BRIDGE_DLQ_TOPIC_CONFIG",
        "kafka.dlq_topic_config",
        "topic configs of the DLQ topic when the bridge creates it",
        _topic_config,
        default_text="empty",
    ),
    EnvVar(
        "KAFKA_COMPRESSION",
        "kafka.compression",
        "producer compression: " + ", ".join(COMPRESSIONS),
        _compression,
        aliases=("KAFKA_PRODUCER_COMPRESSION_TYPE",),
    ),
    EnvVar(
        "KAFKA_MAX_REQUEST_BYTES",
        "kafka.max_request_bytes",
        "largest produce request; bigger events go to the DLQ",
        _int(1024),
        aliases=("KAFKA_PRODUCER_MAX_REQUEST_SIZE",),
    ),
    EnvVar(
        "KAFKA_LINGER_MS",
        "kafka.linger_ms",
        "producer linger before sending",
        _int(0),
        aliases=("KAFKA_PRODUCER_LINGER_MS",),
    ),
    EnvVar(
        "BRIDGE_DELIVERY",
        "delivery.mode",
        "exactly_once (Kafka transactions) or at_least_once",
        _choice(DELIVERY_MODES),
    ),
    EnvVar(
        "BRIDGE_TRANSACTIONAL_ID",
        "delivery.transactional_id",
        "this member's name in the group (its client id; Kubernetes: the pod name); the "
        "producers' transactional ids are `<BRIDGE_GROUP_ID>-<shard>`",
        _text,
    ),
    EnvVar(
        "BRIDGE_GROUP_ID",
        "kafka.group_id",
        "Kafka consumer group every running bridge joins: its members share the sessions by "
        "shard, and `qoder-bridge checkpoints reset` asks it which bridges are live",
        _text,
    ),
    EnvVar(
        "BRIDGE_COMMIT_INTERVAL_MS",
        "delivery.commit_interval_ms",
        "a transaction (exactly_once, and replays) commits this long after its first event "
        "was read, then its commit round trip",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_BATCH_MAX_RECORDS",
        "delivery.batch_max_records",
        "most records per transaction",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_MAX_IN_FLIGHT_BYTES",
        "delivery.max_in_flight_bytes",
        "unacknowledged bytes before reading pauses (backpressure)",
        _int(1),
    ),
    EnvVar(
        "BRIDGE_TRANSACTION_TIMEOUT_MS",
        "delivery.transaction_timeout_ms",
        "Kafka transaction.timeout.ms",
        _int(1000),
    ),
    EnvVar(
        "BRIDGE_PUBLISH_DELTAS",
        "delivery.publish_deltas",
        "also publish stream-only delta frames",
        _bool,
    ),
    EnvVar("BRIDGE_HTTP_HOST", "http.host", "address of the health/metrics server", _text),
    EnvVar(
        "BRIDGE_HTTP_PORT",
        "http.port",
        "port of `/livez`, `/readyz`, `/metrics` (0 = any free port)",
        _int(0, 65535),
    ),
    EnvVar(
        "BRIDGE_DRAIN_TIMEOUT_S",
        "shutdown.drain_timeout_s",
        "on SIGTERM, time to flush and checkpoint before cancelling",
        _seconds,
    ),
    EnvVar(
        "BRIDGE_LOG_FORMAT",
        "log.format",
        "json (one object per line) or console",
        _choice(LOG_FORMATS),
        default_text="`json` (`console` when stderr is a TTY)",
    ),
    EnvVar("BRIDGE_LOG_LEVEL", "log.level", ", ".join(LOG_LEVELS), _log_level),
    EnvVar(
        "BRIDGE_LOG_SUMMARY_INTERVAL_S",
        "log.summary_interval_s",
        "seconds between `bridge.summary` progress lines (threads, events, lag) at info; 0 = none",
        _seconds_or_off,
    ),
)

_BY_NAME: dict[str, EnvVar] = {v.name: v for v in ENV_VARS}
_BY_NAME.update({alias: v for v in ENV_VARS for alias in v.aliases})


PRODUCER_TABLE_ROW = (
    f"| `{PRODUCER_ENV_PREFIX}<PROPERTY>` | `{PRODUCER_FLAG} property=value` | none | any of "
    "these Kafka producer properties, passed to the producer over the bridge's defaults: "
    + ", ".join(f"`{p}`" for p in PRODUCER_PROPERTIES)
    + " (e.g. `KAFKA_PRODUCER_CLIENT_ID`, `KAFKA_PRODUCER_REQUEST_TIMEOUT_MS`); "
    + ", ".join(f"`{p}`" for p in PRODUCER_PROPERTY_SETTINGS)
    + " are aliases of their own settings; in the config file also a `[kafka_producer]` table "
    "with Kafka's names |"
)


def config_table_markdown() -> str:
    """The README's configuration table, generated from :data:`ENV_VARS`."""
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for var in ENV_VARS:
        name = f"`{var.name}`" + "".join(f" (alias `{a}`)" for a in var.aliases)
        default = var.default
        if var.default_text is None and default != "none":
            default = f"`{default}`"
        lines.append(f"| {name} | `{var.flag}` | {default} | {var.meaning} |")
        if var.name == "KAFKA_LINGER_MS":
            lines.append(PRODUCER_TABLE_ROW)
    return "\n".join(lines) + "\n"


# -- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    value: str
    origin: str  # for messages: "--http-port", "the environment", "config.toml"
    as_name: str  # the name it was given under (an alias, or the canonical name)


_TABLE_KEYS = frozenset(
    {v.config_key for v in ENV_VARS if v.parse is _topic_config} | {PRODUCER_CONFIG_TABLE}
)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"retention": {"ms": 1}}``, TOML's reading of ``retention.ms = 1``, back to
    ``{"retention.ms": 1}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _toml_scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return None


def _read_config_file(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"--config: {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    known = {v.config_key for v in ENV_VARS} | {a.lower() for v in ENV_VARS for a in v.aliases}
    errors: list[str] = []
    out: dict[str, str] = {}
    for key, value in data.items():
        producer_key = key.startswith(PRODUCER_ENV_PREFIX.lower())
        if key not in known and key not in _TABLE_KEYS and not producer_key:
            errors.append(
                f"{path}: unknown key {key!r}{_did_you_mean(key, known)}; keys are the "
                "environment variable names in lower case, such as 'bridge_topic'"
            )
            continue
        if key in _TABLE_KEYS and isinstance(value, dict):
            items = _flatten(value)
            bad = [k for k, v in items.items() if _toml_scalar(v) is None]
            if bad:
                errors.append(f"{path}: [{key}] {bad[0]!r} must be a string, a number or a boolean")
                continue
            if key == PRODUCER_CONFIG_TABLE:
                for prop, item in items.items():
                    out[producer_env_name(prop).lower()] = str(_toml_scalar(item))
            else:
                out[key] = ",".join(f"{k}={_toml_scalar(v)}" for k, v in items.items())
            continue
        text = _toml_scalar(value)
        if text is None:
            errors.append(f"{path}: key {key!r} must be a string, a number, a boolean or a list")
        else:
            out[key] = text
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def _did_you_mean(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key.lower(), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lookup(
    var: EnvVar,
    *,
    overrides: Mapping[str, str],
    env: Mapping[str, str],
    file_values: Mapping[str, str],
    config_file: Path | None,
    errors: list[str],
) -> _Raw | None:
    """The highest-precedence value for ``var``, or None when it is unset everywhere."""
    names = (var.name, *var.aliases)
    sources: list[tuple[str, Callable[[str], str | None], Callable[[str], str]]] = [
        ("flag", overrides.get, lambda n: _flag_origin(n, var)),
        ("env", env.get, lambda _n: "the environment"),
        ("file", lambda n: file_values.get(n.lower()), lambda n: f"{config_file}, {n.lower()}"),
    ]
    for _kind, get, origin in sources:
        found = [(n, v) for n in names if (v := get(n)) is not None]
        if not var.empty_is_value:
            found = [(n, v) for n, v in found if v.strip()]
        if not found:
            continue
        if len({v.strip() for _, v in found}) > 1:
            both = " and ".join(n for n, _ in found)
            errors.append(
                f"{var.name}: both {both} are set ({origin(found[0][0])}) to different "
                "values; set only one"
            )
        name, value = found[0]
        return _Raw(value, origin(name), name)
    return None


def _flag_origin(name: str, var: EnvVar) -> str:
    if name == var.name:
        return var.flag
    if name.startswith(PRODUCER_ENV_PREFIX):
        return f"{PRODUCER_FLAG} {_producer_property(name)}"
    return name


def load_settings(
    env: Mapping[str, str],
    config_file: Path | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    stderr_isatty: bool | None = None,
) -> Settings:
    """Build the validated Settings; raises ConfigError naming every bad setting.

    ``overrides`` maps variable names (canonical or alias) to flag values. ``stderr_isatty``
    decides the log format when ``BRIDGE_LOG_FORMAT`` is unset (default: ``sys.stderr``).
    """
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in _BY_NAME and not name.startswith(PRODUCER_ENV_PREFIX):
            raise ConfigError(f"unknown setting {name!r}")
    file_values = _read_config_file(config_file) if config_file is not None else {}

    errors: list[str] = []
    groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
    explicit: set[str] = set()
    for var in ENV_VARS:
        raw = _lookup(
            var,
            overrides=overrides,
            env=env,
            file_values=file_values,
            config_file=config_file,
            errors=errors,
        )
        if raw is None:
            continue
        explicit.add(var.name)
        try:
            value = var.parse(raw.value)
        except _Invalid as exc:
            got = "" if var.secret else f", got {raw.value.strip()[:80]!r}"
            hint = ""
            if raw.value.startswith("tcp://"):
                hint = (
                    "; this looks like a Kubernetes service link variable: rename the "
                    "Service or set enableServiceLinks: false"
                )
            errors.append(f"{raw.as_name}: expected {exc.expected}{got} (from {raw.origin}){hint}")
            continue
        group, attr = var.field.split(".")
        groups[group][attr] = value

    groups["kafka"]["producer_overrides"] = _producer_overrides(
        overrides, env, file_values, config_file, errors
    )

    if "BRIDGE_LOG_FORMAT" not in explicit:
        isatty = sys.stderr.isatty() if stderr_isatty is None else stderr_isatty
        groups["log"]["format"] = "console" if isatty else "json"

    if not errors:
        _validate_together(groups, errors)
    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return Settings(**{name: cls(**groups[name]) for name, cls in _GROUPS.items()})


def _producer_overrides(
    overrides: Mapping[str, str],
    env: Mapping[str, str],
    file_values: Mapping[str, str],
    config_file: Path | None,
    errors: list[str],
) -> tuple[tuple[str, str | int], ...]:
    """``KAFKA_PRODUCER_<PROPERTY>`` from the flags, the environment and the file, validated.

    The properties with a setting of their own (linger.ms, ...) are aliases in ENV_VARS.
    """
    prefix = PRODUCER_ENV_PREFIX
    names = {n for n in overrides if n.startswith(prefix)}
    names |= {n for n, v in env.items() if n.startswith(prefix) and v.strip()}
    names |= {k.upper() for k in file_values if k.startswith(prefix.lower())}
    names -= set(_BY_NAME)
    found: list[tuple[str, str | int]] = []
    supported = ", ".join(PRODUCER_PROPERTIES)
    for name in sorted(names):
        prop = _producer_property(name)
        if name in overrides:
            raw, origin = overrides[name], f"{PRODUCER_FLAG} {prop}"
        elif env.get(name, "").strip():
            raw, origin = env[name], "the environment"
        else:
            raw, origin = file_values[name.lower()], f"{config_file}, {name.lower()}"
        if prop in PRODUCER_PROPERTIES_RESERVED:
            errors.append(
                f"{name}: {prop} is not for the operator to override: "
                f"{PRODUCER_PROPERTIES_RESERVED[prop]} (from {origin})"
            )
            continue
        if prop in _PRODUCER_JAVA_ONLY:
            errors.append(
                f"{name}: {prop} is a Java client property; the bridge's Kafka client (aiokafka) "
                f"has no equivalent. Supported: {supported} (from {origin})"
            )
            continue
        if prop not in PRODUCER_PROPERTIES:
            hint = ""
            if raw.startswith("tcp://") or name.endswith(("_SERVICE_HOST", "_SERVICE_PORT")):
                hint = (
                    "; this looks like a Kubernetes service link variable of a Service named "
                    "kafka-producer: rename it or set enableServiceLinks: false"
                )
            known = set(PRODUCER_PROPERTIES) | set(PRODUCER_PROPERTY_SETTINGS)
            errors.append(
                f"{name}: unknown Kafka producer property {prop!r}{_did_you_mean(prop, known)}; "
                f"supported: {supported} (from {origin}){hint}"
            )
            continue
        _kwarg, parse = PRODUCER_PROPERTIES[prop]
        try:
            found.append((prop, parse(raw)))
        except _Invalid as exc:
            errors.append(
                f"{name}: expected {exc.expected}, got {raw.strip()[:80]!r} (from {origin})"
            )
    return tuple(found)


def _validate_together(groups: dict[str, dict[str, Any]], errors: list[str]) -> None:
    """Rules that involve more than one setting; fills in derived values."""
    api = ApiSettings(**groups["api"])
    if api.token is not None and api.token_file is not None:
        errors.append(
            "QODER_ACCESS_TOKEN and QODER_ACCESS_TOKEN_FILE are both set; set only one of them"
        )
    if api.backoff_max_s < api.backoff_initial_s:
        errors.append(
            f"BRIDGE_BACKOFF_MAX_S: expected a value >= BRIDGE_BACKOFF_INITIAL_S "
            f"({api.backoff_initial_s}), got {api.backoff_max_s}"
        )

    kafka = KafkaSettings(**groups["kafka"])
    topics = {
        "BRIDGE_TOPIC": kafka.topic,
        "BRIDGE_ALERTS_TOPIC": kafka.alerts_topic,
        "BRIDGE_CHECKPOINT_TOPIC": kafka.checkpoint_topic,
        "BRIDGE_DLQ_TOPIC": kafka.dlq_topic,
    }
    seen: dict[str, str] = {}
    for name, topic in topics.items():
        if topic is None:
            continue
        if topic in seen:
            errors.append(f"{name} and {seen[topic]} are both {topic!r}; each needs its own topic")
        seen[topic] = name

    policy = dict(kafka.checkpoint_topic_config).get("cleanup.policy")
    if policy is not None and "compact" not in [p.strip() for p in policy.split(",")]:
        errors.append(
            f"BRIDGE_CHECKPOINT_TOPIC_CONFIG: cleanup.policy must include compact (the topic "
            f"keeps the last checkpoint of every thread), got {policy!r}"
        )
    for name, configs in (
        ("BRIDGE_TOPIC_CONFIG", kafka.topic_config),
        ("BRIDGE_ALERTS_TOPIC_CONFIG", kafka.alerts_topic_config),
        ("BRIDGE_CHECKPOINT_TOPIC_CONFIG", kafka.checkpoint_topic_config),
        ("BRIDGE_DLQ_TOPIC_CONFIG", kafka.dlq_topic_config),
    ):
        isr = dict(configs).get("min.insync.replicas")
        if isr is not None and isr.isdigit() and int(isr) > kafka.replication_factor:
            errors.append(
                f"{name}: min.insync.replicas={isr} is more than BRIDGE_REPLICATION_FACTOR="
                f"{kafka.replication_factor}: every write with acks=all would be refused"
            )

    protocol = kafka.security_protocol
    sasl_set = [
        name
        for name, value in (
            ("KAFKA_SASL_MECHANISM", kafka.sasl_mechanism),
            ("KAFKA_SASL_USERNAME", kafka.sasl_username),
            ("KAFKA_SASL_PASSWORD", kafka.sasl_password),
        )
        if value is not None
    ]
    if protocol.startswith("SASL_"):
        missing = [
            name
            for name, value in (
                ("KAFKA_SASL_USERNAME", kafka.sasl_username),
                ("KAFKA_SASL_PASSWORD", kafka.sasl_password),
            )
            if value is None
        ]
        if missing:
            errors.append(
                f"{' and '.join(missing)}: required when KAFKA_SECURITY_PROTOCOL={protocol}"
            )
        if kafka.sasl_mechanism is None:
            groups["kafka"]["sasl_mechanism"] = "PLAIN"
    elif sasl_set:
        errors.append(
            f"{', '.join(sasl_set)}: set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
            "SASL; set KAFKA_SECURITY_PROTOCOL to SASL_PLAINTEXT or SASL_SSL"
        )

    ssl_files = {
        "KAFKA_SSL_CAFILE": kafka.ssl_cafile,
        "KAFKA_SSL_CERTFILE": kafka.ssl_certfile,
        "KAFKA_SSL_KEYFILE": kafka.ssl_keyfile,
    }
    ssl_set = [name for name, path in ssl_files.items() if path is not None]
    if protocol in ("SSL", "SASL_SSL"):
        for name, path in ssl_files.items():
            if path is not None and not path.is_file():
                errors.append(f"{name}: {path} does not exist or is not a file")
        if kafka.ssl_keyfile is not None and kafka.ssl_certfile is None:
            errors.append("KAFKA_SSL_KEYFILE: set without KAFKA_SSL_CERTFILE")
    elif ssl_set:
        errors.append(
            f"{', '.join(ssl_set)}: set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
            "TLS; set KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL"
        )

    delivery = DeliverySettings(**groups["delivery"])
    if delivery.max_in_flight_bytes < kafka.max_request_bytes:
        errors.append(
            f"BRIDGE_MAX_IN_FLIGHT_BYTES: expected a value >= KAFKA_MAX_REQUEST_BYTES "
            f"({kafka.max_request_bytes}) so the largest record fits, "
            f"got {delivery.max_in_flight_bytes}"
        )
    if delivery.transaction_timeout_ms <= delivery.commit_interval_ms:
        errors.append(
            f"BRIDGE_TRANSACTION_TIMEOUT_MS: expected a value > BRIDGE_COMMIT_INTERVAL_MS "
            f"({delivery.commit_interval_ms}), got {delivery.transaction_timeout_ms}"
        )


def require_token(api: ApiSettings) -> None:
    """``run`` and ``check`` refuse to start without a token: the same ConfigError (exit 2)."""
    if api.uses_simulator:
        # Never fall back to fake data silently: a pod with a missing secret must not start.
        raise ConfigError(
            "QODER_ACCESS_TOKEN: no token; set QODER_ACCESS_TOKEN (alias QODER_PAT) or "
            "QODER_ACCESS_TOKEN_FILE"
        )


def env_token(env: Mapping[str, str]) -> Secret | None:
    """The token from ``QODER_ACCESS_TOKEN`` or its alias ``QODER_PAT``, without validating
    anything else (``qoder-bridge simulate`` accepts that token)."""
    for name in ("QODER_ACCESS_TOKEN", "QODER_PAT"):
        value = env.get(name, "").strip()
        if value:
            return Secret(value)
    return None
