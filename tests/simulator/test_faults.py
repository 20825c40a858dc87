"""Fault injection: determinism, drops, stalls, gateway errors, replays, bad frames, outages."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.simulator.helpers import (
    TOKEN,
    all_pages,
    client,
    ids,
    is_event,
    page_items_raw,
    read_sse,
    sse_frame,
)

pytestmark = pytest.mark.anyio

BASE = Scenario(
    name="faulty",
    seed=41,
    instant=True,
    heartbeat_interval_s=0.2,
    sessions=(SessionSpec(ThreadSpec(events=30, rate=0), (ThreadSpec(events=25, rate=0),) * 2),),
)


def _with(faults: Faults, **changes: Any) -> Scenario:
    return dataclasses.replace(BASE, faults=faults, **changes)


async def _drain(
    c: httpx.AsyncClient, path: str, last: str | None, end: str
) -> tuple[str, list[str]]:
    """One connection: what it ended with, and the ids of the JSON frames it got."""
    got: list[str] = []
    headers = {"Last-Event-ID": last} if last else {}
    try:
        async with aconnect_sse(c, "GET", path, headers=headers) as source:
            if source.response.status_code != 200:
                return f"http {source.response.status_code}", got
            async for sse in source.aiter_sse():
                try:
                    json.loads(sse.data)
                except ValueError:
                    continue  # heartbeats and frames whose data is not JSON
                if sse.event != "heartbeat":
                    got.append(sse.id)
                    if sse.id == end:
                        return "complete", got
    except httpx.TransportError as exc:
        return type(exc).__name__, got
    return "eof", got


async def _client_script(scenario: Scenario) -> tuple[list[tuple[str, str]], list[Any]]:
    """A fixed client: per thread, reconnect with the last id until it has every event."""
    outcomes: list[Any] = []
    async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
        for session, thread in sim.all_threads():
            log = ids(sim.thread_log(session, thread))
            position = {event_id: i for i, event_id in enumerate(log)}
            path = f"/sessions/{session}/threads/{thread}/stream"
            last: str | None = None
            for _ in range(40):
                how, got = await _drain(c, path, last, log[-1])
                outcomes.append((how, [position[i] for i in got]))
                last = got[-1] if got else last
                if how == "complete":
                    break
            else:
                raise AssertionError("never completed")
            for _ in range(3):
                try:
                    outcomes.append(
                        (await c.get(f"/sessions/{session}/threads/{thread}")).status_code
                    )
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)
        return list(sim.fault_log), outcomes


async def test_same_seed_same_faults_other_seed_other_faults() -> None:
    """Scenario "faulty" with every stream fault and 30% gateway errors: the same client run
    twice against the same seed meets the same faults at the same places (ids differ, the
    positions do not); another seed gives other faults."""
    faults = Faults(
        error_rate=0.3, drop_rate=0.6, drop_after_frames=(2, 9), replay_rate=0.7, non_json_rate=0.1
    )
    with anyio.fail_after(40):
        first = await _client_script(_with(faults, fresh_stream="replay"))
        second = await _client_script(_with(faults, fresh_stream="replay"))
        other = await _client_script(_with(faults, fresh_stream="replay", seed=42))
    assert first == second
    assert first[0] and first[0] != other[0]
    kinds = " ".join(fault for _, fault in first[0])
    for kind in ("error 429", "error 503", "error reset", "drop after", "replay", "non_json"):
        assert kind in kinds


async def test_drop_mid_frame_cuts_the_body_and_records_what_was_served() -> None:
    """Scenario "faulty" cutting every stream half-way through its 5th frame: the client
    sees an incomplete chunked body after 4 whole events, which is what sim.served says."""
    faults = Faults(drop_rate=1.0, drop_after_frames=(4, 4), drop_mid_frame_rate=1.0)
    with anyio.fail_after(20):
        async with running_simulator(_with(faults, fresh_stream="replay"), token=TOKEN) as sim:
            async with client(sim) as c:
                session, thread = sim.all_threads()[0]
                log = ids(sim.thread_log(session, thread))
                how, got = await _drain(c, f"/sessions/{session}/threads/{thread}/stream", None, "")
            assert how == "RemoteProtocolError" and got == log[:4]
            assert sim.served[(session, thread)] == [log[:4]]
            assert sim.fault_log == [("stream:0.0", "drop after 4 frames mid-frame")]


@pytest.mark.parametrize("replay_max", [1, 3, 6])
async def test_replay_goes_back_past_the_resume_boundary(replay_max: int) -> None:
    """Scenario "faulty" with a boundary replay on every resume (replay_max 1, 3, 6): a
    resumed connection first serves the k events before the cursor (ids older than the
    Last-Event-ID), then the cursor's own event, then carries on in order; k is drawn from
    1..replay_max, the same k for the same connection in every run."""
    faults = Faults(replay_rate=1.0, replay_max=replay_max)
    drawn: list[list[int]] = []
    with anyio.fail_after(20):
        for _ in range(2):
            async with running_simulator(_with(faults), token=TOKEN) as sim, client(sim) as c:
                session, thread = sim.all_threads()[1]
                log = ids(sim.thread_log(session, thread))
                path = f"/sessions/{session}/threads/{thread}/stream"
                drawn.append([])
                for _ in range(8):
                    frames = await read_sse(c, path, 12, headers={"Last-Event-ID": log[9]})
                    k = int(sim.fault_log[-1][1].split()[-1])
                    drawn[-1].append(k)
                    assert 1 <= k <= replay_max
                    assert frames[0].id in log[:9]  # older than the cursor
                    assert [f.id for f in frames] == log[9 - k : 21 - k]
                    assert sim.connections[-1].ids[: k + 1] == log[9 - k : 10]
    assert drawn[0] == drawn[1]
    assert (len(set(drawn[0])) > 1) == (replay_max > 1)


async def test_non_json_frames_and_huge_events() -> None:
    """Scenario "faulty" with a non-JSON frame before every event and every tool result
    ~300 KB: the bad frames carry no id; the events still arrive whole and byte-exact, in
    the stream and in list pages."""
    faults = Faults(non_json_rate=1.0, huge_rate=1.0, huge_bytes=300_000)
    with anyio.fail_after(20):
        scenario = _with(faults, fresh_stream="replay")
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[1]
            log = sim.thread_log(session, thread)
            path = f"/sessions/{session}/threads/{thread}/stream"
            frames = await read_sse(c, path, 2 * len(log))
            listed = await c.get(f"/sessions/{session}/threads/{thread}/events?limit=100")
    huge = [e for e in log if json.loads(e)["type"] == "agent.tool_result"]
    assert huge and all(len(e) > 300_000 for e in huge)
    bad, good = frames[0::2], frames[1::2]
    assert [f.data.encode() for f in good] == log
    for previous, f in zip([None, *good], bad, strict=False):
        with pytest.raises(ValueError):
            json.loads(f.data)
        assert f.id == (previous.id if previous else "")  # no id line of its own
    assert [
        json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode()
        for e in listed.json()["data"]
    ] == log


async def _raw_stream(c: httpx.AsyncClient, path: str, size: int, **headers: str) -> bytes:
    """The first ``size`` bytes of a stream's body, as they came."""
    received = b""
    async with c.stream("GET", path, headers=headers) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_raw():
            received += chunk
            if len(received) >= size:
                break
    return received[:size]


