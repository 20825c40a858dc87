"""Review of issue 11's per-core work (7e47eed..3b9f0ae): the publisher's batch API, the
collection window counted from the first read, one send round a transaction.

Each test is a finding, marked ``xfail(strict=True)`` until it was fixed (all three are): it
asserts what a user checks (the records in the topic, counted, in order) against the real
broker fixture.
"""

from __future__ import annotations

import base64
import json
import os

import anyio
import pytest

from bridge.checkpoints import ensure_topics
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.health import HealthState
from bridge.publisher import Outgoing, Publisher
from bridge.records import Event, ThreadRef, event_record
from bridge.sharding import RELEASE_WITHIN_S, ShardedPublisher
from bridge.shards import shard_of
from tests.bridge_harness import bridge_settings
from tests.kafka_broker import create_topics, lower_topic_limit, read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _settings(bootstrap: str, topics: object, **extra: str) -> Settings:
    return bridge_settings("http://127.0.0.1:9", bootstrap, topics, **extra)


def _incompressible(event_id: str, size: int) -> bytes:
    """An event of about ``size`` bytes that zstd cannot shrink."""
    text = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    return json.dumps({"id": event_id, "type": "message", "text": text}).encode()


def _outgoing(settings: Settings, cursor: ThreadCursor, event_id: str, data: bytes) -> Outgoing:
    record = event_record(settings.kafka.topic, cursor.thread, Event(event_id, "message", data, {}))
    return Outgoing(cursor, cursor.epoch, [record], event_id=event_id, event_type="message")


def _session_in(shard: int) -> str:
    n = 0
    while shard_of(f"sess_{n}") != shard:
        n += 1
    return f"sess_{n}"


# -- finding 1: at_least_once, a record refused in "alone" mode re-sends every one before it --


async def test_finding1_at_least_once_a_lowered_limit_publishes_each_event_once(
    kafka_bootstrap, kafka_topics
):
    """Scenario: test_publisher_kafka's lowered-limit scenario, with BRIDGE_DELIVERY=
    at_least_once. The events topic takes 1 MB when the publisher starts, then 20,000 bytes;
    one thread's batch holds three 15 KB events and a 30 KB one (evt_3): one Kafka batch of
    75 KB, refused whole (BatchTooLarge), sent again one record a batch.

    Expected (CONTRACT: at_least_once, duplicates only around a crash; order per key): the
    topic holds evt_1, evt_2, evt_4 once each, in order, and evt_3 is dead-lettered. Today
    the "alone" round writes and acknowledges evt_1 and evt_2, is refused evt_3, raises
    RecordsRejected, and the retry (dead letter in place of evt_3) sends evt_1 and evt_2 again:
    the topic reads evt_1, evt_2, evt_1, evt_2, evt_4. With k refused records in a batch of n,
    the records before the last refused one are written up to k + 1 times."""
    settings = _settings(kafka_bootstrap, kafka_topics, BRIDGE_DELIVERY="at_least_once")
    await create_topics(
        kafka_bootstrap,
        [kafka_topics.events],
        partitions=3,
        configs={"max.message.bytes": "1048576"},
    )
    await ensure_topics(settings.kafka)
    publisher = Publisher(settings, HealthState())
    cursor = ThreadCursor(ThreadRef("sess_alo", "sthr_alo"))
    sizes = {"evt_1": 15_000, "evt_2": 15_000, "evt_3": 30_000, "evt_4": 15_000}
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        await lower_topic_limit(kafka_bootstrap, kafka_topics.events, 20_000)
        for event_id, size in sizes.items():
            await publisher.submit(
                _outgoing(settings, cursor, event_id, _incompressible(event_id, size))
            )
            cursor.mark_submitted(cursor.epoch, event_id, moves_cursor=True)
        publisher.close()
    assert publisher.drained
    dead = [json.loads(r.value) for r in await read_topic(kafka_bootstrap, kafka_topics.dlq)]
    assert [(d["event_id"], d["reason"]) for d in dead] == [("evt_3", "too_large")]
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    ids = [json.loads(r.value)["id"] for r in events]
    assert ids == ["evt_1", "evt_2", "evt_4"], f"the events topic reads {ids}"


# -- finding 2: a lowered limit makes every batch one round trip a record, forever -------------


