"""Stopping the bridge: SIGTERM at any moment flushes what was read and exits 0."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import anyio
import pytest

from bridge import app as app_module
from bridge.app import Bridge
from bridge.cursor import ThreadCursor
from bridge.logs import configure_logging
from bridge.publisher import Outgoing
from bridge.records import Event, ThreadRef, event_record
from bridge.shards import shard_of
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import (
    TOKEN,
    BridgeProcess,
    bridge_env,
    bridge_settings,
    wait_for_delivery,
)
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def test_sigterm_at_fifty_random_moments_under_load_always_exits_0_and_loses_nothing(
    kafka_bootstrap, kafka_topics
):
    """Scenario (8.11): six threads stream 40 events/s each; the bridge is started and drained
    (what SIGTERM does) 50 times, each at a random moment from start-up to full flow. Every
    drain exits 0; at the end the topic holds every event once, in order."""
    scenario = Scenario(
        name="sigterm-moments",
        seed=31,
        heartbeat_interval_s=0.5,
        sessions=(
            SessionSpec(ThreadSpec(events=1500, rate=40), (ThreadSpec(events=1500, rate=40),) * 5),
        ),
    )
    rng = random.Random(31)
    exits: list[int] = []
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        configure_logging(settings.log)
        for _ in range(50):
            bridge = Bridge(settings)
            result: list[int] = []

            async def run(bridge: Bridge = bridge, result: list[int] = result) -> None:
                result.append(await bridge.run())

            with anyio.fail_after(settings.shutdown.drain_timeout_s + 20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    await anyio.sleep(rng.uniform(0.0, 1.5))
                    bridge.drain()
            exits.append(result[0])
        final = Bridge(settings)
        async with anyio.create_task_group() as tg:
            tg.start_soon(final.run)
            with anyio.fail_after(120):
                await sim.wait_idle()
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
            final.drain()
    assert exits == [0] * 50
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert delivery.expected >= 9000


async def test_sigterm_before_kafka_answers_exits_0_at_once(kafka_topics, tmp_path):
    """Scenario (13.2): Kafka is unreachable at start-up, nothing has been read; SIGTERM
    (Ctrl-C) must not wait out the drain deadline: exit 0 within a couple of seconds."""
    scenario = Scenario(name="no-kafka", seed=32, sessions=(SessionSpec(),))
    async with running_simulator(scenario, token=TOKEN) as sim:
        env = bridge_env(
            sim.base_url,
            "127.0.0.1:1",  # nothing listens there: connection refused
            kafka_topics,
            BRIDGE_DRAIN_TIMEOUT_S="20",
        )
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridge.start()
        try:
            await anyio.sleep(3.0)
            started = time.monotonic()
            code = await anyio.to_thread.run_sync(bridge.terminate, 15)
            took = time.monotonic() - started
        finally:
            bridge.stop()
    assert code == 0, bridge.log_text()[-2000:]
    assert took < 3.0, took
    assert "bridge.shutdown.before_reading" in bridge.log_text()


async def test_a_read_that_completes_as_the_drain_begins_is_still_published(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario (8.11), the race itself: a reader whose socket read had completed when SIGTERM
    came is not cancelled yet and hands its event on right after the drain began. The event
    is published and checkpointed, and the bridge exits 0 (the publisher closes only once no
    reader can submit any more)."""
    thread = ThreadRef("sess_late", "sthr_late")
    drain_begun = anyio.Event()

    class LateReader:
        def __init__(self, _settings: Any, _api: Any, publisher: Any, *_: Any) -> None:
            self.publisher = publisher
            self.owned: set[int] = set()

        def own_nothing(self) -> None:
            pass

        def follow(self, shard: int) -> None:
            self.owned.add(shard)

        def unfollow(self, shard: int) -> None:
            self.owned.discard(shard)

        async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            with anyio.CancelScope(shield=True):  # the read already completed
                await drain_begun.wait()
                cursor = ThreadCursor(thread)
                event = Event("evt_late", "agent.message", b'{"id":"evt_late"}', {})
                record = event_record(kafka_topics.events, thread, event)
                await self.publisher.submit(
                    Outgoing(cursor, cursor.epoch, [record], event_id="evt_late")
                )
            await anyio.sleep_forever()

    monkeypatch.setattr(app_module, "Supervisor", LateReader)
    settings = bridge_settings("http://127.0.0.1:1", kafka_bootstrap, kafka_topics)
    bridge = Bridge(settings)
    result: list[int] = []

    async def run() -> None:
        result.append(await bridge.run())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            # The read is of a thread this bridge owns: its shard is acquired first.
            while (
                bridge.status.shards is None or shard_of("sess_late") not in bridge.status.shards()
            ):
                await anyio.sleep(0.01)
            bridge.drain()
            drain_begun.set()
    assert result == [0]
    records = await read_topic(kafka_bootstrap, kafka_topics.events)
    assert [r.value for r in records] == [b'{"id":"evt_late"}']
    checkpoints = [
        r for r in await read_topic(kafka_bootstrap, kafka_topics.checkpoints) if b"/" in r.key
    ]
    assert json.loads(checkpoints[-1].value)["last_event_id"] == "evt_late"
