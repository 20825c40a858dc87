"""The holes an adversarial read found (issue 8), each played by the simulator over real sockets
against a real broker: what a user checks is what reached the topics, counted."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest

from bridge import metrics
from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import (
    TOKEN,
    bridge_settings,
    deliver_scenario,
    read_json,
    running_bridge,
    wait_for_delivery,
)
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _clean(delivery: object) -> tuple[int, int, int]:
    return (delivery.lost, delivery.duplicated, delivery.misordered)  # type: ignore[attr-defined]


async def test_a_session_archived_while_the_bridge_was_down_is_delivered(
    kafka_bootstrap, kafka_topics
):
    """Scenario (8.1): a session runs, ends and is archived before the bridge starts, so the
    default session listing leaves it out. Every one of its events reaches the topic."""
    scenario = Scenario(
        name="archived",
        seed=21,
        instant=True,
        sessions=(
            SessionSpec(ThreadSpec(events=15, rate=0), (ThreadSpec(events=10, rate=0),) * 2),
            SessionSpec(
                ThreadSpec(events=12, rate=0), (ThreadSpec(events=8, rate=0),), archive=True
            ),
        ),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        await sim.wait_idle()
        with anyio.fail_after(10):
            await sim.wait_until(lambda: len(sim.session_ids()) == 2)
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=45
            )
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert len(delivery.by_key) == 5  # the archived session's two threads too


async def test_lists_without_next_page_are_read_to_the_end(kafka_bootstrap, kafka_topics):
    """Scenario (8.2): the older generation answers lists with has_more and last_id but no
    next_page, and refuses `page`. Threads that already finished (read through the list
    only) have 250 events each: all of them reach the topic, not the first 100."""
    scenario = Scenario(
        name="old-pagination",
        seed=22,
        instant=True,
        pagination="after_id",
        sessions=(SessionSpec(ThreadSpec(events=250, rate=0), (ThreadSpec(events=130, rate=0),)),),
    )
    _records, delivery = await deliver_scenario(scenario, kafka_bootstrap, kafka_topics)
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert delivery.received == delivery.expected >= 380


async def test_a_stream_route_that_refuses_query_parameters_is_learnt_once(
    kafka_bootstrap, kafka_topics
):
    """Scenario (8.10): the Forward-style stream answers any query parameter with 400 and
    takes the cursor only from Last-Event-ID; connections drop often, so the bridge resumes
    many times. Everything is delivered once, and the refusal costs at most one request per
    stream that was connecting when it was learnt, never one (and a rescan) per reconnect."""
    scenario = Scenario(
        name="strict-stream",
        seed=23,
        stream_query="strict",
        heartbeat_interval_s=0.3,
        sessions=(
            SessionSpec(ThreadSpec(events=60, rate=30), (ThreadSpec(events=40, rate=30),) * 2),
        ),
        faults=Faults(drop_rate=1.0, drop_after_frames=(2, 6)),
    )

    def refused() -> float:
        return sum(
            metrics.API_REQUESTS.labels(route=route, status="400")._value.get()
            for route in ("stream", "events")
        )

    before = refused()
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
        resumed = [c for c in sim.connections if c.thread_id and c.cursor]
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert len(resumed) >= 5  # many resumes, each with its cursor in Last-Event-ID
    assert refused() - before <= 3  # three threads
    alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert not [a for a in alerts if a["source"] == "bridge"]  # no cursor_lost, no DLQ


async def test_restarts_while_threads_are_quiet_never_republish_replayed_events(
    kafka_bootstrap, kafka_topics
):
    """Scenario (8.8): threads write an event every 2-3 s; the bridge is restarted several
    times between two events, so the backfill after each restart finds nothing new; every
    resumed stream first replays up to 3 events from before its Last-Event-ID. Exactly once:
    0 duplicates and 0 out of order."""
    scenario = Scenario(
        name="quiet-restarts",
        seed=24,
        heartbeat_interval_s=0.3,
        sessions=(SessionSpec(ThreadSpec(events=8, rate=0.4), (ThreadSpec(events=8, rate=0.4),)),),
        faults=Faults(replay_rate=1.0, replay_max=3),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        for _ in range(4):
            async with running_bridge(settings):
                await anyio.sleep(3.0)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
        replays = [c for c in sim.connections if "replay" in c.plan]
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert len(replays) >= 4  # the boundary replays did happen


async def test_a_failed_first_listing_is_retried_within_seconds(kafka_bootstrap, kafka_topics):
    """Scenario (8.15): the API answers 503 for the first 2 s after the bridge starts, with a
    15 s poll interval. Readiness says discovery has not succeeded; discovery retries with
    backoff, so the first event is in Kafka within a few seconds of the API coming back, not
    a poll interval later."""
    scenario = Scenario(
        name="late-api",
        seed=25,
        instant=True,
        sessions=(SessionSpec(ThreadSpec(events=10, rate=0)),),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        await sim.wait_idle()
        sim.outage(503, duration_s=2.0)
        back_at = time.monotonic() + 2.0
        settings = bridge_settings(
            sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_POLL_INTERVAL_S="15"
        )
        async with running_bridge(settings) as bridge:
            await anyio.sleep(1.0)
            during = bridge.health.failing_checks()
            with anyio.fail_after(30):
                while not await read_topic(kafka_bootstrap, kafka_topics.events):
                    await anyio.sleep(0.2)
            first_after_s = time.monotonic() - back_at
            after = bridge.health.failing_checks()
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=20
            )
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert first_after_s < 8.0, first_after_s
    assert "discovery_ok" in during and "discovery_ok" not in after


async def test_a_configured_session_that_does_not_exist_is_named_not_blamed_on_the_token(
    kafka_bootstrap, kafka_topics
):
    """Scenario (13.3): BRIDGE_SESSIONS names one real session and one with a typo. The real
    one is delivered; the typo gets a warning and one `bridge.session_not_found` alert naming
    it; /readyz fails on discovery_ok, naming the session, and never on api_authorized."""
    scenario = Scenario(
        name="typo", seed=26, instant=True, sessions=(SessionSpec(ThreadSpec(events=10, rate=0)),)
    )
    typo = "sess_0000000000000000000000000000typo"
    async with running_simulator(scenario, token=TOKEN) as sim:
        await sim.wait_idle()
        real = sim.session_ids()[0]
        settings = bridge_settings(
            sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_SESSIONS=f"{real},{typo}"
        )
        async with running_bridge(settings) as bridge:
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
            with anyio.fail_after(20):
                while "discovery_ok" not in bridge.health.failing_checks():
                    await anyio.sleep(0.1)
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{bridge.http_port}/readyz")
    assert _clean(delivery) == (0, 0, 0), delivery.summary()
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["discovery_ok"]
    assert typo in json.dumps(ready.json()["detail"])
    alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    missing = [a for a in alerts if a["type"] == "bridge.session_not_found"]
    assert len(missing) == 1 and missing[0]["detail"]["session_id"] == typo