async def test_finding2_a_lowered_limit_does_not_stop_a_full_batch_forever(
    kafka_bootstrap, kafka_topics
):
    """Scenario: exactly_once, BRIDGE_TRANSACTION_TIMEOUT_MS=1000 (its minimum),
    BRIDGE_BATCH_MAX_RECORDS=5000. The events topic takes 1 MB when the publisher starts
    (max_batch_size is 256 KiB); an operator then lowers it to 100,000 bytes. One thread has
    5,000 events of about 550 bytes, every one far below the new limit. The "pump" reads them
    again after each rewind, three times.

    Expected: every event reaches the topic once, in order (each fits the topic; only the
    publisher's own batches are too large, and it can split them). Today each attempt is a
    round refused as BatchTooLarge, a producer restart, then 5,000 sends each awaited before
    the next (about 1 ms a round trip to the local broker: about 1,000 records written, then
    aborted) inside fail_after(1 s). It times out, is reported as "no answer from <broker> in
    time: Kafka down, paused or firewalled" (Kafka is fine), the thread is rewound, and the
    next attempt does exactly the same: the publisher never learns the topic's new limit
    (_start_producer reads the limits only when it has none). Nothing of the thread is ever
    published. With the defaults (60 s, 2,000 records) the same happens at 30 ms a round trip
    (a broker in another region); at any round trip, every batch after the change pays a
    refused round, a producer restart and one round trip a record."""
    settings = _settings(
        kafka_bootstrap,
        kafka_topics,
        BRIDGE_TRANSACTION_TIMEOUT_MS="1000",
        BRIDGE_BATCH_MAX_RECORDS="5000",
        BRIDGE_COMMIT_INTERVAL_MS="100",
    )
    await create_topics(
        kafka_bootstrap,
        [kafka_topics.events],
        partitions=3,
        configs={"max.message.bytes": "1048576"},
    )
    await ensure_topics(settings.kafka)
    publisher = Publisher(
        settings, HealthState(), transactional_id=f"{kafka_topics.group}-0", shard=0
    )
    cursor = ThreadCursor(ThreadRef("sess_rtt", "sthr_rtt"))
    publisher.checkpoints_read(0)  # as ShardManager says after reading them: none yet
    ids = [f"evt_{n:04d}" for n in range(5000)]
    data = {event_id: _incompressible(event_id, 300) for event_id in ids}
    attempts = 0
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        await lower_topic_limit(kafka_bootstrap, kafka_topics.events, 100_000)
        while cursor.committed_id != ids[-1] and attempts < 3:
            attempts += 1
            epoch = cursor.epoch
            start = 0 if cursor.committed_id is None else ids.index(cursor.committed_id) + 1
            for event_id in ids[start:]:  # as a pump reads them: after the committed cursor
                await publisher.submit(_outgoing(settings, cursor, event_id, data[event_id]))
                cursor.mark_submitted(epoch, event_id, moves_cursor=True)
            with anyio.fail_after(60):
                while cursor.committed_id != ids[-1] and cursor.epoch == epoch:
                    await anyio.sleep(0.05)
        publisher.close()
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    published = [json.loads(r.value)["id"] for r in events]
    assert published == ids, (
        f"{attempts} attempt(s): {len(published)} of {len(ids)} events in the topic, "
        f"the thread's cursor at {cursor.committed_id}"
    )


# -- finding 3: close() no longer ends the collection window: a release aborts what it held ---


async def test_finding3_a_released_shard_commits_what_it_holds(kafka_bootstrap, kafka_topics):
    """Scenario: exactly_once, BRIDGE_COMMIT_INTERVAL_MS=5000 (a transaction every 5 s: fewer,
    larger transactions). The member owns shard s; a pump submits one event of a session in s;
    at once the group moves s to another member: ShardedPublisher.release(s) closes the
    shard's publisher and gives it RELEASE_WITHIN_S to commit what it holds. (Half a second
    passes between the two: the publisher has taken the event and is collecting more.)

    Expected (as before issue 11: close() ended the window, the receive raised EndOfStream):
    the release commits the event; it is in the topic (read_committed) and the thread's cursor
    moved. Today the publisher sleeps out the window (5 s from the read), the release gives up
    after 2 s and cancels it: nothing is committed, the new owner must read it again, and every
    release (each rebalance, each member's shutdown of its shards) takes its whole bound."""
    settings = _settings(
        kafka_bootstrap,
        kafka_topics,
        BRIDGE_COMMIT_INTERVAL_MS="5000",
        BRIDGE_TRANSACTION_TIMEOUT_MS="60000",
    )
    await kafka_topics.create(kafka_bootstrap)
    assert RELEASE_WITHIN_S < 5
    publisher = ShardedPublisher(settings, HealthState())
    shard = 7
    cursor = ThreadCursor(ThreadRef(_session_in(shard), "sthr_release"))
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        await publisher.acquire(shard)
        await publisher.submit(_outgoing(settings, cursor, "evt_1", b'{"id":"evt_1"}'))
        cursor.mark_submitted(cursor.epoch, "evt_1", moves_cursor=True)
        await anyio.sleep(0.5)  # the shard's publisher has taken it and collects more
        await publisher.release(shard)
        publisher.close()
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    assert [r.value for r in events] == [b'{"id":"evt_1"}']
    assert cursor.committed_id == "evt_1"
