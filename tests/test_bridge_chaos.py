"""The bridge as a real process under crashes: SIGKILL, SIGTERM, a broker that dies, an API
that fails. A read_committed consumer counts by value; every run prints one summary line:
``expected, received, lost, duplicated, misordered``."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import TOKEN, BridgeProcess, Delivery, bridge_env, wait_for_delivery
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _scenario(sessions: int, children: int, events: int, rate: float, faults: Faults, seed: int):
    return Scenario(
        name="chaos",
        seed=seed,
        heartbeat_interval_s=0.5,
        faults=faults,
        sessions=tuple(
            SessionSpec(
                coordinator=ThreadSpec(events=events, rate=rate),
                children=tuple(
                    ThreadSpec(events=events, rate=rate, start_after_s=0.3 * i)
                    for i in range(children)
                ),
                start_after_s=1.0 * s,
            )
            for s in range(sessions)
        ),
    )


#: `BRIDGE_CHAOS_SOAK=10 pytest -m slow tests/test_bridge_chaos.py`: ten times the events, the
#: kills and the patience (a soak; the default is what CI runs).
SOAK = max(1, int(os.environ.get("BRIDGE_CHAOS_SOAK", "1")))

CHAOS_FAULTS = Faults(drop_rate=0.05, replay_rate=0.5, error_rate=0.01, drop_after_frames=(5, 200))


async def _kill_repeatedly(bridge: BridgeProcess, kills: int, rng: random.Random) -> None:
    for _ in range(kills):
        await anyio.sleep(rng.uniform(1.0, 3.0))
        bridge.kill()
        bridge.start()


def _report(name: str, delivery: Delivery) -> None:
    print(f"\n{name}: {delivery.summary()}")


Disruption = Callable[[BridgeProcess, Any], Awaitable[None]]


async def _run_disrupted(
    scenario: Scenario, bootstrap: str, topics: Any, log: Path, disrupt: Disruption, **env: str
) -> tuple[Delivery, BridgeProcess]:
    """The bridge as a process over the scenario, disrupted, then left to catch up."""
    async with running_simulator(scenario, token=TOKEN) as sim:
        bridge = BridgeProcess(bridge_env(sim.base_url, bootstrap, topics, **env), log)
        bridge.start()
        try:
            await disrupt(bridge, sim)
            with anyio.fail_after(180 * SOAK):
                await sim.wait_idle()
            _, delivery = await wait_for_delivery(
                bootstrap, topics.events, sim, timeout_s=120 * SOAK
            )
        finally:
            bridge.stop()
    return delivery, bridge


def _kills(count: int, seed: int) -> Disruption:
    async def disrupt(bridge: BridgeProcess, _: Any) -> None:
        await _kill_repeatedly(bridge, count, random.Random(seed))

    return disrupt


async def _first_record(bootstrap: str, topic: str) -> None:
    with anyio.fail_after(60):
        while not await read_topic(bootstrap, topic):
            await anyio.sleep(0.2)


async def test_sigkill_five_times_at_least_once_loses_nothing(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario: at_least_once, 12 threads streaming; the bridge is killed with SIGKILL five
    times and restarted: nothing lost, in order; duplicates only around the crashes."""
    delivery, bridge = await _run_disrupted(
        _scenario(2, 5, 150, 25, Faults(), seed=3),
        kafka_bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        _kills(5, seed=5),
        BRIDGE_DELIVERY="at_least_once",
        BRIDGE_LOG_LEVEL="debug",
    )
    _report("sigkill x5 at_least_once", delivery)
    assert delivery.expected >= 12 * 150
    assert (delivery.lost, delivery.misordered) == (0, 0), delivery.summary()
    # Only what was unacknowledged or not yet checkpointed at each crash comes twice: at most
    # about a second of every thread's events per crash (12 threads at 25/s), not whole threads.
    assert delivery.duplicated <= 5 * 12 * 25, delivery.summary()
    printed = bridge.log_text()
    assert "bridge.pump.started" in printed, "debug logging was on: the log is not empty"
    assert TOKEN not in printed, "the token appeared in what the bridge printed"


