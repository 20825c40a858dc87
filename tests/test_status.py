"""GET /status and `qoder-bridge status`: the document, its paging and filters, the table, and a
running bridge (simulator over real sockets, a real broker) reporting what is in the topic."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute

from bridge import cli, health, status_cli
from bridge.config import HttpSettings, Settings
from bridge.cursor import ThreadCursor
from bridge.health import HealthState, serve_http
from bridge.pump import Pump, PumpLimits, PumpState
from bridge.records import ThreadRef
from bridge.slots import StreamSlots
from bridge.status import (
    MAX_LIMIT,
    NOT_STARTED,
    STATES,
    QueryError,
    StatusQuery,
    StatusView,
    build_status,
    lag_s,
    member_id,
    parse_query,
)

pytestmark = pytest.mark.anyio

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def _stamp(seconds_before_now: float) -> str:
    moment = datetime.fromtimestamp(NOW - seconds_before_now, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "123Z")  # ns, as the API


def make_pump(
    session: str,
    thread: str,
    state: PumpState | None = PumpState.STREAMING,
    *,
    submitted: str | None = None,
    committed: str | None = None,
    event_age_s: float | None = None,
    read_age_s: float | None = None,
    reconnects: int = 0,
    last_error: str | None = None,
) -> Pump:
    """A real pump (never run: nothing it talks to is needed) in the given state."""
    cursor = ThreadCursor(ThreadRef(session, thread), committed)
    cursor.submitted_id = submitted or committed
    pump = Pump(cursor, None, None, None, Settings(), PumpLimits(StreamSlots(10)))  # type: ignore[arg-type]
    pump.state = state
    pump.reconnects, pump.last_error = reconnects, last_error
    if event_age_s is not None:
        pump.last_event_time = _stamp(event_age_s)
        pump.last_event_read_at = NOW - (read_age_s if read_age_s is not None else 0.0)
    return pump


def pumps_of(*pumps: Pump) -> dict[ThreadRef, Pump]:
    return {pump.thread: pump for pump in pumps}


# -- the query ------------------------------------------------------------------------------


def test_query_defaults_filters_and_bounds() -> None:
    """Defaults 500/0; session and state repeat or take commas; limit is at most 5000."""
    assert parse_query("") == StatusQuery(500, 0, frozenset(), frozenset())
    query = parse_query("limit=5000&offset=7&session=sess_a,sess_b&session=sess_c&state=backoff")
    assert query == StatusQuery(
        5000, 7, frozenset({"sess_a", "sess_b", "sess_c"}), frozenset({"backoff"})
    )
    assert parse_query("limit=0").limit == 0  # the summary alone
    assert parse_query("state=waiting_slot,draining").states == {"waiting_slot", "draining"}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=5001", "limit: expected an integer from 0 to 5000, got 5001"),
        ("limit=ten", "limit: expected an integer from 0 to 5000, got 'ten'"),
        ("offset=-1", "offset: expected an integer >= 0, got -1"),
        ("limit=1&limit=2", "limit: give it once"),
        ("page=2", "unknown parameter 'page'; accepted: limit, offset, after, session, state"),
        ("state=running", "unknown state 'running'; accepted: " + ", ".join(STATES)),
        ("a=1&&=", "cannot parse the query string"),
        ("after=sess_a", "after: expected SESSION_ID/THREAD_ID (a page's next), got 'sess_a'"),
        ("after=/sthr_1", "after: expected SESSION_ID/THREAD_ID"),
        ("after=sess_a/sthr_1&offset=3", "after and offset: give one of them"),
        ("after=sess_a/sthr_1&after=sess_a/sthr_2", "after: give it once"),
    ],
)
def test_bad_queries_say_what_is_accepted(query: str, message: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(query)
    assert str(caught.value).startswith(message)


# -- the document ---------------------------------------------------------------------------


def test_lag_is_the_last_events_delay_when_streaming_else_its_age() -> None:
    """Streaming: read time - processed_at (a quiet live stream is not behind). Otherwise:
    now - processed_at. Unknown or zone-less times: null. Never negative."""
    processed = _stamp(100)
    assert lag_s("streaming", processed, NOW - 98.5, NOW) == pytest.approx(1.5, abs=0.001)
    assert lag_s("backfilling", processed, NOW - 98.5, NOW) == pytest.approx(100.0, abs=0.001)
    assert lag_s("backoff", processed, None, NOW) == pytest.approx(100.0, abs=0.001)
    assert lag_s("streaming", None, NOW, NOW) is None
    assert lag_s("streaming", "2025-03-01T11:59:00", NOW, NOW) is None
    assert lag_s("streaming", "yesterday", NOW, NOW) is None
    assert lag_s("streaming", _stamp(-30), NOW, NOW) == 0.0  # the API's clock runs ahead


async def test_document_rows_states_and_summary() -> None:
    """Scenario: three pumps in two sessions (streaming, backing off after stalls, a drain's
    final pass) and a followed session with no thread read. Rows come sorted by session and
    thread, each with its cursor, processed_at, lag, reconnects and last error; the session
    without threads is an `idle` row; counts by state, the member and the version are there."""
    streaming = make_pump(
        "sess_b", "sthr_1", submitted="ev9", committed="ev8", event_age_s=10, read_age_s=9.5
    )
    backing_off = make_pump(
        "sess_a",
        "sthr_2",
        PumpState.BACKOFF,
        committed="ev4",
        event_age_s=60,
        reconnects=3,
        last_error="stall",
    )
    draining = make_pump("sess_a", "sthr_1", PumpState.BACKFILLING, committed="ev2")
    draining.drain("2025-03-01T11:00:00Z")
    health = HealthState()
    doc = build_status(
        pumps_of(streaming, backing_off, draining),
        frozenset({"sess_a", "sess_b", "sess_c"}),
        health,
        member="pod-0-7",
        now=NOW,
    )
    assert doc["version"] == 1
    assert doc["generated_at"] == "2025-03-01T12:00:00.000Z"
    assert doc["member"] == {"id": "pod-0-7", "group": None, "shards": None}
    assert (doc["ready"], doc["failing"]) == (False, health.failing_checks())
    assert doc["reason"] is None
    assert (doc["sessions_followed"], doc["threads_followed"]) == (3, 3)
    assert doc["states"] == {"streaming": 1, "backoff": 1, "draining": 1, "idle": 1}
    assert (doc["total"], doc["offset"], doc["limit"], doc["next_offset"]) == (4, 0, 500, None)
    keys = [(row["session_id"], row["thread_id"]) for row in doc["threads"]]
    assert keys == [
        ("sess_a", "sthr_1"),
        ("sess_a", "sthr_2"),
        ("sess_b", "sthr_1"),
        ("sess_c", None),
    ]
    rows = {key: row for key, row in zip(keys, doc["threads"], strict=True)}
    assert rows["sess_b", "sthr_1"] == {
        "session_id": "sess_b",
        "thread_id": "sthr_1",
        "state": "streaming",
        "following": True,
        "last_event_id": "ev9",
        "committed_event_id": "ev8",
        "last_event_processed_at": "2025-03-01T11:59:50.000000123Z",
        "last_event_read_at": "2025-03-01T11:59:50.500Z",
        "lag_s": 0.5,
        "reconnects": 0,
        "last_error": None,
    }
    backoff_row = rows["sess_a", "sthr_2"]
    assert (backoff_row["state"], backoff_row["lag_s"]) == ("backoff", 60.0)
    assert (backoff_row["reconnects"], backoff_row["last_error"]) == (3, "stall")
    assert backoff_row["last_event_id"] == backoff_row["committed_event_id"] == "ev4"
    drain_row = rows["sess_a", "sthr_1"]
    assert (drain_row["state"], drain_row["following"], drain_row["lag_s"]) == (
        "draining",
        False,
        None,
    )
    idle = rows["sess_c", None]
    assert (idle["state"], idle["last_event_id"], idle["lag_s"]) == ("idle", None, None)
    json.dumps(doc)  # JSON all the way down


async def test_a_draining_pump_that_backs_off_says_backoff() -> None:
    """A drain's final pass that fails backs off like any other read: the row says `backoff`
    (the problem), `following: false` (what comes after)."""
    pump = make_pump("sess_a", "sthr_1", PumpState.BACKOFF, committed="ev1")
    pump.drain(None)
    (row,) = build_status(pumps_of(pump), frozenset(), HealthState(), member="m", now=NOW)[
        "threads"
    ]
    assert (row["state"], row["following"]) == ("backoff", False)
    between = make_pump("sess_a", "sthr_2", None)
    (row,) = build_status(pumps_of(between), frozenset(), HealthState(), member="m", now=NOW)[
        "threads"
    ]
    assert row["state"] == "connecting"


async def test_paging_walks_every_row_once_and_filters_count_before_paging() -> None:
    """Scenario: 7 threads over 3 sessions, pages of 3: offsets 0, 3, 6 give every row once
    and next_offset is null on the last page; a session or state filter narrows the total."""
    pumps = pumps_of(
        *[make_pump(f"sess_{i % 3}", f"sthr_{i}", committed=f"ev{i}") for i in range(6)],
        make_pump("sess_1", "sthr_9", PumpState.WAITING_SLOT),
    )
    health, seen, offset = HealthState(), [], 0
    while True:
        doc = build_status(pumps, frozenset(), health, parse_query(f"limit=3&offset={offset}"),
                           member="m", now=NOW)  # fmt: skip
        assert doc["total"] == 7 and len(doc["threads"]) <= 3
        seen += [(r["session_id"], r["thread_id"]) for r in doc["threads"]]
        if doc["next_offset"] is None:
            break
        assert doc["next_offset"] == offset + 3
        offset = doc["next_offset"]
    assert seen == sorted((p.session_id, p.thread_id) for p in pumps)
    assert offset == 6

    one = build_status(pumps, frozenset(), health, parse_query("session=sess_1"), member="m",
                       now=NOW)  # fmt: skip
    assert [r["thread_id"] for r in one["threads"]] == ["sthr_1", "sthr_4", "sthr_9"]
    assert one["filters"] == {"session": ["sess_1"], "state": []}
    assert one["states"] == {"streaming": 6, "waiting_slot": 1}  # counts ignore the filters
    waiting = build_status(pumps, frozenset(), health, parse_query("state=waiting_slot"),
                           member="m", now=NOW)  # fmt: skip
    assert (waiting["total"], waiting["threads"][0]["thread_id"]) == (1, "sthr_9")
    summary = build_status(pumps, frozenset(), health, parse_query("limit=0"), member="m", now=NOW)
    assert (summary["threads"], summary["total"], summary["next_offset"]) == ([], 7, None)
    past = build_status(pumps, frozenset(), health, parse_query("offset=50"), member="m", now=NOW)
    assert (past["threads"], past["total"], past["next_offset"]) == ([], 7, None)


def test_keyset_pages_keep_every_thread_followed_all_along_while_others_come_and_go() -> None:
    """Scenario: 9 threads in 3 sessions (and an idle session), pages of 2 asked with `after`
    = the previous page's `next`. Between pages the first thread leaves, a thread arrives
    before the cursor and one after it: every thread followed all along is on exactly one
    page, the late one after the cursor too; `offset` says how many rows come before the
    page, `next` is null on the last page. With a state or session filter the same walk
    gives the filtered rows, and `total` counts them."""
    pumps = {
        p.thread: p
        for p in (make_pump(f"sess_{i % 3}", f"sthr_{i}", committed=f"e{i}") for i in range(9))
    }
    sessions = frozenset({"sess_0", "sess_1", "sess_2", "sess_9"})
    health, seen, after, offsets = HealthState(), [], None, []
    while True:
        query = "limit=2" + (f"&after={after}" if after else "")
        doc = build_status(pumps, sessions, health, parse_query(query), member="m", now=NOW)
        seen += [(r["session_id"], r["thread_id"]) for r in doc["threads"]]
        offsets.append(doc["offset"])
        assert doc["after"] == after
        if doc["next"] is None:
            assert doc["next_offset"] is None
            break
        assert doc["next"] == "/".join(seen[-1])  # the last row's key
        assert doc["next_offset"] == doc["offset"] + len(doc["threads"])
        after = doc["next"]
        if len(seen) == 2:  # sess_0: sthr_0, sthr_3 shown
            del pumps[ThreadRef("sess_0", "sthr_0")]
            for late in (make_pump("sess_0", "sthr_1"), make_pump("sess_2", "sthr_99")):
                pumps[late.thread] = late
    assert seen == [
        ("sess_0", "sthr_0"), ("sess_0", "sthr_3"), ("sess_0", "sthr_6"), ("sess_1", "sthr_1"),
        ("sess_1", "sthr_4"), ("sess_1", "sthr_7"), ("sess_2", "sthr_2"), ("sess_2", "sthr_5"),
        ("sess_2", "sthr_8"), ("sess_2", "sthr_99"), ("sess_9", None),
    ]  # fmt: skip
    # Rows before each page, as counted then: sess_0/sthr_0 left and sthr_1 came, both before.
    assert offsets == [0, 2, 4, 6, 8, 10]

    pumps[ThreadRef("sess_1", "sthr_4")].state = PumpState.BACKOFF
    pumps[ThreadRef("sess_2", "sthr_5")].state = PumpState.BACKOFF
    pumps[ThreadRef("sess_2", "sthr_8")].state = PumpState.BACKOFF
    walked, after = [], None
    while True:
        query = "limit=1&state=backoff,idle" + (f"&after={after}" if after else "")
        doc = build_status(pumps, sessions, health, parse_query(query), member="m", now=NOW)
        assert doc["total"] == 4
        walked += [(r["thread_id"], doc["offset"]) for r in doc["threads"]]
        if (after := doc["next"]) is None:
            break
    assert walked == [("sthr_4", 0), ("sthr_5", 1), ("sthr_8", 2), (None, 3)]
    doc = build_status(
        pumps, sessions, health, parse_query("session=sess_2&after=sess_2/sthr_5"),
        member="m", now=NOW,
    )  # fmt: skip
    assert [r["thread_id"] for r in doc["threads"]] == ["sthr_8", "sthr_99"]
    assert (doc["total"], doc["offset"], doc["next"]) == (4, 2, None)


async def test_before_the_supervisor_exists_the_answer_is_empty_and_says_why() -> None:
    view = StatusView(HealthState())
    code, body = await view.answer("")
    doc = json.loads(body)
    assert code == 200
    assert (doc["threads"], doc["total"], doc["reason"]) == ([], 0, NOT_STARTED)
    assert doc["member"]["id"] == member_id() == f"{os.uname().nodename}-{os.getpid()}"
    code, body = await view.answer("limit=99999")
    assert code == 400
    assert json.loads(body) == {
        "error": f"limit: expected an integer from 0 to {MAX_LIMIT}, got 99999"
    }


# -- the table ------------------------------------------------------------------------------


def test_table_fits_100_columns_and_cuts_ids_in_the_middle() -> None:
    """Real-length ids (30+ characters) are cut to their kind and their end; times show as
    UTC clock times on the document's day; every line fits in 100 columns."""
    session = "sess_01JN8Q6W3ZKX4V2R9T7M5PB0AD"
    doc = {
        "member": {"id": "bridge-0-1"},
        "ready": False,
        "failing": ["kafka_reachable"],
        "sessions_followed": 2,
        "threads_followed": 2,
        "states": {"streaming": 1, "backoff": 1},
        "generated_at": "2025-03-01T12:00:00.000Z",
        "total": 5,
        "threads": [
            {
                "session_id": session,
                "thread_id": "sthr_01JN8Q7A1B2C3D4E5F6G7H8J9K",
                "state": "waiting_slot",
                "last_event_id": "0195521a7c3e7a11b2c3d4e5f6a7b8c9",
                "last_event_processed_at": "2025-03-01T11:59:58.123456789Z",
                "lag_s": 4217.3,
                "reconnects": 12345,
                "last_error": "server_error_with_a_long_name",
            },
            {
                "session_id": "sess_b",
                "thread_id": "sthr_1",
                "state": "backoff",
                "last_event_id": "ev1",
                "last_event_processed_at": "2025-02-27T08:05:00Z",
                "lag_s": 0.25,
                "reconnects": 0,
                "last_error": None,
            },
            {"session_id": "sess_c", "thread_id": None, "state": "idle", "reconnects": 0},
        ],
    }
    lines = status_cli.render(doc).splitlines()
    assert lines[0] == "member bridge-0-1  ready no (kafka_reachable)  sessions 2  threads 2"
    assert lines[1] == "streaming 1  backoff 1"
    assert lines[2].split() == [
        "SESSION", "THREAD", "STATE", "LAST", "EVENT", "PROCESSED", "AT", "LAG", "RECONN", "LAST",
        "ERROR",
    ]  # fmt: skip
    assert lines[3].split() == [
        "sess_..5PB0AD",
        "sthr_..7H8J9K",
        "waiting_slot",
        "0195..a7b8c9",
        "11:59:58Z",
        "1h10m",
        "12345",
        "server_err..",
    ]
    assert lines[4].split() == [
        *("sess_b", "sthr_1", "backoff", "ev1", "02-27T08:05Z", "0.2s", "0", "-")
    ]
    assert lines[5].split() == ["sess_c", "-", "idle", "-", "-", "-", "0", "-"]
    assert lines[6] == "3 of 5 rows shown (--limit N for more)"
    assert max(len(line) for line in lines) <= 100
    assert len(lines[3]) == 100  # every column full: exactly the budget


