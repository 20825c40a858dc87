"""The bridge end to end: simulator over real sockets -> bridge -> a real Apache Kafka broker."""

from __future__ import annotations

import json

import pytest

from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec
from tests.asyncapi import assert_topics_match_asyncapi
from tests.bridge_harness import deliver_scenario
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _many_threads_scenario(fresh_stream: str = "tail", **kw: object) -> Scenario:
    return Scenario(
        name="many-threads",
        seed=7,
        fresh_stream=fresh_stream,  # type: ignore[arg-type]
        heartbeat_interval_s=0.5,
        sessions=(
            SessionSpec(
                coordinator=ThreadSpec(events=30, rate=40),
                children=tuple(
                    ThreadSpec(events=12, rate=30, start_after_s=0.1 * i) for i in range(30)
                ),
            ),
            SessionSpec(
                coordinator=ThreadSpec(events=40, rate=50, rerun_after_s=1.0, rerun_events=10),
                children=(
                    ThreadSpec(events=20, rate=0, start_after_s=1.5, final_status="archived"),
                ),
                start_after_s=0.5,
            ),
            SessionSpec(coordinator=ThreadSpec(events=25, rate=25), terminate=True),
        ),
        **kw,  # type: ignore[arg-type]
    )


async def test_every_event_once_in_order_with_key_value_and_headers(kafka_bootstrap, kafka_topics):
    """Scenario: three sessions, one with 31 threads (children appearing over 3 s), a
    coordinator that runs a second turn, an archived child and a terminated session.
    Every event of every thread is in the topic exactly once, in API order, byte for byte."""
    scenario = _many_threads_scenario()
    records, delivery = await deliver_scenario(scenario, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert delivery.received == delivery.expected
    assert len(delivery.by_key) == 34  # every thread of the three sessions
    assert delivery.expected > 500

    first = records[0]
    session_id, thread_id = first.key.decode().split("/")
    event = json.loads(first.value)
    headers = {k: v.decode() for k, v in first.headers}
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_id"] == event["id"]
    assert headers["ce_type"] == event["type"]
    assert headers["ce_source"] == f"/sessions/{session_id}/threads/{thread_id}"
    assert headers["ce_time"] == event["processed_at"]
    assert headers["content-type"] == "application/json"
    assert headers["qoder_session_id"] == session_id
    assert headers["qoder_thread_id"] == thread_id

    assert await read_topic(kafka_bootstrap, kafka_topics.dlq) == []
    checkpoints = await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
    last = {
        r.key.decode(): json.loads(r.value)["last_event_id"]
        for r in checkpoints
        if b"/" in r.key  # not a session's settled mark
    }
    for key, values in delivery.by_key.items():
        assert last[key] == json.loads(values[-1])["id"], f"checkpoint of {key} is behind"
    counts = await assert_topics_match_asyncapi(kafka_bootstrap, kafka_topics)
    assert counts["alerts"] > 0, "the terminated session raises alerts: check them too"


@pytest.mark.parametrize("heartbeat", ["comment", "event"])
async def test_heartbeats_are_never_published_and_never_move_the_cursor(
    kafka_bootstrap, kafka_topics, heartbeat
):
    """Scenario: slow threads (2 events/s) with a heartbeat every 50 ms, as `: heartbeat`
    comments or as `event: heartbeat` frames: the topic holds exactly the events, the DLQ
    nothing, and each checkpoint names the thread's last real event."""
    scenario = Scenario(
        name="heartbeats",
        seed=5,
        heartbeat=heartbeat,  # type: ignore[arg-type]
        heartbeat_interval_s=0.05,
        sessions=(
            SessionSpec(
                coordinator=ThreadSpec(events=8, rate=2), children=(ThreadSpec(events=6, rate=2),)
            ),
        ),
    )
    _, delivery = await deliver_scenario(scenario, kafka_bootstrap, kafka_topics)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert await read_topic(kafka_bootstrap, kafka_topics.dlq) == []
    checkpoints = await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
    last = {
        r.key.decode(): json.loads(r.value)["last_event_id"]
        for r in checkpoints
        if b"/" in r.key  # not a session's settled mark
    }
    for key, values in delivery.by_key.items():
        assert last[key] == json.loads(values[-1])["id"]
    await assert_topics_match_asyncapi(kafka_bootstrap, kafka_topics)


@pytest.mark.parametrize("fresh_stream", ["tail", "replay"])
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Faults(drop_rate=0.5, drop_after_frames=(1, 15)), id="dropped"),
        pytest.param(Faults(stall_rate=0.3, stall_after_frames=(0, 10), stall_s=30), id="stalled"),
        pytest.param(Faults(error_rate=0.15, retry_after_s=1), id="429-5xx-reset"),
        pytest.param(
            Faults(drop_rate=0.5, replay_rate=1.0, drop_after_frames=(2, 10)), id="replayed"
        ),
        pytest.param(
            Faults(non_json_rate=0.05, huge_rate=0.2, huge_bytes=400_000), id="bad-frames"
        ),
    ],
)
async def test_faults_lose_nothing_and_duplicate_nothing(
    kafka_bootstrap, kafka_topics, fault, fresh_stream
):
    """Scenario: every fault kind of the simulator, on both fresh-stream behaviours, in
    at_least_once mode with no crash: nothing lost, nothing duplicated, in order."""
    scenario = Scenario(
        name="faults",
        seed=11,
        fresh_stream=fresh_stream,  # type: ignore[arg-type]
        heartbeat_interval_s=0.3,
        faults=fault,
        # Starting a second in and lasting two: read on streams, where the faults are, even
        # when the bridge is slow to start (not all through the list after the fact).
        sessions=(
            SessionSpec(
                coordinator=ThreadSpec(events=60, rate=30),
                children=tuple(
                    ThreadSpec(events=40, rate=20, start_after_s=0.2 * i) for i in range(4)
                ),
                start_after_s=1.0,
            ),
        ),
    )
    _, delivery = await deliver_scenario(
        scenario, kafka_bootstrap, kafka_topics, BRIDGE_DELIVERY="at_least_once"
    )
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    if fault.non_json_rate:
        dead = await read_topic(kafka_bootstrap, kafka_topics.dlq)
        assert dead, "non-JSON frames must reach the DLQ"
        assert {json.loads(r.value)["reason"] for r in dead} == {"not_json"}
    await assert_topics_match_asyncapi(kafka_bootstrap, kafka_topics)
