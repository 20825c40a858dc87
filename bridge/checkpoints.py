"""Topics the bridge writes, and the checkpoints it resumes from.

Checkpoints live in a compacted topic keyed ``{session_id}/{thread_id}``. On start they are read
with ``read_committed`` to the end of the topic before any pump starts, so a checkpoint written in
an aborted transaction is never believed. The same topic keeps, keyed ``{session_id}`` alone, the
mark of a session that settled (nothing running, every thread drained): ``settled_updated_at``,
its ``updated_at`` then. Listed again with nothing newer, that session costs no request, across
restarts too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

from bridge.config import KafkaSettings
from bridge.errors import ConfigError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs
from bridge.records import Record, canonical_json
from bridge.shards import SHARDS, shard_of

log = structlog.get_logger("bridge.checkpoints")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    last_event_id: str | None
    drained_updated_at: str | None
    #: The ids handed on just before ``last_event_id``: replays from before the cursor.
    recent_ids: tuple[str, ...] = ()
    #: Items without an id handed on after ``last_event_id`` (dead letters, known by place).
    idless_after: int = 0


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the bridge creates when it is missing, and the settings that shape it."""

    name: str
    partitions: int
    configs: dict[str, str]
    partitions_setting: str
    config_setting: str


#: The checkpoint topic keeps one record per thread; the operator's configs go over these.
#: Small segments: the active one is never compacted, and a new owner of a shard reads its
#: partition from the start (a minute of updates, not a gigabyte, on top of one per thread).
CHECKPOINT_TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "60000",
    "segment.bytes": "16777216",
    "segment.ms": "3600000",
}


def topic_specs(kafka: KafkaSettings, checkpoint_partitions: int = SHARDS) -> list[TopicSpec]:
    """The bridge's topics with their partitions and configs (``BRIDGE_*_TOPIC_PARTITIONS``,
    ``BRIDGE_*_TOPIC_CONFIG``)."""
    specs = [
        TopicSpec(
            kafka.topic,
            kafka.topic_partitions,
            dict(kafka.topic_config),
            "BRIDGE_TOPIC_PARTITIONS",
            "BRIDGE_TOPIC_CONFIG",
        ),
        TopicSpec(
            kafka.dlq_topic,
            kafka.dlq_topic_partitions,
            dict(kafka.dlq_topic_config),
            "BRIDGE_DLQ_TOPIC_PARTITIONS",
            "BRIDGE_DLQ_TOPIC_CONFIG",
        ),
        TopicSpec(
            kafka.checkpoint_topic,
            checkpoint_partitions,  # a partition per shard (bridge/shards.py)
            {**CHECKPOINT_TOPIC_CONFIGS, **dict(kafka.checkpoint_topic_config)},
            "BRIDGE_CHECKPOINT_TOPIC",
            "BRIDGE_CHECKPOINT_TOPIC_CONFIG",
        ),
    ]
    if kafka.alerts_topic:
        specs.append(
            TopicSpec(
                kafka.alerts_topic,
                kafka.alerts_topic_partitions,
                dict(kafka.alerts_topic_config),
                "BRIDGE_ALERTS_TOPIC_PARTITIONS",
                "BRIDGE_ALERTS_TOPIC_CONFIG",
            )
        )
    return specs


async def ensure_topics(
    kafka: KafkaSettings, *, timeout_s: float = 60, shard_topic: bool = True
) -> None:
    """Create the bridge's topics when they are missing, with their partitions and configs.

    Topics that exist are left as they are. Raises ConfigError, naming the setting, when the
    broker refuses a topic for its partitions, replication factor or configs (retrying would
    not help), and SinkUnavailable when Kafka cannot be reached.
    """
    try:
        with anyio.fail_after(timeout_s):
            async with admin_client(kafka) as admin:
                specs = topic_specs(kafka, SHARDS if shard_topic else 1)
                await _create_missing(admin, kafka, specs)
                if not shard_topic:
                    return  # a replay's progress topic in the checkpoint topic's place
                partitions = await _partition_count(admin, kafka.checkpoint_topic)
    except (KafkaError, TimeoutError) as exc:
        raise SinkUnavailable(
            f"cannot create topics on {kafka.bootstrap_servers}: "
            f"{describe_kafka_error(exc, kafka.bootstrap_servers)}"
        ) from exc
    check_shard_partitions(kafka.checkpoint_topic, partitions)