def test_table_says_why_it_is_empty() -> None:
    doc = {"member": {"id": "m"}, "ready": True, "threads": [], "total": 0, "reason": NOT_STARTED,
           "filters": {"session": [], "state": []}}  # fmt: skip
    assert status_cli.render(doc).splitlines()[1:] == [f"note: {NOT_STARTED}", "no rows"]
    doc = {**doc, "reason": None, "filters": {"session": ["sess_x"], "state": []}}
    assert status_cli.render(doc).splitlines()[1:] == ["no rows match the filters"]


# -- the HTTP route and the command, against a real socket -----------------------------------


@asynccontextmanager
async def http_server(view: StatusView | None) -> AsyncIterator[int]:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_http(
                    HttpSettings(host="127.0.0.1", port=0),
                    view.health if view else HealthState(),
                    status=view.answer if view else None,
                    task_status=task_status,
                )
            )
            yield port
            tg.cancel_scope.cancel()


def table_rows(out: str) -> list[str]:
    """The table's rows: the lines after its header (log lines may come before)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SESSION  "))
    return lines[start + 1 :]


async def run_cli(*argv: str) -> int:
    """`qoder-bridge status ...` in a worker thread: the server answers on this event loop."""
    return await anyio.to_thread.run_sync(cli.main, ["status", *argv])


async def test_route_answers_json_pages_and_refuses_writes_probes_unchanged() -> None:
    view = StatusView(HealthState(), member="pod-0-1")
    view.supervisor = SimpleNamespace(  # type: ignore[assignment]
        pumps=pumps_of(*[make_pump("sess_a", f"sthr_{i}", committed=f"e{i}") for i in range(3)]),
        sessions=frozenset({"sess_a"}),
    )
    async with (
        http_server(view) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        answer = await client.get("/status", params={"limit": 2, "offset": 1})
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        doc = answer.json()
        assert [r["thread_id"] for r in doc["threads"]] == ["sthr_1", "sthr_2"]
        assert (doc["total"], doc["next_offset"], doc["member"]["id"]) == (3, None, "pod-0-1")
        bad = await client.get("/status?state=sleeping")
        assert bad.status_code == 400 and "unknown state 'sleeping'" in bad.json()["error"]
        post = await client.post("/status")
        assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
        head = await client.head("/status")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/livez?x=1")).text == "ok\n"
        assert (await client.get("/readyz")).status_code == 503
    async with http_server(None) as port, httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{port}/status")).status_code == 404


async def test_route_answers_what_build_status_builds_slice_by_slice() -> None:
    """Scenario: 1,300 threads (the route builds them a slice at a time, 500 rows each) in
    4 sessions, filters on a session and a state: the route's JSON is the document
    build_status builds in one pass, but for its times (and lags from now: the threads
    backing off have none); a `next` from it pages on."""
    pumps = pumps_of(
        *[
            make_pump(f"sess_{i % 4}", f"sthr_{i:05d}", PumpState.BACKOFF, committed=f"e{i}")
            if i % 5 == 0
            else make_pump(f"sess_{i % 4}", f"sthr_{i:05d}", committed=f"e{i}", reconnects=i % 3)
            for i in range(1300)
        ]
    )
    for i in range(1300):  # the streaming ones read an event: a lag from its read time
        pump = pumps[ThreadRef(f"sess_{i % 4}", f"sthr_{i:05d}")]
        if pump.state is PumpState.STREAMING:
            pump.last_event_time, pump.last_event_read_at = _stamp(9), NOW - 8
    sessions = frozenset({"sess_0", "sess_7"})
    view = StatusView(HealthState(), member="pod-0-1")
    view.supervisor = SimpleNamespace(pumps=pumps, sessions=sessions)  # type: ignore[assignment]
    async with (
        http_server(view) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        for query in ("limit=5000", "limit=700&session=sess_1,sess_7&state=streaming,idle"):
            answer = await client.get(f"/status?{query}")
            assert answer.status_code == 200
            doc = answer.json()
            assert answer.content == json.dumps(doc).encode() + b"\n"
            expected = build_status(
                pumps, sessions, view.health, parse_query(query), member="pod-0-1", now=NOW
            )
            for times in ("generated_at", "listed_at"):
                assert doc.pop(times) is not None and expected.pop(times) is not None
            assert doc == expected
        assert (doc["total"], len(doc["threads"]), doc["next"]) == (261, 261, None)
        first = (await client.get("/status?limit=1000")).json()
        rest = (await client.get("/status", params={"after": first["next"]})).json()
        keys = [(r["session_id"], r["thread_id"]) for r in first["threads"] + rest["threads"]]
        assert keys == sorted(keys) and len(set(keys)) == 1301 == first["total"]


async def test_route_stays_right_while_pumps_come_and_go_during_the_build() -> None:
    """Scenario: 3,000 threads; while a request is built (slice by slice, the loop running
    other tasks between), every turn of the loop a thread leaves and another arrives. The
    answer is 200 with rows sorted and each once, every row a thread followed at some point
    of the request, and every thread followed from before the request to after it shown."""
    pumps = pumps_of(*[make_pump("sess_a", f"sthr_{i:05d}") for i in range(3000)])
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(pumps=pumps, sessions=frozenset())  # type: ignore[assignment]
    before, ever, turns = set(pumps), set(pumps), [0]

    async def churn() -> None:
        while True:
            turns[0] += 1
            del pumps[next(iter(pumps))]  # the oldest leaves
            late = make_pump("sess_a", f"sthr_late_{turns[0]:05d}")
            pumps[late.thread] = late
            ever.add(late.thread)
            await anyio.lowlevel.checkpoint()

    async with (
        http_server(view) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(churn)
        answer = await client.get("/status?limit=5000")
        tg.cancel_scope.cancel()
    assert answer.status_code == 200
    assert turns[0] > 6  # the request was built while the loop ran the churn
    doc = answer.json()
    keys = [ThreadRef(r["session_id"], r["thread_id"]) for r in doc["threads"]]
    assert keys == sorted(keys, key=lambda k: (k.session_id, k.thread_id))
    assert len(set(keys)) == len(keys) and set(keys) <= ever
    assert before & set(pumps) <= set(keys)
    assert doc["total"] == doc["threads_followed"] >= len(keys)


class _OnePlace:
    """A server with one place for /status answers; the first answer waits for `release`.
    `busy` counts the requests told to come back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release, self.calls, self.busy = anyio.Event(), 0, 0
        self.view = StatusView(HealthState(), member="m")
        self.view.supervisor = SimpleNamespace(  # type: ignore[assignment]
            pumps=pumps_of(make_pump("sess_a", "sthr_1", committed="e1")), sessions=frozenset()
        )
        status_busy = health._status_busy

        def counted_busy(most: int) -> Any:
            self.busy += 1
            return status_busy(most)

        monkeypatch.setattr(health, "_status_busy", counted_busy)

    async def blocked_first(self, query: str) -> tuple[HTTPStatus, bytes]:
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()
        return await self.view.answer(query)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """The server's URL, with the first /status in flight (holding the place)."""
        answers: list[httpx.Response] = []

        async def first(url: str) -> None:
            async with httpx.AsyncClient() as client:
                answers.append(await client.get(f"{url}/status"))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                port = await tg.start(
                    lambda task_status: serve_http(
                        HttpSettings(host="127.0.0.1", port=0),
                        self.view.health,
                        status=self.blocked_first,
                        max_status=1,
                        task_status=task_status,
                    )
                )
                url = f"http://127.0.0.1:{port}"
                async with anyio.create_task_group() as clients:
                    clients.start_soon(first, url)
                    while self.calls < 1:
                        await anyio.sleep(0.01)
                    yield url
                    self.release.set()
                tg.cancel_scope.cancel()
        assert [answer.status_code for answer in answers] == [200]


