"""SSE routes of the simulator: framing, resume, fresh-stream behaviour, heartbeats, routes."""

from __future__ import annotations

import dataclasses
import json

import anyio
import httpx
import pytest

from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.simulator.helpers import TOKEN, client, ids, read_sse

pytestmark = pytest.mark.anyio

KIDS = (ThreadSpec(events=10, rate=0), ThreadSpec(events=10, rate=0, final_status="terminated"))
REPLAY = Scenario(
    name="replay",
    seed=31,
    instant=True,
    fresh_stream="replay",
    sessions=(SessionSpec(ThreadSpec(events=20, rate=0), KIDS),),
)
LIVE = Scenario(
    name="live",
    seed=32,
    heartbeat_interval_s=0.2,
    sessions=(SessionSpec(ThreadSpec(events=40, rate=60)),),
)


def _routes(session: str, thread: str) -> list[tuple[str, dict[str, str]]]:
    base = f"/sessions/{session}/threads/{thread}"
    return [(f"{base}/stream", {}), (f"{base}/events", {"Accept": "text/event-stream"})]


async def test_frames_carry_the_canonical_bytes_on_both_routes() -> None:
    """Scenario "replay": a fresh connection replays the whole thread; each frame's id and
    event name are the event's, and its data is the thread log's bytes exactly, on
    /stream and on /events with Accept: text/event-stream alike."""
    with anyio.fail_after(20):
        async with running_simulator(REPLAY, token=TOKEN) as sim, client(sim) as c:
            for session, thread in sim.all_threads():
                log = sim.thread_log(session, thread)
                for path, headers in _routes(session, thread):
                    frames = await read_sse(c, path, len(log), headers=headers)
                    assert [f.data.encode() for f in frames] == log
                    assert [f.id for f in frames] == ids(log)
                    assert [f.event for f in frames] == [json.loads(e)["type"] for e in log]
            assert len(sim.served[sim.all_threads()[0]]) == 2


