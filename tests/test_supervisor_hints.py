"""What a running session costs (issue 9): a thread that starts running is followed on its
lifecycle hint, without a request; a look at a session the running listing just showed asks
only for its threads; a hint about the session itself makes the next look ask for it."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from bridge import supervisor as supervisor_module
from bridge.sse import Frame
from bridge.supervisor import Supervisor
from tests.test_review_issue9 import (
    CommittingPublisher,
    FakeAlerts,
    World,
    WorldApi,
    _event,
    _settings,
    _ts,
)

pytestmark = pytest.mark.anyio


class HintingApi(WorldApi):
    """The world's API with a session stream the test writes to, counting every request."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.calls: Counter[str] = Counter()
        self.hints: dict[str, list[Frame]] = {}
        self.connected: set[str] = set()

    async def list_sessions(self, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls["list_sessions"] += 1
        return await super().list_sessions(**kwargs)

    async def get_session(self, session_id: str) -> dict[str, Any]:
        self.calls["get_session"] += 1
        return await super().get_session(session_id)

    async def list_threads(self, session_id: str) -> list[dict[str, Any]]:
        self.calls["list_threads"] += 1
        return await super().list_threads(session_id)

    def hint(self, session_id: str, frame: Frame) -> None:
        self.hints.setdefault(session_id, []).append(frame)

    @asynccontextmanager
    async def stream_session(self, session_id: str, after_id: str | None) -> AsyncIterator[Any]:
        hints = self.hints.setdefault(session_id, [])
        self.connected.add(session_id)

        async def frames() -> AsyncIterator[Frame]:
            sent = 0
            while True:
                while sent < len(hints):
                    sent += 1
                    yield hints[sent - 1]
                await anyio.sleep(0.01)

        yield frames()


def _lifecycle(kind: str, thread_id: str, *, event_line: bool = True, age_s: float = 0.0) -> Frame:
    """A session-stream lifecycle event, processed ``age_s`` ago."""
    processed = datetime.fromtimestamp(time.time() - age_s, UTC).isoformat()
    body = {
        "id": f"sevt_{kind}_{thread_id}",
        "type": kind,
        "processed_at": processed.replace("+00:00", "Z"),
        "session_thread_id": thread_id,
    }
    return Frame(kind if event_line else "", json.dumps(body).encode(), body["id"])


def _running_session(world: World) -> None:
    world.add("sess_a", "running", "running", 3, 1)


async def _until(condition: Any, within_s: float) -> None:
    with anyio.fail_after(within_s):
        while not condition():
            await anyio.sleep(0.01)


@pytest.mark.parametrize("event_line", [True, False], ids=["event-line", "type-in-data"])
async def test_a_thread_that_starts_running_is_followed_on_its_hint_without_a_request(
    event_line: bool,
):
    """Scenario: a configured running session (one thread) is followed, its session stream
    open; then a child thread is created and runs, with 4 events. Its ``session.thread_created``
    hint names it (``session_thread_id``; with or without an SSE ``event:`` line, qoder-api.md
    5.1): the child's events reach the publisher with no session or thread-list request in
    between. Before, each such hint cost a look: the session and its thread list."""
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(sessions=("sess_a",), poll_interval_s=60.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    child = [{**_event(n), "id": f"evt_c{n}"} for n in range(4)]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: "sess_a" in api.connected and len(publisher.event_ids()) == 3, 3)
        await anyio.sleep(0.1)
        looked = api.calls.copy()
        world.threads["sess_a"].append({"id": "sthr_c", "status": "running", "updated_at": _ts(2)})
        world.logs[("sess_a", "sthr_c")] = child
        api.hint("sess_a", _lifecycle("session.thread_created", "sthr_c", event_line=event_line))
        await _until(lambda: len(publisher.event_ids()) == 7, 3)
        tg.cancel_scope.cancel()
    assert publisher.event_ids()[3:] == [e["id"] for e in child]
    assert api.calls == looked  # no request but the child's own reads


async def test_a_look_at_a_session_the_running_listing_shows_asks_only_for_its_threads():
    """Scenario: discovery (no configured sessions), one running session, a 0.1 s poll: the
    session is looked at every poll. Its status comes from the running-session listing made
    moments before, so a look is one request (the thread list), not two. Before, every look
    also asked for the session: as many get_session as list_threads."""
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=0.1, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: api.calls["list_threads"] >= 10, 5)
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]
    assert api.calls["get_session"] == 0
    assert api.calls["list_sessions"] >= 5  # the listing is what the look trusts


