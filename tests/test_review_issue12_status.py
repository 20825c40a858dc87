"""Adversarial review of issue 12 item 1 (`GET /status`, `qoder-bridge status`; commits eeef409
and 11bfb6e). Each test is one finding: an operator paged at night, or an attacker on the HTTP
port, in a situation where the endpoint or the command does not do what the README and the
issue say. Each is marked xfail(strict) with the finding's number; the fix removes the mark."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest

from bridge import health, status_cli
from bridge.config import HttpSettings, Settings
from bridge.cursor import ThreadCursor
from bridge.errors import BadCursor
from bridge.health import HealthState, serve_http
from bridge.pump import Pump, PumpLimits, PumpState
from bridge.records import Event, Rejected, ThreadRef
from bridge.slots import StreamSlots
from bridge.status import StatusView, build_status
from bridge.supervisor import Supervisor
from tests.test_pump import FakeAlerts as PumpAlerts
from tests.test_pump import FakeApi, FakePublisher
from tests.test_review_issue9 import CommittingPublisher, World, WorldApi, _settings
from tests.test_review_issue9 import FakeAlerts as SupervisorAlerts
from tests.test_status import http_server, make_pump, pumps_of, run_cli, table_rows

pytestmark = pytest.mark.anyio

THREAD = ThreadRef("sess_a", "sthr_1")


def _ago(seconds: float) -> str:
    """An RFC 3339 ``processed_at`` that many seconds before now (wall clock)."""
    moment = datetime.fromtimestamp(time.time() - seconds, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _item(event_id: str, processed_ago_s: float, text: str = "x") -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "agent.message",
        "processed_at": _ago(processed_ago_s),
        "content": [{"type": "text", "text": text}],
    }


def _row(doc: dict[str, Any], session_id: str, thread_id: str | None) -> dict[str, Any]:
    rows = [
        r for r in doc["threads"] if (r["session_id"], r["thread_id"]) == (session_id, thread_id)
    ]
    assert len(rows) == 1, doc
    return rows[0]


# -- finding 1: the whole document is built in one synchronous pass on the event loop ---------


class _CountedPump:
    """What build_status reads of a pump; each read of its state notes how many times the
    event loop's other tasks have run so far (a ticker's count)."""

    def __init__(self, ref: ThreadRef, ticks: list[int], reads: list[int]) -> None:
        self.thread = ref
        self._follow = True
        self.cursor = SimpleNamespace(submitted_id="evt_1", committed_id="evt_1")
        self.last_event_time: str | None = None
        self.last_event_read_at: float | None = None
        self.reconnects = 0
        self.last_error: str | None = None
        self._ticks, self._reads = ticks, reads

    @property
    def following(self) -> bool:
        return self._follow

    @property
    def state(self) -> PumpState:
        self._reads.append(self._ticks[0])
        return PumpState.STREAMING


async def test_status_for_100000_pumps_does_not_stall_the_event_loop() -> None:
    """Scenario: a bridge reading 100,000 threads (the scale README's cost section measures);
    an operator runs `watch qoder-bridge status`, a dashboard polls `/status?limit=0`, or
    anyone on the HTTP port sends requests in a loop. Today each request reads the state of
    every pump, sorts 100,000 keys and serialises the page before the loop runs anything
    else: measured with a quick script (tests not timed) on this 2-core machine, 135-250 ms
    best case per request (limit=0 costs as much as a page: the docstring's "a page costs the
    same whatever the total" is not so), 0.5-2 s under load; 10 concurrent requests kept
    `/livez` waiting 7.6 s and 32 concurrent `limit=5000` requests over only 5,000 pumps 7.2
    s, past the chart's liveness timeout (3 s, 3 failures: a restart), and every SSE read
    and Kafka batch waits as long. Expected: while the document is built, the loop keeps
    running other tasks (built in slices, in a worker on a snapshot, or from counts kept up
    to date), or a request reads only about a page's worth of pumps. Here: a ticker task
    counts its turns; every pump's state read during the one request must not all happen
    in the same turn."""
    ticks, reads = [0], []
    pumps = {
        ref: _CountedPump(ref, ticks, reads)
        for ref in (ThreadRef(f"sess_{i % 1000:04d}", f"sthr_{i:06d}") for i in range(100_000))
    }
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(pumps=pumps, sessions=frozenset())  # type: ignore[assignment]

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await anyio.sleep(0)

    async with (
        http_server(view) as port,
        httpx.AsyncClient(timeout=60) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticker)
        answer = await client.get(f"http://127.0.0.1:{port}/status?limit=0")
        tg.cancel_scope.cancel()
    assert answer.status_code == 200 and answer.json()["total"] == 100_000
    other_tasks_ran = reads[-1] - reads[0] if reads else 0
    assert len(reads) <= 500 or other_tasks_ran > 0, (len(reads), other_tasks_ran)


# -- finding 2: probes share the connection cap with /status ------------------------------


async def test_slow_status_clients_do_not_make_livez_answer_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scenario: 32 clients open `GET /status?limit=5000 HTTP/1.1` and send the rest of the
    head slowly (an attacker on the port, or 32 port-forwarded `qoder-bridge status` over a
    slow link: a 2 MB answer not read within the 5 s send timeout holds its slot just as
    long). Every one holds one of the server's 32 slots for up to read_timeout_s (5 s; an
    attacker simply opens new ones), and the kubelet's `GET /livez` gets `503 busy`: three
    in a row restart a healthy pod, and `/readyz` takes it out of service. Measured by hand
    against a server with 5,000 pumps: `/livez` answered 503 while 32 slow /status clients
    were connected. Expected: the probes are answered whatever /status clients do (a cap
    of their own, or /status capped apart). Here the read timeout is 60 s so the slow
    clients surely hold their slots while /livez asks."""
    reading = [0]
    read_head = health._read_head

    async def counted(stream: Any) -> bytes:
        reading[0] += 1
        return await read_head(stream)

    monkeypatch.setattr(health, "_read_head", counted)
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(  # type: ignore[assignment]
        pumps=pumps_of(make_pump("sess_a", "sthr_1", committed="e1")), sessions=frozenset()
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_http(
                    HttpSettings(host="127.0.0.1", port=0),
                    view.health,
                    status=view.answer,
                    read_timeout_s=60.0,
                    task_status=task_status,
                )
            )
            slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(32)]
            for stream in slow:
                await stream.send(b"GET /status?limit=5000 HTTP/1.1\r\n")
            while reading[0] < 32:  # every slow client is being served (holds its slot)
                await anyio.sleep(0.01)
            async with httpx.AsyncClient() as client:
                livez = await client.get(f"http://127.0.0.1:{port}/livez")
            for stream in slow:
                await stream.aclose()
            tg.cancel_scope.cancel()
    assert (livez.status_code, livez.text) == (200, "ok\n")


# -- finding 3: a crashed pump shows as "connecting", with no error ---------------------------


class _BuggyApi(WorldApi):
    """The world's API; reading this thread's events hits a bug in the bridge (any exception
    that is not an ApiError, as a parser or a publisher bug would raise)."""

    async def thread_events(self, thread: ThreadRef, after_id: str | None) -> Any:
        raise RuntimeError("a bug on this thread's events")
        yield  # pragma: no cover


class _RecordingAlerts(SupervisorAlerts):
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, alert_type: str, *_: Any, **__: Any) -> None:
        self.sent.append(alert_type)


