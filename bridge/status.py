"""``GET /status``: what this bridge follows and where each thread stands, as one JSON document.

A pure function of the supervisor's pumps and sessions and of the readiness checks, built at
request time: nothing is kept for it, and it never calls into a pump. The document is bounded:
one page of rows (``limit``, at most :data:`MAX_LIMIT`), with ``total`` and ``next_offset``
for the next page. A row is a thread being read, or a followed session with no thread being
read (``thread_id`` null, state ``idle``), sorted by session then thread.

Lag (``lag_s``), from the last event this process read of the thread (its ``processed_at``):

- ``streaming``: that event's delay, the time it was read minus its ``processed_at``. On a live
  stream the API sends what it has, so a quiet thread is not behind: its lag stays what it was.
- any other state: now minus its ``processed_at``. The thread is not on a live stream, so newer
  events may be waiting: this is the most it can be behind (a quiet thread shows how long it
  has been quiet).
- null: no event read yet by this process (a thread resumed from its checkpoint that has been
  quiet since), or a ``processed_at`` that is not an RFC 3339 time. Never negative (clocks).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from bridge import __version__
from bridge.records import ThreadRef

if TYPE_CHECKING:  # the CLI imports this module: it must not pull in the daemon
    from bridge.health import HealthState
    from bridge.pump import Pump
    from bridge.supervisor import Supervisor

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "STATES",
    "STATUS_VERSION",
    "QueryError",
    "StatusQuery",
    "StatusView",
    "build_status",
    "lag_s",
    "member_id",
    "parse_query",
]

#: Bumped only when a field changes meaning or goes away; new fields may appear in any version.
STATUS_VERSION = 1
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
#: A row's state: a pump's (``bridge.pump.PumpState``), ``connecting`` between two of them
#: (opening a stream, or just started), ``idle`` for a followed session with no thread read.
STATES = (
    "backfilling",
    "streaming",
    "waiting_slot",
    "list_polling",
    "backoff",
    "auth_wait",
    "draining",
    "connecting",
    "idle",
)
#: States in which a pump that no longer follows its thread is reading what is left of it.
_FINAL_PASS = frozenset({"backfilling", "connecting"})
NOT_STARTED = (
    "the supervisor has not started yet (it starts once the topics, the producer and the "
    "checkpoints are ready): no session is followed"
)
_PARAMS = ("limit", "offset", "session", "state")


class QueryError(ValueError):
    """A query string ``/status`` does not accept; the message says what it accepts."""


@dataclass(frozen=True, slots=True)
class StatusQuery:
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    #: Empty: every session (every state).
    sessions: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()


def parse_query(text: str) -> StatusQuery:
    """``limit=&offset=&session=&state=``; ``session`` and ``state`` repeat or take a comma
    list. Raises :class:`QueryError` for anything else."""
    values: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise QueryError(f"cannot parse the query string {text[:80]!r}") from None
    for name, value in pairs:
        if name not in _PARAMS:
            raise QueryError(f"unknown parameter {name[:40]!r}; accepted: {', '.join(_PARAMS)}")
        values.setdefault(name, []).extend(v for v in value.split(",") if v)
    limit = _number(values, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _number(values, "offset", 0, None)
    states = frozenset(values.get("state", ()))
    if unknown := sorted(states - set(STATES)):
        raise QueryError(f"unknown state {unknown[0][:40]!r}; accepted: {', '.join(STATES)}")
    return StatusQuery(limit, offset, frozenset(values.get("session", ())), states)


def _number(values: Mapping[str, list[str]], name: str, default: int, most: int | None) -> int:
    given = values.get(name)
    if not given:
        return default
    if len(given) > 1:
        raise QueryError(f"{name}: give it once")
    accepted = f"an integer from 0 to {most}" if most is not None else "an integer >= 0"
    try:
        number = int(given[0])
    except ValueError:
        raise QueryError(f"{name}: expected {accepted}, got {given[0][:40]!r}") from None
    if number < 0 or (most is not None and number > most):
        raise QueryError(f"{name}: expected {accepted}, got {number}")
    return number


def member_id() -> str:
    """This process among the bridge's members: the host (the pod's name) and the pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def lag_s(state: str, processed_at: str | None, read_at: float | None, now: float) -> float | None:
    """How far behind the thread is, in seconds (the module's docstring says what it means)."""
    event_time = _epoch(processed_at)
    if event_time is None:
        return None
    reference = read_at if state == "streaming" and read_at is not None else now
    return round(max(0.0, reference - event_time), 3)