async def test_invalid_utf8_inside_strings_in_pages_and_streams() -> None:
    """Scenario "faulty" with invalid_utf8_rate=0.3 (and malformed items): some events carry
    a lone 0xff or a truncated 0xe2 0x82 inside a JSON string value; the JSON page (then not
    UTF-8 as a whole) and the stream's data lines serve exactly those bytes. The same seed
    picks the same events, with or without malformed items among them."""
    picked: list[list[tuple[int, bytes]]] = []
    malformed: list[list[int]] = []
    with anyio.fail_after(20):
        for rate in (0.2, 0.2, 0.0):
            faults = Faults(invalid_utf8_rate=0.3, malformed_item_rate=rate)
            scenario = _with(faults, fresh_stream="replay")
            async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
                session, thread = sim.all_threads()[0]
                log, items = sim.thread_log(session, thread), sim.thread_items(session, thread)
                path = f"/sessions/{session}/threads/{thread}"
                page = await c.get(f"{path}/events", params={"limit": 100})
                expected = b"".join(sse_frame(e) for e in items)
                streamed = await _raw_stream(c, f"{path}/stream", len(expected))
            bad = []
            for i, raw in enumerate(log):
                try:
                    raw.decode()
                except UnicodeDecodeError as exc:
                    bad.append((i, raw[exc.start : exc.end]))
                    # outside a string, json.loads would refuse the escaped bytes
                    json.loads(raw.decode("utf-8", "surrogateescape"))
            assert 0 < len(bad) < len(log)
            assert {b for _, b in bad} == {b"\xff", b"\xe2\x82"}  # a lone byte, a cut sequence
            with pytest.raises(UnicodeDecodeError):
                page.content.decode()
            assert page_items_raw(page.content) == b",".join(items)
            assert streamed == expected
            picked.append(bad)
            malformed.append([i for i, raw in enumerate(items) if raw not in log])
    assert picked[0] == picked[1] == picked[2]
    assert malformed[0] == malformed[1] and malformed[0] and not malformed[2]


