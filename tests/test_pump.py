"""Pump logic with in-memory fakes: races that real sockets make rare are made certain here."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from httpx_sse import ServerSentEvent

from bridge.api import event_from_item
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import NotFound
from bridge.pump import Pump, PumpLimits
from bridge.records import Event, ThreadRef

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
        self.frames: list[ServerSentEvent] = []
        self.stream_opened = anyio.Event()

    async def thread_events(
        self, thread: ThreadRef, after_id: str | None
    ) -> AsyncIterator[list[Event]]:
        ids = [e["id"] for e in self.log]
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

        async def frames() -> AsyncIterator[ServerSentEvent]:
            for frame in self.frames:
                yield frame
            await anyio.sleep_forever()

        yield frames()

    async def get_thread(self, thread: ThreadRef) -> dict[str, Any]:
        raise NotFound("gone")


class FakePublisher:
    def __init__(self) -> None:
        self.items: list[Any] = []

    async def submit(self, item: Any) -> None:
        self.items.append(item)

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
        PumpLimits(anyio.CapacityLimiter(10)),
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
    """Scenario: after a backfill of 3 events, the stream sends a comment heartbeat (httpx-sse:
    event "message", empty data, previous id), an event heartbeat, a delta frame, a replay of
    an already-published event, then one new event and a frame whose data is not JSON."""
    api, publisher = FakeApi(), FakePublisher()
    api.log = [_event(n) for n in range(3)]
    new = json.dumps(_event(3), separators=(",", ":"))
    api.frames = [
        ServerSentEvent(event="", data="", id="evt_0002"),
        ServerSentEvent(event="heartbeat", data="{}", id="evt_0002"),
        ServerSentEvent(
            event="event_delta", data='{"type":"event_delta","event_id":"evt_0003"}', id="evt_0003"
        ),
        ServerSentEvent(
            event="agent.message", data=json.dumps(_event(1), separators=(",", ":")), id="evt_0001"
        ),
        ServerSentEvent(event="agent.message", data=new, id="evt_0003"),
        ServerSentEvent(event="", data="<html>oops", id="evt_0003"),
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
