"""Cost follows live work, not history (issue 9): requests, connections and state held depend on
what runs now, not on how many sessions the account has finished."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import anyio
import pytest

from bridge import metrics
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import (
    TOKEN,
    api_requests_counted,
    bridge_settings,
    read_json,
    running_bridge,
    wait_for_delivery,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _account(history: int) -> Scenario:
    running = SessionSpec(ThreadSpec(events=70, rate=3), (ThreadSpec(events=70, rate=3),))
    return Scenario(
        name=f"account-{history}",
        seed=61,
        heartbeat_interval_s=0.5,
        sessions=(running, running, *(SessionSpec(ThreadSpec(events=3, rate=0)),) * history),
    )


async def _steady_cost(history: int, bootstrap: str, topics: object) -> tuple[float, int, int]:
    """Requests per second and open connections once the history is caught up, and how many
    historical threads' events reached the topic."""
    async with running_simulator(_account(history), token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, bootstrap, topics)
        async with running_bridge(settings):
            # Catch-up: every historical thread read once (the running ones are still going).
            with anyio.fail_after(90):
                while True:
                    _records, delivery = await wait_for_delivery(
                        bootstrap,
                        topics.events,
                        sim,
                        timeout_s=1,  # type: ignore[attr-defined]
                    )
                    if len(delivery.by_key) >= history + 4:
                        break
            await anyio.sleep(3.0)  # settle: catch-up pumps end, watchers of history let go
            before, started = api_requests_counted(), anyio.current_time()
            await anyio.sleep(6.0)
            rate = (api_requests_counted() - before) / (anyio.current_time() - started)
            open_streams = sim.open_streams
    return rate, open_streams, len(delivery.by_key)


async def test_steady_requests_and_connections_do_not_grow_with_history(
    kafka_bootstrap, kafka_topics
):
    """Scenario: an account with 2 running sessions (4 threads writing 3 events/s) and 300
    finished sessions. After catch-up, with a 1 s poll: the bridge makes a few requests per
    second (the running-session listing and the running sessions' looks), and holds one
    connection per running thread and running session, whatever the history. With a watcher
    per historical session (before) this measured 210 requests/s and 306 open streams."""
    rate, open_streams, threads = await _steady_cost(300, kafka_bootstrap, kafka_topics)
    print(f"\n300 finished sessions: {rate:.1f} requests/s, {open_streams} open streams")
    assert threads >= 304
    assert rate <= 8.0, rate
    assert open_streams <= 4 + 2 + 2, open_streams


def _lags(records: list[Any]) -> list[float]:
    """Seconds from each event's processed_at to its append to the topic."""
    lags = []
    for record in records:
        processed = json.loads(record.value).get("processed_at")
        if isinstance(processed, str):
            moment = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", processed))
            lags.append(record.timestamp / 1000 - moment.timestamp())
    return sorted(lags)


@pytest.mark.parametrize(
    ("knob", "env"),
    [
        pytest.param({"connection_cap": 4}, {}, id="api-connection-cap"),
        pytest.param({}, {"BRIDGE_MAX_STREAMS": "2"}, id="max-streams"),
    ],
)
async def test_threads_beyond_the_stream_cap_keep_flowing_through_the_list(
    kafka_bootstrap, kafka_topics, knob, env
):
    """Scenario (9.4): 8 running threads (2 sessions) and either a gateway that resets every
    stream beyond 4 per client (the 2 session streams count too) or BRIDGE_MAX_STREAMS=2.
    Every event of every thread is delivered exactly once, in order; the threads without a
    stream are read through the list in rotation; one `bridge.streams_capped` alert."""
    session = SessionSpec(ThreadSpec(events=40, rate=5), (ThreadSpec(events=40, rate=5),) * 3)
    scenario = Scenario(
        name="capped", seed=62, heartbeat_interval_s=0.5, sessions=(session, session), **knob
    )
    polls = metrics.LIST_POLLS._value.get()
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_LIST_POLL_INTERVAL_S="1", **env
        )
        async with running_bridge(settings):
            with anyio.fail_after(90):
                await sim.wait_idle()
            records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
        refused = len(sim.cap_refusals)
    lags = _lags(records)
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
    print(f"\ncapped {knob or env}: {delivery.summary()} refused={refused} lag p50={p50:.2f}s")
    print(f"  p99={p99:.2f}s list passes={metrics.LIST_POLLS._value.get() - polls}")
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert metrics.LIST_POLLS._value.get() > polls
    alerts = await read_json(kafka_bootstrap, kafka_topics.alerts)
    assert sum(a["type"] == "bridge.streams_capped" for a in alerts) == 1