async def test_malformed_items_hold_their_place_and_are_never_cursors() -> None:
    """Scenario "faulty" with a malformed item after every event (malformed_item_rate=1):
    in turn an object without an id and a JSON value that is no object. Pages serve them at
    their place; first_id/last_id and next_page step over them, a page of nothing but one
    is extended to the next event (or, at the end, names the event before it), so page
    walks by next_page or by after_id=last_id get every event once; streams send them as
    frames without an id line, at the same place."""
    scenario = _with(Faults(malformed_item_rate=1.0), fresh_stream="replay")
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[1]
            items, log = sim.thread_items(session, thread), ids(sim.thread_log(session, thread))
            parsed = [json.loads(i) for i in items]
            assert [is_event(i) for i in parsed] == [True, False] * len(log)
            assert [p["id"] for p in parsed[0::2]] == log
            assert parsed[1:8:2] == [parsed[1], None, parsed[1], 42]
            assert parsed[1] == {"type": "agent.message", "content": parsed[1]["content"]}
            assert {json.dumps(p) for p in parsed[3::4]} == {"null", "42", '"text"', "[]"}
            path = f"/sessions/{session}/threads/{thread}/events"
            for limit in (1, 2, 3, 7):
                walked = [x for p in await all_pages(c, path, limit=limit) for x in p["data"]]
                assert walked == parsed, limit
                by_id, after = [], None
                while True:
                    params = {"limit": limit, **({"after_id": after} if after else {})}
                    body = (await c.get(path, params=params)).json()
                    by_id.append(body["data"])
                    if not body["has_more"]:
                        break
                    after = body["last_id"]
                real = [x["id"] for data in by_id for x in data if is_event(x)]
                assert real == log, limit  # every event once; a malformed item may come twice
            one = (await c.get(path, params={"after_id": log[3], "limit": 1})).json()
            assert one["data"] == parsed[7:9] and one["first_id"] == one["last_id"] == log[4]
            end = (await c.get(path, params={"after_id": log[-1]})).json()
            assert end == {
                "data": [parsed[-1]],
                "next_page": None,
                "first_id": log[-1],
                "last_id": log[-1],
                "has_more": False,
            }
            back = (await c.get(path, params={"before_id": log[2], "limit": 1})).json()
            assert back["data"] == parsed[2:4] and back["first_id"] == log[1]
            newest = (await c.get(path, params={"order": "desc", "limit": 1})).json()
            assert newest["data"] == parsed[:-3:-1] and newest["last_id"] == log[-1]
            session_items = [json.loads(i) for i in sim.session_items(session)]
            assert len(session_items) == 2 * len(sim.session_log(session))
            pages = await all_pages(c, f"/sessions/{session}/events", limit=3)
            assert [x for p in pages for x in p["data"]] == session_items
            typed = (await c.get(path, params={"types": "agent.message", "limit": 100})).json()
            assert typed["data"] and all(is_event(x) for x in typed["data"])
            stream = f"/sessions/{session}/threads/{thread}/stream"
            expected = b"".join(sse_frame(i) for i in items)
            assert await _raw_stream(c, stream, len(expected)) == expected
            resumed = b"".join(sse_frame(i) for i in items[7:11])
            assert await _raw_stream(c, stream, len(resumed), **{"last-event-id": log[3]}) == (
                resumed
            )
            assert resumed.startswith(b"data: 42\n\nid: %s\n" % log[4].encode())
            assert [conn.ids for conn in sim.connections] == [log, log[4:]]


