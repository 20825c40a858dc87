"""The publisher against a real broker where Kafka's answers are the hard part: commits whose
outcome is unknown, records a topic refuses, topics the bridge may not write."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.errors import ProducerFenced as KafkaProducerFenced

from bridge.checkpoints import ensure_topics
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import SinkForbidden
from bridge.health import HealthState
from bridge.publisher import Outgoing, Publisher
from bridge.records import Event, ThreadRef, dead_letter_record, event_record
from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec
from tests.bridge_harness import bridge_settings, deliver_scenario, read_json
from tests.kafka_broker import create_topics, lower_topic_limit, read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

_SCENARIO = Scenario(
    name="steady",
    seed=41,
    heartbeat_interval_s=0.5,
    sessions=(SessionSpec(ThreadSpec(events=80, rate=15), (ThreadSpec(events=60, rate=15),) * 3),),
)


@pytest.fixture
def unknown_commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every third commit answers nothing (a timeout): alternately after it really committed
    (its reply lost) and before EndTxn was ever sent (the transaction stays open)."""
    original = AIOKafkaProducer.commit_transaction
    calls: list[str] = []

    async def commit(self: AIOKafkaProducer) -> None:
        calls.append("commit")
        n = len(calls)
        if n % 3:
            return await original(self)
        if n % 6 == 3:
            await original(self)
            calls[-1] = "committed, reply lost"
        else:
            calls[-1] = "never sent"
        raise KafkaTimeoutError("EndTxn did not answer")

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", commit)
    yield calls


async def test_commits_with_an_unknown_outcome_neither_lose_nor_duplicate(
    kafka_bootstrap, kafka_topics, unknown_commits
):
    """Scenario (8.9): commits time out, some after the broker committed (the reply was lost),
    some before EndTxn left. The bridge learns each outcome before it rewinds anything: a
    read_committed consumer sees every event exactly once."""
    _records, delivery = await deliver_scenario(_SCENARIO, kafka_bootstrap, kafka_topics)
    assert "committed, reply lost" in unknown_commits and "never sent" in unknown_commits
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


async def test_records_larger_than_the_topic_takes_go_to_the_dlq_and_nothing_stalls(
    kafka_bootstrap, kafka_topics
):
    """Scenario (8.12): the events topic exists with max.message.bytes=20000 (below what the
    bridge may send); some tool results are 60 KB. Those are dead-lettered with their id and
    an alert; every other event reaches the topic once, in order, and nothing stalls."""
    await create_topics(
        kafka_bootstrap,
        [kafka_topics.events],
        partitions=3,
        configs={"max.message.bytes": "20000"},
    )
    scenario = Scenario(
        name="big-results",
        seed=42,
        heartbeat_interval_s=0.5,
        sessions=(SessionSpec(ThreadSpec(events=60, rate=40), (ThreadSpec(events=40, rate=40),)),),
        faults=Faults(huge_rate=0.3, huge_bytes=60_000),
    )
    records, delivery = await deliver_scenario(scenario, kafka_bootstrap, kafka_topics)
    dead = [json.loads(r.value) for r in await read_topic(kafka_bootstrap, kafka_topics.dlq)]
    dead_ids = {d["event_id"] for d in dead}
    assert dead and {d["reason"] for d in dead} == {"too_large"}
    # The DLQ topic takes them whole: the dead letter holds the event's exact bytes.
    assert all(not d["truncated"] and d["size_bytes"] > 60_000 for d in dead)
    published = {json.loads(r.value)["id"] for r in records}
    assert not dead_ids & published
    # Every event is either in the topic or dead-lettered, once; nothing else is missing.
    assert delivery.lost == len(dead_ids), delivery.summary()
    assert (delivery.duplicated, delivery.misordered) == (0, 0), delivery.summary()
    alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert len([a for a in alerts if a["type"] == "bridge.dead_letter"]) == len(dead_ids)


async def test_a_topic_the_bridge_may_not_write_is_fatal_with_its_name():
    """Scenario (8.12): the broker refuses a topic by ACL. Retrying can never succeed: the
    batch fails with a fatal error that names the cause, instead of aborting forever."""
    publisher = Publisher(Settings(), HealthState())
    cursor = ThreadCursor(ThreadRef("sess_1", "sthr_1"))
    record = dead_letter_record(
        "qoder.alerts",
        cursor.thread,
        "not_json",
        b"x",
        event_id=None,
        event_type=None,
        limit_bytes=1000,
    )
    item = Outgoing(cursor, cursor.epoch, [record], event_id="evt_1")
    await publisher._budget.acquire(item.size)

    class Refusing:
        async def begin_transaction(self) -> None:
            pass

        async def partitions_for(self, topic: str) -> Any:
            raise TopicAuthorizationFailedError(topic)  # as aiokafka's metadata wait does

        async def send_batch(self, *args: Any, **kwargs: Any) -> Any:
            raise TopicAuthorizationFailedError("qoder.alerts")

    publisher._producer = Refusing()  # type: ignore[assignment]
    with pytest.raises(SinkForbidden, match=r"qoder\.alerts"):
        with anyio.fail_after(5):
            await publisher._publish_until_done([item])
    assert publisher._budget.used == 0


def test_a_dead_letter_fits_its_limit_whatever_the_escaping() -> None:
    """Scenario (8.12): a frame of control characters escapes to six times its size in JSON;
    the dead letter is cut by its encoded size, so the broker never refuses it."""
    thread = ThreadRef("sess_1", "sthr_1")
    data = bytes(range(32)) * 4000
    record = dead_letter_record(
        "dlq", thread, "not_json", data, event_id="evt_1", event_type=None, limit_bytes=20_000
    )
    assert record.size <= 20_000
    doc = json.loads(record.value)
    assert doc["truncated"] is True and doc["size_bytes"] == len(data)
    assert data.startswith(doc["data"].encode())