async def test_sessions_that_settled_cost_no_request_after_a_restart(kafka_bootstrap, kafka_topics):
    """Scenario: an account of 40 finished sessions and 1 running. A first bridge catches up and
    lets the finished sessions go (each settled: its mark is written to the checkpoint topic,
    keyed by the session). A second bridge starts: its first full listing shows the same 40
    with nothing newer, and it asks for none of them (no session, no thread list), where a
    bridge that kept the marks only in its local cache looked at every one again (80
    requests). Nothing is republished."""
    history = 40
    async with running_simulator(_account(history), token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                while True:
                    marks = [
                        r
                        for r in await read_json(kafka_bootstrap, kafka_topics.checkpoints)
                        if "settled_updated_at" in r
                    ]
                    if len(marks) >= history:
                        break
                    await anyio.sleep(0.5)
        published = len(await read_json(kafka_bootstrap, kafka_topics.events))
        sessions, threads = api_requests_counted("session"), api_requests_counted("threads")
        async with running_bridge(settings):
            await anyio.sleep(4.0)  # well past the start's full listing
        asked_sessions = api_requests_counted("session") - sessions
        asked_threads = api_requests_counted("threads") - threads
        events = await read_json(kafka_bootstrap, kafka_topics.events)
    print(f"\nrestart: {asked_sessions:.0f} session and {asked_threads:.0f} thread-list requests")
    assert len({m["session_id"] for m in marks}) >= history
    # The two running sessions' looks only (each a few); before, 40 + 40 for the history.
    assert asked_sessions <= 10, asked_sessions
    assert asked_threads <= 16, asked_threads
    ids = [e["id"] for e in events]
    assert len(ids) >= published
    assert len(ids) == len(set(ids))  # nothing of the history published again


async def test_a_catch_up_slower_than_the_poll_costs_one_look_per_session(
    kafka_bootstrap, kafka_topics
):
    """Scenario: 60 finished sessions of two threads each, read under a request budget so
    tight that the catch-up takes several poll intervals (as 3,000 sessions do under the
    default budget). Each finished session costs its thread list and one page per thread,
    and settles (its mark in the checkpoint topic) once its threads are stored. Before, a
    session whose catch-up outlasted a poll interval looked again (session and thread list,
    queued behind the catch-up), every poll: the queue grew with its own looks, and at a
    restart 5 s after the events were in, most sessions had not settled."""
    history = 60
    spec = SessionSpec(ThreadSpec(events=3, rate=0), (ThreadSpec(events=2, rate=0),))
    scenario = Scenario(name="slow-catch-up", seed=62, sessions=(spec,) * history)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url,
            kafka_bootstrap,
            kafka_topics,
            BRIDGE_API_MAX_RPS="25",  # 60 x 3 requests: 7 s, seven poll intervals
        )
        before = {r: api_requests_counted(r) for r in ("session", "threads", "events")}
        async with running_bridge(settings):
            with anyio.fail_after(60):
                while True:
                    marks = {
                        r["session_id"]
                        for r in await read_json(kafka_bootstrap, kafka_topics.checkpoints)
                        if "settled_updated_at" in r
                    }
                    if len(marks) >= history:
                        break
                    await anyio.sleep(0.5)
        asked = {r: api_requests_counted(r) - n for r, n in before.items()}
        _records, delivery = await wait_for_delivery(
            kafka_bootstrap, kafka_topics.events, sim, timeout_s=1
        )
    print(f"\n{history} sessions caught up with {asked}; {delivery.summary()}")
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0)
    assert len(delivery.by_key) == 2 * history
    # The full listing already gave each session: no session request, one thread list, one
    # page per thread.
    assert asked["session"] == 0, asked
    assert asked["threads"] == history, asked
    assert asked["events"] == 2 * history, asked