@pytest.mark.parametrize("answer", ["429", "503", "reset"])
async def test_connection_cap_per_token(answer: str) -> None:
    """Scenario "faulty" with connection_cap=2: a client (bearer token) with two streams open
    has a third refused, on every stream route, with the configured answer (429 with
    Retry-After, 503 api_error, or a reset with no response); its JSON requests go through,
    another token's streams are counted apart, and once one of its streams closes it may
    open another. Every refusal is recorded."""
    scenario = _with(Faults(retry_after_s=3), connection_cap=2, connection_cap_answer=answer)
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            base = f"/sessions/{session}/threads/{thread}"
            sse = {"Accept": "text/event-stream"}
            routes = [(f"{base}/stream", {}), (f"{base}/events", sse)]
            routes.append((f"/sessions/{session}/events/stream", {}))

            async def assert_refused(path: str, headers: dict[str, str]) -> None:
                if answer == "reset":
                    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                        await c.get(path, headers=headers)
                    return
                r = await c.get(path, headers=headers)
                assert r.status_code == int(answer)
                if answer == "429":
                    assert r.headers["retry-after"] == "3"
                else:
                    assert r.json()["error"]["type"] == "api_error"

            async with contextlib.AsyncExitStack() as streams:
                held = [
                    await streams.enter_async_context(c.stream("GET", p, headers=h))
                    for p, h in routes[:2]
                ]
                assert [r.status_code for r in held] == [200, 200]
                for path, headers in routes:
                    await assert_refused(path, headers)
                assert (await c.get(f"{base}/events")).status_code == 200  # JSON: not capped
                assert (await c.get("/sessions")).status_code == 200
                await held[0].aclose()
                await sim.wait_until(lambda: sim.open_streams == 1)
                r = await streams.enter_async_context(c.stream("GET", routes[2][0]))
                assert r.status_code == 200
                sim.set_token("pt-other", drop_streams=False)
                other = {"Authorization": "Bearer pt-other"}
                for _ in range(2):
                    r = await streams.enter_async_context(
                        c.stream("GET", routes[0][0], headers=other)
                    )
                    assert r.status_code == 200
                assert sim.open_streams == 4
            assert len(sim.cap_refusals) == 3 and len(sim.connections) == 5
            assert {who for who, _ in sim.cap_refusals} == {sim.connections[0].client}
            assert sim.connections[0].client == sim.connections[2].client
            assert sim.connections[0].client != sim.connections[3].client
            assert [path for _, path in sim.cap_refusals] == [
                f"/api/v1/cloud{path}" for path, _ in routes
            ]


