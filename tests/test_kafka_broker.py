"""The local Apache Kafka broker, and what the bridge needs from aiokafka against it.

The bridge's exactly-once delivery rests on aiokafka's idempotent and transactional producers and
on read_committed consumers behaving on a real Kafka 4.x broker; these tests prove that first.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import ProducerFenced

from tests.kafka_broker import (
    KafkaBroker,
    KafkaBrokerError,
    KafkaTopics,
    create_topics,
    read_topic,
    wait_for_records,
)

pytestmark = pytest.mark.kafka

Headers = list[tuple[str, bytes]]


@asynccontextmanager
async def producer(bootstrap: str, **kwargs: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kwargs)
    await p.start()
    try:
        yield p
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await p.stop()


def event(i: int) -> tuple[bytes, bytes, Headers]:
    """A record shaped like the bridge's: JSON value (non-ASCII too), CloudEvents headers."""
    key = f"sess_01/sthr_{i % 3:02d}".encode()
    value = f'{{"id":"evt_{i:04d}","type":"message","text":"héllo ✓ {i}"}}'.encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", f"evt_{i:04d}".encode()),
        ("content-type", b"application/json"),
        ("empty", b""),
    ]
    return key, value, headers


def as_tuples(records: list[Any]) -> list[tuple[bytes, bytes, Headers]]:
    return [(r.key, r.value, list(r.headers)) for r in records]


