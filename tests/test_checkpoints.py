"""Checkpoints as a restarted bridge reads them (the real broker, read_committed, to the end),
and the topics the bridge creates, as the broker describes them."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge.checkpoints import Checkpoint, ensure_topics, load_checkpoints
from bridge.config import KafkaSettings, load_settings
from bridge.errors import ConfigError

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def test_restart_believes_only_committed_checkpoints_last_one_wins(
    kafka_bootstrap, kafka_topics
):
    """Scenario: checkpoints written in a committed transaction, then newer ones in an aborted
    transaction, then a tombstone for one thread: a restart resumes each thread after its last
    committed checkpoint and forgets the deleted one."""
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=kafka_topics.events,
        checkpoint_topic=kafka_topics.checkpoints,
        dlq_topic=kafka_topics.dlq,
        alerts_topic=None,
        topic_partitions=3,
    )
    await ensure_topics(kafka)
    assert await load_checkpoints(kafka) == {}
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=kafka_topics.transactional_id
    )
    await producer.start()
    try:
        async with producer.transaction():
            for n in range(1, 4):
                for thread in ("s/a", "s/b", "s/c"):
                    value = f'{{"last_event_id":"evt_{thread[-1]}{n}","drained_updated_at":null}}'
                    await producer.send(kafka.checkpoint_topic, value.encode(), key=thread.encode())
        await producer.begin_transaction()
        await producer.send(kafka.checkpoint_topic, b'{"last_event_id":"evt_a9"}', key=b"s/a")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(kafka.checkpoint_topic, None, key=b"s/c")
    finally:
        await producer.stop()

    assert await load_checkpoints(kafka) == {
        "s/a": Checkpoint("evt_a3", None),
        "s/b": Checkpoint("evt_b3", None),
    }


async def topic_configs(bootstrap: str, topic: str, names: list[str]) -> dict[str, str]:
    """The topic's configs as the broker reports them (describe_configs)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))]
        )
    finally:
        await admin.close()
    ((_code, _msg, _type, _name, entries),) = response.resources
    return {entry[0]: entry[1] for entry in entries}


async def partitions(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described["partitions"])


async def test_topics_are_created_with_their_own_partitions_and_configs(
    kafka_bootstrap, kafka_topics
):
    """Scenario: an operator sets partitions and retention per topic, the way Kafka Connect
    users set topic.creation.*. The broker reports exactly those on the topics the bridge
    created; BRIDGE_TOPIC_PARTITIONS shapes the events topic only, and the checkpoint topic
    stays compacted under the operator's configs."""
    settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "BRIDGE_TOPIC": kafka_topics.events,
            "BRIDGE_ALERTS_TOPIC": kafka_topics.alerts,
            "BRIDGE_CHECKPOINT_TOPIC": kafka_topics.checkpoints,
            "BRIDGE_DLQ_TOPIC": kafka_topics.dlq,
            "BRIDGE_TOPIC_PARTITIONS": "4",
            "BRIDGE_DLQ_TOPIC_PARTITIONS": "2",
            "BRIDGE_TOPIC_CONFIG": "retention.ms=604800000,min.insync.replicas=1",
            "BRIDGE_ALERTS_TOPIC_CONFIG": "retention.ms=86400000,cleanup.policy=compact,delete",
            "BRIDGE_CHECKPOINT_TOPIC_CONFIG": "min.compaction.lag.ms=1000,segment.ms=3600000",
            "BRIDGE_DLQ_TOPIC_CONFIG": "max.message.bytes=2097152",
        }
    )
    await ensure_topics(settings.kafka)
    bootstrap = kafka_bootstrap
    assert await partitions(bootstrap, kafka_topics.events) == 4
    assert await partitions(bootstrap, kafka_topics.dlq) == 2
    assert await partitions(bootstrap, kafka_topics.alerts) == 1
    assert await partitions(bootstrap, kafka_topics.checkpoints) == 32  # the shards, always
    events = await topic_configs(
        bootstrap, kafka_topics.events, ["retention.ms", "min.insync.replicas"]
    )
    assert events == {"retention.ms": "604800000", "min.insync.replicas": "1"}
    alerts = await topic_configs(bootstrap, kafka_topics.alerts, ["retention.ms", "cleanup.policy"])
    assert alerts == {"retention.ms": "86400000", "cleanup.policy": "compact,delete"}
    checkpoints = await topic_configs(
        bootstrap,
        kafka_topics.checkpoints,
        ["cleanup.policy", "min.compaction.lag.ms", "segment.ms"],
    )
    assert checkpoints == {
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "1000",
        "segment.ms": "3600000",
    }
    dlq = await topic_configs(bootstrap, kafka_topics.dlq, ["max.message.bytes"])
    assert dlq == {"max.message.bytes": "2097152"}

    # Existing topics are left as they are: a second start changes nothing and says nothing.
    await ensure_topics(settings.kafka)
    assert await partitions(bootstrap, kafka_topics.events) == 4


