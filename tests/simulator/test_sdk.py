"""The official SDK (qca-sdk) against the simulator: if Qoder's own client reads it, the
simulator speaks the API as Qoder ships it. Also pins the SDK behaviours the bridge must not
inherit (it reads SSE with httpx-sse instead)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from qca.common._exceptions import APIResponseValidationError
from qca.managed import AsyncManaged
from qca.managed.types.session import Session
from qca.managed.types.session_event import SessionEvent
from qca.managed.types.session_thread import SessionThread

from bridge.simulator import NAMED, Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.simulator.helpers import TOKEN, ids

pytestmark = pytest.mark.anyio

# The SDK splits lines like str.splitlines(); see test_sdk_breaks_on_line_separators.
SDK_SAFE = dataclasses.replace(
    NAMED["many-threads"], line_separator_rate=0.0, heartbeat_interval_s=0.2, unicode_rate=0.5
)


def _sdk(sim_url: str) -> AsyncManaged:
    return AsyncManaged(access_token=TOKEN, base_url=sim_url, max_retries=0)


async def test_sdk_lists_pages_and_resumes_streams() -> None:
    """Scenario "many-threads" (31 threads): the SDK pages through sessions and threads with
    its own next_page handling, parses thread events into its typed models, and resumes
    the session and thread streams with Last-Event-ID, strictly after the cursor."""
    with anyio.fail_after(30):
        async with running_simulator(SDK_SAFE, token=TOKEN) as sim, _sdk(sim.base_url) as qoder:
            sessions = [s async for s in qoder.sessions.list(limit=1)]
            assert all(isinstance(s, Session) for s in sessions)
            assert [s.id for s in sessions] == sim.session_ids()[::-1]  # newest first
            session = sessions[0].id
            threads = [t async for t in qoder.sessions.threads.list(session, limit=7)]
            assert [t.id for t in threads] == [t for _, t in sim.all_threads()]
            assert all(isinstance(t, SessionThread) for t in threads)
            assert threads[0].parent_thread_id is None
            assert isinstance(threads[0].created_at, datetime)
            child = threads[5].id
            log = sim.thread_log(session, child)
            events = [
                e
                async for e in qoder.sessions.threads.events.list(
                    child, session_id=session, limit=3
                )
            ]
            assert [e.id for e in events] == ids(log)
            for event, raw in zip(events, log, strict=True):
                assert isinstance(event, SessionEvent) and event.session_thread_id == child
                expected = json.loads(raw)["processed_at"][:26] + "+00:00"  # to microseconds
                assert event.processed_at == datetime.fromisoformat(expected)
                if event.type == "agent.message":
                    assert (
                        event.content
                        and event.content[0].text == json.loads(raw)["content"][0]["text"]
                    )

            cursor = ids(log)[2]
            stream = await qoder.sessions.threads.events.stream(
                child, session_id=session, extra_headers={"Last-Event-ID": cursor}
            )
            got = []
            async for event in stream:
                got.append(event.id)
                if len(got) == len(log) - 3:
                    break
            await stream.close()
            assert got == ids(log)[3:]

            session_log = sim.session_log(session)
            stream = await qoder.sessions.events.stream(session, last_event_id=ids(session_log)[4])
            got = []
            async for event in stream:
                got.append(event.id)
                if len(got) == 5:
                    break
            await stream.close()
            assert got == ids(session_log)[5:10]


async def test_sdk_resumable_stream_survives_drops() -> None:
    """Scenario: a terminating session whose streams are all cut after 6-10 frames: the
    SDK's resumable session stream reconnects with the last id and stops after
    session.status_terminated, having yielded every event once, in order."""
    scenario = Scenario(
        seed=51,
        instant=True,
        fresh_stream="replay",
        line_separator_rate=0.0,
        sessions=(SessionSpec(ThreadSpec(events=24, rate=0), terminate=True),),
        faults=Faults(drop_rate=1.0, drop_after_frames=(6, 10)),
    )
    with anyio.fail_after(30):
        async with running_simulator(scenario, token=TOKEN) as sim, _sdk(sim.base_url) as qoder:
            session = sim.session_ids()[0]
            got = [e.id async for e in qoder.sessions.events.resumable_stream(session)]
            assert got == ids(sim.session_log(session))
            assert len(sim.connections) >= 3


async def test_sdk_hands_out_heartbeats_as_events() -> None:
    """Scenario "tiny" with named heartbeats (event: heartbeat / data: {}): the SDK yields
    them as events of type "heartbeat" carrying the previous event's id; a client that
    checkpoints every event's id must recognise them by type."""
    scenario = dataclasses.replace(
        NAMED["tiny"], heartbeat="event", heartbeat_interval_s=0.1, line_separator_rate=0.0
    )
    with anyio.fail_after(30):
        async with running_simulator(scenario, token=TOKEN) as sim, _sdk(sim.base_url) as qoder:
            session, child = sim.all_threads()[1]
            *_, before, last = ids(sim.thread_log(session, child))
            stream = await qoder.sessions.threads.events.stream(
                child, session_id=session, extra_headers={"Last-Event-ID": before}
            )
            got = []
            async for event in stream:
                got.append((event.type, event.id, stream.last_event_id))
                if len(got) == 3:
                    break
            await stream.close()
            assert got[0] == ("session.thread_status_idle", last, last)
            assert got[1:] == [("heartbeat", last, last)] * 2


async def test_sdk_does_not_dedupe_boundary_replays() -> None:
    """Scenario "tiny", streams cut after 12 frames and every resume replaying 1-3 events
    first: the SDK's resumable stream yields the replayed events again (no dedupe by id)."""
    scenario = dataclasses.replace(
        NAMED["tiny"],
        fresh_stream="replay",
        line_separator_rate=0.0,
        faults=Faults(drop_rate=1.0, drop_after_frames=(12, 12), replay_rate=1.0),
    )
    with anyio.fail_after(30):
        async with running_simulator(scenario, token=TOKEN) as sim, _sdk(sim.base_url) as qoder:
            session = sim.session_ids()[0]
            log = ids(sim.session_log(session))
            got: list[str] = []
            async with qoder.sessions.events.resumable_stream(session) as stream:
                async for event in stream:
                    got.append(str(event.id))
                    if set(got) == set(log):
                        break
            assert [i for i in dict.fromkeys(got)] == log and len(got) > len(log)


async def test_sdk_breaks_on_line_separators() -> None:
    """Scenario: every text holds U+2028/U+2029/U+0085, legal raw in JSON and in SSE data
    lines: httpx-sse (what the bridge uses) parses the frames, the SDK's stream splits
    them like str.splitlines() and fails validating the JSON."""
    scenario = Scenario(
        seed=52,
        instant=True,
        fresh_stream="replay",
        line_separator_rate=1.0,
        sessions=(SessionSpec(ThreadSpec(events=10, rate=0)),),
    )
    with anyio.fail_after(30):
        async with running_simulator(scenario, token=TOKEN) as sim, _sdk(sim.base_url) as qoder:
            session, thread = sim.all_threads()[0]
            log = sim.thread_log(session, thread)
            assert any("\u2028".encode() in e for e in log)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=sim.base_url, headers=headers) as c:
                path = f"/sessions/{session}/threads/{thread}/stream"
                async with aconnect_sse(c, "GET", path) as source:
                    frames = []
                    async for sse in source.aiter_sse():
                        frames.append(sse.data.encode())
                        if len(frames) == len(log):
                            break
            assert frames == log
            stream = await qoder.sessions.threads.events.stream(thread, session_id=session)
            with pytest.raises(APIResponseValidationError):
                async for _ in stream:
                    pass
            await stream.close()
