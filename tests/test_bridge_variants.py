"""The bridge against every API variant the docs describe, and against a token that goes bad."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anyio
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
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

_SESSIONS = (
    SessionSpec(
        coordinator=ThreadSpec(events=30, rate=30),
        children=tuple(ThreadSpec(events=15, rate=30, start_after_s=0.2 * i) for i in range(3)),
    ),
)
_BASE = Scenario(name="variant", seed=9, heartbeat_interval_s=0.3, sessions=_SESSIONS)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            dataclasses.replace(_BASE, thread_stream_routes="events"), id="events-route-only"
        ),
        pytest.param(
            dataclasses.replace(_BASE, thread_stream_routes="stream"), id="stream-route-only"
        ),
        pytest.param(
            dataclasses.replace(
                _BASE,
                fresh_stream="replay",
                heartbeat="event",
                honour_thread_statuses=True,
                thread_stream_routes="events",
            ),
            id="legacy-generation",
        ),
        pytest.param(dataclasses.replace(_BASE, deltas=True), id="stream-only-deltas"),
    ],
)
async def test_every_documented_api_variant_delivers_everything_once(
    kafka_bootstrap, kafka_topics, scenario
):
    """Scenario: the thread stream served on only one of its two routes; the older generation
    (history replay on a fresh stream, `event: heartbeat` frames, `statuses[]` honoured); and
    stream-only `event_start`/`event_delta` frames, which are never published."""
    records, delivery = await deliver_scenario(scenario, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    types = {json.loads(r.value)["type"] for r in records}
    assert not types & {"event_start", "event_delta", "heartbeat"}
    assert await read_topic(kafka_bootstrap, kafka_topics.dlq) == []


async def _ready(port: int) -> tuple[int, str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/readyz")
        return response.status_code, response.text


async def _metric(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_revoked_token_turns_readiness_off_alerts_once_and_rotation_recovers(
    kafka_bootstrap, kafka_topics, tmp_path: Path
):
    """Scenario: the token (read from a file, as a Kubernetes secret mount) is revoked while 4
    threads stream: /readyz turns 503 naming api_authorized, qoder_bridge_token_rejected is 1,
    one bridge.token_rejected alert is published; the secret is then rotated and the bridge
    picks up the new file by itself: ready again, and nothing lost or duplicated."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    scenario = dataclasses.replace(
        _BASE,
        sessions=(
            SessionSpec(
                coordinator=ThreadSpec(events=80, rate=8),
                children=tuple(ThreadSpec(events=60, rate=6) for _ in range(3)),
            ),
        ),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url,
            kafka_bootstrap,
            kafka_topics,
            QODER_ACCESS_TOKEN="",
            QODER_ACCESS_TOKEN_FILE=str(token_file),
        )
        async with running_bridge(settings) as bridge:
            with anyio.fail_after(30):
                while bridge.http_port is None or (await _ready(bridge.http_port))[0] != 200:
                    await anyio.sleep(0.1)
            port = bridge.http_port
            sim.set_token("pt-revoked-nobody-has-this")
            with anyio.fail_after(30):
                while (await _ready(port))[0] != 503:
                    await anyio.sleep(0.1)
            _, body = await _ready(port)
            assert "api_authorized" in body
            assert await _metric(port, "qoder_bridge_token_rejected") == 1
            rotated = "pt-rotated-0123456789abcdef"
            sim.set_token(rotated)
            token_file.write_text(rotated + "\n")
            with anyio.fail_after(30):
                while (await _ready(port))[0] != 200:
                    await anyio.sleep(0.1)
            assert await _metric(port, "qoder_bridge_token_rejected") == 0
            with anyio.fail_after(90):
                await sim.wait_idle()
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
        alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    token_alerts = [a for a in alerts if a["type"] == "bridge.token_rejected"]
    assert len(token_alerts) == 1
    assert token_alerts[0]["source"] == "bridge"
    assert TOKEN not in json.dumps(alerts)


async def test_checkpoint_the_api_no_longer_knows_republishes_the_thread_and_alerts(
    kafka_bootstrap, kafka_topics
):
    """Scenario: a thread's checkpoint names an event the API answers 400 for (archived or
    purged): the bridge rescans that thread from its start, publishes every event, raises a
    bridge.cursor_lost alert, and the other threads resume as usual."""
    scenario = Scenario(
        name="lost-cursor",
        seed=12,
        instant=True,
        sessions=(
            SessionSpec(coordinator=ThreadSpec(events=40), children=(ThreadSpec(events=25),)),
        ),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        with anyio.fail_after(30):
            await sim.wait_idle()
        (session_id, thread_id), *_ = sim.all_threads()
        await kafka_topics.create(kafka_bootstrap, partitions=3)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                kafka_topics.checkpoints,
                b'{"last_event_id":"evt_00000000000000000000000000000bad"}',
                key=f"{session_id}/{thread_id}".encode(),
            )
        finally:
            await producer.stop()
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
        alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    lost = [a for a in alerts if a["type"] == "bridge.cursor_lost"]
    assert [(a["session_id"], a["thread_id"]) for a in lost] == [(session_id, thread_id)]


async def test_sessions_that_ended_before_the_bridge_started_are_caught_up(
    kafka_bootstrap, kafka_topics
):
    """Scenario: while the bridge was down, one session ran and was terminated, one ran with a
    child that was archived, one ran and went idle. The bridge starts after all of it: every
    event of every thread still reaches Kafka once, in order."""
    scenario = Scenario(
        name="downtime",
        seed=13,
        instant=True,
        sessions=(
            SessionSpec(coordinator=ThreadSpec(events=20), terminate=True),
            SessionSpec(children=(ThreadSpec(events=15, final_status="archived"),)),
            SessionSpec(coordinator=ThreadSpec(events=12)),
        ),
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        with anyio.fail_after(30):
            await sim.wait_idle()
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert len(delivery.by_key) == 4