async def test_a_thread_hint_drains_and_a_session_status_hint_costs_no_request(monkeypatch):
    """Scenario: the session stops running (status idle, its thread idle) and says so on its
    stream (``session.thread_status_idle``, ``session.status_idle``); the running listing is
    slow to show it (listed every 60 s here). The thread's hint makes a look (its thread
    list: one request), which drains the thread within a couple of seconds; the session's
    own status hint makes none: with discovery, the running listing says whether it runs."""
    monkeypatch.setattr(supervisor_module, "RUNNING_LIST_INTERVAL_S", 60.0)
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=60.0, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: "sess_a" in api.connected and len(publisher.event_ids()) == 3, 3)
        looked = api.calls.copy()
        world.logs[("sess_a", "sthr_1")].append(_event(3))
        world.sessions["sess_a"].update(status="idle", updated_at=_ts(5))
        world.threads["sess_a"][0].update(status="idle", updated_at=_ts(5))
        api.hint("sess_a", _lifecycle("session.thread_status_idle", "sthr_1"))
        api.hint("sess_a", _lifecycle("session.status_idle", "sthr_1"))
        await _until(lambda: not supervisor.pumps, 3)
        await anyio.sleep(1.5)  # any other look would have come by now
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002", "evt_0003"]
    assert api.calls["list_threads"] - looked["list_threads"] == 1
    assert api.calls["get_session"] == looked["get_session"] == 0


async def test_a_session_over_hint_makes_the_next_look_ask_for_the_session(monkeypatch):
    """Scenario: the session is terminated and says so (``session.status_terminated``); the
    running listing would never show it over. The look the hint makes asks for the session
    itself, sees it over and drains its thread."""
    monkeypatch.setattr(supervisor_module, "RUNNING_LIST_INTERVAL_S", 60.0)
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=60.0, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: "sess_a" in api.connected and len(publisher.event_ids()) == 3, 3)
        world.logs[("sess_a", "sthr_1")].append(_event(3))
        world.sessions["sess_a"].update(status="terminated", updated_at=_ts(5))
        api.hint("sess_a", _lifecycle("session.status_terminated", "sthr_1"))
        await _until(lambda: not supervisor.pumps, 4)
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002", "evt_0003"]
    assert api.calls["get_session"] >= 1


async def test_a_short_turn_soon_after_the_session_went_idle_is_read_within_a_poll(monkeypatch):
    """Scenario: a session goes idle (its thread drained), and 0.1 s later runs a short turn
    that ends before anything lists it running (the listing is slow here, and an idle
    session's stream is closed): 2 more events, the thread and session ``updated_at`` newer.
    A session is let go only after a poll interval of quiet, so the next look (0.3 s) sees
    the thread changed since its drain and reads it. Letting it go the moment its last thread
    drained left those events to the next full scan (an hour here)."""
    monkeypatch.setattr(supervisor_module, "RUNNING_LIST_INTERVAL_S", 60.0)
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=0.3, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: len(publisher.event_ids()) == 3, 3)
        world.sessions["sess_a"].update(status="idle", updated_at=_ts(5))
        world.threads["sess_a"][0].update(status="idle", updated_at=_ts(5))
        api.hint("sess_a", _lifecycle("session.status_idle", "sthr_1"))
        await _until(lambda: not supervisor.pumps, 2)
        await anyio.sleep(0.1)
        world.logs[("sess_a", "sthr_1")] += [_event(3), _event(4)]
        world.sessions["sess_a"]["updated_at"] = _ts(7)
        world.threads["sess_a"][0]["updated_at"] = _ts(7)
        with anyio.move_on_after(3):
            while len(publisher.event_ids()) < 5:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == [f"evt_{n:04d}" for n in range(5)]