async def test_a_topic_config_the_broker_refuses_is_a_config_error(kafka_bootstrap, kafka_topics):
    """Scenario: a typo in a topic config name. The bridge stops with a configuration error
    (exit 2) naming the setting and the broker's words, instead of retrying forever."""
    settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "BRIDGE_TOPIC": kafka_topics.events,
            "BRIDGE_ALERTS_TOPIC": "",
            "BRIDGE_CHECKPOINT_TOPIC": kafka_topics.checkpoints,
            "BRIDGE_DLQ_TOPIC": kafka_topics.dlq,
            "BRIDGE_DLQ_TOPIC_CONFIG": "retention.msec=1000",
        }
    )
    with pytest.raises(ConfigError, match=r"^BRIDGE_DLQ_TOPIC_CONFIG: the broker refused") as info:
        await ensure_topics(settings.kafka)
    assert "retention.msec" in str(info.value)


def _topics_settings(bootstrap: str, topics: Any) -> Any:
    return load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "BRIDGE_TOPIC": topics.events,
            "BRIDGE_ALERTS_TOPIC": topics.alerts,
            "BRIDGE_CHECKPOINT_TOPIC": topics.checkpoints,
            "BRIDGE_DLQ_TOPIC": topics.dlq,
        }
    )


async def test_a_checkpoint_topic_that_is_not_32_shards_is_refused_with_the_way_out(
    kafka_bootstrap, kafka_topics
):
    """Scenario: an operator upgrades a bridge whose checkpoint topic was created with one
    partition (the old default). The bridge shards sessions over 32 partitions of that topic:
    it refuses to start (a ConfigError, exit 2) naming the topic, the count it found and the
    migration command, instead of looking for checkpoints in the wrong partitions."""
    from aiokafka.admin import NewTopic  # noqa: PLC0415

    from bridge.checkpoints import admin_client  # noqa: PLC0415
    from bridge.errors import ConfigError  # noqa: PLC0415

    settings = _topics_settings(kafka_bootstrap, kafka_topics)
    async with admin_client(settings.kafka) as admin:
        await admin.create_topics([NewTopic(kafka_topics.checkpoints, 1, 1)])
    with pytest.raises(ConfigError) as refused:
        await ensure_topics(settings.kafka)
    message = str(refused.value)
    assert message.startswith("BRIDGE_CHECKPOINT_TOPIC: ")
    assert f"{kafka_topics.checkpoints!r} has 1 partition(s)" in message
    assert "qoder-bridge checkpoints migrate" in message


async def test_a_bridge_does_not_start_half_way_through_a_checkpoint_migration(
    kafka_bootstrap, kafka_topics
):
    """Scenario: `checkpoints migrate` was interrupted after it deleted the old checkpoint
    topic (its copy, `<topic>.migrating`, holds every checkpoint). A bridge started now would
    create an empty checkpoint topic and publish every thread again from its start; instead it
    refuses, exit 2, saying how to finish the migration."""
    from aiokafka.admin import NewTopic  # noqa: PLC0415

    from bridge.checkpoints import admin_client  # noqa: PLC0415
    from bridge.errors import ConfigError  # noqa: PLC0415

    settings = _topics_settings(kafka_bootstrap, kafka_topics)
    async with admin_client(settings.kafka) as admin:
        await admin.create_topics([NewTopic(kafka_topics.checkpoints + ".migrating", 32, 1)])
        with anyio.fail_after(30):  # (left behind minutes ago, in the story)
            while kafka_topics.checkpoints + ".migrating" not in await admin.list_topics():
                await anyio.sleep(0.1)
    with pytest.raises(ConfigError) as refused:
        await ensure_topics(settings.kafka)
    assert "checkpoints migrate --execute" in str(refused.value)
    async with admin_client(settings.kafka) as admin:
        assert kafka_topics.checkpoints not in await admin.list_topics()  # nothing created