@pytest.mark.parametrize("kind", ["429", "503", "reset"])
async def test_gateway_errors(kind: str) -> None:
    """Scenario "faulty" answering every request with one gateway error: 429 with
    Retry-After, 503 with the api_error envelope, or a bare connection reset."""
    mix = {"429": (1, 0, 0), "503": (0, 1, 0), "reset": (0, 0, 1)}[kind]
    faults = Faults(error_rate=1.0, error_mix=mix, retry_after_s=7)
    with anyio.fail_after(20):
        async with running_simulator(_with(faults), token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            for path in ("/sessions", f"/sessions/{session}/threads/{thread}/stream"):
                if kind == "reset":
                    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                        await c.get(path)
                    continue
                r = await c.get(path, headers={"x-request-id": "req-1"})
                assert r.status_code == int(kind)
                body = r.json()
                assert body["type"] == "error" and body["request_id"] == "req-1"
                if kind == "429":
                    assert r.headers["retry-after"] == "7"
                else:
                    assert body["error"]["type"] == "api_error"


async def test_stall_sends_nothing_then_resumes() -> None:
    """Scenario "faulty" stalling every stream for 0.6 s after its 3rd frame: no byte at
    all (no heartbeat either, though they are due every 0.2 s), then the 4th event."""
    faults = Faults(stall_rate=1.0, stall_after_frames=(3, 3), stall_s=0.6)
    scenario = _with(faults, fresh_stream="replay")
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            path = f"/sessions/{session}/threads/{thread}/stream"
            async with c.stream("GET", path) as resp:
                chunks = resp.aiter_raw()
                received = await chunks.__anext__()
                assert received.count(b"\n\n") == 3
                started = time.monotonic()
                received = await chunks.__anext__()
                assert time.monotonic() - started >= 0.5
                assert received.startswith(
                    b"id: " + ids(sim.thread_log(session, thread))[3].encode()
                )


@pytest.mark.parametrize("status", [503, 429, 0])
async def test_outage_fails_everything_and_cuts_streams(status: int) -> None:
    """Scenario "faulty": sim.outage() cuts the open stream and fails every request (503,
    429, or 0 = connection reset) until it ends, by end_outage() or by its duration."""
    with anyio.fail_after(20):
        async with running_simulator(BASE, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            path = f"/sessions/{session}/threads/{thread}/stream"
            async with c.stream("GET", path) as resp:
                assert resp.status_code == 200
                sim.outage(status=status, duration_s=None)
                with pytest.raises(httpx.RemoteProtocolError):
                    await resp.aread()
            for _ in range(2):
                if status == 0:
                    with pytest.raises(httpx.ReadError):
                        await c.get("/sessions")
                else:
                    assert (await c.get("/sessions")).status_code == status
            sim.end_outage()
            assert (await c.get("/sessions")).status_code == 200
            sim.outage(status=503, duration_s=0.3)
            started = time.monotonic()
            while (await c.get("/sessions")).status_code == 503:
                await anyio.sleep(0.05)
            assert time.monotonic() - started >= 0.25


async def test_token_change_cuts_streams_and_refuses_the_old_token() -> None:
    """Scenario "faulty": set_token() cuts streams opened with the old token; reconnecting
    with it gets 401, with the new one 200. drop_streams() cuts without changing anything."""
    with anyio.fail_after(20):
        async with running_simulator(BASE, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            path = f"/sessions/{session}/threads/{thread}/stream"
            for action in (sim.drop_streams, lambda: sim.set_token("pt-new")):
                async with c.stream("GET", path) as resp:
                    assert resp.status_code == 200 and sim.open_streams == 1
                    action()
                    with pytest.raises(httpx.RemoteProtocolError):
                        await resp.aread()
            assert (await c.get(path)).status_code == 401
            async with c.stream("GET", path, headers={"Authorization": "Bearer pt-new"}) as resp:
                assert resp.status_code == 200
            assert [conn.outcome for conn in sim.connections[:2]] == ["cut (abort)"] * 2
