"""JSON routes of the simulator: pagination, cursors, filters, auth and 404s."""

from __future__ import annotations

import dataclasses
import json
import uuid

import anyio
import pytest

from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.simulator.helpers import (
    TOKEN,
    all_pages,
    all_pages_by_id,
    client,
    ids,
    page_items_raw,
    read_sse,
)

pytestmark = pytest.mark.anyio

# 45 events in the coordinator, 27 children: enough for several pages of everything.
WIDE = Scenario(
    name="wide",
    seed=21,
    instant=True,
    sessions=(
        SessionSpec(ThreadSpec(events=45, rate=0), (ThreadSpec(events=8, rate=0),) * 27),
        SessionSpec(ThreadSpec(events=10, rate=0), archive=True),
        SessionSpec(ThreadSpec(events=10, rate=0), terminate=True),
    ),
)


async def test_event_pages_cover_the_log_byte_for_byte() -> None:
    """Scenario "wide": thread events followed page by page (limit 7) are the thread log,
    in order, with first_id/last_id/has_more/next_page right, and the page bytes are the
    log's canonical bytes joined (not re-serialised)."""
    with anyio.fail_after(20):
        async with running_simulator(WIDE, token=TOKEN) as sim, client(sim) as c:
            session, coordinator = sim.all_threads()[0]
            log = sim.thread_log(session, coordinator)
            path = f"/sessions/{session}/threads/{coordinator}/events"
            pages = await all_pages(c, path, limit=7)
            full, rest = divmod(len(log), 7)
            assert len(log) > 45 and [len(p["data"]) for p in pages] == [7] * full + [rest] * bool(
                rest
            )
            assert [e["id"] for p in pages for e in p["data"]] == ids(log)
            raw = await c.get(path, params={"limit": 100})
            assert page_items_raw(raw.content) == b",".join(log[:100])
            tail = await c.get(path, params={"limit": 100, "page": raw.json()["next_page"]})
            assert page_items_raw(tail.content) == b",".join(log[100:])
            assert tail.json()["has_more"] is False and tail.json()["next_page"] is None
            # after_id and before_id page relative to an event, strictly
            middle = ids(log)[10]
            after = (await c.get(path, params={"after_id": middle, "limit": 3})).json()
            assert [e["id"] for e in after["data"]] == ids(log)[11:14] and after["has_more"]
            before = (await c.get(path, params={"before_id": middle, "limit": 3})).json()
            assert [e["id"] for e in before["data"]] == ids(log)[7:10] and before["has_more"]
            back = (await c.get(path, params={"page": before["next_page"], "limit": 3})).json()
            assert [e["id"] for e in back["data"]] == ids(log)[4:7]
            last = (await c.get(path, params={"after_id": ids(log)[-1]})).json()
            assert last == {
                "data": [],
                "next_page": None,
                "first_id": None,
                "last_id": None,
                "has_more": False,
            }


async def test_session_and_thread_lists_paginate() -> None:
    """Scenario "wide": 28 threads listed 10 at a time, coordinator first; sessions newest
    first, archived ones only with include_archived, statuses filter honoured."""
    with anyio.fail_after(20):
        async with running_simulator(WIDE, token=TOKEN) as sim, client(sim) as c:
            session = sim.session_ids()[0]
            pages = await all_pages(c, f"/sessions/{session}/threads", limit=10)
            threads = [t for p in pages for t in p["data"]]
            assert len(pages) == 3 and len(threads) == 28
            assert [t["id"] for t in threads] == [t for s, t in sim.all_threads() if s == session]
            assert threads[0]["parent_thread_id"] is None
            assert {t["parent_thread_id"] for t in threads[1:]} == {threads[0]["id"]}
            assert {t["type"] for t in threads} == {"session_thread"}
            listed = [s for p in await all_pages(c, "/sessions", limit=1) for s in p["data"]]
            archived = sim.session_ids()[1]
            assert [s["id"] for s in listed] == [sim.session_ids()[2], sim.session_ids()[0]]
            everything = await all_pages(c, "/sessions", include_archived="true", order="asc")
            assert [s["id"] for s in everything[0]["data"]] == sim.session_ids()
            assert everything[0]["data"][1]["archived_at"] is not None
            assert archived not in [s["id"] for s in listed]
            ended = (await c.get("/sessions", params={"statuses[]": "terminated"})).json()
            assert [s["status"] for s in ended["data"]] == ["terminated"]
            one = (await c.get(f"/sessions/{session}")).json()
            assert one["id"] == session and one["type"] == "session" and one["status"] == "idle"


