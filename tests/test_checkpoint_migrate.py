"""``qoder-bridge checkpoints migrate`` as an operator runs it, against a real broker: an old
one-partition checkpoint topic (superseded checkpoints, a tombstone, settled marks, an aborted
transaction) ends as a 32-partition topic holding exactly the latest record of each live key in
its session's shard, byte for byte; the dry run changes nothing; a rerun changes nothing; a
run killed between or inside its steps is finished by the next run with the same result; an
old bridge's producer is fenced; and a bridge started on the migrated topic publishes nothing
twice."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.checkpoint_migrate import (
    COMPLETE_KEY,
    TEMP_SUFFIX,
    TRANSACTIONAL_ID_PREFIX,
    Migration,
    partition_of,
)
from bridge.config import load_settings
from bridge.shards import SHARDS
from bridge.simulator import running_simulator
from tests.bridge_harness import (
    TOKEN,
    bridge_env,
    compare,
    running_bridge,
    simulator_logs,
    wait_for_delivery,
)
from tests.kafka_broker import KafkaBrokerError, create_topics, read_topic
from tests.test_checkpoint_admin import SCENARIO, settled
from tests.test_checkpoints import partitions, topic_configs

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

OLD_WRITTEN_AT = "2026-01-02T03:04:05.000000Z"  # long ago: no watching before --execute


def checkpoint(session: str, thread: str, last: str, drained: str | None = None) -> bytes:
    """A checkpoint value as the old bridges wrote it."""
    doc = {
        "last_event_id": last,
        "session_id": session,
        "thread_id": thread,
        "drained_updated_at": drained,
        "recent_ids": [last],
        "idless_after": 0,
        "written_at": OLD_WRITTEN_AT,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def mark(session: str, updated_at: str) -> bytes:
    return json.dumps({"session_id": session, "settled_updated_at": updated_at}).encode()


#: What the old bridges wrote, in order, in two committed transactions: sess_mig_c and
#: sess_mig_e share a shard (20); sess_mig_b/thr_1 and sess_mig_d's mark end as tombstones.
OLD: list[list[tuple[str, bytes | None]]] = [
    [
        ("sess_mig_a/thr_1", checkpoint("sess_mig_a", "thr_1", "evt_1")),
        ("sess_mig_a/thr_2", checkpoint("sess_mig_a", "thr_2", "evt_1")),
        ("sess_mig_b/thr_1", checkpoint("sess_mig_b", "thr_1", "evt_4")),
        ("sess_mig_c/thr_1", checkpoint("sess_mig_c", "thr_1", "evt_2")),
        ("sess_mig_d", mark("sess_mig_d", "2026-01-01T00:00:00Z")),
        ("sess_mig_e", mark("sess_mig_e", "2026-01-01T00:00:00Z")),
    ],
    [
        ("sess_mig_a/thr_1", checkpoint("sess_mig_a", "thr_1", "evt_7")),
        ("sess_mig_b/thr_1", None),
        ("sess_mig_c/thr_1", checkpoint("sess_mig_c", "thr_1", "evt_9", "2026-01-01T00:00:09Z")),
        ("sess_mig_e/thr_1", checkpoint("sess_mig_e", "thr_1", "evt_3", "2026-01-01T00:00:05Z")),
        ("sess_mig_d", None),
        ("sess_mig_e", mark("sess_mig_e", "2026-01-01T00:00:05Z")),
        ("sess_mig_f/thr_1", checkpoint("sess_mig_f", "thr_1", "evt_1")),
    ],
]
#: Written in a transaction that was aborted: never to be migrated.
ABORTED = [("sess_mig_x/thr_1", checkpoint("sess_mig_x", "thr_1", "evt_1"))]


def expected() -> dict[str, bytes]:
    latest: dict[str, bytes | None] = {}
    for batch in OLD:
        latest.update(batch)
    return {k: v for k, v in latest.items() if v is not None}


def env_for(bootstrap: str, topics: Any, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "BRIDGE_CHECKPOINT_TOPIC": topics.checkpoints,
        "BRIDGE_GROUP_ID": f"{topics.transactional_id}.group",
        "BRIDGE_TRANSACTIONAL_ID": topics.transactional_id,
        "BRIDGE_LOG_FORMAT": "json",
        **extra,
    }


async def cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "bridge", "checkpoints", "migrate", *argv],
        env={**os.environ, **env},
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def old_topic(
    bootstrap: str, topic: str, txn_id: str, batches: list[list[tuple[str, bytes | None]]]
) -> None:
    """A checkpoint topic as releases before scale-out made it (one partition, compacted),
    written by an old bridge's transactional producer; one aborted transaction among them."""
    await create_topics(
        bootstrap, [topic], compacted=True, configs={"min.compaction.lag.ms": "60000"}
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=txn_id)
    await producer.start()
    try:
        for i, batch in enumerate(batches):
            if i == 1:
                await producer.begin_transaction()
                for key, value in ABORTED:
                    await producer.send_and_wait(topic, value, key=key.encode(), partition=0)
                await producer.abort_transaction()
            await producer.begin_transaction()
            for key, value in batch:
                await producer.send_and_wait(topic, value, key=key.encode(), partition=0)
            await producer.commit_transaction()
    finally:
        await producer.stop()