async def test_a_crashed_pump_says_so_in_the_status() -> None:
    """Scenario: a running thread whose events trip a bug (RuntimeError in the pump). The
    supervisor logs `bridge.pump.crashed`, alerts `bridge.pump_crashed` and waits
    backoff_max_s (30 s by default) with the pump still in its map; the pump's state
    context managers unwound to None. `/status` shows the thread as `connecting` ("opening
    a stream, or just started"), `reconnects` 0, `last_error` null; after the wait a new
    pump starts from 0 reconnects, crashes again, and so on: the table never shows it
    failing. Expected: the row says the thread is not being read because of an error
    (a state other than `connecting`, e.g. `backoff`, and a `last_error`)."""
    world = World()
    world.add("sess_a", "running", "running", 3, 1)
    alerts = _RecordingAlerts()
    settings = _settings(sessions=("sess_a",), backoff_max_s=60.0, poll_interval_s=60.0)
    supervisor = Supervisor(settings, _BuggyApi(world), CommittingPublisher(), alerts, {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(10):
            while "bridge.pump_crashed" not in alerts.sent:
                await anyio.sleep(0.01)
        doc = build_status(
            supervisor.pumps, supervisor.sessions, HealthState(), member="m", now=time.time()
        )
        tg.cancel_scope.cancel()
    row = _row(doc, "sess_a", "sthr_1")
    assert row["state"] != "connecting" and row["last_error"] is not None, row


# -- finding 4: the API's bytes reach the operator's terminal ----------------------------------


async def test_control_characters_from_the_api_do_not_reach_the_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Scenario: the API (or anyone who can shape its answers: a proxy, a compromised
    upstream) sends an event whose `id` is `ESC[2J ESC[3J` (clear the screen and the
    scrollback) and whose `processed_at` is `ESC]0;owned BEL` (set the window title);
    the bridge accepts any non-empty string id and passes processed_at on as it came.
    Session and thread ids are checked by the supervisor (_SAFE_ID); these two are not.
    `/status` escapes them (JSON), but `qoder-bridge status` prints both raw in its table
    (12 characters fit whole; a longer id keeps its last 6-8, room for `ESC[8m`, which hides
    everything printed after it). Expected: no control character other than the newlines
    between lines reaches stdout (escaped, replaced or dropped)."""
    pump = make_pump("sess_a", "sthr_1", submitted="\x1b[2J\x1b[3J", event_age_s=5)
    pump.last_event_time = "\x1b]0;owned\x07"
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(pumps=pumps_of(pump), sessions=frozenset())  # type: ignore[assignment]
    async with http_server(view) as port:
        assert await run_cli("--url", f"http://127.0.0.1:{port}") == 0
    out = capsys.readouterr().out
    assert len(table_rows(out)) == 1, out
    controls = sorted({c for c in out if (ord(c) < 32 and c != "\n") or ord(c) == 127})
    assert controls == [], repr(out)


# -- finding 5: paging loses a thread that is there all along ---------------------------------


class _LeavingView(StatusView):
    """After the first page is answered, the first thread stops being read (drained)."""

    calls = 0

    async def answer(self, query_string: str) -> Any:
        result = await super().answer(query_string)
        self.calls += 1
        if self.calls == 1:
            assert self.supervisor is not None
            del self.supervisor.pumps[ThreadRef("sess_a", "sthr_0")]  # type: ignore[attr-defined]
        return result


async def test_the_command_shows_every_thread_followed_all_along_while_others_leave(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: 5 threads (sthr_0..sthr_4), pages of 2 rows. Between the command's first
    and second request sthr_0 is drained and leaves the list: offset 2 now starts at
    sthr_3, and sthr_2 -- followed the whole time -- is on no page. README: "a row can move
    across a page boundary; qoder-bridge status keeps each thread once"; it does drop the
    duplicates, not the holes. On a bridge where threads finish every second (the normal
    case), the table misses threads at random, and a thread in `backoff` can be the one
    not shown. Expected: every thread followed from the first page to the last is printed
    (a cursor after the last key, `after=SESSION/THREAD`, instead of an offset, or the
    command re-reading until the total is stable)."""
    monkeypatch.setattr(status_cli, "PAGE_ROWS", 2)
    view = _LeavingView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(  # type: ignore[assignment]
        pumps=pumps_of(*[make_pump("sess_a", f"sthr_{i}", committed=f"e{i}") for i in range(5)]),
        sessions=frozenset(),
    )
    async with http_server(view) as port:
        assert await run_cli("--url", f"http://127.0.0.1:{port}") == 0
    shown = {line.split()[1] for line in table_rows(capsys.readouterr().out) if "sthr_" in line}
    assert {"sthr_1", "sthr_2", "sthr_3", "sthr_4"} <= shown, shown


# -- finding 6: one odd processed_at from the API crashes the command ------------------------


async def test_an_out_of_range_processed_at_does_not_crash_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Scenario: the API sends an event with `processed_at` `0001-01-01T00:00:00+01:00` (a
    zero time with a zone, as a Go or Java server may format an unset field). The bridge
    takes it (status.py computes a lag from it without complaint), but the command's
    `_when` converts it to UTC: OverflowError, a traceback, exit 1 -- for every row of the
    table, at the moment the operator needs it. Expected: exit 0, the table, that row's time
    shown as it came (cut) or `-`."""
    pump = make_pump("sess_a", "sthr_1", committed="e1", event_age_s=5)
    pump.last_event_time = "0001-01-01T00:00:00+01:00"
    other = make_pump("sess_a", "sthr_2", committed="e2", event_age_s=5)
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(pumps=pumps_of(pump, other), sessions=frozenset())  # type: ignore[assignment]
    async with http_server(view) as port:
        code = await run_cli("--url", f"http://127.0.0.1:{port}")
    rows = table_rows(capsys.readouterr().out)
    assert code == 0
    assert [line.split()[1] for line in rows] == ["sthr_1", "sthr_2"]


# -- finding 7: `--limit 0` says "no rows" ----------------------------------------------------


async def test_limit_zero_does_not_say_there_are_no_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Scenario: 3 threads followed; the operator asks for the summary alone, `--limit 0`
    (accepted: `_rows` takes 0; the endpoint documents `limit=0` as "the summary alone").
    The command prints the summary and then "no rows": the total (3) is known and not
    said. Expected: no "no rows" when rows exist; e.g. "0 of 3 rows shown"."""
    view = StatusView(HealthState(), member="m")
    view.supervisor = SimpleNamespace(  # type: ignore[assignment]
        pumps=pumps_of(*[make_pump("sess_a", f"sthr_{i}", committed=f"e{i}") for i in range(3)]),
        sessions=frozenset(),
    )
    async with http_server(view) as port:
        assert await run_cli("--url", f"http://127.0.0.1:{port}", "--limit", "0") == 0
    out = capsys.readouterr().out
    assert "threads 3" in out
    assert "no rows" not in out, out


# -- finding 8: a caught-up streaming thread reports its catch-up delay as lag -----------------


async def test_a_caught_up_streaming_thread_is_not_reported_behind() -> None:
    """Scenario: after 10 minutes down, the bridge resumes a running thread: the backfill
    reads its last event (processed 10 minutes ago), the stream opens after it, and the
    thread is quiet. Nothing is waiting: README says "a live stream delivers what the API
    has, so a quiet thread is not behind". `lag_s` is read time minus processed_at of that
    event, read by the backfill: 600 s, shown as LAG 10m00s next to `streaming` until the
    thread writes again (hours for a coordinator waiting for its children). The operator
    paged for lag sees a thread 10 minutes behind that is not. Expected: a thread streaming
    with nothing newer on its stream shows a lag of seconds at most (the delay of an
    event that arrived on the live stream, or 0)."""
    api = FakeApi()
    api.log = [_item("evt_0000", 600)]
    pump = Pump(
        ThreadCursor(THREAD),
        api,  # type: ignore[arg-type]
        FakePublisher(),  # type: ignore[arg-type]
        PumpAlerts(),  # type: ignore[arg-type]
        Settings(),
        PumpLimits(StreamSlots(10)),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pump.run)
        with anyio.fail_after(10):
            while pump.state is not PumpState.STREAMING:
                await anyio.sleep(0.01)
        doc = build_status(pumps_of(pump), frozenset(), HealthState(), member="m", now=time.time())
        tg.cancel_scope.cancel()
    row = _row(doc, "sess_a", "sthr_1")
    assert (row["state"], row["last_event_id"]) == ("streaming", "evt_0000")
    assert row["lag_s"] is not None and row["lag_s"] < 60, row


# -- finding 9: last_event_id and last_event_processed_at describe two different events -------


class _SmallRecords(FakePublisher):
    def record_limit(self, topic: str) -> int:
        return 4096


async def test_last_event_id_and_its_processed_at_are_the_same_events() -> None:
    """Scenario: a thread's event evt_0000 (processed 10 minutes ago) is published; the next,
    evt_0001 (processed 5 s ago), is larger than Kafka takes and goes to the DLQ: the
    cursor moves past it, so `last_event_id` is evt_0001, but `_handle` returns before it
    sets `last_event_time`, so `last_event_processed_at` is evt_0000's and `lag_s` (in any
    state but streaming) is 600 s: README says it is "that last event's processed_at".
    Expected: the two fields describe the same event."""
    api = FakeApi()
    api.log = [_item("evt_0000", 600), _item("evt_0001", 5, text="x" * 8192)]
    pump = Pump(
        ThreadCursor(THREAD),
        api,  # type: ignore[arg-type]
        _SmallRecords(),  # type: ignore[arg-type]
        PumpAlerts(),  # type: ignore[arg-type]
        Settings(),
        PumpLimits(StreamSlots(10)),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pump.run)
        with anyio.fail_after(10):
            while pump.state is not PumpState.STREAMING:
                await anyio.sleep(0.01)
        doc = build_status(pumps_of(pump), frozenset(), HealthState(), member="m", now=time.time())
        tg.cancel_scope.cancel()
    row = _row(doc, "sess_a", "sthr_1")
    by_id = {item["id"]: item["processed_at"] for item in api.log}
    assert row["last_event_id"] == "evt_0001"  # the dead letter moved the cursor
    assert row["last_event_processed_at"] == by_id[row["last_event_id"]], row


# -- finding 10: a rescan of a whole thread shows as "connecting" ------------------------------


class _LostCursorApi(FakeApi):
    """The stream refuses the cursor (400: the API no longer knows it); the list from the
    start is served, and the test holds the rescan in the middle of its pages."""

    def __init__(self) -> None:
        super().__init__()
        self.rescanning = anyio.Event()
        self.release = anyio.Event()

    def stream_thread(self, thread: ThreadRef, after_id: str | None) -> Any:
        raise BadCursor("GET .../stream: HTTP 400 unknown after_id")

    async def thread_events(self, thread: ThreadRef, after_id: str | None) -> Any:
        if after_id is None:
            self.rescanning.set()
            await self.release.wait()
        yield [_event_of(item) for item in self.log]


def _event_of(item: dict[str, Any]) -> Event | Rejected:
    from bridge.api import event_from_item  # noqa: PLC0415

    return event_from_item(item)


async def test_a_rescan_from_the_start_is_shown_as_reading_the_list() -> None:
    """Scenario: a thread resumed at a checkpointed event the API no longer knows (400 on
    the stream, `bad_cursor`). The pump backs off, then `_rescan` reads the thread's whole
    list from the start to find the cursor (thousands of events, minutes on a long
    thread). Meanwhile its state is None:
    `/status` says `connecting` ("opening a stream, or just started"). Expected: a state
    that says it is reading the JSON list (`backfilling`), with last_error `bad_cursor`."""
    api = _LostCursorApi()
    api.log = [_item("evt_0000", 60)]
    pump = Pump(
        ThreadCursor(THREAD, committed_id="evt_forgotten"),
        api,  # type: ignore[arg-type]
        FakePublisher(),  # type: ignore[arg-type]
        PumpAlerts(),  # type: ignore[arg-type]
        _settings(backoff_initial_s=0.01, backoff_max_s=0.05),
        PumpLimits(StreamSlots(10)),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pump.run)
        with anyio.fail_after(10):
            await api.rescanning.wait()
        doc = build_status(pumps_of(pump), frozenset(), HealthState(), member="m", now=time.time())
        tg.cancel_scope.cancel()
    row = _row(doc, "sess_a", "sthr_1")
    assert row["last_error"] == "bad_cursor"
    assert row["state"] == "backfilling", row
