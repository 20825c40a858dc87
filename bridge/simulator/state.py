"""The simulated world: sessions, threads, their event logs and the resource objects.

Every event is serialised once, at emission, as compact JSON (``ensure_ascii=False``). Those
bytes are what JSON pages are joined from and what SSE ``data:`` lines carry, and the SSE frame
around them is built once too, so serving is mostly ``b"".join``. Generation-time faults
(:class:`~bridge.simulator.faults.ItemFaults`) are made here too: an event's bytes with invalid
UTF-8, or a malformed item after it, are in the log like any event and served the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio

from bridge.simulator.clock import Clock, Stamp
from bridge.simulator.events import Step
from bridge.simulator.faults import ItemFaults
from bridge.simulator.scenario import Scenario, SessionSpec, ThreadSpec


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Event:
    """An item of a log: an event, or (with ``id == ""``) a malformed item served in its
    place, which no cursor can name."""

    id: str
    type: str
    raw: bytes  # canonical JSON, byte for byte what lists and streams serve
    frame: bytes  # the SSE frame around it

    @classmethod
    def make(cls, obj: dict[str, Any], raw: bytes | None = None) -> Event:
        """``raw``: other bytes for the same event (invalid UTF-8 in a string)."""
        raw = canonical(obj) if raw is None else raw
        frame = b"id: %s\nevent: %s\ndata: %s\n\n" % (obj["id"].encode(), obj["type"].encode(), raw)
        return cls(obj["id"], obj["type"], raw, frame)

    @classmethod
    def without_id(cls, raw: bytes, event_type: str) -> Event:
        """A frame with no ``id:`` line (and an ``event:`` line only when there is a type)."""
        head = b"event: %s\n" % event_type.encode() if event_type else b""
        return cls("", event_type, raw, head + b"data: " + raw + b"\n\n")


class EventLog:
    """Append-only; readers wait on :meth:`changed`, which is set on every append or wake."""

    __slots__ = ("_changed", "events", "index")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.index: dict[str, int] = {}
        self._changed: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self.events)

    def append(self, event: Event) -> None:
        if event.id:
            self.index[event.id] = len(self.events)
        self.events.append(event)
        self.wake()

    def back(self, at: int, count: int) -> int:
        """The position ``count`` events before position ``at`` (or the start), for replays
        that go back past a cursor."""
        pos = at
        while count and pos > 0:
            pos -= 1
            count -= bool(self.events[pos].id)
        return pos

    def changed(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


@dataclass(eq=False)
class ThreadState:
    id: str
    session: SessionState
    key: str  # "<session ordinal>.<thread ordinal>": stable across runs, used to seed faults
    spec: ThreadSpec
    agent: dict[str, Any]
    parent_id: str | None
    created: Stamp
    updated: Stamp
    status: str = "running"
    archived_at: Stamp | None = None
    log: EventLog = field(default_factory=EventLog)
    faults: ItemFaults | None = None  # generation-time faults of this thread's events

    @property
    def final(self) -> bool:
        return self.status in ("terminated", "archived")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "session_thread",
            "session_id": self.session.id,
            "parent_thread_id": self.parent_id,
            "agent": self.agent,
            "status": self.status,
            "stats": None,
            "usage": None,
            "archived_at": self.archived_at.rfc3339_ms if self.archived_at else None,
            "created_at": self.created.rfc3339_ms,
            "updated_at": self.updated.rfc3339_ms,
        }


@dataclass(eq=False)
class SessionState:
    id: str
    ordinal: int
    spec: SessionSpec
    agent: dict[str, Any]
    created: Stamp
    updated: Stamp
    terminated: bool = False
    archived_at: Stamp | None = None
    threads: list[ThreadState] = field(default_factory=list)  # coordinator first
    thread_index: dict[str, int] = field(default_factory=dict)
    log: EventLog = field(default_factory=EventLog)

    @property
    def status(self) -> str:
        if self.terminated:
            return "terminated"
        return "running" if any(t.status == "running" for t in self.threads) else "idle"

    @property
    def final(self) -> bool:
        return self.terminated or self.archived_at is not None

    def thread(self, thread_id: str) -> ThreadState | None:
        at = self.thread_index.get(thread_id)
        return None if at is None else self.threads[at]

    def to_json(self) -> dict[str, Any]:
        seconds = (self.updated.ms - self.created.ms) // 1000
        return {
            "id": self.id,
            "type": "session",
            "agent": self.agent,
            "agent_id": self.agent["id"],
            "environment_id": "env_019f000000000000000000000000e001",
            "status": self.status,
            "title": self.spec.title,
            "metadata": {"origin": "qoder-bridge-simulator"},
            "resources": [],
            "vault_ids": [],
            "memory_store_ids": [],
            "stats": {"active_seconds": seconds, "duration_seconds": seconds},
            "archived_at": self.archived_at.rfc3339_ms if self.archived_at else None,
            "created_at": self.created.rfc3339_ms,
            "updated_at": self.updated.rfc3339_ms,
        }


class World:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.clock = Clock(scenario.seed)
        self.sessions: list[SessionState] = []
        self.session_index: dict[str, int] = {}
        self._agents: dict[str, dict[str, Any]] = {}
        self._changed: anyio.Event | None = None

    def changed(self) -> anyio.Event:
        """Set on the next change anywhere: a session, a thread, an event, a status, a stream
        opening or closing."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def session(self, session_id: str) -> SessionState | None:
        at = self.session_index.get(session_id)
        return None if at is None else self.sessions[at]

    def agent(self, name: str) -> dict[str, Any]:
        if name not in self._agents:
            agent_id = self.clock.new_id("agent_")
            self._agents[name] = {"id": agent_id, "type": "agent", "version": 1, "name": name}
        return self._agents[name]

    def add_session(self, spec: SessionSpec, ordinal: int, agent_name: str) -> SessionState:
        stamp = self.clock.stamp()
        session = SessionState(
            self.clock.new_id("sess_", stamp), ordinal, spec, self.agent(agent_name), stamp, stamp
        )
        self.session_index[session.id] = len(self.sessions)
        self.sessions.append(session)
        self.wake()
        return session

    def add_thread(
        self, session: SessionState, spec: ThreadSpec, agent_name: str, parent: ThreadState | None
    ) -> ThreadState:
        stamp = self.clock.stamp()
        thread = ThreadState(
            id=self.clock.new_id("sthr_", stamp),
            session=session,
            key=f"{session.ordinal}.{len(session.threads)}",
            spec=spec,
            agent=self.agent(agent_name),
            parent_id=parent.id if parent else None,
            created=stamp,
            updated=stamp,
        )
        faults = self.scenario.faults
        if faults.invalid_utf8_rate or faults.malformed_item_rate:
            thread.faults = ItemFaults(self.scenario.seed, thread.key, faults)
        session.thread_index[thread.id] = len(session.threads)
        session.threads.append(thread)
        session.updated = stamp
        self.wake()
        return thread

    def emit(
        self,
        thread: ThreadState,
        step: Step,
        resolve: list[str] | None = None,
    ) -> Event:
        """Gives the step an id and a time, serialises it and appends it where it is served."""
        stamp = self.clock.stamp()
        obj = step.materialize(self.clock.new_id("evt_", stamp), stamp, thread.id, resolve or [])
        faults = thread.faults
        event = Event.make(obj, faults.corrupt(obj) if faults else None)
        # A malformed item follows its event wherever the event is served.
        bad = faults.malformed() if faults else None
        items = (event, Event.without_id(*bad)) if bad else (event,)
        session = thread.session
        # The session stream carries the coordinator's activity and every thread's lifecycle.
        logs = [thread.log]
        if thread.parent_id is None or step.type.startswith(_SESSION_LEVEL):
            logs.append(session.log)
        for log in logs:
            for item in items:
                log.append(item)
        thread.updated = session.updated = stamp
        if resolve is not None:
            resolve.append(event.id)
        self.wake()
        return event

    def set_status(self, thread: ThreadState, status: str, *, archive: bool = False) -> None:
        stamp = self.clock.stamp()
        thread.status = status
        thread.updated = thread.session.updated = stamp
        if archive:
            thread.archived_at = stamp
        # Streams that end on a final thread must notice even when no event came with it.
        thread.log.wake()
        thread.session.log.wake()
        self.wake()

    def archive_session(self, session: SessionState) -> None:
        session.archived_at = session.updated = self.clock.stamp()
        session.log.wake()
        self.wake()


_SESSION_LEVEL = ("session.thread_", "agent.thread_message_")