async def everything(bootstrap: str, topic: str) -> list[tuple[int, int, bytes | None, Any]]:
    """Every record, uncommitted and aborted ones too, with partition and offset."""
    return [
        (r.partition, r.offset, r.key, r.value)
        for r in await read_topic(bootstrap, topic, isolation_level="read_uncommitted")
    ]


async def topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def assert_migrated(bootstrap: str, topic: str, want: dict[str, bytes]) -> None:
    """32 partitions; read_committed, exactly one record per live key, its value byte for byte,
    in its session's shard; nothing else (no tombstone, no aborted record, no completion
    mark); the temporary topic gone; the configs the bridge creates the topic with, over the
    old topic's own."""
    assert await partitions(bootstrap, topic) == SHARDS
    got = sorted((r.partition, r.key, r.value) for r in await read_topic(bootstrap, topic))
    assert got == sorted((partition_of(k), k.encode(), v) for k, v in want.items())
    assert topic + TEMP_SUFFIX not in await topic_names(bootstrap)
    names = ["cleanup.policy", "min.compaction.lag.ms", "segment.bytes", "segment.ms"]
    assert await topic_configs(bootstrap, topic, names) == {
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "60000",
        "segment.bytes": "16777216",
        "segment.ms": "3600000",
    }


async def test_dry_run_then_execute_then_rerun(kafka_bootstrap, kafka_topics):
    """Scenario: an operator upgrades a deployment whose checkpoint topic has one partition.
    The dry run prints the counts (13 committed records read, 5 thread checkpoints and 1
    settled mark to keep, 7 dropped) and the steps, and changes nothing. --execute leaves a
    32-partition topic with exactly the 6 latest live records, each in its session's shard. A
    second run says there is nothing to migrate and changes nothing."""
    topic = kafka_topics.checkpoints
    await old_topic(kafka_bootstrap, topic, kafka_topics.transactional_id, OLD)
    env = env_for(kafka_bootstrap, kafka_topics)
    before = await everything(kafka_bootstrap, topic)

    code, out, err = await cli(env)
    assert code == 0, err
    assert f"{topic}: 1 partition(s), 13 record(s) read (read_committed)" in out
    assert "5 thread checkpoint(s) and 1 settled mark(s) to keep" in out
    assert "7 superseded or deleted record(s) to drop" in out
    assert f"copy the 6 record(s) to {topic}{TEMP_SUFFIX}" in out
    assert "(3 shard(s) used)" in out
    assert "no bridge is running" in out
    assert "dry run: nothing changed" in out
    assert await everything(kafka_bootstrap, topic) == before
    assert topic + TEMP_SUFFIX not in await topic_names(kafka_bootstrap)

    code, out, err = await cli(env, "--execute")
    assert code == 0, err
    assert f"copied 6 record(s) to {topic}{TEMP_SUFFIX}" in out
    assert f"copied 6 record(s) back to {topic}" in out
    assert f"migrated: {topic} has 32 partitions, 5 thread checkpoint(s) and 1 settled" in out
    await assert_migrated(kafka_bootstrap, topic, expected())
    after = await everything(kafka_bootstrap, topic)

    code, out, err = await cli(env, "--execute")
    assert code == 0, err
    assert f"{topic} has 32 partitions already: nothing to migrate" in out
    assert await everything(kafka_bootstrap, topic) == after


