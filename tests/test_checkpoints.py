"""Checkpoints as a restarted bridge reads them: the real broker, read_committed, to the end."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from bridge.checkpoints import Checkpoint, ensure_topics, load_checkpoints
from bridge.config import KafkaSettings

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
