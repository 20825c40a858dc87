"""``GET /status``: what this bridge follows and where each thread stands, as one JSON document.

Built at request time from the supervisor's pumps and sessions and the readiness checks; it
never calls into a pump. The document is bounded: one page of rows (``limit``, at most
:data:`MAX_LIMIT`), with ``total``, and ``next`` (keyset: the ``after`` of the next page) and
``next_offset`` for the next page. A row is a thread being read, or a followed session with no
thread being read (``thread_id`` null, state ``idle``), sorted by session then thread.

Cost. Pages are cut from an index: every row's key and state at one moment (``listed_at``),
sorted. It is built in slices of :data:`SLICE` rows with the event loop let run between them,
and the requests that follow reuse it for up to :data:`REUSE_FACTOR` times what building it
cost (at most :data:`REUSE_MAX_S`): whatever the request rate, indexes take about a tenth of
the loop, and a page without a ``state`` filter costs about its size. The counts, ``total``
and the filters come from the index; each row's fields are read from its pump as the page is
built (a thread gone since is left out of the page, which keeps its place for paging).

Lag (``lag_s``), from the last event this process read of the thread (its ``processed_at``):

- ``streaming``: that event's delay, the time it was read minus its ``processed_at``. On a live
  stream the API sends what it has, so a quiet thread is not behind: its lag stays what it was;
  an event read before the stream went live (the catch-up) leaves it at 0.
- any other state: now minus its ``processed_at``. The thread is not on a live stream, so newer
  events may be waiting: this is the most it can be behind (a quiet thread shows how long it
  has been quiet).
- null: no event read yet by this process (a thread resumed from its checkpoint that has been
  quiet since), or a ``processed_at`` that is not an RFC 3339 time in UTC's range. Never
  negative (clocks).
"""

from __future__ import annotations

import json
import os
import socket
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel

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
#: Rows looked at between two turns of the event loop.
SLICE = 500
#: An index is reused for this many times the loop's time it took to build, at most
#: REUSE_MAX_S: a bridge of 100,000 threads (0.18 s of CPU an index, in slices under 1 ms but
#: the sort, 9 ms) lists them every 2 s however often it is asked; a small one, for every request.
REUSE_FACTOR = 10
REUSE_MAX_S = 2.0
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
_PARAMS = ("limit", "offset", "after", "session", "state")
#: Between a session id and a thread id in an index key: below every character an id may hold
#: (the supervisor takes ``[A-Za-z0-9_.:-]``), so the keys sort as (session, thread) pairs.
_SEP = "\0"
_AFTER_SEP = "\1"  # just above _SEP: the end of one session's keys

T = TypeVar("T")


class QueryError(ValueError):
    """A query string ``/status`` does not accept; the message says what it accepts."""


@dataclass(frozen=True, slots=True)
class StatusQuery:
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    #: Empty: every session (every state).
    sessions: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    #: ``SESSION_ID/THREAD_ID`` (the thread empty for a session row): the page starts after it.
    after: str | None = None