async def test_after_id_generation_lists_without_next_page() -> None:
    """Scenario "wide" with pagination=after_id (the older CN docs): every list route answers
    {data, first_id, last_id, has_more} with no next_page key, pages by after_id and
    before_id, and answers a page parameter (even an empty one) with 400 naming it."""
    scenario = dataclasses.replace(WIDE, pagination="after_id")
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, coordinator = sim.all_threads()[0]
            log = ids(sim.thread_log(session, coordinator))
            expected = {
                "/sessions": [sim.session_ids()[2], sim.session_ids()[0]],  # newest first
                f"/sessions/{session}/threads": [t for s, t in sim.all_threads() if s == session],
                f"/sessions/{session}/events": ids(sim.session_log(session)),
                f"/sessions/{session}/threads/{coordinator}/events": log,
            }
            for path, listed in expected.items():
                limit = 1 if path == "/sessions" else 7
                pages = await all_pages_by_id(c, path, limit=limit)
                assert [item["id"] for p in pages for item in p["data"]] == listed, path
                assert len(pages) == -(-len(listed) // limit)
                first = await c.get(path, params={"limit": 1})
                assert b"next_page" not in first.content
                assert first.content.endswith(b',"has_more":true}')
                for page in ("", "page_YTpldnRfMQ"):
                    r = await c.get(path, params={"page": page})
                    assert r.status_code == 400, (path, r.text)
                    error = r.json()["error"]
                    assert error["type"] == "invalid_request_error" and error["param"] == "page"
            path = f"/sessions/{session}/threads/{coordinator}/events"
            before = (await c.get(path, params={"before_id": log[10], "limit": 3})).json()
            assert [e["id"] for e in before["data"]] == log[7:10] and before["has_more"]
            assert (before["first_id"], before["last_id"]) == (log[7], log[9])


async def test_archived_sessions_leave_the_listing_and_stay_readable() -> None:
    """Scenario: a session that starts late and is archived once its threads finish. It is
    listed while it runs; once archived, GET /sessions leaves it out (statuses filter too)
    unless include_archived=true, and the session, its threads and its events (lists and
    stream resume) stay readable."""
    archived = SessionSpec(
        ThreadSpec(events=10, rate=20), (ThreadSpec(events=8, rate=20),), 0.2, archive=True
    )
    scenario = Scenario(seed=22, sessions=(SessionSpec(ThreadSpec(events=6, rate=0)), archived))
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            await sim.wait_until(lambda: len(sim.session_ids()) == 2)
            kept, gone = sim.session_ids()
            running = (await c.get("/sessions")).json()["data"]
            assert [(s["id"], s["archived_at"]) for s in running] == [(gone, None), (kept, None)]
            await sim.wait_idle()
            listed = (await c.get("/sessions")).json()
            assert [s["id"] for s in listed["data"]] == [kept] and not listed["has_more"]
            idle = (await c.get("/sessions", params={"statuses": "idle"})).json()
            assert [s["id"] for s in idle["data"]] == [kept]
            everything = (await c.get("/sessions", params={"include_archived": "true"})).json()
            assert [s["id"] for s in everything["data"]] == [gone, kept]
            session = (await c.get(f"/sessions/{gone}")).json()
            assert session["archived_at"] is not None and session["status"] == "idle"
            assert everything["data"][0] == session
            threads = (await c.get(f"/sessions/{gone}/threads")).json()["data"]
            assert [t["id"] for t in threads] == [t for s, t in sim.all_threads() if s == gone]
            for thread in threads:
                log = ids(sim.thread_log(gone, thread["id"]))
                events = await all_pages(c, f"/sessions/{gone}/threads/{thread['id']}/events")
                assert [e["id"] for p in events for e in p["data"]] == log
                resumed = await read_sse(
                    c,
                    f"/sessions/{gone}/threads/{thread['id']}/stream",
                    2,
                    headers={"Last-Event-ID": log[-3]},
                )
                assert [f.id for f in resumed] == log[-2:]
            pages = await all_pages(c, f"/sessions/{gone}/events")
            assert [e["id"] for p in pages for e in p["data"]] == ids(sim.session_log(gone))


@pytest.mark.parametrize("honour", [True, False])
async def test_thread_statuses_filter_honoured_or_ignored(honour: bool) -> None:
    """Scenario: two children, one archived; G2 servers filter threads by statuses[],
    G3/G4 servers ignore the parameter and list every thread."""
    kids = (ThreadSpec(events=6, rate=0), ThreadSpec(events=6, rate=0, final_status="archived"))
    scenario = Scenario(
        seed=5,
        instant=True,
        honour_thread_statuses=honour,
        sessions=(SessionSpec(ThreadSpec(events=8, rate=0), kids),),
    )
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session = sim.session_ids()[0]
            r = await c.get(f"/sessions/{session}/threads", params={"statuses[]": "archived"})
            statuses = [t["status"] for t in r.json()["data"]]
            assert statuses == (["archived"] if honour else ["idle", "idle", "archived"])


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"page": "x", "after_id": "evt_1"}, "page"),
        ({"after_id": "evt_1", "before_id": "evt_2"}, "before_id"),
        ({"after_id": "evt_00000000000000000000000000000000"}, "after_id"),
        ({"page": "not-a-cursor"}, "page"),
    ],
)
async def test_bad_list_parameters_are_400(params: dict[str, str], param: str) -> None:
    """Scenario "tiny": limit outside 1..100, two cursors at once, unknown cursors ->
    400 invalid_request_error naming the parameter, on every list route."""
    with anyio.fail_after(20):
        async with running_simulator("tiny", token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[1]
            for path in (
                "/sessions",
                f"/sessions/{session}/threads",
                f"/sessions/{session}/events",
                f"/sessions/{session}/threads/{thread}/events",
            ):
                r = await c.get(path, params=params)
                assert r.status_code == 400, (path, r.text)
                error = r.json()["error"]
                assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_cursor_of_another_thread_is_400() -> None:
    """Scenario "tiny": an event id of the coordinator is no cursor for a child's list."""
    with anyio.fail_after(20):
        async with running_simulator("tiny", token=TOKEN) as sim, client(sim) as c:
            (session, coordinator), (_, child) = sim.all_threads()[:2]
            foreign = ids(sim.thread_log(session, coordinator))[0]
            r = await c.get(f"/sessions/{session}/threads/{child}/events?after_id={foreign}")
            assert r.status_code == 400 and r.json()["error"]["param"] == "after_id"


async def test_auth_401_envelope_and_runtime_token_switch() -> None:
    """Scenario "tiny": missing or wrong bearer -> 401 authentication_error with the
    request id (echoing x-request-id); set_token swaps and revokes the accepted token."""
    with anyio.fail_after(20):
        async with running_simulator("tiny", token=TOKEN) as sim, client(sim) as c:
            rid = str(uuid.uuid4())
            c.headers.pop("Authorization")
            for headers in ({"Authorization": "Bearer nope"}, {"x-api-key": TOKEN}):
                r = await c.get("/sessions", headers={**headers, "x-request-id": rid})
                assert r.status_code == 401
                assert r.json() == {
                    "type": "error",
                    "request_id": rid,
                    "error": {
                        "type": "authentication_error",
                        "message": "Invalid API key or token.",
                    },
                }
            r = await c.get("/sessions")
            assert r.status_code == 401 and uuid.UUID(r.json()["request_id"])
            sim.set_token("pt-rotated")
            assert (
                await c.get("/sessions", headers={"Authorization": f"Bearer {TOKEN}"})
            ).status_code == 401
            ok = await c.get("/sessions", headers={"Authorization": "Bearer pt-rotated"})
            assert ok.status_code == 200
            sim.set_token(None)
            revoked = await c.get("/sessions", headers={"Authorization": "Bearer pt-rotated"})
            assert revoked.status_code == 401


async def test_not_found_messages() -> None:
    """Scenario "tiny": unknown session, thread and route -> 404 not_found_error with the
    API's message shapes."""
    with anyio.fail_after(20):
        async with running_simulator("tiny", token=TOKEN) as sim, client(sim) as c:
            session = sim.session_ids()[0]
            r = await c.get("/sessions/sess_missing/threads")
            assert r.status_code == 404
            assert r.json()["error"] == {
                "type": "not_found_error",
                "message": "Session 'sess_missing' was not found.",
            }
            r = await c.get(f"/sessions/{session}/threads/sthr_missing/events")
            assert r.json()["error"]["message"] == "Session thread 'sthr_missing' was not found."
            assert (await c.get(f"/sessions/{session}/bogus")).status_code == 404


async def test_objects_follow_their_events() -> None:
    """Scenario: a thread object's updated_at moves with its events and status changes;
    the session's status is derived from its threads."""
    scenario = Scenario(seed=9, sessions=(SessionSpec(ThreadSpec(events=12, rate=40)),))
    with anyio.fail_after(20):
        async with running_simulator(scenario, token=TOKEN) as sim, client(sim) as c:
            session, thread = sim.all_threads()[0]
            first = (await c.get(f"/sessions/{session}/threads/{thread}")).json()
            assert first["status"] == "running"
            assert (await c.get(f"/sessions/{session}")).json()["status"] == "running"
            await sim.wait_idle()
            last = (await c.get(f"/sessions/{session}/threads/{thread}")).json()
            assert last["status"] == "idle" and last["updated_at"] > first["updated_at"]
            assert last["created_at"] == first["created_at"]
            assert (await c.get(f"/sessions/{session}")).json()["status"] == "idle"
            final = json.loads(sim.thread_log(session, thread)[-1])
            assert final["type"] == "session.status_idle"
