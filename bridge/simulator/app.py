"""The raw ASGI app: routing, bearer auth, gateway faults, JSON pages and stream opening.

Order of checks, as a gateway in front of the API would apply them: outage, injected 429/5xx
or reset, authentication, then the resource (404), then the parameters (400).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio

from bridge.simulator.faults import FaultPlanner, StreamPlan
from bridge.simulator.pages import (
    HttpError,
    Query,
    bad_request,
    envelope,
    first,
    many,
    parse_page_query,
    select,
)
from bridge.simulator.sse import HEARTBEATS, Outcome, Receive, Send, StreamConn, cut, write_stream
from bridge.simulator.state import EventLog, SessionState, ThreadState, World, canonical

BASE = "/api/v1/cloud"


@dataclass(eq=False)
class Connection:
    """One stream connection, as recorded for tests: what was asked, planned and served."""

    route: str
    session_id: str
    thread_id: str | None
    cursor: str | None
    plan: str
    ids: list[str]
    outcome: str = "open"
    cut: str | None = None  # set from outside: "abort" (outage, revoked token) or "end"
    client: str = ""  # who opened it: a digest of its bearer token
    scope: anyio.CancelScope | None = field(default=None, repr=False)


class _Reset(Exception):
    """Answer with a TCP reset, no HTTP response at all."""


class App:
    def __init__(self, world: World, token: str | None) -> None:
        self.world = world
        self.scenario = world.scenario
        self.token = token
        self.planner = FaultPlanner(self.scenario.seed, self.scenario.faults)
        self.outage_status: int | None = None
        self.outage_until: float | None = None
        self.connections: list[Connection] = []
        self.served: dict[tuple[str, str], list[list[str]]] = {}
        self.open: set[Connection] = set()
        self.cap_refusals: list[tuple[str, str]] = []  # (client, path): over connection_cap

    def cut_streams(self, how: str = "abort") -> None:
        for conn in list(self.open):
            conn.cut = how
            if conn.scope is not None:
                conn.scope.cancel()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers: dict[bytes, bytes] = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or str(uuid.uuid4())
        try:
            await self._handle(scope, headers, receive, send, request_id)
        except HttpError as exc:
            await _respond(send, exc.status, exc.body(request_id), request_id, exc.headers)
        except _Reset:
            await cut(send, receive, reset=True)

    async def _handle(
        self,
        scope: MutableMapping[str, Any],
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        request_id: str,
    ) -> None:
        self._check_outage()
        path: str = scope["path"]
        parts = path[len(BASE) :].strip("/").split("/") if path.startswith(BASE + "/") else []
        session = (
            self.world.session(parts[1]) if len(parts) > 1 and parts[0] == "sessions" else None
        )
        thread = session.thread(parts[3]) if session and len(parts) > 3 else None
        route = _route(parts)
        wants_sse = b"text/event-stream" in headers.get(b"accept", b"")
        streaming = route in ("session_stream", "thread_stream") or (
            wants_sse and route in ("session_events", "thread_events")
        )
        # Faults are keyed by what is asked for, in terms stable across runs (ordinals, not ids).
        target = thread.key if thread else (str(session.ordinal) if session else path)
        key = f"{'stream' if streaming else route}:{target}"
        strict = self.scenario.stream_query == "strict"
        resuming = _cursor(headers, scope, strict=strict) is not None
        plan = self.planner.stream(key, resuming=resuming) if streaming else None
        self._fail(plan.error if plan else self.planner.request(key))
        if plan is not None:
            self._cap(_client(headers), path)
        if headers.get(b"authorization", b"") != f"Bearer {self.token}".encode() or not self.token:
            raise HttpError(401, "authentication_error", "Invalid API key or token.")
        if route is None:
            raise HttpError(404, "not_found_error", f"No route for {path}.")
        if scope["method"] != "GET":
            raise HttpError(405, "invalid_request_error", f"{scope['method']} is not allowed.")
        query: Query = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if route == "sessions":
            return await _respond(send, 200, self._list_sessions(query), request_id)
        if session is None:
            raise HttpError(404, "not_found_error", f"Session '{parts[1]}' was not found.")
        if route in ("thread", "thread_events", "thread_stream") and thread is None:
            raise HttpError(404, "not_found_error", f"Session thread '{parts[3]}' was not found.")
        if plan is not None:
            if (route == "thread_stream" and self.scenario.thread_stream_routes == "events") or (
                route == "thread_events" and self.scenario.thread_stream_routes == "stream"
            ):
                raise HttpError(404, "not_found_error", f"No stream route at {path}.")
            if strict and query:
                name = next(iter(query))
                message = f"Query parameter '{name}' is not supported on event streams."
                raise HttpError(400, "invalid_request", message, param=name, code="invalid_request")
            return await self._stream(scope, headers, receive, send, route, session, thread, plan)
        if route == "session":
            body = canonical(session.to_json())
        elif route == "session_events":
            body = _list_events(session.log, query, self.scenario.pagination)
        elif route == "threads":
            body = self._list_threads(session, query)
        elif thread is None:  # unreachable: thread routes were checked above
            raise HttpError(404, "not_found_error", f"No route for {path}.")
        elif route == "thread":
            body = canonical(thread.to_json())
        else:
            body = _list_events(thread.log, query, self.scenario.pagination)
        await _respond(send, 200, body, request_id)

    def _check_outage(self) -> None:
        if self.outage_status is None:
            return
        if self.outage_until is not None and time.monotonic() >= self.outage_until:
            self.outage_status = self.outage_until = None
            return
        self._fail("reset" if self.outage_status == 0 else str(self.outage_status))

    def _fail(self, error: str | None) -> None:
        """Raises what a gateway would answer: 429 + Retry-After, 5xx api_error, a reset."""
        if error is None:
            return
        if error == "reset":
            raise _Reset
        if error == "429":
            retry = [(b"retry-after", str(self.scenario.faults.retry_after_s).encode())]
            raise HttpError(429, "rate_limit_error", "Too many requests.", headers=retry)
        raise HttpError(int(error), "api_error", "Service temporarily unavailable.")

    def _cap(self, client: str, path: str) -> None:
        """The gateway's per-client cap on open streams (JSON requests are not capped)."""
        cap = self.scenario.connection_cap
        if cap is None or sum(conn.client == client for conn in self.open) < cap:
            return
        self.cap_refusals.append((client, path))
        self._fail(self.scenario.connection_cap_answer)

    def _list_sessions(self, query: Query) -> bytes:
        pagination = self.scenario.pagination
        q = parse_page_query(query, default_order="desc", pagination=pagination)
        archived = (query.get("include_archived") or ["false"])[0].lower() in ("true", "1")
        statuses = many(query, "statuses", "statuses[]")
        sessions = self.world.sessions

        def match(i: int) -> bool:
            s = sessions[i]
            ok = archived or s.archived_at is None
            return ok and (not statuses or s.status in statuses)

        page = select(len(sessions), lambda i: sessions[i].id, self.world.session_index, q, match)
        items = [canonical(sessions[i].to_json()) for i in page.picked]
        return envelope(items, page, pagination)

    def _list_threads(self, session: SessionState, query: Query) -> bytes:
        pagination = self.scenario.pagination
        q = parse_page_query(query, pagination=pagination)
        threads = session.threads
        statuses = many(query, "statuses[]", "statuses")
        honour = statuses and self.scenario.honour_thread_statuses
        match = (lambda i: threads[i].status in statuses) if honour else None
        page = select(len(threads), lambda i: threads[i].id, session.thread_index, q, match)
        items = [canonical(threads[i].to_json()) for i in page.picked]
        return envelope(items, page, pagination)

    async def _stream(
        self,
        scope: MutableMapping[str, Any],
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        route: str,
        session: SessionState,
        thread: ThreadState | None,
        plan: StreamPlan,
    ) -> None:
        log: EventLog = thread.log if thread else session.log
        cursor = _cursor(headers, scope, strict=self.scenario.stream_query == "strict")
        if cursor is None:
            pos = 0 if self.scenario.fresh_stream == "replay" else len(log)
        elif (at := log.index.get(cursor)) is None:
            where = f"thread '{thread.id}'" if thread else f"session '{session.id}'"
            param = "Last-Event-ID" if headers.get(b"last-event-id") else "after_id"
            raise bad_request(f"Event '{cursor}' is not an event of {where}.", param)
        else:
            pos = log.back(at, plan.replay) if plan.replay else at + 1
        scenario = self.scenario
        target: ThreadState | SessionState = thread if thread else session
        conn = StreamConn(
            log=log,
            pos=pos,
            live_from=len(log),
            plan=plan,
            heartbeat=HEARTBEATS[scenario.heartbeat],
            heartbeat_s=scenario.heartbeat_interval_s,
            deltas=scenario.deltas,
            is_final=(lambda: target.final) if scenario.close_on_terminal else None,
        )
        record = Connection(
            route, session.id, thread.id if thread else None, cursor, plan.describe(), conn.served
        )
        record.client = _client(headers)
        self.connections.append(record)
        if thread:
            self.served.setdefault((session.id, thread.id), []).append(conn.served)
        start = [(b"content-type", b"text/event-stream; charset=utf-8")]
        start += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        outcome: Outcome | None = None
        gone = False
        self.open.add(record)
        self.world.wake()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": start})
            async with anyio.create_task_group() as tg:
                record.scope = tg.cancel_scope
                if record.cut:  # cut while the headers were being written
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                outcome = await write_stream(send, conn)
                tg.cancel_scope.cancel()
        finally:
            self.open.discard(record)
            self.world.wake()
        record.outcome = "client closed" if gone else (outcome or f"cut ({record.cut})")
        if gone:
            return
        if outcome == "end" or record.cut == "end":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await cut(send, receive)


