"""Adversarial review of 8c80743 (a finished session's catch-up costs one look, not one a
poll): while a history session's only pumps are catch-up passes, only a trigger (the running
listing's diff, the last pump's end) or a crashed pump makes it look again. Each test plays one
interleaving under which a history session loses events or is followed late, on the code the
review read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from bridge.api import RateLimiter
from bridge.records import ThreadRef
from bridge.supervisor import Supervisor
from tests.test_review_issue9 import (
    CommittingPublisher,
    FakeAlerts,
    LimitedWorldApi,
    World,
    _event,
    _settings,
    _ts,
)
from tests.test_supervisor_hints import CrashOnceApi, HintingApi, _until

pytestmark = pytest.mark.anyio


# -- finding 1: a catch-up that crashed settles unread with the default timings ---------------


async def test_a_crashed_catch_up_is_read_before_its_session_settles_at_the_default_ratio():
    """Scenario: an idle session found by the full listing, one thread with 3 events not yet
    in Kafka; its catch-up pass crashes once (a bug), the next read works. Timings in the
    defaults' ratio: poll 0.2 s, crash wait (backoff_max_s) 0.5 s -- 15 s and 30 s by
    default. The crash marks the session dirty; the poll's timeout (0.2 s) makes a look while
    the crashed pump still sleeps in the pump table, so that look starts no new pass (the
    dead pump is "drained") and clears the dirty mark. At 0.5 s the dead pump leaves, its end
    triggers the session, which has no pump and is not dirty: it settles as of its first
    look, its 3 events never read (and never looked at again: its updated_at did not move).
    The existing test of this (test_history_whose_catch_up_crashed_is_looked_at_again_before
    _it_settles) uses a crash wait shorter than the poll, where the dead pump's end comes
    first. (This predates 8c80743; finding 2 is what 8c80743 added to it.)"""
    world = World()
    world.add("sess_h", "idle", "idle", 3, 1)
    api, publisher = CrashOnceApi(world), CommittingPublisher()
    settings = _settings(
        poll_interval_s=0.2,
        full_scan_interval_s=3600.0,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
    )
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: api.crashed and "sess_h" not in supervisor.sessions, 5)
        tg.cancel_scope.cancel()
    marks = [r for item in publisher.items for r in item.records if r.key == b"sess_h"]
    assert len(marks) == 1  # it settled (let go, its mark written) ...
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]  # ... unread


class CrashOnceSlowApi(HintingApi):
    """The first read of ``sthr_1`` trips a bug; every read of ``sthr_2`` takes 2 s (a catch-up
    queued behind a busy budget)."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.crashed = False

    async def thread_events(self, thread: Any, after_id: str | None) -> AsyncIterator[Any]:
        if thread.thread_id == "sthr_1" and not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug")
        if thread.thread_id == "sthr_2":
            await anyio.sleep(2.0)
        async for page in super().thread_events(thread, after_id):
            yield page


async def test_a_crashed_catch_up_is_read_again_while_another_thread_still_catches_up():
    """Scenario: an idle session found by the full listing with two threads not yet in Kafka:
    ``sthr_1`` (3 events), whose catch-up crashes once (a bug), and ``sthr_2`` (2 events),
    whose catch-up takes 2 s. Poll 0.2 s, crash wait 0.5 s (the defaults' ratio, 15 s and
    30 s). The look the crash asks for comes during the crash wait and clears the dirty mark
    (finding 1); the dead pump leaves at 0.5 s with ``sthr_2`` still reading, so its end
    triggers nothing; the session has only a catch-up pump, so the poll's timeout makes no
    look either (8c80743). At 2 s ``sthr_2``'s pass ends and the session settles: ``sthr_1``'s
    3 events are never read. On the parent commit the same run read all 5 (the poll's look
    at 0.6 s restarted ``sthr_1``'s pass), with 10 looks instead of 2."""
    world = World()
    world.add("sess_h", "idle", "idle", 3, 1)
    world.threads["sess_h"].append({"id": "sthr_2", "status": "idle", "updated_at": _ts(1)})
    world.logs[("sess_h", "sthr_2")] = [{**_event(n), "id": f"evt_2_{n}"} for n in range(2)]
    api, publisher = CrashOnceSlowApi(world), CommittingPublisher()
    settings = _settings(
        poll_interval_s=0.2,
        full_scan_interval_s=3600.0,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
    )
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await _until(lambda: api.crashed and "sess_h" not in supervisor.sessions, 8)
        tg.cancel_scope.cancel()
    assert sorted(publisher.event_ids()) == [
        "evt_0000",
        "evt_0001",
        "evt_0002",
        "evt_2_0",
        "evt_2_1",
    ]