async def test_history_that_needed_a_catch_up_settles_as_soon_as_it_is_read(monkeypatch):
    """Scenario: the start's full listing finds an idle session whose thread has 3 events not
    yet in Kafka (no checkpoint). Its look starts a catch-up pass; once that pass is stored,
    the session is looked at again at once and let go, its settled mark written, not a poll
    interval (60 s here) later, and with no second look: a restart soon after must not look
    at it again."""
    world = World()
    world.add("sess_h", "idle", "idle", 3, 1)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=60.0, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: "sess_h" not in supervisor.sessions and publisher.items, 3)
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]
    marks = [r for item in publisher.items for r in item.records if r.key == b"sess_h"]
    assert len(marks) == 1 and b'"settled_updated_at"' in marks[0].value
    # One look (its threads; the listing gave the session); settled as of that look once the
    # pass was stored.
    assert (api.calls["get_session"], api.calls["list_threads"]) == (0, 1)


async def test_a_running_session_with_its_hint_stream_up_is_looked_at_less_often():
    """Scenario: a configured running session, poll interval 0.2 s. While its session stream
    is up, lifecycle changes come as hints, and the safety-net look comes every 4 polls
    (0.8 s): about 3 looks in 2 s, where every poll would be 10."""
    world = World()
    _running_session(world)
    api, publisher = HintingApi(world), CommittingPublisher()
    settings = _settings(sessions=("sess_a",), poll_interval_s=0.2)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: "sess_a" in api.connected, 3)
        await anyio.sleep(0.3)
        looks = api.calls["list_threads"]
        await anyio.sleep(2.0)
        looks = api.calls["list_threads"] - looks
        tg.cancel_scope.cancel()
    assert 1 <= looks <= 4, looks


class CrashOnceApi(HintingApi):
    """The first read of the history thread's events trips a bug (not an API error)."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.crashed = False

    async def thread_events(self, thread: Any, after_id: str | None) -> AsyncIterator[Any]:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug")
        async for page in super().thread_events(thread, after_id):
            yield page


async def test_history_whose_catch_up_crashed_is_looked_at_again_before_it_settles():
    """Scenario: the catch-up pass of an idle session's thread crashes (a bug). The session
    must not settle as of its first look (that would leave its 3 events unread until it
    changes): it is looked at again, read, and only then marked settled."""
    world = World()
    world.add("sess_h", "idle", "idle", 3, 1)
    api, publisher = CrashOnceApi(world), CommittingPublisher()
    settings = _settings(poll_interval_s=60.0, full_scan_interval_s=3600.0, backoff_max_s=0.1)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: api.crashed and "sess_h" not in supervisor.sessions, 5)
        tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]
    assert api.calls["list_threads"] == 2


class TimedApi(HintingApi):
    """Also remembers when each session's threads were listed."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.listed: dict[str, list[float]] = {}

    async def list_threads(self, session_id: str) -> list[dict[str, Any]]:
        self.listed.setdefault(session_id, []).append(anyio.current_time())
        return await super().list_threads(session_id)


async def test_sessions_followed_together_do_not_all_look_again_at_the_same_moment():
    """Scenario: 20 running sessions, all followed at the start, a 2 s poll. Each looks at its
    threads at once, then again as the safety net: those second looks are spread over the
    interval, not all at the same moment (20 thread lists in one burst, every interval). In the
    latency bench, 50 such looks together held back every stream: the second 14 s after the
    start had a p99 of 131-158 ms against 106-128 around it (issue 11)."""
    world = World()
    sessions = tuple(f"sess_{n:02}" for n in range(20))
    for session_id in sessions:
        world.add(session_id, "running", "running", 1, 1)
    api, publisher = TimedApi(world), CommittingPublisher()
    settings = _settings(sessions=sessions, poll_interval_s=2.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: all(len(api.listed.get(s, ())) >= 2 for s in sessions), 5)
        tg.cancel_scope.cancel()
    first = [api.listed[s][0] for s in sessions]
    second = [api.listed[s][1] for s in sessions]
    assert max(first) - min(first) < 0.5  # followed together
    assert all(b - a <= 2.0 + 0.2 for a, b in zip(first, second, strict=True))  # never later
    assert max(second) - min(second) >= 0.4, sorted(round(t - min(first), 2) for t in second)