def _route(parts: list[str]) -> str | None:
    n = len(parts)
    if n == 0 or parts[0] != "sessions":
        return None
    if n == 1:
        return "sessions"
    if n == 2:
        return "session"
    if parts[2] == "events":
        if n == 3:
            return "session_events"
        return "session_stream" if parts[3:] == ["stream"] else None
    if parts[2] != "threads":
        return None
    if n == 3:
        return "threads"
    if n == 4:
        return "thread"
    return {"events": "thread_events", "stream": "thread_stream"}.get(parts[4]) if n == 5 else None


def _client(headers: dict[bytes, bytes]) -> str:
    """A client as the gateway tells them apart: by bearer token (kept as a digest only)."""
    return hashlib.sha256(headers.get(b"authorization", b"")).hexdigest()[:12]


def _cursor(
    headers: dict[bytes, bytes], scope: MutableMapping[str, Any], *, strict: bool
) -> str | None:
    """Last-Event-ID, else (unless streams refuse every query parameter) ``after_id``."""
    header = headers.get(b"last-event-id", b"").decode("latin-1").strip()
    if header or strict:
        return header or None
    return first(parse_qs(scope["query_string"].decode("latin-1")), "after_id")


def _list_events(log: EventLog, query: Query, pagination: str) -> bytes:
    q = parse_page_query(query, pagination=pagination)
    events = log.events
    types = many(query, "types", "types[]", "type")
    # Malformed items have no type a filter could match.
    match = (lambda i: bool(events[i].id) and events[i].type in types) if types else None
    page = select(len(events), lambda i: events[i].id, log.index, q, match)
    return envelope([events[i].raw for i in page.picked], page, pagination)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    headers: list[tuple[bytes, bytes]] | tuple[()] = (),
) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