async def test_status_requests_beyond_the_cap_are_told_to_retry_and_probes_are_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scenario: /status answers are capped (1 here, 4 by default) and one is being built
    (a slow build, or a slow reader of a big answer). Another /status gets 503 with
    Retry-After and a JSON error, while /livez, /readyz and /metrics are answered."""
    place = _OnePlace(monkeypatch)
    async with place.serving() as url, httpx.AsyncClient(base_url=url) as client:
        refused = await client.get("/status")
        livez = await client.get("/livez")
        readyz = await client.get("/readyz")
        scrape = await client.get("/metrics")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "busy: 1 /status answers are under way; retry in 1 s"}
    assert (livez.text, readyz.json()["ready"], scrape.status_code) == ("ok\n", False, 200)
    assert place.busy == 1


async def test_cli_fetches_every_page_up_to_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: 5 threads, pages of 2 rows: the command asks three times and prints all 5;
    --limit 3 prints 3 and says how many there are; --json prints the joined document."""
    monkeypatch.setattr(status_cli, "PAGE_ROWS", 2)
    view = StatusView(HealthState(), member="pod-0-1")
    view.supervisor = SimpleNamespace(  # type: ignore[assignment]
        pumps=pumps_of(*[make_pump("sess_a", f"sthr_{i}", committed=f"e{i}") for i in range(5)]),
        sessions=frozenset({"sess_a"}),
    )
    async with http_server(view) as port:
        url = f"http://127.0.0.1:{port}"
        assert await run_cli("--url", url) == 0
        rows = table_rows(capsys.readouterr().out)
        assert [line.split()[:4] for line in rows] == [
            ["sess_a", f"sthr_{i}", "streaming", f"e{i}"] for i in range(5)
        ]
        assert await run_cli("--url", url + "/status/", "--limit", "3") == 0
        rows = table_rows(capsys.readouterr().out)
        assert len(rows) == 3 + 1 and rows[-1] == "3 of 5 rows shown (--limit N for more)"
        assert await run_cli("--url", url, "--json", "--state", "streaming") == 0
        doc = json.loads(capsys.readouterr().out)
        assert [r["thread_id"] for r in doc["threads"]] == [f"sthr_{i}" for i in range(5)]
        assert (doc["total"], doc["filters"]["state"]) == (5, ["streaming"])