def by_key(items: list[tuple[bytes, bytes, Headers]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for key, value, _ in items:
        out.setdefault(key, []).append(value)
    return out


@pytest.mark.anyio
async def test_plain_round_trip(kafka_bootstrap: str, kafka_topics: KafkaTopics) -> None:
    """Plain producer -> 3 partitions -> read_topic: everything back, in order per key."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events], partitions=3)
        sent = [event(i) for i in range(30)]
        async with producer(kafka_bootstrap) as p:
            for key, value, headers in sent:
                await p.send(kafka_topics.events, value, key=key, headers=headers)
            await p.flush()
        got = as_tuples(
            await read_topic(
                kafka_bootstrap, kafka_topics.events, isolation_level="read_uncommitted"
            )
        )
    assert sorted(got) == sorted(sent)
    assert by_key(got) == by_key(sent)


@pytest.mark.anyio
async def test_idempotent_producer(kafka_bootstrap: str, kafka_topics: KafkaTopics) -> None:
    """enable_idempotence against Kafka 4: every record exactly once, in order."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events])
        sent = [event(i) for i in range(200)]
        async with producer(kafka_bootstrap, enable_idempotence=True) as p:
            for key, value, headers in sent:
                await p.send(kafka_topics.events, value, key=key, headers=headers)
            await p.flush()
        got = as_tuples(await read_topic(kafka_bootstrap, kafka_topics.events))
    assert got == sent


@pytest.mark.anyio
async def test_committed_transaction_byte_for_byte(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """A committed transaction: read_committed sees key, value and headers unchanged, in order."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events])
        sent = [event(i) for i in range(50)]
        async with (
            producer(
                kafka_bootstrap,
                transactional_id=kafka_topics.transactional_id,
                enable_idempotence=True,
            ) as p,
            p.transaction(),
        ):
            for key, value, headers in sent:
                await p.send(kafka_topics.events, value, key=key, headers=headers)
        records = await wait_for_records(kafka_bootstrap, kafka_topics.events, len(sent))
    assert as_tuples(records) == sent
    # One partition, one transaction: offsets 0..49, then the commit marker at 50.
    assert [r.offset for r in records] == list(range(50))


@pytest.mark.anyio
async def test_aborted_transaction_is_invisible_to_read_committed(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """commit A, abort B, commit C: read_committed sees A+C, read_uncommitted sees A+B+C."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events], partitions=2)
        topic = kafka_topics.events
        async with producer(
            kafka_bootstrap, transactional_id=kafka_topics.transactional_id, enable_idempotence=True
        ) as p:
            for batch, outcome in ((b"a", "commit"), (b"b", "abort"), (b"c", "commit")):
                await p.begin_transaction()
                for i in range(3):
                    await p.send_and_wait(topic, batch + b"%d" % i, key=b"k", partition=i % 2)
                if outcome == "commit":
                    await p.commit_transaction()
                else:
                    await p.abort_transaction()
        committed = [r.value for r in await wait_for_records(kafka_bootstrap, topic, 6)]
        everything = [
            r.value
            for r in await read_topic(kafka_bootstrap, topic, isolation_level="read_uncommitted")
        ]
    # read_topic returns partition 0 then partition 1.
    assert committed == [b"a0", b"a2", b"c0", b"c2", b"a1", b"c1"]
    assert everything == [b"a0", b"a2", b"b0", b"b2", b"c0", b"c2", b"a1", b"b1", b"c1"]


@pytest.mark.anyio
async def test_read_topic_stops_at_last_stable_offset(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """An open transaction does not make a read_committed read_topic wait or see its records."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events])
        topic = kafka_topics.events
        async with producer(
            kafka_bootstrap, transactional_id=kafka_topics.transactional_id, enable_idempotence=True
        ) as p:
            async with p.transaction():
                await p.send_and_wait(topic, b"committed", key=b"k")
            await wait_for_records(kafka_bootstrap, topic, 1)
            await p.begin_transaction()
            await p.send_and_wait(topic, b"open", key=b"k")
            with anyio.fail_after(10):
                assert [r.value for r in await read_topic(kafka_bootstrap, topic)] == [b"committed"]
            uncommitted = await read_topic(
                kafka_bootstrap, topic, isolation_level="read_uncommitted"
            )
            assert [r.value for r in uncommitted] == [b"committed", b"open"]
            await p.commit_transaction()
        records = await wait_for_records(kafka_bootstrap, topic, 2)
        assert [r.value for r in records] == [b"committed", b"open"]


@pytest.mark.anyio
async def test_same_transactional_id_fences_the_first_producer(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """Two bridges with one transactional.id: the newer wins, the older gets ProducerFenced."""
    with anyio.fail_after(60):
        await create_topics(kafka_bootstrap, [kafka_topics.events])
        topic, txn_id = kafka_topics.events, kafka_topics.transactional_id
        async with producer(
            kafka_bootstrap, transactional_id=txn_id, enable_idempotence=True
        ) as old:
            await old.begin_transaction()
            await old.send_and_wait(topic, b"old-1", key=b"k")
            # Starting the newer producer aborts the older one's open transaction.
            async with producer(
                kafka_bootstrap, transactional_id=txn_id, enable_idempotence=True
            ) as new:
                with pytest.raises(ProducerFenced):
                    await old.send_and_wait(topic, b"old-2", key=b"k")
                with pytest.raises(ProducerFenced):
                    await old.commit_transaction()
                async with new.transaction():
                    await new.send_and_wait(topic, b"new-1", key=b"k")
        assert [r.value for r in await wait_for_records(kafka_bootstrap, topic, 1)] == [b"new-1"]
        everything = await read_topic(kafka_bootstrap, topic, isolation_level="read_uncommitted")
        assert [r.value for r in everything] == [b"old-1", b"new-1"]


@pytest.mark.anyio
async def test_topics_fixture_creates_the_bridge_topics(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """kafka_topics.create(): four topics, checkpoints compacted; a missing topic reads empty."""
    with anyio.fail_after(60):
        assert await read_topic(kafka_bootstrap, kafka_topics.events) == []
        await kafka_topics.create(kafka_bootstrap, partitions=2)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            assert set(kafka_topics.names) <= set(await admin.list_topics())
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, kafka_topics.checkpoints)]
            )
        finally:
            await admin.close()
        configs = {c[0]: c[1] for c in response.resources[0][4]}
        assert configs["cleanup.policy"] == "compact"
        with pytest.raises(KafkaBrokerError, match=r"already exists|error 36"):
            await create_topics(kafka_bootstrap, [kafka_topics.events])
        await create_topics(kafka_bootstrap, [kafka_topics.events], exist_ok=True)


def test_topic_names_are_unique_and_legal() -> None:
    """Two tests never share a topic or transactional id, and every name is a legal topic."""
    a = KafkaTopics.unique("test_x[param-1/ü]")
    b = KafkaTopics.unique("test_x[param-1/ü]")
    assert set(a.names).isdisjoint(b.names)
    assert a.transactional_id != b.transactional_id
    for name in a.names:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,249}", name), name


def test_start_refuses_a_taken_port(tmp_path: Any) -> None:
    """kafka.sh start on a port something else listens on: a clear error, no broker left."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker = KafkaBroker(tmp_path, port=squatter.getsockname()[1])
        with pytest.raises(KafkaBrokerError, match="already in use"):
            broker.start()
    assert broker.pid is None


@pytest.mark.anyio
async def test_dedicated_broker_survives_kill_9_and_restart(
    kafka_broker_factory: Callable[..., KafkaBroker],
) -> None:
    """kill -9 then restart on the same port and data dir: acknowledged records are all there."""
    broker = kafka_broker_factory()
    topics = KafkaTopics.unique("kill9")
    with anyio.fail_after(120):
        await create_topics(broker.bootstrap, [topics.events], partitions=2)
        async with (
            producer(
                broker.bootstrap, transactional_id=topics.transactional_id, enable_idempotence=True
            ) as p,
            p.transaction(),
        ):
            for i in range(10):
                await p.send(topics.events, b"before-%d" % i, key=b"k%d" % i)
        # Visible = the commit markers are in the partitions. Killed before that, Kafka 4.3.1
        # leaves the transaction hanging (see KafkaBroker.kill), which is not what this checks.
        await wait_for_records(broker.bootstrap, topics.events, 10)

        await broker.akill()
        assert not broker.is_running()
        await broker.astart()
        assert broker.is_running()
        assert len(await wait_for_records(broker.bootstrap, topics.events, 10)) == 10

        # The transactional id and its producer state survive too: a new producer resumes.
        async with (
            producer(
                broker.bootstrap, transactional_id=topics.transactional_id, enable_idempotence=True
            ) as p,
            p.transaction(),
        ):
            await p.send(topics.events, b"after", key=b"k0")
        await broker.arestart()  # the clean way this time
        values = {r.value for r in await wait_for_records(broker.bootstrap, topics.events, 11)}
    assert values == {b"before-%d" % i for i in range(10)} | {b"after"}
    assert "Kafka Server started" in broker.log_text()
