"""The Qoder API, as the bridge reads it: sessions, threads, thread events (pages and SSE).

httpx and httpx-sse errors become ours here (``bridge.errors``); nothing above this module sees
a third-party exception. Every request goes through one rate limiter so that a reconnect storm
after an outage is spread out instead of fired at once.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from bridge import metrics
from bridge.errors import (
    ApiError,
    ApiRequestRejected,
    ApiUnavailable,
    AuthRejected,
    BadCursor,
    NotFound,
    StreamStalled,
)
from bridge.records import Event, ThreadRef, canonical_json

PAGE_LIMIT = 100
_CURSOR_PARAMS = ("after_id", "before_id", "page")


class RateLimiter:
    """Token bucket shared by every request: at most ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self._interval = 1.0 / rate
        self._burst = burst if burst is not None else max(1, math.ceil(rate))
        self._next = 0.0
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = anyio.current_time()
            # Allow up to `burst` requests of credit, never more.
            self._next = max(self._next, now - self._burst * self._interval)
            wait = self._next - now
            self._next += self._interval
        if wait > 0:
            await anyio.sleep(wait)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_page: str | None
    has_more: bool


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def event_from_item(item: dict[str, Any]) -> Event:
    """An event from a JSON page; re-serialised canonically (the API's compact form)."""
    return Event(
        id=str(item.get("id", "")),
        type=str(item.get("type", "")),
        data=canonical_json(item),
        fields=item,
    )


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        request_id = body.get("request_id") if isinstance(body, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        message, request_id = None, None
    text = f"HTTP {response.status_code} {message or response.reason_phrase}"
    return f"{text} (request_id {request_id})" if request_id else text


def _raise_for_status(response: httpx.Response, *, had_cursor: bool) -> None:
    status = response.status_code
    if status < 400:
        return
    message = f"{response.request.method} {response.request.url.path}: {_error_message(response)}"
    if status in (401, 403):
        raise AuthRejected(message, status=status)
    if status == 404:
        raise NotFound(message, status=status)
    if status == 400 and had_cursor:
        raise BadCursor(message, status=status)
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise ApiUnavailable(message, status=status, retry_after_s=retry_after)
    raise ApiRequestRejected(message, status=status)


StreamRoute = Literal["events", "stream"]


class QoderApi:
    """A thin, typed view of the API over one shared ``httpx.AsyncClient``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        stream_clients: Sequence[httpx.AsyncClient],
        base_url: str,
        token: Callable[[], str],
        limiter: RateLimiter,
        *,
        stall_timeout_s: float,
        request_timeout_s: float,
    ) -> None:
        self._client = client
        # httpcore scans its whole pool on every request: thousands of streams in one pool
        # make every request slow. Streams are spread over small pools by a stable hash.
        self._stream_clients = stream_clients
        self._base = base_url.rstrip("/")
        self._token = token
        self._limiter = limiter
        self._stall_timeout_s = stall_timeout_s
        self._request_timeout_s = request_timeout_s
        #: Which thread-stream route this server serves; learnt on first use.
        self.stream_route: StreamRoute = "events"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if extra:
            headers.update(extra)
        return headers

    async def _get(self, route: str, path: str, params: Mapping[str, Any] | None = None) -> Any:
        await self._limiter.acquire()
        had_cursor = bool(params) and any(params.get(p) for p in _CURSOR_PARAMS)  # type: ignore[union-attr]
        try:
            response = await self._client.get(
                self._base + path,
                params=params,
                headers=self._headers(),
                timeout=self._request_timeout_s,
            )
        except httpx.HTTPError as exc:
            metrics.API_REQUESTS.labels(route=route, status="error").inc()
            raise ApiUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        metrics.API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
        _raise_for_status(response, had_cursor=had_cursor)
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiUnavailable(f"GET {path}: the response is not JSON") from exc

    async def _pages(
        self, route: str, path: str, params: dict[str, Any]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Follow ``next_page`` while ``has_more``; a cursor that does not advance is an error."""
        params = {"limit": PAGE_LIMIT, **params}
        seen: set[str] = set()
        while True:
            page = self._page(await self._get(route, path, params))
            yield page.items
            if not page.has_more or not page.next_page:
                return
            if page.next_page in seen:
                raise ApiRequestRejected(f"GET {path}: next_page {page.next_page!r} repeats")
            seen.add(page.next_page)
            params = {"limit": PAGE_LIMIT, "page": page.next_page}

    @staticmethod
    def _page(body: Any) -> Page:
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ApiUnavailable("a list response without a `data` array")
        next_page = body.get("next_page")
        has_more = body.get("has_more")
        # Some generations omit has_more; a next_page alone then means "more".
        more = bool(next_page) if has_more is None else bool(has_more)
        return Page(body["data"], next_page if isinstance(next_page, str) else None, more)

    async def list_sessions(self) -> list[dict[str, Any]]:
        return [s async for page in self._pages("sessions", "/sessions", {}) for s in page]

    async def get_session(self, session_id: str) -> dict[str, Any]:
        body = await self._get("session", f"/sessions/{session_id}")
        return body if isinstance(body, dict) else {}

    async def list_threads(self, session_id: str) -> list[dict[str, Any]]:
        path = f"/sessions/{session_id}/threads"
        return [t async for page in self._pages("threads", path, {}) for t in page]

    async def get_thread(self, thread: ThreadRef) -> dict[str, Any]:
        path = f"/sessions/{thread.session_id}/threads/{thread.thread_id}"
        body = await self._get("thread", path)
        return body if isinstance(body, dict) else {}

    def thread_events(self, thread: ThreadRef, after_id: str | None) -> AsyncIterator[list[Event]]:
        """Pages of the thread's buffered events strictly after ``after_id`` (all if None)."""
        path = f"/sessions/{thread.session_id}/threads/{thread.thread_id}/events"
        params = {"after_id": after_id} if after_id else {}
        return self._event_pages(path, params)

    async def _event_pages(self, path: str, params: dict[str, Any]) -> AsyncIterator[list[Event]]:
        async for items in self._pages("events", path, params):
            yield [event_from_item(i) for i in items if isinstance(i, dict)]

    async def latest_session_event_id(self, session_id: str) -> str | None:
        body = await self._get(
            "session_events", f"/sessions/{session_id}/events", {"order": "desc", "limit": 1}
        )
        page = self._page(body)
        return str(page.items[0].get("id")) if page.items else None

    def _stream_path(self, thread: ThreadRef) -> str:
        base = f"/sessions/{thread.session_id}/threads/{thread.thread_id}"
        return base + ("/events" if self.stream_route == "events" else "/stream")

    @asynccontextmanager
    async def stream_thread(
        self, thread: ThreadRef, after_id: str | None
    ) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
        """The thread's SSE frames, resuming strictly after ``after_id``.

        Tries the events route with ``Accept: text/event-stream`` first; a server that answers it
        with JSON, or with 404 for a thread that exists, serves the ``/stream`` route instead.
        """
        async with AsyncExitStack() as stack:
            for _ in range(2):
                try:
                    path = self._stream_path(thread)
                    frames = await stack.enter_async_context(self._sse("stream", path, after_id))
                    break
                except _WrongRoute:
                    pass
                except NotFound:
                    await self.get_thread(thread)  # raises NotFound if the thread is really gone
                self.stream_route = "stream" if self.stream_route == "events" else "events"
            else:
                raise ApiUnavailable(f"no stream route for {thread.key} answers with SSE")
            yield frames

    @asynccontextmanager
    async def stream_session(
        self, session_id: str, after_id: str | None
    ) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
        async with self._sse(
            "session_events", f"/sessions/{session_id}/events/stream", after_id
        ) as f:
            yield f

    @asynccontextmanager
    async def _sse(
        self, route: str, path: str, after_id: str | None
    ) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
        await self._limiter.acquire()
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        params: dict[str, str] = {}
        if after_id:
            extra["Last-Event-ID"] = after_id
            params["after_id"] = after_id
        # No bytes at all (not even a heartbeat) for stall_timeout_s is a stalled stream.
        timeout = httpx.Timeout(self._request_timeout_s, read=self._stall_timeout_s)
        try:
            shard = zlib.crc32(path.encode()) % len(self._stream_clients)
            async with aconnect_sse(
                self._stream_clients[shard],
                "GET",
                self._base + path,
                params=params,
                headers=self._headers(extra),
                timeout=timeout,
            ) as source:
                response = source.response
                metrics.API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response, had_cursor=after_id is not None)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    raise _WrongRoute(path)
                yield _translated(source.aiter_sse(), path)
        except httpx.ReadTimeout as exc:
            raise StreamStalled(f"GET {path}: no bytes for {self._stall_timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            metrics.API_REQUESTS.labels(route=route, status="error").inc()
            raise ApiUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc


class _WrongRoute(ApiError):
    """This route answered, but not with an event stream."""


async def _translated(
    frames: AsyncIterator[ServerSentEvent], path: str
) -> AsyncIterator[ServerSentEvent]:
    # No cancel scope or task group here: this generator only re-raises errors as ours.
    try:
        async for frame in frames:
            yield frame
    except httpx.ReadTimeout as exc:
        raise StreamStalled(f"GET {path}: stream stalled") from exc
    except httpx.HTTPError as exc:
        raise ApiUnavailable(f"GET {path}: stream broke: {type(exc).__name__}: {exc}") from exc