def parse_query(text: str) -> StatusQuery:
    """``limit=&offset=&after=&session=&state=``; ``session`` and ``state`` repeat or take a
    comma list. Raises :class:`QueryError` for anything else."""
    values: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise QueryError(f"cannot parse the query string {text[:80]!r}") from None
    for name, value in pairs:
        if name not in _PARAMS:
            raise QueryError(f"unknown parameter {name[:40]!r}; accepted: {', '.join(_PARAMS)}")
        given = [value] if name == "after" else [v for v in value.split(",") if v]
        values.setdefault(name, []).extend(given)
    limit = _number(values, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _number(values, "offset", 0, None)
    after = _after(values.get("after"))
    if after is not None and offset:
        raise QueryError("after and offset: give one of them (after: a page's next)")
    states = frozenset(values.get("state", ()))
    if unknown := sorted(states - set(STATES)):
        raise QueryError(f"unknown state {unknown[0][:40]!r}; accepted: {', '.join(STATES)}")
    return StatusQuery(limit, offset, frozenset(values.get("session", ())), states, after)


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


def _after(given: list[str] | None) -> str | None:
    if given is None:
        return None
    if len(given) > 1:
        raise QueryError("after: give it once")
    session_id, sep, _ = given[0].partition("/")
    if not sep or not session_id:
        raise QueryError(
            f"after: expected SESSION_ID/THREAD_ID (a page's next), got {given[0][:80]!r}"
        )
    return given[0]


def member_id() -> str:
    """This process among the bridge's members: the host (the pod's name) and the pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def lag_s(
    state: str,
    processed_at: str | None,
    read_at: float | None,
    now: float,
    live_since: float | None = None,
) -> float | None:
    """How far behind the thread is, in seconds (the module's docstring says what it means)."""
    if state == "streaming" and live_since is not None and (read_at or 0.0) <= live_since:
        return 0.0  # caught up when the stream went live, nothing newer since
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
        if parsed.tzinfo is None:
            return None  # a time without its zone says nothing about how long ago it was
        return parsed.astimezone(UTC).timestamp()
    except (ValueError, OverflowError):  # not a time, or out of UTC's years (0001-01-01+01:00)
        return None


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _state(pump: Pump) -> str:
    state = pump.state.value if pump.state is not None else "connecting"
    if not pump.following and state in _FINAL_PASS:
        return "draining"
    return state


def _thread_row(pump: Pump, state: str, now: float) -> dict[str, Any]:
    ref = pump.thread
    return {
        "session_id": ref.session_id,
        "thread_id": ref.thread_id,
        "state": state,
        "following": pump.following,
        "last_event_id": pump.cursor.submitted_id,
        "committed_event_id": pump.cursor.committed_id,
        "last_event_processed_at": pump.last_event_time,
        "last_event_read_at": _iso(pump.last_event_read_at),
        "lag_s": lag_s(state, pump.last_event_time, pump.last_event_read_at, now, pump.live_since),
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


# -- the index, the page, the rows: generators that yield where the event loop may run -------

Steps = Generator[None, None, T]


@dataclass(slots=True)
class _Index:
    """Every row at one moment: ``keys`` sorted (``session\\0thread``, the thread empty for a
    session row), each key's state, the counts."""

    keys: list[str]
    state_of: dict[str, str]
    counts: dict[str, int]
    sessions_followed: int
    threads_followed: int
    listed_at: float
    #: Monotonic time until which requests may use it instead of listing again.
    fresh_until: float = float("-inf")
    source: object = None

    def spans(self, sessions: frozenset[str]) -> list[tuple[int, int]]:
        """Where the rows of these sessions are in ``keys`` (all of them when empty)."""
        if not sessions:
            return [(0, len(self.keys))]
        spans = []
        for session_id in sorted(sessions):
            start = bisect_left(self.keys, session_id + _SEP)
            end = bisect_left(self.keys, session_id + _AFTER_SEP, start)
            if start < end:
                spans.append((start, end))
        return spans


@dataclass(frozen=True, slots=True)
class _Page:
    positions: list[int]  # in the index
    before: int  # rows matching the filters before this page
    total: int  # rows matching the filters

    @property
    def more(self) -> bool:
        return bool(self.positions) and self.before + len(self.positions) < self.total


def _index_steps(
    pumps: Mapping[ThreadRef, Pump], sessions: Set[str], listed_at: float
) -> Steps[_Index]:
    refs = list(pumps)  # the pumps may come and go meanwhile: a pump gone is not listed
    followed = list(sessions)
    state_of: dict[str, str] = {}
    with_threads: set[str] = set()
    for done, ref in enumerate(refs, 1):
        pump = pumps.get(ref)
        if pump is not None:
            state_of[ref.session_id + _SEP + ref.thread_id] = _state(pump)
            with_threads.add(ref.session_id)
        if done % SLICE == 0:
            yield
    threads = len(state_of)
    for session_id in followed:
        if session_id not in with_threads:
            state_of[session_id + _SEP] = "idle"
    yield
    keys = sorted(state_of)
    by_state = Counter(state_of.values())
    counts = {name: by_state[name] for name in STATES if by_state[name]}
    followed_count = len(with_threads.union(followed))
    return _Index(keys, state_of, counts, followed_count, threads, listed_at)


def _page_steps(index: _Index, query: StatusQuery) -> Steps[_Page]:
    spans = index.spans(query.sessions)
    keys = index.keys
    after = _index_key(query.after) if query.after is not None else None
    if not query.states:  # every row of the spans matches: positions by arithmetic
        total = sum(end - start for start, end in spans)
        if after is None:
            before = min(query.offset, total)
        else:
            before = sum(bisect_right(keys, after, start, end) - start for start, end in spans)
        positions: list[int] = []
        skip = before
        for start, end in spans:
            if len(positions) >= query.limit:
                break
            first = start + skip
            skip = max(0, skip - (end - start))
            last = min(end, first + query.limit - len(positions))
            positions.extend(range(first, last))
        return _Page(positions, before, total)
    # A state filter: every row of the spans is looked at.
    total = before = looked = 0
    positions = []
    for start, end in spans:
        for position in range(start, end):
            looked += 1
            if looked % SLICE == 0:
                yield
            key = keys[position]
            if index.state_of[key] not in query.states:
                continue
            total += 1
            if (total <= query.offset) if after is None else (key <= after):
                before += 1
            elif len(positions) < query.limit:
                positions.append(position)
    return _Page(positions, before, total)


def _rows_steps(
    index: _Index,
    page: _Page,
    pumps: Mapping[ThreadRef, Pump],
    sessions: Callable[[], Set[str]],
    now: float,
) -> Steps[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    followed: Set[str] | None = None
    for done, position in enumerate(page.positions, 1):
        session_id, _, thread_id = index.keys[position].partition(_SEP)
        if thread_id:
            pump = pumps.get(ThreadRef(session_id, thread_id))
            if pump is not None:
                rows.append(_thread_row(pump, _state(pump), now))
        else:
            followed = sessions() if followed is None else followed
            if session_id in followed:
                rows.append(_session_row(session_id))
        if done % SLICE == 0:
            yield
    return rows


def _index_key(cursor: str) -> str:
    session_id, _, thread_id = cursor.partition("/")
    return session_id + _SEP + thread_id


def _cursor(key: str) -> str:
    session_id, _, thread_id = key.partition(_SEP)
    return f"{session_id}/{thread_id}"


def _document(
    index: _Index,
    page: _Page,
    rows: list[dict[str, Any]],
    query: StatusQuery,
    health: HealthState,
    *,
    member: str,
    now: float,
    reason: str | None,
    group: str | None = None,
    shards: list[int] | None = None,
) -> dict[str, Any]:
    failing = health.failing_checks()
    end = page.before + len(page.positions)
    return {
        "version": STATUS_VERSION,
        "bridge_version": __version__,
        "generated_at": _iso(now),
        "listed_at": _iso(index.listed_at),
        "member": {"id": member, "group": group, "shards": shards},
        "ready": not failing,
        "failing": failing,
        "reason": reason,
        "sessions_followed": index.sessions_followed,
        "threads_followed": index.threads_followed,
        "states": dict(index.counts),
        "filters": {"session": sorted(query.sessions), "state": sorted(query.states)},
        "total": page.total,
        "offset": query.offset if query.after is None else page.before,
        "limit": query.limit,
        "after": query.after,
        "next_offset": end if page.more else None,
        "next": _cursor(index.keys[page.positions[-1]]) if page.more else None,
        "threads": rows,  # last: StatusView.answer encodes the rows apart
    }


def _run(steps: Steps[T]) -> T:
    """All the steps at once (a caller that is not on the event loop, or does not mind)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return] # StopIteration's value is Any


async def _run_sliced(steps: Steps[T]) -> tuple[T, float]:
    """The steps with the event loop let run between them; also the time spent in them."""
    spent = 0.0
    while True:
        started = time.perf_counter()
        try:
            next(steps)
        except StopIteration as done:
            return done.value, spent + time.perf_counter() - started
        spent += time.perf_counter() - started
        await anyio.lowlevel.checkpoint()


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
    """The ``/status`` document in one pass (``now``: wall-clock seconds, as ``time.time()``);
    :meth:`StatusView.answer` builds the same with the event loop running between slices."""
    query = query or StatusQuery()
    index = _run(_index_steps(pumps, sessions, now))
    page = _run(_page_steps(index, query))
    rows = _run(_rows_steps(index, page, pumps, lambda: sessions, now))
    return _document(index, page, rows, query, health, member=member, now=now, reason=reason)


class StatusView:
    """What the HTTP server asks for ``/status``. The supervisor is set once it exists: the
    server starts first, so until then the answer has no rows and says why."""

    def __init__(
        self, health: HealthState, member: str | None = None, group: str | None = None
    ) -> None:
        self.health = health
        self.member = member or member_id()
        #: The Kafka consumer group this bridge is a member of (BRIDGE_GROUP_ID).
        self.group = group
        self.supervisor: Supervisor | None = None
        #: The shards this member owns now (set by the bridge once it is a member).
        self.shards: Callable[[], list[int]] | None = None
        self._index: _Index | None = None
        self._listing: anyio.Lock | None = None  # made on the event loop, at the first request

    async def answer(self, query_string: str) -> tuple[HTTPStatus, bytes]:
        """The status and JSON body for ``GET /status?{query_string}``."""
        try:
            query = parse_query(query_string)
        except QueryError as exc:
            body = {"error": str(exc)}
            return HTTPStatus.BAD_REQUEST, json.dumps(body).encode() + b"\n"
        supervisor = self.supervisor
        index = await self._current_index(supervisor)
        pumps: Mapping[ThreadRef, Pump] = supervisor.pumps if supervisor is not None else {}
        now = time.time()
        page, _ = await _run_sliced(_page_steps(index, query))

        def sessions() -> Set[str]:
            return supervisor.sessions if supervisor is not None else frozenset()

        rows, _ = await _run_sliced(_rows_steps(index, page, pumps, sessions, now))
        reason = None if supervisor is not None else NOT_STARTED
        doc = _document(
            index,
            page,
            rows,
            query,
            self.health,
            member=self.member,
            now=now,
            reason=reason,
            group=self.group,
            shards=self.shards() if self.shards is not None else None,
        )
        return HTTPStatus.OK, await _encode(doc)

    async def _current_index(self, supervisor: Supervisor | None) -> _Index:
        if self._listing is None:
            self._listing = anyio.Lock()
        async with self._listing:  # one listing at a time; the requests waiting share it
            index = self._index
            if (
                index is not None
                and index.source is supervisor
                and time.monotonic() <= index.fresh_until
            ):
                return index
            pumps: Mapping[ThreadRef, Pump] = {}
            sessions: Set[str] = frozenset()
            if supervisor is not None:
                pumps, sessions = supervisor.pumps, supervisor.sessions
            fresh, spent = await _run_sliced(_index_steps(pumps, sessions, time.time()))
            fresh.source = supervisor
            fresh.fresh_until = time.monotonic() + min(REUSE_MAX_S, REUSE_FACTOR * spent)
            self._index = fresh
            return fresh


async def _encode(doc: dict[str, Any]) -> bytes:
    """``json.dumps(doc)``, its rows a slice at a time."""
    rows = doc["threads"]
    head = json.dumps({name: value for name, value in doc.items() if name != "threads"})
    parts: list[str] = []
    for start in range(0, len(rows), SLICE):
        if start:
            await anyio.lowlevel.checkpoint()
        parts.extend(json.dumps(row) for row in rows[start : start + SLICE])
    return (head[:-1] + ', "threads": [' + ", ".join(parts) + "]}\n").encode()