async def _partition_count(admin: AIOKafkaAdminClient, topic: str) -> int:
    """The topic's partitions, once the broker's metadata knows it (a topic created a moment
    ago may be described without them)."""
    while True:
        partitions = await described_partitions(admin, topic)
        if partitions:
            return len(partitions)
        await anyio.sleep(0.2)


async def described_partitions(admin: AIOKafkaAdminClient, topic: str) -> list[int] | None:
    """The topic's partitions, from the admin API (a consumer's own metadata only knows the
    topics it is assigned); None when there is no such topic. Any other error raises:
    believing "no checkpoints" by mistake would republish every thread from its start."""
    (described,) = await admin.describe_topics([topic])
    code = described.get("error_code", 0)
    if code == UnknownTopicOrPartitionError.errno:
        return None
    if code != 0:
        raise SinkUnavailable(f"cannot describe the topic {topic}: error {code}")
    return sorted(p["partition"] for p in described.get("partitions", []))


def check_shard_partitions(topic: str, partitions: int) -> None:
    """Refuse a checkpoint topic whose partitions are not the shards: every session's
    checkpoints would be looked for in the wrong place."""
    if partitions != SHARDS:
        raise ConfigError(
            f"BRIDGE_CHECKPOINT_TOPIC: {topic!r} has {partitions} partition(s); the bridge "
            f"keeps each session's checkpoints in one of {SHARDS} shards, a partition each, "
            "and needs exactly that many. Stop every bridge and run `qoder-bridge checkpoints "
            "migrate` (it moves the checkpoints into a topic of 32 partitions), or name a new "
            "topic (the bridge creates it; every thread is then read from its start)"
        )