async def test_cli_errors_and_exit_codes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nobody listening, or not a bridge's status: exit 1 with the reason. A bad --url, a bad
    --state, BRIDGE_HTTP_PORT unusable for a client: exit 2 naming what to fix."""
    async with http_server(None) as port:  # a server without /status
        pass
    assert await run_cli("--url", f"http://127.0.0.1:{port}") == 1
    assert f"cannot reach the bridge at http://127.0.0.1:{port}/status" in capsys.readouterr().err
    async with http_server(None) as port:
        assert await run_cli("--url", f"http://127.0.0.1:{port}") == 1
        err = capsys.readouterr().err
        assert "answered HTTP 404 (is this the bridge's HTTP port, BRIDGE_HTTP_PORT?)" in err
    assert await run_cli("--url", "ftp://x") == 2
    assert "--url: expected http://HOST:PORT, got 'ftp://x'" in capsys.readouterr().err
    assert await run_cli("--state", "sleeping") == 2
    assert "invalid choice: 'sleeping'" in capsys.readouterr().err
    monkeypatch.setenv("BRIDGE_HTTP_PORT", "0")
    assert await run_cli() == 2
    assert "BRIDGE_HTTP_PORT is 0 (any free port)" in capsys.readouterr().err
    monkeypatch.setenv("BRIDGE_HTTP_PORT", "http")
    assert await run_cli() == 2
    assert "BRIDGE_HTTP_PORT: expected" in capsys.readouterr().err


async def test_cli_waits_when_the_bridge_says_retry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: the bridge's /status places are all taken (another operator's big page): the
    command, answered 503 with Retry-After, waits and asks again; once the place is free it
    prints its table (exit 0)."""
    place = _OnePlace(monkeypatch)
    codes: list[int] = []

    async def command(url: str) -> None:
        codes.append(await run_cli("--url", url))

    async with place.serving() as url, anyio.create_task_group() as tg:
        tg.start_soon(command, url)
        while place.busy < 1:  # the command was told to come back
            await anyio.sleep(0.01)
        place.release.set()
    assert codes == [0] and place.busy >= 1
    assert [line.split()[:2] for line in table_rows(capsys.readouterr().out)] == [
        ["sess_a", "sthr_1"]
    ]