async def test_an_old_bridge_still_in_a_transaction_is_fenced(kafka_bootstrap, kafka_topics):
    """Scenario: an old bridge that nobody stopped has a transaction open on the old topic.
    The dry run says so; --execute without fencing its id is refused (exit 1) and changes
    nothing (what follows an open transaction cannot be read). With
    --fence-transactional-id the migration goes through without the uncommitted record, and
    the old process can commit nothing afterwards."""
    topic, old_id = kafka_topics.checkpoints, kafka_topics.transactional_id
    await old_topic(kafka_bootstrap, topic, old_id, OLD)
    env = env_for(kafka_bootstrap, kafka_topics)
    forgotten = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=old_id)
    await forgotten.start()
    try:
        await forgotten.begin_transaction()
        late = checkpoint("sess_mig_a", "thr_1", "evt_8")
        await forgotten.send_and_wait(topic, late, key=b"sess_mig_a/thr_1", partition=0)
        before = await everything(kafka_bootstrap, topic)

        code, out, err = await cli(env)
        assert code == 0, err
        assert "has an open transaction (partition(s) 0)" in out

        code, out, err = await cli(env, "--execute")
        assert code == 1, out
        assert "open transaction" in err and "--fence-transactional-id" in err
        assert await everything(kafka_bootstrap, topic) == before
        assert await partitions(kafka_bootstrap, topic) == 1

        code, out, err = await cli(env, "--execute", "--fence-transactional-id", old_id)
        assert code == 0, err
        assert f"fenced transactional id {old_id}" in out
        await assert_migrated(kafka_bootstrap, topic, expected())

        with pytest.raises(KafkaError):
            await forgotten.send_and_wait(topic, late, key=b"sess_mig_a/thr_1", partition=0)
            await forgotten.commit_transaction()
    finally:
        with anyio.move_on_after(10):
            await forgotten.stop()
    await assert_migrated(kafka_bootstrap, topic, expected())


async def half_written(bootstrap: str, migration: Migration, topic: str) -> None:
    """What a run killed in the middle of a copy leaves: the first half of the records
    committed, the rest in a transaction never committed (the process died)."""
    records = sorted(expected().items())
    half = len(records) // 2
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=TRANSACTIONAL_ID_PREFIX + migration.name
    )
    await producer.start()
    for i, part in enumerate((records[:half], records[half:])):
        await producer.begin_transaction()
        for key, value in part:
            await producer.send_and_wait(
                topic, value, key=key.encode(), partition=partition_of(key)
            )
        if i == 0:
            await producer.commit_transaction()
    await producer.stop()  # no commit, no abort: as kill -9 leaves it


