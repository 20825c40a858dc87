"""Pump logic with in-memory fakes: races that real sockets make rare are made certain here."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from bridge.api import BACKGROUND, RateLimiter, event_from_item
from bridge.config import DeliverySettings, Settings
from bridge.cursor import ThreadCursor
from bridge.errors import NotFound
from bridge.pump import Pump, PumpLimits
from bridge.records import Event, Rejected, ThreadRef
from bridge.slots import StreamSlots
from bridge.sse import Frame

pytestmark = pytest.mark.anyio

THREAD = ThreadRef("sess_1", "sthr_1")


def _event(n: int) -> dict[str, Any]:
    return {
        "id": f"evt_{n:04d}",
        "type": "agent.message",
        "content": [{"type": "text", "text": str(n)}],
    }


class FakeApi:
    """A thread's event log served as pages (two events each) and as a stream."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.after_last_page: anyio.Event | None = None  # a backfill waits here once, if set
        self.frames: list[Frame] = []
        self.stream_opened = anyio.Event()

    async def thread_events(
        self, thread: ThreadRef, after_id: str | None
    ) -> AsyncIterator[list[Event | Rejected]]:
        ids = [e.get("id") if isinstance(e, dict) else None for e in self.log]
        start = ids.index(after_id) + 1 if after_id else 0
        items = self.log[start:]
        for i in range(0, len(items), 2):
            yield [event_from_item(item) for item in items[i : i + 2]]
        gate, self.after_last_page = self.after_last_page, None
        if gate is not None:
            await gate.wait()

    @asynccontextmanager
    async def stream_thread(self, thread: ThreadRef, after_id: str | None) -> AsyncIterator[Any]:
        self.stream_opened.set()

        async def frames() -> AsyncIterator[Frame]:
            # Scripted frames, or else the log after the cursor, as a server resumes it.
            for frame in self.frames or self._resumed(after_id):
                yield frame
            await anyio.sleep_forever()

        yield frames()

    def _resumed(self, after_id: str | None) -> list[Frame]:
        ids = [e.get("id") if isinstance(e, dict) else None for e in self.log]
        start = ids.index(after_id) + 1 if after_id in ids else len(ids)
        return [
            Frame(str(e.get("type")), json.dumps(e, separators=(",", ":")).encode(), e.get("id"))
            for e in self.log[start:]
            if isinstance(e, dict)
        ]

    async def get_thread(self, thread: ThreadRef) -> dict[str, Any]:
        raise NotFound("gone")


class FakePublisher:
    """Takes everything and commits only drain markers (at once), as a slow broker would."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def submit(self, item: Any) -> None:
        self.items.append(item)
        if item.drain and item.cursor is not None:
            item.cursor.mark_committed(item.epoch, None, item.drained_updated_at, None, drain=True)
            item.cursor.settle()

    def record_limit(self, topic: str) -> int:
        return 1 << 20

    def event_ids(self) -> list[str]:
        return [i.event_id for i in self.items if i.event_id]


class FakeAlerts:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, alert_type: str, reason: str, *_: Any, **__: Any) -> None:
        self.sent.append((alert_type, reason))

    async def token_rejected(self, message: str) -> None:
        self.sent.append(("bridge.token_rejected", message))

    def token_accepted(self, started_at: float) -> None:
        pass


def _pump(api: FakeApi, publisher: FakePublisher, cursor: ThreadCursor | None = None) -> Pump:
    return Pump(
        cursor or ThreadCursor(THREAD),
        api,
        publisher,
        FakeAlerts(),
        Settings(),  # type: ignore[arg-type]
        PumpLimits(StreamSlots(10)),
    )


async def test_drain_during_backfill_reads_what_came_after_that_backfill():
    """Scenario: the pump's backfill has read its last page when the thread writes its final
    events and the supervisor (seeing it idle) asks for a drain: the pump must not stop on the
    stale backfill; a second pass publishes the final events."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(5)]
    gate = anyio.Event()
    api.after_last_page = gate
    pump = _pump(api, publisher)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            while len(publisher.event_ids()) < 5:
                await anyio.sleep(0.01)
            api.log += [_event(n) for n in range(5, 8)]  # the turn's last events
            pump.drain("2026-11-23T10:00:00.000Z")  # the thread is idle now
            gate.set()
    assert publisher.event_ids() == [f"evt_{n:04d}" for n in range(8)]
    assert publisher.items[-1].drained_updated_at == "2026-11-23T10:00:00.000Z"