@pytest.fixture
def broken_producers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Twice, a transaction call raises AssertionError, as aiokafka's transaction manager does
    once its sender routine has died (a broker restart can do it): the second begin, and the
    fourth commit (never sent)."""
    begin, commit = AIOKafkaProducer.begin_transaction, AIOKafkaProducer.commit_transaction
    calls: list[str] = []

    async def broken_begin(self: AIOKafkaProducer) -> None:
        calls.append("begin")
        if len([c for c in calls if c.startswith("begin")]) == 2:
            calls[-1] = "begin broken"
            raise AssertionError("transaction state")
        return await begin(self)  # type: ignore[no-any-return]

    async def broken_commit(self: AIOKafkaProducer) -> None:
        calls.append("commit")
        if len([c for c in calls if c.startswith("commit")]) == 4:
            calls[-1] = "commit broken"
            raise AssertionError("transaction state")
        return await commit(self)  # type: ignore[no-any-return]

    monkeypatch.setattr(AIOKafkaProducer, "begin_transaction", broken_begin)
    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", broken_commit)
    yield calls


async def test_a_producer_broken_inside_aiokafka_is_replaced_and_nothing_is_lost(
    kafka_bootstrap, kafka_topics, broken_producers
):
    """Scenario: transaction calls fail with aiokafka's AssertionError (a producer whose sender
    died), at a begin and at a commit. The bridge replaces the producer, reads the batch's
    threads again, drains with exit 0, and a read_committed consumer sees every event
    exactly once. Before, the AssertionError escaped the publisher: exit 1."""
    _records, delivery = await deliver_scenario(_SCENARIO, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert "begin broken" in broken_producers and "commit broken" in broken_producers


async def test_a_topic_limit_lowered_while_publishing_names_the_record_too_large(
    kafka_bootstrap, kafka_topics
):
    """Scenario: the events topic takes 1 MB when the publisher starts, then an operator lowers
    it to 20,000 bytes. The next batch (three 15 KB events and a 30 KB one of one thread, random
    text that compression cannot shrink: one Kafka batch of 75 KB) is refused whole. Sent again
    one record a batch, the three reach the topic once, in order, and the 30 KB one is
    dead-lettered by its id."""
    settings = bridge_settings("http://127.0.0.1:9", kafka_bootstrap, kafka_topics)
    await create_topics(
        kafka_bootstrap,
        [kafka_topics.events],
        partitions=3,
        configs={"max.message.bytes": "1048576"},
    )
    await ensure_topics(settings.kafka)
    health = HealthState()
    publisher = Publisher(settings, health, transactional_id=f"{kafka_topics.group}-0", shard=0)
    thread = ThreadRef("sess_limit", "sthr_limit")
    publisher.checkpoints_read(0)  # as ShardManager says after reading them: none yet
    cursor = ThreadCursor(thread)
    sizes = {"evt_1": 15_000, "evt_2": 15_000, "evt_3": 30_000, "evt_4": 15_000}
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        await lower_topic_limit(kafka_bootstrap, kafka_topics.events, 20_000)
        for event_id, size in sizes.items():
            text = base64.b64encode(os.urandom(size * 3 // 4)).decode()  # zstd cannot shrink it
            data = json.dumps({"id": event_id, "type": "message", "text": text}).encode()
            record = event_record(
                settings.kafka.topic, thread, Event(event_id, "message", data, {})
            )
            await publisher.submit(
                Outgoing(cursor, cursor.epoch, [record], event_id=event_id, event_type="message")
            )
            cursor.mark_submitted(cursor.epoch, event_id, moves_cursor=True)
        publisher.close()
    assert publisher.drained
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    assert [json.loads(r.value)["id"] for r in events] == ["evt_1", "evt_2", "evt_4"]
    dead = [json.loads(r.value) for r in await read_topic(kafka_bootstrap, kafka_topics.dlq)]
    assert [(d["event_id"], d["reason"]) for d in dead] == [("evt_3", "too_large")]
    assert cursor.committed_id == "evt_4"


async def test_a_fence_in_the_same_round_as_a_size_refusal_is_not_masked_by_it():
    """One round, two partitions: Kafka refuses a record for its size on one, and fences the
    producer on the other. The fence is what the publisher reports (a restart would take the
    transactional id back from the member that now owns the shard), not the refusal."""
    publisher = Publisher(Settings(), HealthState(), transactional_id="t-0", shard=0)
    loop = asyncio.get_running_loop()
    answers = iter([MessageSizeTooLargeError(), KafkaProducerFenced()])

    class Batch:
        def append(self, **_: Any) -> object:
            return object()

    class Producer:
        async def partitions_for(self, topic: str) -> set[int]:
            return {0, 1, 2}

        def create_batch(self) -> Batch:
            return Batch()

        async def send_batch(self, *_: Any, **__: Any) -> asyncio.Future[Any]:
            future = loop.create_future()
            future.set_exception(next(answers))
            return future

    records = [
        event_record("events", ThreadRef("sess_a", f"sthr_{n}"), Event(f"e{n}", "m", b"{}", {}))
        for n in (1, 2)
    ]
    places = {publisher._partitioner(r.key, [0, 1, 2], [0, 1, 2]) for r in records}
    assert len(places) == 2  # two batches, one answer each
    with pytest.raises(KafkaProducerFenced):
        await publisher._send_all(Producer(), records)  # type: ignore[arg-type]