async def test_sigterm_drains_within_deadline_and_checkpoints_cover_everything(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario: SIGTERM while 6 threads stream: exit 0 within the drain deadline, and the
    checkpoint of every thread names the last event of that thread in the topic."""
    scenario = _scenario(1, 5, 400, 40, Faults(), seed=4)
    async with running_simulator(scenario, token=TOKEN) as sim:
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_DRAIN_TIMEOUT_S="10")
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridge.start()
        try:
            await _first_record(kafka_bootstrap, kafka_topics.events)
            await anyio.sleep(1.0)  # mid-stream, on purpose
            started = time.monotonic()
            code = await anyio.to_thread.run_sync(bridge.terminate, 30)
            took = time.monotonic() - started
        finally:
            bridge.stop()
        assert code == 0, bridge.log_text()[-3000:]
        assert TOKEN not in bridge.log_text()
        assert took < 10, f"drain took {took:.1f} s, over the 10 s deadline"
        events = await read_topic(kafka_bootstrap, kafka_topics.events)
        checkpoints = await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
    last_event: dict[str, str] = {}
    for record in events:
        last_event[record.key.decode()] = json.loads(record.value)["id"]
    last_checkpoint = {
        r.key.decode(): json.loads(r.value)["last_event_id"]
        for r in checkpoints
        if b"/" in r.key  # not a session's settled mark
    }
    assert last_event, "nothing was published before SIGTERM"
    for key, event_id in last_event.items():
        assert last_checkpoint.get(key) == event_id, f"{key}: checkpoint behind the topic"


async def test_broker_down_for_20s_loses_nothing_and_memory_stays_flat(
    kafka_broker_factory, kafka_topics, tmp_path
):
    """Scenario: the broker is stopped for 20 s mid-stream and started again; the bridge's RSS
    while Kafka is down stays within 64 MiB of its level before, and nothing is lost."""
    broker = await anyio.to_thread.run_sync(kafka_broker_factory)
    rss: dict[str, int] = {}

    async def broker_down(bridge: BridgeProcess, _: Any) -> None:
        await _first_record(broker.bootstrap, kafka_topics.events)
        rss["before"] = rss["peak"] = bridge.rss_bytes()
        await broker.astop()
        for _ in range(40):
            await anyio.sleep(0.5)
            rss["peak"] = max(rss["peak"], bridge.rss_bytes())
        await broker.astart()

    delivery, _ = await _run_disrupted(
        _scenario(1, 7, 600, 30, Faults(), seed=6),
        broker.bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        broker_down,
    )
    _report("broker down 20 s", delivery)
    print(f"rss before={rss['before'] >> 20} MiB, peak while down={rss['peak'] >> 20} MiB")
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert rss["peak"] - rss["before"] < 64 << 20


@pytest.mark.slow
async def test_chaos_twenty_sigkills_exactly_once(kafka_bootstrap, kafka_topics, tmp_path):
    """Scenario: exactly_once, 104 threads, 20,800 events, simulator faults on; the bridge is
    SIGKILLed 20 times at random moments and restarted: 0 lost, 0 duplicated, 0 out of order."""
    delivery, _ = await _run_disrupted(
        _scenario(4, 25, 200 * SOAK, 12, CHAOS_FAULTS, seed=20),
        kafka_bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        _kills(20 * SOAK, seed=20),
    )
    _report("chaos 20 x SIGKILL exactly_once", delivery)
    assert delivery.expected >= 20_000
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


@pytest.mark.slow
async def test_chaos_at_least_once_under_kills_counts_duplicates(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario: the same kills in at_least_once: 0 lost, 0 out of order; duplicates counted."""
    delivery, _ = await _run_disrupted(
        _scenario(4, 25, 200 * SOAK, 12, CHAOS_FAULTS, seed=21),
        kafka_bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        _kills(20 * SOAK, seed=21),
        BRIDGE_DELIVERY="at_least_once",
    )
    _report("chaos 20 x SIGKILL at_least_once", delivery)
    assert delivery.expected >= 20_000
    assert (delivery.lost, delivery.misordered) == (0, 0), delivery.summary()


@pytest.mark.slow
async def test_chaos_broker_killed_twice_exactly_once(kafka_broker_factory, kafka_topics, tmp_path):
    """Scenario: exactly_once, 52 threads with faults on; the broker is killed (-9) and
    restarted twice mid-run: 0 lost, 0 duplicated, 0 out of order."""
    broker = await anyio.to_thread.run_sync(kafka_broker_factory)

    async def broker_kills(_: BridgeProcess, __: Any) -> None:
        for _ in range(2):
            await anyio.sleep(3)
            await broker.akill()
            await anyio.sleep(2)
            await broker.astart()

    delivery, _ = await _run_disrupted(
        _scenario(2, 25, 100, 10, CHAOS_FAULTS, seed=22),
        broker.bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        broker_kills,
    )
    _report("chaos broker killed twice exactly_once", delivery)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


@pytest.mark.slow
async def test_chaos_api_down_30s_exactly_once(kafka_bootstrap, kafka_topics, tmp_path):
    """Scenario: exactly_once, 22 threads; the API answers 503 to everything for 30 s, and
    a fifth of the streams stall silently: 0 lost, 0 duplicated, 0 out of order."""
    faults = Faults(drop_rate=0.05, replay_rate=0.5, stall_rate=0.2, stall_after_frames=(0, 50))

    async def api_outage(_: BridgeProcess, sim: Any) -> None:
        await anyio.sleep(3)
        sim.outage(status=503, duration_s=30)

    delivery, _ = await _run_disrupted(
        _scenario(2, 10, 150, 10, faults, seed=23),
        kafka_bootstrap,
        kafka_topics,
        tmp_path / "bridge.log",
        api_outage,
    )
    _report("chaos API 503 for 30 s exactly_once", delivery)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


async def test_a_second_instance_shares_the_work_and_neither_exits(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario: exactly_once; while bridge A streams 8 threads, bridge B starts with the same
    configuration (before scale-out, B fenced A, which exited 1). Now B joins A's group and
    takes its share of the shards: neither exits, and a read_committed consumer sees 0 lost,
    0 duplicated, 0 out of order across the hand-over of half the shards mid-stream."""
    scenario = _scenario(1, 7, 300, 25, Faults(), seed=8)
    async with running_simulator(scenario, token=TOKEN) as sim:
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics)
        first = BridgeProcess(env, tmp_path / "a.log")
        second = BridgeProcess(env, tmp_path / "b.log")
        first.start()
        try:
            await _first_record(kafka_bootstrap, kafka_topics.events)
            second.start()
            with anyio.fail_after(120):
                await sim.wait_idle()
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
            assert first.proc is not None and second.proc is not None
            running = (first.proc.poll(), second.proc.poll())
        finally:
            first.stop()
            second.stop()
    _report("a second instance joins", delivery)
    assert running == (None, None), first.log_text()[-2000:]
    assert '"bridge.shards.assigned"' in second.log_text()
    assert "bridge.fatal" not in first.log_text() + second.log_text()
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