async def test_heartbeats_deltas_and_replays_never_publish_nor_move_the_cursor():
    """Scenario: after a backfill of 3 events, the stream sends an event heartbeat, a delta
    frame, a replay of an already-published event, then one new event and a frame whose data
    is not JSON (neither of the last three frames without an id of its own)."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(3)]
    new = json.dumps(_event(3), separators=(",", ":"))
    api.frames = [
        Frame("heartbeat", b"{}", None),
        Frame("event_delta", b'{"type":"event_delta","event_id":"evt_0003"}', None),
        Frame("agent.message", json.dumps(_event(1), separators=(",", ":")).encode(), "evt_0001"),
        Frame("agent.message", new.encode(), "evt_0003"),
        Frame("", b"<html>oops", None),
    ]
    pump = _pump(api, publisher)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            while len(publisher.items) < 5:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002", "evt_0003"]
    assert publisher.items[3].records[0].value == new.encode()  # the data bytes, unchanged
    dead = publisher.items[4]
    assert dead.event_id is None  # the repeated id is not this frame's own: no cursor move
    assert json.loads(dead.records[0].value)["reason"] == "not_json"
    assert pump.cursor.submitted_id == "evt_0003"


async def test_resume_after_checkpoint_skips_nothing_and_repeats_nothing():
    """Scenario: a restart with a checkpoint at evt_0004 of 10 events: the pump publishes
    evt_0005..evt_0009, in order, and nothing before."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(10)]
    pump = _pump(api, publisher, ThreadCursor(THREAD, committed_id="evt_0004"))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            await api.stream_opened.wait()
            tg.cancel_scope.cancel()
    assert publisher.event_ids() == [f"evt_{n:04d}" for n in range(5, 10)]


class GatedApi(FakeApi):
    """Pages that wait at a gate before the end of every backfill after the first ``free``."""

    def __init__(self, free: int = 0) -> None:
        super().__init__()
        self.passes = 0
        self.free = free
        self.at_gate = anyio.Event()
        self.gate = anyio.Event()

    async def thread_events(
        self, thread: ThreadRef, after_id: str | None
    ) -> AsyncIterator[list[Event | Rejected]]:
        async for page in super().thread_events(thread, after_id):
            yield page
        self.passes += 1
        if self.passes > self.free:
            self.at_gate.set()
            await self.gate.wait()


async def test_a_second_drain_during_the_final_pass_means_another_pass():
    """Scenario (issue 8.3): the thread goes idle (U1); the final pass reads its last page and
    then waits (backpressure); meanwhile the thread runs a short turn and goes idle again (U2).
    The U2 events must be read, and the drain mark must be U2 only after a pass that began
    after U2."""
    api, publisher = GatedApi(free=0), FakePublisher()
    api.log = [_event(n) for n in range(3)]
    pump = _pump(api, publisher)
    pump.drain("2026-11-23T10:00:00.000Z")  # U1: not running from the start
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            await api.at_gate.wait()  # the final pass has read its last page
            api.log += [_event(n) for n in range(3, 6)]  # a short turn...
            pump.drain("2026-11-23T10:00:05.000Z")  # ...and idle again: U2
            api.gate.set()
    assert publisher.event_ids() == [f"evt_{n:04d}" for n in range(6)]
    drains = [i.drained_updated_at for i in publisher.items if i.drain]
    assert drains == ["2026-11-23T10:00:05.000Z"]


