"""What no well-behaved server sends, through real sockets and a real broker: bytes that are not
UTF-8, items without an id or not objects, frames and pages larger than any event should be;
and all of it at once with SIGKILLs (issue 8: 6, 13, 14 and the combined chaos run)."""

from __future__ import annotations

import dataclasses
import random

import anyio
import pytest

from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from bridge.simulator.named import NAMED
from tests.bridge_harness import (
    TOKEN,
    BridgeProcess,
    bridge_env,
    bridge_settings,
    dead_letters,
    expected_dead_letters,
    read_json,
    running_bridge,
    wait_for_delivery,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

READ_LIMIT = 64 * 1024


def _scenario(instant: bool, seed: int, **faults: float) -> Scenario:
    thread = ThreadSpec(events=40, rate=0 if instant else 40)
    return Scenario(
        name="bad-bytes",
        seed=seed,
        instant=instant,
        heartbeat_interval_s=0.5,
        sessions=(SessionSpec(thread, (thread,) * 2),),
        faults=Faults(**faults),  # type: ignore[arg-type]
    )


async def _deliver(scenario: Scenario, bootstrap: str, topics: object, **env: str):
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url, bootstrap, topics, BRIDGE_MAX_EVENT_BYTES=str(READ_LIMIT), **env
        )
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            _records, delivery = await wait_for_delivery(
                bootstrap, topics.events, sim, timeout_s=45, max_event_bytes=READ_LIMIT
            )
            wanted = expected_dead_letters(sim, READ_LIMIT)
            with anyio.move_on_after(20):
                while await dead_letters(bootstrap, topics.dlq) != wanted:
                    await anyio.sleep(0.5)
    return delivery, wanted, await dead_letters(bootstrap, topics.dlq)


@pytest.mark.parametrize("instant", [True, False], ids=["lists", "streams"])
async def test_bad_bytes_and_malformed_items_are_dead_lettered_once(
    kafka_bootstrap, kafka_topics, instant
):
    """Scenario (8.6, 8.13): some events carry bytes that are not UTF-8, and some list items
    have no id or are not objects; read through the JSON list (threads already finished) or
    live on the stream. Every good event once, in order; every bad item in the DLQ once, with
    an alert; the threads keep flowing."""
    scenario = _scenario(instant, seed=51, invalid_utf8_rate=0.08, malformed_item_rate=0.08)
    delivery, wanted, got = await _deliver(scenario, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    reasons = {reason for _key, reason in wanted}
    assert {"invalid_utf8", "missing_id", "not_object"} <= reasons
    assert got == wanted
    alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert sum(a["type"] == "bridge.dead_letter" for a in alerts) == sum(wanted.values())


@pytest.mark.parametrize("instant", [True, False], ids=["lists", "streams"])
async def test_events_larger_than_the_read_limit_become_excerpts_and_the_thread_goes_on(
    kafka_bootstrap, kafka_topics, instant
):
    """Scenario (8.14): tool results of 300 KB against BRIDGE_MAX_EVENT_BYTES=64 KiB, on pages
    (the page is asked again smaller, then the item is cut) and on the stream (the frame is
    cut as it arrives). Each goes to the DLQ as a 4 KiB excerpt with its id, once; everything
    else is delivered once, in order."""
    scenario = _scenario(instant, seed=52, huge_rate=0.2, huge_bytes=300_000)
    delivery, wanted, got = await _deliver(scenario, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert wanted and set(reason for _key, reason in wanted) == {"too_large"}
    assert got == wanted
    for dead in await read_json(kafka_bootstrap, kafka_topics.dlq):
        assert dead["truncated"] and dead["size_bytes"] > 300_000 and dead["event_id"]


async def test_adversarial_server_with_sigkills_exactly_once(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario (issue 8, done-when): the simulator's `adversarial` scenario (older pagination,
    a stream route that refuses query parameters, archived sessions that start late and end
    fast, replays from before the cursor, bytes that are not UTF-8, malformed items, drops),
    and the bridge SIGKILLed 6 times under exactly_once. A read_committed consumer sees 0
    lost, 0 duplicated, 0 out of order; every bad item is dead-lettered exactly once."""
    scenario = dataclasses.replace(NAMED["adversarial"], seed=53)
    rng = random.Random(53)
    async with running_simulator(scenario, token=TOKEN) as sim:
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics)
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridge.start()
        try:
            for _ in range(6):
                await anyio.sleep(rng.uniform(0.5, 2.0))
                bridge.kill()
                bridge.start()
            with anyio.fail_after(120):
                await sim.wait_idle()
            limit = 16 * 1024 * 1024
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=90, max_event_bytes=limit
            )
            wanted = expected_dead_letters(sim, limit)
            with anyio.move_on_after(30):
                while await dead_letters(kafka_bootstrap, kafka_topics.dlq) != wanted:
                    await anyio.sleep(0.5)
            got = await dead_letters(kafka_bootstrap, kafka_topics.dlq)
        finally:
            bridge.stop()
    print(f"\nadversarial x 6 SIGKILL exactly_once: {delivery.summary()} dead_letters={got}")
    assert bridge.starts == 7
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert delivery.expected > 300
    assert got == wanted and sum(wanted.values()) > 5