async def test_resume_strictly_after_last_event_id_or_after_id() -> None:
    """Scenario "replay": Last-Event-ID (header) or after_id (query) resumes with the event
    right after the cursor, on both thread-stream routes."""
    with anyio.fail_after(20):
        async with running_simulator(REPLAY, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[1]
            log = sim.thread_log(session, thread)
            cursor = ids(log)[4]
            for path, headers in _routes(session, thread):
                by_header = await read_sse(c, path, 3, headers={**headers, "Last-Event-ID": cursor})
                by_query = await read_sse(c, path, 3, headers=headers, params={"after_id": cursor})
                assert [f.id for f in by_header] == [f.id for f in by_query] == ids(log)[5:8]
            last = ids(log)[-1]
            r = sim.connections[-1]
            assert r.cursor == cursor and r.ids[:3] == ids(log)[5:8]
            async with c.stream(
                "GET", _routes(session, thread)[0][0], headers={"Last-Event-ID": last}
            ) as resp:
                assert resp.status_code == 200  # resuming at the end: nothing, then heartbeats


async def test_bad_cursor_is_400_before_the_stream_starts() -> None:
    """Scenario "replay": an unknown cursor, or one of another thread, is answered 400
    invalid_request_error (JSON, not a stream), on thread and session streams."""
    with anyio.fail_after(20):
        async with running_simulator(REPLAY, token=TOKEN) as sim, client(sim) as c:
            (session, coordinator), (_, child) = sim.all_threads()[:2]
            foreign = ids(sim.thread_log(session, coordinator))[3]
            unknown = "evt_019f0000000000000000000000000000"
            for cursor in (foreign, unknown):
                for path, headers in _routes(session, child):
                    r = await c.get(path, headers={**headers, "Last-Event-ID": cursor})
                    assert r.status_code == 400, r.text
                    assert r.headers["content-type"] == "application/json"
                    assert r.json()["error"]["param"] == "Last-Event-ID"
            r = await c.get(f"/sessions/{session}/events/stream", params={"after_id": unknown})
            assert r.status_code == 400 and r.json()["error"]["param"] == "after_id"


async def test_strict_stream_query_refuses_any_parameter() -> None:
    """Scenario "replay" with stream_query=strict (Forward): any query parameter on any stream
    request, even an empty one, is answered 400 invalid_request (with error.code and param)
    and no stream opens; the cursor comes from Last-Event-ID only; JSON lists still page."""
    scenario = dataclasses.replace(REPLAY, stream_query="strict")
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[1]
            log = ids(sim.thread_log(session, thread))
            streams = [
                *_routes(session, thread),
                (f"/sessions/{session}/events/stream", {}),
                (f"/sessions/{session}/events", {"Accept": "text/event-stream"}),
            ]
            for path, headers in streams:
                for query in (f"after_id={log[3]}", "x=", "x", "after_id=", "limit=5&order=asc"):
                    r = await c.get(f"{path}?{query}", headers={**headers, "Last-Event-ID": log[2]})
                    assert r.status_code == 400, (path, query, r.text)
                    assert r.headers["content-type"] == "application/json"
                    name = query.split("=")[0].split("&")[0]
                    assert r.json()["error"] == {
                        "type": "invalid_request",
                        "message": f"Query parameter '{name}' is not supported on event streams.",
                        "param": name,
                        "code": "invalid_request",
                    }
            assert sim.connections == []
            for path, headers in _routes(session, thread):
                frames = await read_sse(c, path, 3, headers={**headers, "Last-Event-ID": log[4]})
                assert [f.id for f in frames] == log[5:8]
            listed = await c.get(
                f"/sessions/{session}/threads/{thread}/events", params={"after_id": log[4]}
            )
            assert [e["id"] for e in listed.json()["data"]] == log[5:]


async def test_fresh_stream_tail_starts_at_the_live_edge() -> None:
    """Scenario "live" (tail, the behaviour since 2026-08-24): a fresh connection gets only
    events created after it connected, consecutive from there."""
    with anyio.fail_after(20):
        async with running_simulator(LIVE, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            before = len(sim.thread_log(session, thread))
            frames = await read_sse(c, _routes(session, thread)[0][0], 5)
            log_ids = ids(sim.thread_log(session, thread))
            at = log_ids.index(frames[0].id)
            assert at >= before > 0
            assert [f.id for f in frames] == log_ids[at : at + 5]


async def test_fresh_stream_replay_starts_at_the_first_event_then_goes_live() -> None:
    """Scenario "live" with fresh_stream=replay (the old behaviour): a fresh connection
    starts with the thread's first event and carries on into live events."""
    scenario = dataclasses.replace(LIVE, fresh_stream="replay")
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            frames = await read_sse(
                c, _routes(session, thread)[1][0], 40, headers=_routes(session, thread)[1][1]
            )
            assert [f.data.encode() for f in frames] == sim.thread_log(session, thread)


@pytest.mark.parametrize(
    ("form", "expected"),
    [("comment", b": heartbeat\n\n"), ("event", b"event: heartbeat\ndata: {}\n\n")],
)
async def test_heartbeat_forms(form: str, expected: bytes) -> None:
    """Scenario "tiny" at the live tail with 0.2 s heartbeats, in both documented forms:
    the idle stream sends only heartbeat frames."""
    scenario = Scenario(instant=True, heartbeat=form, heartbeat_interval_s=0.2)  # type: ignore[arg-type]
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            async with c.stream("GET", _routes(session, thread)[0][0]) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                received = b""
                async for chunk in resp.aiter_raw():
                    received += chunk
                    if len(received) >= 2 * len(expected):
                        break
            assert received == expected * 2


@pytest.mark.parametrize("served", ["events", "stream"])
async def test_one_thread_stream_route_disabled(served: str) -> None:
    """Scenario "replay" serving only one of the two thread-stream routes: the other one
    answers 404 not_found_error; the JSON list keeps working either way."""
    scenario = dataclasses.replace(REPLAY, thread_stream_routes=served)
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            (stream_path, _), (events_path, sse) = _routes(session, thread)
            off, on = ((stream_path, {}), (events_path, sse))[:: 1 if served == "events" else -1]
            r = await c.get(off[0], headers=off[1])
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
            assert len(await read_sse(c, on[0], 3, headers=on[1])) == 3
            assert (await c.get(events_path)).json()["data"][0]["id"] == sim.connections[0].ids[0]


async def test_session_stream_carries_coordinator_and_thread_lifecycle() -> None:
    """Scenario "replay": the session stream (and its JSON list) holds the coordinator's
    events plus every child's lifecycle and messages, the same bytes as the thread logs."""
    with anyio.fail_after(20):
        async with running_simulator(REPLAY, token=TOKEN) as sim, client(sim) as c:
            session = sim.session_ids()[0]
            log = sim.session_log(session)
            frames = await read_sse(c, f"/sessions/{session}/events/stream", len(log))
            assert [f.data.encode() for f in frames] == log
            listed = (await c.get(f"/sessions/{session}/events", params={"limit": 100})).json()
            assert [e["id"] for e in listed["data"]] == ids(log)
            events = [json.loads(e) for e in log]
            children = [t for s, t in sim.all_threads()[1:]]
            for kind in ("session.thread_created", "session.thread_status_running"):
                assert [e["session_thread_id"] for e in events if e["type"] == kind] == children
            ends = [e["type"] for e in events if e["type"].startswith("session.thread_status_")]
            assert ends.count("session.thread_status_terminated") == 1
            threads = {e["session_thread_id"] for e in events}
            everything = {raw for _, t in sim.all_threads() for raw in sim.thread_log(session, t)}
            assert set(log) <= everything and threads == {t for _, t in sim.all_threads()}
            sse = await read_sse(
                c, f"/sessions/{session}/events", 2, headers={"Accept": "text/event-stream"}
            )
            assert [f.id for f in sse] == ids(log)[:2]


async def test_delta_frames_precede_live_messages_and_never_reach_lists() -> None:
    """Scenario "live" with deltas: event_start/event_delta frames carry the id of the
    message that follows them whole; lists and logs never hold them."""
    scenario = dataclasses.replace(LIVE, deltas=True, unicode_rate=1.0)
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            frames = await read_sse(c, _routes(session, thread)[0][0], 30)
            await sim.wait_idle()
            log = {json.loads(e)["id"]: json.loads(e) for e in sim.thread_log(session, thread)}
            text: dict[str, str] = {}
            for f in frames:
                data = json.loads(f.data)
                if f.event == "event_start":
                    assert (
                        data["event"]["id"] == f.id and data["event"]["type"] == log[f.id]["type"]
                    )
                    text[f.id] = ""
                elif f.event == "event_delta":
                    assert data["event_id"] == f.id
                    text[f.id] += data["delta"]["content"]["text"]
                else:
                    assert f.data.encode() in sim.thread_log(session, thread)
                    if f.event == "agent.message" and f.id in text:
                        assert text.pop(f.id) == log[f.id]["content"][0]["text"]
            assert any(f.event == "event_delta" for f in frames)
            assert not any(e["type"].startswith("event_") for e in log.values())


async def test_streams_end_cleanly_on_final_threads_when_asked() -> None:
    """Scenario "replay" with close_on_terminal: the terminated child's stream ends (no
    error) after its last event; the idle coordinator's keeps heartbeating."""
    scenario = dataclasses.replace(REPLAY, close_on_terminal=True)
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, child = sim.all_threads()[2]
            async with c.stream("GET", _routes(session, child)[0][0]) as resp:
                body = await resp.aread()
            assert body == b"".join(
                b"id: %s\nevent: %s\ndata: %s\n\n" % (i.encode(), json.loads(e)["type"].encode(), e)
                for i, e in zip(
                    ids(sim.thread_log(session, child)), sim.thread_log(session, child), strict=True
                )
            )
            assert sim.connections[-1].outcome == "end"


async def test_shutdown_ends_open_streams() -> None:
    """Scenario "live": leaving running_simulator with a stream open ends that stream
    cleanly and promptly."""
    with anyio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as c:
            async with running_simulator(LIVE, token=TOKEN) as sim:
                session, thread = sim.all_threads()[0]
                url = sim.base_url + _routes(session, thread)[0][0]
                resp = await c.send(
                    c.build_request("GET", url, headers={"Authorization": f"Bearer {TOKEN}"}),
                    stream=True,
                )
            await resp.aread()
            assert resp.status_code == 200
            await resp.aclose()