async def test_a_drain_whose_batch_is_rewound_reads_the_thread_again():
    """Scenario (issue 8.4): the drain's batch fails (broker outage) and the cursor is rewound
    after the pump handed on its last events: the pump must read them again, and end only once
    a drain is committed, whether or not the supervisor still watches the session."""
    api = FakeApi()
    api.log = [_event(n) for n in range(4)]

    class FailingOnce(FakePublisher):
        failed = False

        async def submit(self, item: Any) -> None:
            if item.drain and not self.failed:
                self.failed = True
                self.items.append(item)
                item.cursor.rewind()  # the batch holding the drain (and events) failed
                item.cursor.settle()
                return
            await super().submit(item)

    publisher = FailingOnce()
    pump = _pump(api, publisher)
    pump.drain("2026-11-23T10:00:00.000Z")
    with anyio.fail_after(5):
        await pump.run()
    ids = publisher.event_ids()
    assert ids == [f"evt_{n:04d}" for n in range(4)] * 2  # read again after the rewind
    assert pump.cursor.drains_committed == 1


async def test_a_drain_does_not_wait_for_a_stream_slot():
    """Scenario (issue 8.7): every stream slot is taken; a following pump waits for one when
    its thread stops running. The drain must reach it: it reads the last events and ends."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(2)]
    slots = StreamSlots(1)
    pump = Pump(ThreadCursor(THREAD), api, publisher, FakeAlerts(), Settings(), PumpLimits(slots))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await slots.acquire()  # someone else's stream holds the only slot
            tg.start_soon(pump.run)
            while len(publisher.event_ids()) < 2:
                await anyio.sleep(0.01)
            await anyio.wait_all_tasks_blocked()
            api.log += [_event(2)]
            pump.drain("2026-11-23T10:00:00.000Z")
    slots.release()
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]


async def test_frames_without_their_own_id_never_move_the_cursor_even_when_published():
    """Scenario (issue 8.5): with BRIDGE_PUBLISH_DELTAS=true, delta frames (no `id:` line)
    come before the buffered event they announce, and a non-JSON frame without an id follows.
    The deltas are published without moving the cursor; the real event is then published,
    not dropped as a replay; the non-JSON frame is dead-lettered without an id."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(0)]
    event = json.dumps(_event(1), separators=(",", ":")).encode()
    api.frames = [
        Frame("event_start", b'{"event":{"id":"evt_0001"},"type":"event_start"}', None),
        Frame("event_delta", b'{"delta":"a","event_id":"evt_0001","type":"event_delta"}', None),
        Frame("agent.message", event, "evt_0001"),
        Frame("event_delta", b'{"delta":"b","event_id":"evt_0002","type":"event_delta"}', None),
        Frame("", b"not json", None),
        Frame("agent.message", json.dumps(_event(2)).encode(), "evt_0002"),
    ]
    pump = Pump(
        ThreadCursor(THREAD),
        api,
        publisher,
        FakeAlerts(),
        Settings(delivery=DeliverySettings(publish_deltas=True)),
        PumpLimits(StreamSlots(10)),
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            while len(publisher.items) < 7:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    types = [i.event_type for i in publisher.items]
    assert types == [
        "agent.message",
        "event_start",
        "event_delta",
        "agent.message",
        "event_delta",
        None,  # the dead letter
        "agent.message",
    ]
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]
    assert publisher.items[3].records[0].value == event
    dead = json.loads(publisher.items[5].records[0].value)
    assert dead["reason"] == "not_json" and dead["event_id"] is None
    assert pump.cursor.submitted_id == "evt_0002"