def _epoch(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None  # a time without its zone says nothing about how long ago it was
    return parsed.timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _state(pump: Pump) -> str:
    state = pump.state.value if pump.state is not None else "connecting"
    # pump.py keeps "follow" private; a public read-only `following` there would be cleaner.
    if not pump._follow and state in _FINAL_PASS:
        return "draining"
    return state


def _thread_row(pump: Pump, state: str, now: float) -> dict[str, Any]:
    ref = pump.thread
    return {
        "session_id": ref.session_id,
        "thread_id": ref.thread_id,
        "state": state,
        "following": pump._follow,
        "last_event_id": pump.cursor.submitted_id,
        "committed_event_id": pump.cursor.committed_id,
        "last_event_processed_at": pump.last_event_time,
        "last_event_read_at": _iso(pump.last_event_read_at),
        "lag_s": lag_s(state, pump.last_event_time, pump.last_event_read_at, now),
        "reconnects": pump.reconnects,
        "last_error": pump.last_error,
    }


def _session_row(session_id: str) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "thread_id": None,
        "state": "idle",
        "following": True,
        "last_event_id": None,
        "committed_event_id": None,
        "last_event_processed_at": None,
        "last_event_read_at": None,
        "lag_s": None,
        "reconnects": 0,
        "last_error": None,
    }


def build_status(
    pumps: Mapping[ThreadRef, Pump],
    sessions: Set[str],
    health: HealthState,
    query: StatusQuery | None = None,
    *,
    member: str,
    now: float,
    reason: str | None = None,
) -> dict[str, Any]:
    """The ``/status`` document (``now``: wall-clock seconds, as ``time.time()``)."""
    query = query or StatusQuery()
    # Keys and states first, rows only for the page: a page costs the same whatever the total.
    states: dict[ThreadRef, str] = {ref: _state(pump) for ref, pump in pumps.items()}
    with_threads = {ref.session_id for ref in pumps}
    for session_id in sessions:
        if session_id not in with_threads:
            states[ThreadRef(session_id, "")] = "idle"
    counts = {name: 0 for name in STATES}
    for state in states.values():
        counts[state] += 1
    matching = sorted(
        (ref.session_id, ref.thread_id)
        for ref, state in states.items()
        if (not query.sessions or ref.session_id in query.sessions)
        and (not query.states or state in query.states)
    )
    page = matching[query.offset : query.offset + query.limit]
    rows = []
    for session_id, thread_id in page:
        ref = ThreadRef(session_id, thread_id)
        pump = pumps.get(ref)
        rows.append(
            _thread_row(pump, states[ref], now) if pump is not None else _session_row(session_id)
        )
    end = query.offset + len(page)
    failing = health.failing_checks()
    return {
        "version": STATUS_VERSION,
        "bridge_version": __version__,
        "generated_at": _iso(now),
        "member": {"id": member, "group": None, "shards": None},
        "ready": not failing,
        "failing": failing,
        "reason": reason,
        "sessions_followed": len(sessions | with_threads),
        "threads_followed": len(pumps),
        "states": {name: count for name, count in counts.items() if count},
        "filters": {"session": sorted(query.sessions), "state": sorted(query.states)},
        "total": len(matching),
        "offset": query.offset,
        "limit": query.limit,
        "next_offset": end if page and end < len(matching) else None,
        "threads": rows,
    }


class StatusView:
    """What the HTTP server asks for ``/status``. The supervisor is set once it exists: the
    server starts first, so until then the answer has no rows and says why."""

    def __init__(self, health: HealthState, member: str | None = None) -> None:
        self.health = health
        self.member = member or member_id()
        self.supervisor: Supervisor | None = None

    def answer(self, query_string: str) -> tuple[HTTPStatus, bytes]:
        """The status and JSON body for ``GET /status?{query_string}``."""
        try:
            query = parse_query(query_string)
        except QueryError as exc:
            body = {"error": str(exc)}
            return HTTPStatus.BAD_REQUEST, json.dumps(body).encode() + b"\n"
        supervisor = self.supervisor
        doc = build_status(
            supervisor.pumps if supervisor is not None else {},
            supervisor.sessions if supervisor is not None else frozenset(),
            self.health,
            query,
            member=self.member,
            now=time.time(),
            reason=None if supervisor is not None else NOT_STARTED,
        )
        return HTTPStatus.OK, json.dumps(doc).encode() + b"\n"