@pytest.mark.parametrize("crash", ["copying", "copied", "deleted", "copying_back"])
async def test_a_run_killed_between_or_inside_steps_is_finished_by_the_next(
    kafka_bootstrap, kafka_topics, crash
):
    """Scenario: the migration is killed (kill -9) while copying to the temporary topic
    (half committed, half in an open transaction), after the copy, after deleting the old
    topic, or while copying back (the same half and half). The next run finishes the job: the
    topic ends exactly as after an uninterrupted run, the temporary topic gone; a run after
    that has nothing to do."""
    topic = kafka_topics.checkpoints
    await old_topic(kafka_bootstrap, topic, kafka_topics.transactional_id, OLD)
    env = env_for(kafka_bootstrap, kafka_topics)
    migration = Migration(load_settings(env), io.StringIO())
    old = await migration.describe(topic)
    if crash == "copying":
        await migration.create_temp(old)
        await half_written(kafka_bootstrap, migration, migration.temp)
    else:
        await migration.copy_to_temp(old)
        temp = [r.key for r in await read_topic(kafka_bootstrap, migration.temp)]
        assert COMPLETE_KEY.encode() in temp
    if crash in ("deleted", "copying_back"):
        await migration.drop_old()
    if crash == "copying_back":
        await migration.recreate()
        await half_written(kafka_bootstrap, migration, topic)

    code, out, err = await cli(env, "--execute")
    assert code == 0, err
    if crash in ("deleted", "copying_back"):
        assert f"an earlier run stopped after copying to {topic}{TEMP_SUFFIX}" in out
    await assert_migrated(kafka_bootstrap, topic, expected())
    code, out, err = await cli(env, "--execute")
    assert code == 0 and "nothing to migrate" in out, err


async def test_a_bridge_on_the_migrated_topic_publishes_nothing_twice(
    kafka_bootstrap, kafka_topics
):
    """Scenario: a deployment from before scale-out published two sessions (its checkpoints in
    one partition), then was stopped, its checkpoint topic migrated, and the new bridge
    started. The new bridge reads the migrated checkpoints: the events topic still holds every
    event exactly once. One session's settled mark is left out of the old topic, so the new
    bridge must look at that session's threads (after their migrated cursors) and settle it
    again: it did, and published nothing while doing so."""
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        group = f"{kafka_topics.transactional_id}.group"
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_GROUP_ID=group)
        topic = kafka_topics.checkpoints
        first, second = sim.session_ids()
        async with running_bridge(load_settings(env)):
            await wait_for_delivery(kafka_bootstrap, kafka_topics.events, sim, timeout_s=60)
            await settled(kafka_bootstrap, topic, first, second)
        published = await read_topic(kafka_bootstrap, kafka_topics.events)
        assert compare(published, simulator_logs(sim)).duplicated == 0

        # The topic as the old release kept it: the same records, in one partition.
        stored = [
            (r.key.decode(), r.value)
            for r in await read_topic(kafka_bootstrap, topic)
            if r.key != second.encode()
        ]
        threads = [k for k, _ in stored if "/" in k]
        assert len(set(threads)) == len(sim.all_threads())
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
            with anyio.fail_after(30):
                while topic in await admin.list_topics():
                    await anyio.sleep(0.2)
        finally:
            await admin.close()
        with anyio.fail_after(30):
            while True:
                try:
                    await old_topic(kafka_bootstrap, topic, kafka_topics.transactional_id, [stored])
                    break
                except KafkaBrokerError:  # the deletion still completing
                    await anyio.sleep(0.5)

        migrate_env = {**env, "BRIDGE_LOG_FORMAT": "json"}
        code, out, err = await cli(
            migrate_env, "--execute", "--fence-transactional-id", kafka_topics.transactional_id
        )
        assert code == 0, err
        assert f"migrated: {topic} has 32 partitions" in out

        async with running_bridge(load_settings(env)):
            await settled(kafka_bootstrap, topic, second)
        again = await read_topic(kafka_bootstrap, kafka_topics.events)
        delivery = compare(again, simulator_logs(sim))
        assert (delivery.lost, delivery.duplicated) == (0, 0), delivery.summary()
        assert [(r.key, r.value) for r in again] == [(r.key, r.value) for r in published]