async def test_a_restart_drops_replays_from_before_the_checkpoint():
    """Scenario (issue 8.8): a restart while the thread is quiet; the checkpoint carries the
    ids before its cursor; the resumed stream first replays the 3 events before the cursor
    (which the backfill, finding nothing new, never saw). Nothing is published again."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(6)]
    recent = [f"evt_{n:04d}" for n in range(3, 5)]
    cursor = ThreadCursor(THREAD, committed_id="evt_0005", recent_ids=recent)
    api.frames = [
        Frame("agent.message", json.dumps(_event(n)).encode(), f"evt_{n:04d}") for n in (3, 4, 5)
    ] + [Frame("agent.message", json.dumps(_event(6)).encode(), "evt_0006")]
    pump = _pump(api, publisher, cursor)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            while not publisher.items:
                await anyio.sleep(0.01)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert publisher.event_ids() == ["evt_0006"]


async def test_list_items_without_an_id_are_dead_lettered_once_and_never_repeated():
    """Scenario (issue 8.13): the last items of a page are an object without an id and a JSON
    value that is not an object. Each is dead-lettered (with an alert) once; a second pass
    over the same list, and a restart from the checkpoint, repeat neither."""
    api, publisher = FakeApi(), FakePublisher()
    no_id = {"type": "agent.message", "content": []}
    api.log = [_event(0), no_id, 42]  # type: ignore[list-item]
    pump = _pump(api, publisher)
    with anyio.fail_after(5):
        await pump._backfill()
        await pump._backfill()  # the cursor is still evt_0000: the same items come again
    reasons = [json.loads(i.records[0].value).get("reason") for i in publisher.items[1:]]
    assert reasons == ["missing_id", "not_object"]
    assert [i.records[1].topic for i in publisher.items[1:]] == ["qoder.alerts"] * 2
    assert pump.cursor.submitted_id == "evt_0000"
    # A restart with the recent ids the checkpoint carries: still nothing again.
    keys = [i.dedupe_key for i in publisher.items]
    publisher.items.clear()
    restarted = _pump(api, publisher, ThreadCursor(THREAD, "evt_0000", recent_ids=keys))
    with anyio.fail_after(5):
        await restarted._backfill()
    assert publisher.items == []


async def test_invalid_utf8_on_the_stream_is_dead_lettered_byte_for_byte():
    """Scenario (issue 8.6): one event's bytes are not UTF-8. It goes to the DLQ with its exact
    bytes (base64) and an alert, it moves the cursor past it, and the next event flows."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(0)]
    bad = b'{"id":"evt_0001","type":"agent.message","text":"\xff\xe2\x82"}'
    api.frames = [
        Frame("agent.message", bad, "evt_0001"),
        Frame("agent.message", json.dumps(_event(2)).encode(), "evt_0002"),
    ]
    pump = _pump(api, publisher)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            while len(publisher.items) < 3:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    dead = json.loads(publisher.items[1].records[0].value)
    assert dead["reason"] == "invalid_utf8" and dead["event_id"] == "evt_0001"
    assert base64.b64decode(dead["data_base64"]) == bad
    assert publisher.event_ids() == ["evt_0000", "evt_0001", "evt_0002"]


async def test_requests_for_live_threads_go_before_history_at_a_cold_start():
    """Scenario (9.3): a cold start queues 50 catch-up reads of finished threads, then a live
    thread asks: with a budget of 100 requests/s it is served next, not after the history."""
    limiter = RateLimiter(100, burst=1)
    order: list[str] = []

    async def ask(name: str, background: bool) -> None:
        BACKGROUND.set(background)
        await limiter.acquire()
        order.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.run)
            await anyio.wait_all_tasks_blocked()
            for n in range(50):
                tg.start_soon(ask, f"history {n}", True)
            while not order:  # the history is queued and being served
                await anyio.sleep(0.001)
            tg.start_soon(ask, "live", False)
            while not limiter._queues[0] and "live" not in order:
                await anyio.sleep(0)  # until the live request is queued
            served_before = len(order)
            while len(order) < 51:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert order.index("live") <= served_before + 1
    assert [o for o in order if o != "live"] == [f"history {n}" for n in range(50)]