async def test_cli_escapes_what_the_bridge_says_and_bounds_its_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: what a hostile or broken server (or the API behind the bridge) sends. A
    last_error and an error message with escape sequences print as escapes, never raw; an
    answer bigger than the bound, or one that trickles in past the time bound, is refused
    (exit 1) instead of read forever; --json keeps the values exact."""

    def no_controls(text: str) -> bool:
        return not any((ord(c) < 32 and c != "\n") or 127 <= ord(c) < 160 for c in text)

    pump = make_pump("sess_a", "sthr_1", committed="e1", last_error="\x1b[8mhidden\x9b")
    view = StatusView(HealthState(), member="pod\x1b]0;x\x07")
    view.supervisor = SimpleNamespace(pumps=pumps_of(pump), sessions=frozenset())  # type: ignore[assignment]
    async with http_server(view) as port:
        url = f"http://127.0.0.1:{port}"
        assert await run_cli("--url", url) == 0
        out = capsys.readouterr().out
        assert no_controls(out) and "member pod\\x1b]0;x\\x07  ready no" in out
        assert table_rows(out)[0].split()[-1] == "\\x1b[8mhid.."
        assert await run_cli("--url", url, "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["threads"][0]["last_error"] == "\x1b[8mhidden\x9b"
        assert doc["member"]["id"] == "pod\x1b]0;x\x07"
        monkeypatch.setattr(status_cli, "MAX_ANSWER_BYTES", 300)
        assert await run_cli("--url", url) == 1
        assert f"{url}/status answered more than 300 bytes" in capsys.readouterr().err

    async def hostile(query: str) -> tuple[HTTPStatus, bytes]:
        return HTTPStatus.BAD_REQUEST, json.dumps({"error": "\x1b[2J\x1b[3Jowned"}).encode()

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_http(
                HttpSettings(host="127.0.0.1", port=0),
                HealthState(),
                status=hostile,
                task_status=task_status,
            )
        )
        assert await run_cli("--url", f"http://127.0.0.1:{port}") == 1
        err = capsys.readouterr().err
        assert no_controls(err) and "answered HTTP 400: \\x1b[2J\\x1b[3Jowned" in err
        tg.cancel_scope.cancel()

    async def trickle(stream: Any) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n{")  # under the bound
            while True:
                await stream.send(b" ")
                await anyio.sleep(0.05)

    monkeypatch.setattr(status_cli, "TIMEOUT_S", 0.5)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    with anyio.fail_after(30):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, trickle)
            port = listener.extra(SocketAttribute.local_port)  # noqa: S610 -- anyio, not Django
            assert await run_cli("--url", f"http://127.0.0.1:{port}") == 1
            tg.cancel_scope.cancel()
    assert "no answer from" in capsys.readouterr().err


def test_default_url_is_the_local_port_of_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRIDGE_HTTP_PORT", raising=False)
    monkeypatch.delenv("BRIDGE_HTTP_HOST", raising=False)
    assert status_cli.status_url(None) == "http://127.0.0.1:8080/status"
    monkeypatch.setenv("BRIDGE_HTTP_PORT", "9181")
    monkeypatch.setenv("BRIDGE_HTTP_HOST", "10.1.2.3")
    assert status_cli.status_url(None) == "http://10.1.2.3:9181/status"
    assert status_cli.status_url("http://localhost:8080/") == "http://localhost:8080/status"


# -- a running bridge -----------------------------------------------------------------------


def _status_scenario() -> Any:
    from bridge.simulator import Scenario, SessionSpec, ThreadSpec  # noqa: PLC0415

    return Scenario(
        name="status",
        seed=23,
        heartbeat_interval_s=0.5,
        sessions=(
            SessionSpec(
                # The coordinator waits for its children: running, and quiet meanwhile.
                coordinator=ThreadSpec(events=10, rate=40),
                children=(
                    ThreadSpec(events=8, rate=0),  # done at once: drained, then not shown
                    ThreadSpec(events=400, rate=0.1),  # an event every 5-15 s
                ),
            ),
            SessionSpec(coordinator=ThreadSpec(events=400, rate=0.1)),
        ),
    )


RUNNING = ("running", "rescheduling", "blocked")


@pytest.mark.kafka
async def test_status_of_a_running_bridge_matches_the_topic(
    kafka_bootstrap: str, kafka_topics: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: a bridge follows two sessions: a coordinator waiting for its children, a
    child done at once, a slow child, a slow coordinator. At a moment when no thread writes,
    /status shows exactly the running threads, streaming, each with the last event id and
    committed id of its last record in the topic, that event's processed_at, a lag; the
    finished child is gone; paging and filters agree; the command prints the same in its
    table, and `--json --session` run as a process shows that session's threads only."""
    from bridge.simulator import running_simulator  # noqa: PLC0415 -- the simulator extra
    from tests.bridge_harness import TOKEN, bridge_settings, running_bridge  # noqa: PLC0415
    from tests.kafka_broker import read_topic  # noqa: PLC0415

    async with running_simulator(_status_scenario(), token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings) as bridge:
            with anyio.fail_after(30):
                while bridge.http_port is None:
                    await anyio.sleep(0.05)
            url = f"http://127.0.0.1:{bridge.http_port}"

            def logs() -> dict[str, list[bytes]]:
                return {f"{s}/{t}": sim.thread_log(s, t) for s, t in sim.all_threads()}

            def running() -> set[str]:
                return {
                    f"{s}/{t}" for s, t in sim.all_threads() if sim.thread_status(s, t) in RUNNING
                }

            def caught_up(doc: dict[str, Any], log: dict[str, list[bytes]]) -> bool:
                rows = {f"{r['session_id']}/{r['thread_id']}": r for r in doc["threads"]}
                return set(rows) == running() and all(
                    row["state"] == "streaming"
                    and row["committed_event_id"] == json.loads(log[key][-1])["id"]
                    for key, row in rows.items()
                )

            # A moment when nothing is written between the look at /status and at the topic.
            last_doc: dict[str, Any] = {}
            async with httpx.AsyncClient(base_url=url) as client:
                with anyio.fail_after(120):
                    while True:
                        before = logs()
                        last_doc = doc = (await client.get("/status")).json()
                        if caught_up(doc, before):
                            assert await run_cli("--url", url) == 0
                            table = capsys.readouterr().out
                            records = await read_topic(kafka_bootstrap, kafka_topics.events)
                            if logs() == before and running() == {
                                f"{r['session_id']}/{r['thread_id']}" for r in doc["threads"]
                            }:
                                break
                        await anyio.sleep(0.2)

                assert len(doc["threads"]) == 3, last_doc
                last: dict[str, Any] = {}
                for record in records:
                    last[record.key.decode()] = json.loads(record.value)
                for row in doc["threads"]:
                    key = f"{row['session_id']}/{row['thread_id']}"
                    event = last[key]
                    assert row["last_event_id"] == row["committed_event_id"] == event["id"]
                    assert row["last_event_processed_at"] == event["processed_at"]
                    assert isinstance(row["lag_s"], float) and row["lag_s"] >= 0
                    assert row["following"] is True
                    assert (row["last_error"] is None) == (row["reconnects"] == 0)
                finished = set(last) - running()
                assert len(finished) == 1  # the child done at once: in the topic, not followed
                assert doc["member"] == {
                    "id": f"{os.uname().nodename}-{os.getpid()}",
                    "group": settings.kafka.group_id,
                    "shards": list(range(32)),  # a group of one owns every shard
                }
                assert (doc["version"], doc["reason"], doc["sessions_followed"]) == (1, None, 2)
                assert (doc["total"], doc["next_offset"], doc["states"]) == (
                    3,
                    None,
                    {"streaming": 3},
                )

                # The table: one line per thread, with its ids, state and last event.
                lines = table_rows(table)
                assert max(len(line) for line in lines) <= 100
                body = [line.split() for line in lines]
                expected = [
                    [
                        status_cli._short(r["session_id"], 13),
                        status_cli._short(r["thread_id"], 13),
                        "streaming",
                        status_cli._short(r["last_event_id"], 12),
                    ]
                    for r in doc["threads"]
                ]
                assert [cells[:4] for cells in body] == expected, table

                # Paging and filters, against the same bridge.
                paged = []
                offset: int | None = 0
                while offset is not None:
                    page = (await client.get(f"/status?limit=1&offset={offset}")).json()
                    paged += [(r["session_id"], r["thread_id"]) for r in page["threads"]]
                    offset = page["next_offset"]
                assert sorted(paged) == sorted(
                    (r["session_id"], r["thread_id"]) for r in doc["threads"]
                )
                none = (await client.get("/status?state=backoff,auth_wait")).json()
                assert (none["total"], none["threads"]) == (0, [])

            second = sim.session_ids()[1]
            result = await anyio.run_process(
                [sys.executable, "-m", "bridge", "status", "--url", url, "--json",
                 "--session", second],
                check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr.decode()
            only = json.loads(result.stdout)
            assert [r["session_id"] for r in only["threads"]] == [second]
            assert only["threads"][0]["state"] == "streaming"