# -- finding 3: a history session that runs again waits behind the whole catch-up ---------------


def _thread_ids(publisher: CommittingPublisher, thread: ThreadRef) -> list[str]:
    return [
        i.event_id
        for i in publisher.items
        if i.event_id and i.cursor is not None and i.cursor.thread == thread
    ]


def _run(world: World, session_id: str, thread_id: str, events: int) -> list[str]:
    """The session runs (status running) with a new running thread of ``events`` events."""
    world.sessions.setdefault(
        session_id, {"id": session_id, "archived_at": None, "updated_at": _ts(1)}
    )
    world.sessions[session_id].update(status="running", updated_at=_ts(30))
    world.threads.setdefault(session_id, []).append(
        {"id": thread_id, "status": "running", "updated_at": _ts(30)}
    )
    log = [{**_event(n), "id": f"evt_{session_id}_{n}"} for n in range(events)]
    world.logs[(session_id, thread_id)] = log
    return [e["id"] for e in log]


async def test_a_history_session_that_runs_again_during_the_catch_up_is_followed_at_once():
    """Scenario: a cold start on 1,200 finished sessions, each with one thread not yet in
    Kafka, read under a budget of 200 requests/s (each session costs its thread list and one
    page: about 12 s of catch-up, all of it BACKGROUND). 0.3 s in, two sessions start running
    with a new running thread of 3 events each: ``sess_new`` (never seen before) and
    ``sess_r`` (one of the finished sessions, listed first, so its own catch-up look is
    already done and its pass is queued). The running listing (every 0.5 s here) shows both;
    ``sess_new`` gets a watcher of its own, whose thread list is live and served at once, and
    its events are in within about a listing. ``sess_r`` is already watched: the diff
    triggers its watcher, whose look is still BACKGROUND and queues its thread list behind
    the ~1,000 catch-up requests already waiting (about 5 s here; with 3,000 sessions at the
    default 50 requests/s, one to two minutes), and its new thread is not read until then.
    Expected (issue 9: "threads that come back to life are still caught at once"; a new
    thread's first event at p99 within 3 s): ``sess_r`` followed as soon as ``sess_new``,
    give or take two listings."""
    world = World()
    world.add("sess_r", "idle", "idle", 1, 1)
    for n in range(1200):
        world.add(f"sess_h{n:04d}", "idle", "idle", 1, 1)
    limiter = RateLimiter(200, burst=1)
    api, publisher = LimitedWorldApi(world, limiter), CommittingPublisher()
    settings = _settings(poll_interval_s=0.5, full_scan_interval_s=3600.0)
    supervisor = Supervisor(settings, api, publisher, FakeAlerts(), {})  # type: ignore[arg-type]
    fresh, revived = ThreadRef("sess_new", "sthr_n"), ThreadRef("sess_r", "sthr_r")
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.run)
        await anyio.wait_all_tasks_blocked()
        await tg.start(supervisor.run)
        # Its first look is done (the listing gave the session; its thread list came first).
        await _until(lambda: any(ref.session_id == "sess_r" for ref in supervisor.pumps), 5)
        await anyio.sleep(0.3)
        want_fresh = _run(world, "sess_new", "sthr_n", 3)
        want_revived = _run(world, "sess_r", "sthr_r", 3)
        await _until(lambda: _thread_ids(publisher, fresh) == want_fresh, 10)
        with anyio.move_on_after(1.0):  # two more listings
            while _thread_ids(publisher, revived) != want_revived:
                await anyio.sleep(0.02)
        caught_up = sum(1 for i in publisher.items if i.event_id == "evt_0000")
        tg.cancel_scope.cancel()
    print(f"\n{caught_up} of 1,201 catch-up passes stored when sess_r was checked")
    assert _thread_ids(publisher, fresh) == want_fresh
    assert _thread_ids(publisher, revived) == want_revived