@asynccontextmanager
async def admin_client(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client, started, and closed however the block ends (5 s at most)."""
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(kafka))
    try:
        await admin.start()
        yield admin
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()


# Broker answers to CreateTopics that no retry can fix, and the setting to blame.
_BAD_PARTITIONS = InvalidPartitionsError.errno  # 37
_BAD_REPLICATION = InvalidReplicationFactorError.errno  # 38
_BAD_CONFIG = (InvalidConfigurationError.errno, PolicyViolationError.errno)  # 40, 44


async def _create_missing(
    admin: AIOKafkaAdminClient, kafka: KafkaSettings, specs: list[TopicSpec]
) -> None:
    existing = set(await admin.list_topics())
    if f"{kafka.checkpoint_topic}.migrating" in existing:
        # Half-way through `checkpoints migrate`: a topic made now would be an empty one, and
        # every thread would be published again from its start.
        raise ConfigError(
            f"BRIDGE_CHECKPOINT_TOPIC: {kafka.checkpoint_topic!r} is being migrated (the topic "
            f"{kafka.checkpoint_topic + '.migrating'!r} exists): finish it with `qoder-bridge "
            "checkpoints migrate --execute` before starting a bridge"
        )
    missing = [spec for spec in specs if spec.name not in existing]
    if not missing:
        return
    response = await admin.create_topics(
        [
            NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=kafka.replication_factor,
                topic_configs=spec.configs,
            )
            for spec in missing
        ]
    )
    by_name = {spec.name: spec for spec in missing}
    for topic, code, *message in response.topic_errors:
        # 36 TOPIC_ALREADY_EXISTS: another instance won the race, which is fine.
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        detail = (message[-1] if message else "") or f"error {code}"
        spec = by_name.get(topic)
        if spec is not None and code == _BAD_PARTITIONS:
            raise ConfigError(f"{spec.partitions_setting}: the broker refused {topic!r}: {detail}")
        if spec is not None and code == _BAD_REPLICATION:
            raise ConfigError(f"BRIDGE_REPLICATION_FACTOR: the broker refused {topic!r}: {detail}")
        if spec is not None and code in _BAD_CONFIG:
            raise ConfigError(
                f"{spec.config_setting}: the broker refused the configs of {topic!r}: {detail}"
            )
        raise SinkUnavailable(f"cannot create topic {topic!r}: {code} {detail}")
    log.info(
        "bridge.topics.created",
        topics=[spec.name for spec in missing],
        partitions=[spec.partitions for spec in missing],
    )


def is_session_key(key: str) -> bool:
    """A session's settled mark (``{session_id}``), not a thread's checkpoint."""
    return "/" not in key


def settled_record(topic: str, session_id: str, updated_at: str) -> Record:
    doc = {"session_id": session_id, "settled_updated_at": updated_at}
    return Record(
        topic, session_id.encode(), canonical_json(doc), [], partition=shard_of(session_id)
    )


def parse_settled(value: bytes | None) -> str | None:
    """A settled mark's ``settled_updated_at``; None for a tombstone or anything else."""
    try:
        doc: Any = json.loads(value) if value is not None else None
    except ValueError:
        return None
    mark = doc.get("settled_updated_at") if isinstance(doc, dict) else None
    return mark if isinstance(mark, str) else None


def parse_checkpoint(value: bytes | None) -> Checkpoint | None:
    if value is None:
        return None  # a tombstone
    try:
        doc: Any = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    last, drained = doc.get("last_event_id"), doc.get("drained_updated_at")
    recent, idless = doc.get("recent_ids"), doc.get("idless_after")
    return Checkpoint(
        last if isinstance(last, str) else None,
        drained if isinstance(drained, str) else None,
        tuple(i for i in recent if isinstance(i, str)) if isinstance(recent, list) else (),
        idless if isinstance(idless, int) and idless > 0 else 0,
    )


async def _partitions(kafka: KafkaSettings, topic: str) -> list[int]:
    """The topic's partitions; none for a topic that does not exist."""
    async with admin_client(kafka) as admin:
        return await described_partitions(admin, topic) or []


_parse = parse_checkpoint


async def load_checkpoints(
    kafka: KafkaSettings, *, timeout_s: float = 120
) -> dict[str, Checkpoint]:
    """Every committed checkpoint, by ``{session_id}/{thread_id}``: the last one for each key."""
    result: dict[str, Checkpoint] = {}

    def keep(records: list[tuple[str, bytes | None]]) -> None:
        for key, value in records:
            if is_session_key(key):
                continue
            checkpoint = parse_checkpoint(value)
            if checkpoint is None:
                result.pop(key, None)
            else:
                result[key] = checkpoint

    await read_checkpoints(kafka, keep, timeout_s=timeout_s)
    return result


async def read_checkpoints(
    kafka: KafkaSettings,
    keep: Callable[[list[tuple[str, bytes | None]]], None],
    *,
    timeout_s: float = 120,
    shards: Iterable[int] | None = None,
    ends: dict[int, int] | None = None,
) -> int:
    """Hand every committed checkpoint record to ``keep``, batch by batch, in topic order per
    key, up to the end of the topic as it was when reading began; the number of records.
    ``shards``: only those partitions (a member acquiring them); ``ends``: filled with each
    partition's end as read (its last stable offset)."""
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(kafka),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    count = 0
    try:
        with anyio.fail_after(timeout_s):
            if shards is None:
                partitions = await _partitions(kafka, kafka.checkpoint_topic)
            else:
                partitions = sorted(shards)
            await consumer.start()
            tps = [TopicPartition(kafka.checkpoint_topic, p) for p in partitions]
            if tps:
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                end_of = await consumer.end_offsets(tps)
                remaining = {tp for tp in tps if end_of[tp] > 0}
                while remaining:
                    batches = await consumer.getmany(*remaining, timeout_ms=500)
                    for records in batches.values():
                        batch = [(r.key.decode(), r.value) for r in records if r.key]
                        count += len(batch)
                        keep(batch)
                    for tp in list(remaining):
                        if await consumer.position(tp) >= end_of[tp]:
                            remaining.discard(tp)
                if ends is not None:
                    ends.update((tp.partition, end) for tp, end in end_of.items())
    except (KafkaError, TimeoutError) as exc:
        raise SinkUnavailable(
            f"cannot read checkpoints from {kafka.checkpoint_topic}: "
            f"{describe_kafka_error(exc, kafka.bootstrap_servers)}"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()
    if shards is None:
        log.info("bridge.checkpoints.loaded", records=count)
    return count


#: The header of a checkpoint written by a shard's publisher: which publisher (a random token
#: of each), so that one whose producer was replaced can tell whether someone else committed
#: to its shard meanwhile (Publisher._sole_writer).
WRITER_HEADER = "bridge_writer"


@asynccontextmanager
async def _partition_reader(
    kafka: KafkaSettings,
    partition: TopicPartition,
    doing: str,
    *,
    timeout_s: float,
    offset_reset: str = "latest",
) -> AsyncIterator[AIOKafkaConsumer]:
    """A read_committed consumer of one partition, stopped (bounded) however the block ends;
    Kafka's errors and the timeout become SinkUnavailable("cannot <doing>: ...")."""
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(kafka),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset=offset_reset,
        group_id=None,
    )
    try:
        with anyio.fail_after(timeout_s):
            await consumer.start()
            consumer.assign([partition])
            yield consumer
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot {doing}: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()


async def foreign_checkpoints(
    kafka: KafkaSettings, shard: int, start: int, writer: bytes, *, timeout_s: float = 30
) -> int:
    """How many checkpoints committed to the shard's partition from offset ``start`` on were
    written by someone other than ``writer`` (another member, an operator's tool)."""
    partition = TopicPartition(kafka.checkpoint_topic, shard)
    foreign = 0
    # (offset_reset: start no longer in the log, it reads from the log's first offset)
    doing = f"read the checkpoints of shard {shard}"
    async with _partition_reader(
        kafka, partition, doing, timeout_s=timeout_s, offset_reset="earliest"
    ) as consumer:
        end = (await consumer.end_offsets([partition]))[partition]
        if end <= start:
            return 0
        consumer.seek(partition, start)
        while await consumer.position(partition) < end:
            batches = await consumer.getmany(partition, timeout_ms=500)
            for record in batches.get(partition, ()):
                if record.offset < end and (WRITER_HEADER, writer) not in record.headers:
                    foreign += 1
    return foreign


async def transaction_committed(
    kafka: KafkaSettings, partition: TopicPartition, offset: int, *, timeout_s: float = 30
) -> bool:
    """Whether the transaction that wrote ``offset`` of ``partition`` committed.

    Asked after a new producer with the same transactional.id has started: that start
    completes a transaction whose commit had reached the coordinator and aborts any other,
    so the record is then either visible to read_committed or skipped as aborted.
    """
    doing = "learn a transaction's outcome"
    async with _partition_reader(kafka, partition, doing, timeout_s=timeout_s) as consumer:
        consumer.seek(partition, offset)
        while True:
            batches = await consumer.getmany(partition, timeout_ms=500)
            if any(r.offset == offset for r in batches.get(partition, ())):
                return True
            if await consumer.position(partition) > offset:
                return False  # read past it without seeing it: aborted


async def topic_record_limits(kafka: KafkaSettings, *, timeout_s: float = 30) -> dict[str, int]:
    """Each of our topics' ``max.message.bytes``: a record above it is refused by the broker,
    and a batch above it takes every record in it down, so the publisher stays below."""
    topics = [kafka.topic, kafka.dlq_topic, kafka.checkpoint_topic]
    if kafka.alerts_topic:
        topics.append(kafka.alerts_topic)
    limits: dict[str, int] = {}
    try:
        with anyio.fail_after(timeout_s):
            async with admin_client(kafka) as admin:
                responses = await admin.describe_configs(
                    [
                        ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None})
                        for t in topics
                    ]
                )
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot read the topics' settings: {cause}") from exc
    for response in responses:
        for _code, _message, _type, name, entries in response.resources:
            for entry in entries:
                if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                    limits[name] = int(entry[1])
    return limits
