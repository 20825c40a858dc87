"""The Qoder API, as the bridge reads it: sessions, threads, thread events (pages and SSE).

httpx and httpx-sse errors become ours here (``bridge.errors``); nothing above this module sees
a third-party exception. Every request goes through one rate limiter so that a reconnect storm
after an outage is spread out instead of fired at once.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, Literal

import anyio
import httpx
import msgspec
import structlog

from bridge import metrics
from bridge.errors import (
    ApiError,
    ApiRequestRejected,
    ApiUnavailable,
    AuthRejected,
    BadCursor,
    ListCursorStuck,
    NotFound,
    StreamRefused,
    StreamStalled,
)
from bridge.records import Event, Rejected, ThreadRef, canonical_json
from bridge.sse import EXCERPT_BYTES, Frame, FrameDecoder
from bridge.stream_transport import NEW_CONNECTION, Connection, KeptConnectionClosed, body_of

log = structlog.get_logger("bridge.api")

PAGE_LIMIT = 100
_CURSOR_PARAMS = ("after_id", "before_id", "page")
#: Envelope bytes allowed on top of the items of a page.
_ENVELOPE_BYTES = 64 * 1024
_LAST_ID = re.compile(rb'"last_id"\s*:\s*"([^"\\]+)"')
_HAS_MORE = re.compile(rb'"has_more"\s*:\s*(true|false)')
_NEXT_PAGE = re.compile(rb'"next_page"\s*:\s*"([^"\\]+)"')


#: Set by a pump that reads history (a catch-up or a drain's final pass): its requests wait
#: while requests for live threads are waiting, so a cold start serves live threads first.
BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("background", default=False)
#: When both wait, one slot in this many goes to background requests.
BACKGROUND_SHARE = 5


class RateLimiter:
    """Token bucket shared by every request: at most ``rate`` per second, bursts of ``burst``.

    With :meth:`run` going (the composition root starts it), waiters are served by one
    dispatcher, first come first served, requests for live threads before background ones.
    Without it, slots are handed out first come first served, ignoring priority.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self._interval = 1.0 / rate
        self._burst = burst if burst is not None else max(1, math.ceil(rate))
        self._next = 0.0
        self._lock = anyio.Lock()
        self._queues: tuple[deque[anyio.Event], deque[anyio.Event]] = (deque(), deque())
        self._wake = anyio.Event()
        self._dispatching = False
        self._granted = 0

    async def acquire(self) -> None:
        if not self._dispatching:
            await self._reserve()
            return
        granted = anyio.Event()
        queue = self._queues[BACKGROUND.get()]
        queue.append(granted)
        self._wake.set()
        try:
            await granted.wait()
        except BaseException:
            if not granted.is_set():
                queue.remove(granted)
            raise

    async def _reserve(self) -> None:
        async with self._lock:
            wait = self._slot()
        if wait > 0:
            await anyio.sleep(wait)

    def _slot(self) -> float:
        now = anyio.current_time()
        # Allow up to `burst` requests of credit, never more.
        self._next = max(self._next, now - self._burst * self._interval)
        wait = self._next - now
        self._next += self._interval
        return wait

    async def run(self) -> None:
        """Hand out slots to the waiters: live first, then background, each in order."""
        self._dispatching = True
        try:
            while True:
                live, background = self._queues
                if not live and not background:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                wait = self._slot()
                if wait > 0:
                    await anyio.sleep(wait)
                # Live first, but every BACKGROUND_SHARE-th slot goes to history when both
                # wait: a steady live load must not starve drains and catch-ups for good.
                self._granted += 1
                share = background and self._granted % BACKGROUND_SHARE == 0
                queue = live if live and not share else background
                if queue:
                    queue.popleft().set()
        finally:
            self._dispatching = False
            for queue in self._queues:
                while queue:
                    queue.popleft().set()  # nobody will hand these out any more


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    next_page: str | None
    has_more: bool
    last_id: str | None = None


class _RawPage(msgspec.Struct):
    """A list envelope whose items are kept as the bytes the API sent (msgspec.Raw)."""

    data: list[msgspec.Raw]
    next_page: str | None = None
    has_more: bool | None = None
    last_id: str | None = None


_RAW_PAGE = msgspec.json.Decoder(_RawPage)
_ITEM = msgspec.json.Decoder(dict[str, Any])


@dataclass(slots=True)
class RawItem:
    """A list item decoded, with its exact bytes on the page: they pass through unchanged."""

    fields: dict[str, Any]
    data: bytes


def _raw_page(body: bytes) -> Page | None:
    """The fast path for event pages: every item an object with an id, decoded by msgspec with
    its bytes kept. None for anything else (invalid UTF-8, a lone surrogate escape, NaN, an
    item that is no object or has no id, an odd envelope): the page then takes the general
    path, which rejects such items one by one."""
    try:
        raw = _RAW_PAGE.decode(body)
        items = []
        for piece in raw.data:
            fields = _ITEM.decode(piece)
            event_id = fields.get("id")
            if not isinstance(event_id, str) or not event_id:
                return None
            items.append(RawItem(fields, bytes(piece)))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    # Some generations omit has_more; a next_page alone then means "more".
    more = bool(raw.next_page) if raw.has_more is None else raw.has_more
    return Page(items, raw.next_page or None, more, raw.last_id or None)


def _envelope(body: Any) -> Page:
    """A list response's envelope: its items, as decoded, and where the list goes on."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ApiUnavailable("a list response without a `data` array")
    next_page = body.get("next_page")
    has_more = body.get("has_more")
    last_id = body.get("last_id")
    # Some generations omit has_more; a next_page alone then means "more".
    more = bool(next_page) if has_more is None else bool(has_more)
    return Page(
        body["data"],
        next_page if isinstance(next_page, str) and next_page else None,
        more,
        last_id if isinstance(last_id, str) and last_id else None,
    )


#: A JSON token: a string, a bracket, a colon or comma, a literal or number; a lone quote is an
#: unterminated string.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}:,]|[^][{}:,"\s]+|"', re.DOTALL)


def _split_page(body: bytes, path: str) -> Page | None:
    """The careful path for event pages: the ``data`` array cut into its items' bytes by a
    scanner (no decoding, no recursion), each item then decoded alone, so that one item no
    decoder takes (invalid UTF-8, nested past the decoders' depth, a number past a float)
    costs that item only. None if the body is no object with a ``data`` array of values."""
    spans: list[bytes] = []
    depth = 0
    previous: list[bytes] = []  # the last two tokens at depth 1: a key and its colon
    array: tuple[int, int] | None = None
    item_start = -1
    item_end = -1
    in_data = False
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token == b'"':
            return None  # an unterminated string
        if in_data and depth == 2 and token in (b",", b"]"):
            if item_start >= 0:
                spans.append(body[item_start:item_end])
                item_start = -1
            elif token == b"," or spans:
                return None  # an empty item: [,  ,,  ,]
            if token == b"]":
                in_data, depth = False, 1
                array = (array[0] if array else 0, match.end())
            continue
        if in_data:
            if item_start < 0:
                item_start = match.start()
            item_end = match.end()
        if token in (b"{", b"["):
            if depth == 0 and token != b"{":
                return None
            if depth == 1 and token == b"[" and previous == [b'"data"', b":"] and not array:
                in_data, array = True, (match.start(), -1)
            depth += 1
        elif token in (b"}", b"]"):
            depth -= 1
            if depth < 0:
                return None
        elif depth == 1:
            previous = [*previous[-1:], token]
    if depth != 0 or array is None or array[1] < 0:
        return None
    envelope = _envelope(_json(body[: array[0]] + b"[]" + body[array[1] :], path))
    items: list[Any] = [event_from_bytes(span) for span in spans]
    return Page(items, envelope.next_page, envelope.has_more, envelope.last_id)


class _PageTooLarge(Exception):
    """A page past the byte limit: what was seen of it, to salvage one oversize item."""

    def __init__(self, head: bytes, tail: bytes, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.head, self.tail, self.size = head, tail, size


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


def event_from_raw(item: RawItem) -> Event:
    """An event from a JSON page, its bytes as the API sent them."""
    kind = item.fields.get("type")
    return Event(
        id=item.fields["id"],
        type=kind if isinstance(kind, str) else "",
        data=item.data,
        fields=item.fields,
    )


def event_from_item(item: Any) -> Event | Rejected:
    """An event from a JSON page, re-serialised canonically (the API's compact form).

    Pages are decoded with ``surrogateescape``, so bytes that are not UTF-8 come back exactly
    here and the item is rejected alone, not the whole page with it.
    """
    kind = item.get("type") if isinstance(item, dict) else None
    kind = kind if isinstance(kind, str) else None
    event_id = item.get("id") if isinstance(item, dict) else None
    event_id = event_id if isinstance(event_id, str) and event_id else None
    try:
        data = canonical_json(item)
    except UnicodeEncodeError:
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
        raw = text.encode("utf-8", "surrogateescape" if _escapable(text) else "backslashreplace")
        return Rejected("invalid_utf8", raw, event_id, kind, len(raw))
    if not isinstance(item, dict):
        return Rejected("not_object", data, None, None, len(data))
    if event_id is None:
        return Rejected("missing_id", data, None, kind, len(data))
    return Event(id=event_id, type=kind or "", data=data, fields=item)


def event_from_bytes(data: bytes) -> Event | Rejected:
    """An event from one item of a JSON page, its bytes as the API sent them, or why not."""
    try:
        fields = _ITEM.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass  # not for the fast decoder: the general one says what it is
    else:
        event_id = fields.get("id")
        if isinstance(event_id, str) and event_id:
            return event_from_raw(RawItem(fields, data))
    try:
        item = json.loads(data.decode("utf-8", "surrogateescape"))
    except RecursionError:
        # Valid JSON, maybe, but nested deeper than a decoder goes: this item alone.
        return Rejected("too_deep", data, None, None, len(data))
    except ValueError:
        return Rejected("not_json", data, None, None, len(data))
    # The item's own bytes, never json.dumps of what was decoded: 1E400 would come back as
    # Infinity (not JSON), 1.0E-5 as 1e-05.
    kind = item.get("type") if isinstance(item, dict) else None
    kind = kind if isinstance(kind, str) else None
    event_id = item.get("id") if isinstance(item, dict) else None
    event_id = event_id if isinstance(event_id, str) and event_id else None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected("invalid_utf8", data, event_id, kind, len(data))
    if not isinstance(item, dict):
        return Rejected("not_object", data, None, None, len(data))
    if event_id is None:
        return Rejected("missing_id", data, None, kind, len(data))
    return Event(id=event_id, type=kind or "", data=data, fields=item)


def _escapable(text: str) -> bool:
    """Every lone surrogate stands for a byte that was not UTF-8 (not a JSON ``\\ud800``)."""
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in text if 0xD800 <= ord(c) <= 0xDFFF)


def _json(body: bytes, path: str) -> Any:
    try:
        return json.loads(body.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise ApiUnavailable(f"GET {path}: the response is not JSON") from exc
    except RecursionError as exc:
        raise ApiUnavailable(f"GET {path}: the response is nested too deep to read") from exc


async def _read_capped(response: httpx.Response, limit_bytes: int | None) -> bytes:
    """The whole body, or ``_PageTooLarge`` with its first and last bytes past the limit."""
    parts: list[bytes] = []
    size = 0
    head = b""
    tail = b""
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if limit_bytes is None or size <= limit_bytes:
            parts.append(chunk)
            continue
        if not head:
            head = (b"".join(parts) + chunk)[: EXCERPT_BYTES * 2]
            parts = []
        tail = (tail + chunk)[-_ENVELOPE_BYTES:]
    if limit_bytes is not None and size > limit_bytes:
        raise _PageTooLarge(head, tail, size)
    return b"".join(parts)


def _salvage(big: _PageTooLarge) -> Page:
    """A one-item page too large to hold: the list goes on after that item.

    The item's own id comes from the page's first bytes (keys are read by depth, so an id
    deeper in the item, or list-like keys inside it, are never taken for it), and the list
    goes on ``after_id`` it. Only without it do the envelope's own keys say where: at the
    start of the page, or else the last ones of its end.
    """
    item_id, envelope = _scan_head(big.head)
    if item_id is not None:
        return Page([], None, True, item_id)
    if envelope:
        next_page, last_id = envelope.get("next_page"), envelope.get("last_id")
        return Page(
            [],
            next_page if isinstance(next_page, str) else None,
            envelope.get("has_more") is not False,
            last_id if isinstance(last_id, str) else None,
        )
    last = _last_match(_LAST_ID, big.tail)
    more = _last_match(_HAS_MORE, big.tail)
    next_page_match = _last_match(_NEXT_PAGE, big.tail)
    return Page(
        [],
        next_page_match.decode() if next_page_match else None,
        more is None or more == b"true",
        last.decode() if last else None,
    )


def _last_match(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    found = None
    for found_match in pattern.finditer(data):
        found = found_match.group(1)
    return found


def _oversize(big: _PageTooLarge) -> Rejected:
    item_id, _envelope = _scan_head(big.head)
    if item_id is None:
        item_id = _salvage(big).last_id
    start = big.head.find(b"[")
    excerpt = big.head[start + 1 if start >= 0 else 0 :][:EXCERPT_BYTES]
    return Rejected("too_large", excerpt, item_id, None, big.size)


def _scan_head(head: bytes) -> tuple[str | None, dict[str, Any]]:
    """Of a list page's first bytes: the first item's own ``id`` (a key of the object at
    ``data[0]``) and the envelope's scalar keys seen so far. A small tokenizer: strings,
    brackets and the literals true/false, by depth."""
    path: list[int] = []  # the open brackets
    key: str | None = None
    data_depth: int | None = None  # where the "data" array opened
    envelope: dict[str, Any] = {}
    i, n = 0, len(head)
    while i < n:
        c = head[i]
        if c == 0x22:  # a string: a key, or a value
            j = i + 1
            while j < n and head[j] != 0x22:
                j += 2 if head[j] == 0x5C else 1
            if j >= n:
                break
            text = head[i + 1 : j].decode("utf-8", "replace")
            i = j + 1
            while i < n and head[i] in b" \t\r\n":
                i += 1
            if i < n and head[i] == 0x3A and path and path[-1] == 0x7B:
                key, i = text, i + 1
                continue
            if key is not None and len(path) == 1:
                envelope[key] = text
            elif key == "id" and data_depth is not None and len(path) == data_depth + 1:
                return text, envelope
            key = None
            continue
        if c in (0x7B, 0x5B):  # { [
            if c == 0x5B and len(path) == 1 and key == "data":
                data_depth = 2
            path.append(c)
            key = None
        elif c in (0x7D, 0x5D):  # } ]
            if path:
                path.pop()
            if data_depth is not None and len(path) < data_depth:
                data_depth = None
            key = None
        elif c in (0x74, 0x66) and key is not None and len(path) == 1:  # true / false
            envelope[key] = c == 0x74
            key = None
        elif c == 0x2C:  # ,
            key = None
        i += 1
    return None, envelope


def _last_item_id(items: list[Any]) -> str | None:
    for each in reversed(items):
        if isinstance(each, Event | Rejected):
            if each.id:
                return each.id
            continue
        item = each.fields if isinstance(each, RawItem) else each
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
            return str(item["id"])
    return None


def _error_message(response: httpx.Response, cut: str | None = None) -> str:
    if cut is not None:
        return f"HTTP {response.status_code} {response.reason_phrase} (its body was cut: {cut})"
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        request_id = body.get("request_id") if isinstance(body, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        message, request_id = None, None
    text = f"HTTP {response.status_code} {message or response.reason_phrase}"
    return f"{text} (request_id {request_id})" if request_id else text


def _raise_for_status(
    response: httpx.Response, *, had_cursor: bool, cut: str | None = None
) -> None:
    """Raise the error for an answer of 400 or more. ``cut``: why its body could not be read
    (it is not looked at then)."""
    status = response.status_code
    if status < 400:
        return
    where = f"{response.request.method} {response.request.url.path}"
    message = f"{where}: {_error_message(response, cut)}"
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
    """A thin, typed view of the API: JSON requests over ``client``, streams over
    ``stream_client``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        stream_client: httpx.AsyncClient,
        base_url: str,
        token: Callable[[], str],
        limiter: RateLimiter,
        *,
        stall_timeout_s: float,
        request_timeout_s: float,
        max_event_bytes: int = 16 * 1024 * 1024,
        json_in_flight: int = 64,
    ) -> None:
        self._client = client
        # Streams go through a client of their own (the daemon's is on the stream transport:
        # a connection each, no pool).
        self._stream_client = stream_client
        self._base = base_url.rstrip("/")
        self._token = token
        self._limiter = limiter
        self._json_in_flight = anyio.CapacityLimiter(json_in_flight)
        self._stall_timeout_s = stall_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_event_bytes = max_event_bytes
        #: Which thread-stream route this server serves; learnt on first use.
        self.stream_route: StreamRoute = "events"
        #: False once a stream answered a query parameter with 400 (the Forward-style route):
        #: from then on the cursor travels only in ``Last-Event-ID``.
        self.stream_query = True

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if extra:
            headers.update(extra)
        return headers

    async def _get(self, route: str, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return _json(await self._get_bytes(route, path, params, limit_bytes=None), path)

    async def _get_bytes(
        self, route: str, path: str, params: Mapping[str, Any] | None, *, limit_bytes: int | None
    ) -> bytes:
        """The body of a GET; past ``limit_bytes`` only its head and tail are kept."""
        # At most as many JSON requests in flight as the pool has connections: a budget that
        # starts more per second than a slow API answers must not pile them up to time out.
        async with self._json_in_flight:
            return await self._get_bytes_now(route, path, params, limit_bytes=limit_bytes)

    async def _get_bytes_now(
        self, route: str, path: str, params: Mapping[str, Any] | None, *, limit_bytes: int | None
    ) -> bytes:
        try:
            return await self._get_once(route, path, params, limit_bytes)
        except KeptConnectionClosed:
            # Ended as the request left (its idle timeout racing it): once more, on a new
            # connection (a kept one may have gone as that one did).
            return await self._get_once(route, path, params, limit_bytes, new_connection=True)

    async def _get_once(
        self,
        route: str,
        path: str,
        params: Mapping[str, Any] | None,
        limit_bytes: int | None,
        *,
        new_connection: bool = False,
    ) -> bytes:
        """One GET, counted and taken from the budget; the transport's ``KeptConnectionClosed``
        (never on a new connection) goes through, for the caller to send it again."""
        await self._limiter.acquire()
        had_cursor = bool(params) and any(params.get(p) for p in _CURSOR_PARAMS)  # type: ignore[union-attr]
        try:
            async with self._client.stream(
                "GET",
                self._base + path,
                params=params,
                headers=self._headers(),
                timeout=self._request_timeout_s,
                extensions={NEW_CONNECTION: True} if new_connection else None,
            ) as response:
                metrics.API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response, had_cursor=had_cursor)
                return await _read_capped(response, limit_bytes)
        except KeptConnectionClosed:
            metrics.API_REQUESTS.labels(route=route, status="error").inc()
            raise
        except httpx.HTTPError as exc:
            metrics.API_REQUESTS.labels(route=route, status="error").inc()
            raise ApiUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc

    async def _pages(
        self,
        route: str,
        path: str,
        params: dict[str, Any],
        *,
        item_bytes: int | None = None,
        raw_items: bool = False,
    ) -> AsyncIterator[list[Any]]:
        """Every page of a list, following ``next_page``, or ``after_id=<last_id>`` where a
        server has no ``next_page`` (the older generation). A continuation that does not
        advance is an error, never a silent stop.

        ``item_bytes``: pages are read within ``limit x item_bytes``; a larger page is asked
        again with a smaller limit, and a single item past it comes back as a ``_PageTooLarge``
        for the caller to dead-letter. ``raw_items``: items come as ``RawItem`` (their bytes
        kept) where the whole page allows it.
        """
        limit = PAGE_LIMIT
        cursor: dict[str, Any] = {}
        seen: set[str] = set()
        while True:
            # Filters go on every page; a continuation replaces the caller's cursor (page,
            # after_id and before_id are mutually exclusive).
            base = (
                {k: v for k, v in params.items() if k not in _CURSOR_PARAMS} if cursor else params
            )
            request = {**base, "limit": limit, **cursor}
            cap = None if item_bytes is None else limit * item_bytes + _ENVELOPE_BYTES
            try:
                body = await self._get_bytes(route, path, request, limit_bytes=cap)
            except _PageTooLarge as big:
                if limit > 1:
                    limit = max(1, limit // 4)
                    continue
                yield [big]
                page = _salvage(big)
            else:
                fast = (_raw_page(body) or _split_page(body, path)) if raw_items else None
                page = fast or self._page(_json(body, path))
                limit = PAGE_LIMIT
                yield page.items
            if not page.has_more:
                return
            if page.next_page:
                token, cursor = "page:" + page.next_page, {"page": page.next_page}
            elif page.last_id or _last_item_id(page.items):
                last = page.last_id or _last_item_id(page.items)
                token, cursor = "after_id:" + str(last), {"after_id": last}
            else:
                raise ListCursorStuck(f"GET {path}: has_more without next_page or last_id")
            if token in seen:
                raise ListCursorStuck(f"GET {path}: the list cursor does not advance ({token})")
            seen.add(token)

    @staticmethod
    def _page(body: Any) -> Page:
        return _envelope(body)

    async def list_sessions(
        self, *, include_archived: bool = True, statuses: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Every session (archived ones too by default: one may have run since we last
        looked), or only those in ``statuses``."""
        params: dict[str, Any] = {"include_archived": "true"} if include_archived else {}
        if statuses:
            params["statuses"] = list(statuses)
        pages = self._pages("sessions", "/sessions", params)
        return [s async for page in pages for s in page if isinstance(s, dict)]

    async def get_session(self, session_id: str) -> dict[str, Any]:
        body = await self._get("session", f"/sessions/{session_id}")
        return body if isinstance(body, dict) else {}

    async def list_threads(self, session_id: str) -> list[dict[str, Any]]:
        path = f"/sessions/{session_id}/threads"
        return [
            t
            async for page in self._pages("threads", path, {})
            for t in page
            if isinstance(t, dict)
        ]

    async def get_thread(self, thread: ThreadRef) -> dict[str, Any]:
        path = f"/sessions/{thread.session_id}/threads/{thread.thread_id}"
        body = await self._get("thread", path)
        return body if isinstance(body, dict) else {}

    def thread_events(
        self, thread: ThreadRef, after_id: str | None
    ) -> AsyncIterator[list[Event | Rejected]]:
        """Pages of the thread's buffered events strictly after ``after_id`` (all if None)."""
        path = f"/sessions/{thread.session_id}/threads/{thread.thread_id}/events"
        params = {"after_id": after_id} if after_id else {}
        return self._event_pages(path, params)

    async def _event_pages(
        self, path: str, params: dict[str, Any]
    ) -> AsyncIterator[list[Event | Rejected]]:
        pages = self._pages(
            "events", path, params, item_bytes=self._max_event_bytes, raw_items=True
        )
        async for items in pages:
            yield [self._event(i) for i in items]

    def _event(self, item: Any) -> Event | Rejected:
        if isinstance(item, _PageTooLarge):
            return _oversize(item)
        if isinstance(item, RawItem):
            event: Event | Rejected = event_from_raw(item)
        elif isinstance(item, Event | Rejected):
            event = item  # from _split_page
        else:
            event = event_from_item(item)
        if isinstance(event, Event) and len(event.data) > self._max_event_bytes:
            # The page fitted, this item does not: the same rule as for a stream frame.
            size = len(event.data)
            return Rejected("too_large", event.data[:EXCERPT_BYTES], event.id, event.type, size)
        return event

    def _stream_path(self, thread: ThreadRef, route: StreamRoute) -> str:
        base = f"/sessions/{thread.session_id}/threads/{thread.thread_id}"
        return base + ("/events" if route == "events" else "/stream")

    def stream_thread(
        self, thread: ThreadRef, after_id: str | None
    ) -> AbstractAsyncContextManager[AsyncIterator[Frame]]:
        """The thread's SSE frames, resuming strictly after ``after_id``.

        Tries the events route with ``Accept: text/event-stream`` first; a server that answers it
        with JSON, or with 404 for a thread that exists, serves the ``/stream`` route instead.
        """
        return _OpenStream(partial(self._open_thread_stream, thread, after_id))

    async def _open_thread_stream(self, thread: ThreadRef, after_id: str | None) -> _Frames:
        first: StreamRoute = self.stream_route
        for route in (first, "stream" if first == "events" else "events"):
            try:
                path = self._stream_path(thread, route)
                frames = await self._open_sse("stream", path, after_id)
                # Learnt from this answer, not flipped: pumps that race here agree.
                self.stream_route = route
                return frames
            except _WrongRoute:
                pass
            except NotFound:
                await self.get_thread(thread)  # raises NotFound if the thread is really gone
        raise ApiUnavailable(f"no stream route for {thread.key} answers with SSE")

    def stream_session(
        self, session_id: str, after_id: str | None
    ) -> AbstractAsyncContextManager[AsyncIterator[Frame]]:
        path = f"/sessions/{session_id}/events/stream"
        return _OpenStream(partial(self._open_sse, "session_events", path, after_id))

    async def _open_sse(self, route: str, path: str, after_id: str | None) -> _Frames:
        """An open event stream; whatever goes wrong before it is handed on closes it."""
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if after_id:
            extra["Last-Event-ID"] = after_id
        # No bytes at all (not even a heartbeat) for stall_timeout_s is a stalled stream.
        timeout = httpx.Timeout(self._request_timeout_s, read=self._stall_timeout_s)
        client = self._stream_client
        while True:
            query = bool(after_id) and self.stream_query
            request = client.build_request(
                "GET",
                self._base + path,
                params={"after_id": after_id} if query else None,
                headers=self._headers(extra),
                timeout=timeout,
            )
            await self._limiter.acquire()
            try:
                response = await client.send(request, stream=True)
            except httpx.ReadTimeout as exc:
                raise StreamStalled(
                    f"GET {path}: no bytes for {self._stall_timeout_s:g} s"
                ) from exc
            except httpx.HTTPError as exc:
                metrics.API_REQUESTS.labels(route=route, status="error").inc()
                raise StreamRefused(f"GET {path}: {type(exc).__name__}: {exc}") from exc
            try:
                metrics.API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
                if response.status_code >= 400:
                    cut = await _read_error(response)
                    if response.status_code == 400 and query:
                        # A stream that takes no query parameters (the Forward-style route):
                        # learnt once; the cursor still travels in Last-Event-ID.
                        self.stream_query = False
                        log.info("bridge.api.stream_query_refused", path=path)
                        await response.aclose()
                        continue
                    try:
                        _raise_for_status(response, had_cursor=after_id is not None, cut=cut)
                    except ApiUnavailable as exc:
                        raise StreamRefused(
                            str(exc), status=exc.status, retry_after_s=exc.retry_after_s
                        ) from exc
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    raise _WrongRoute(path)
                return _Frames(response, path, self._max_event_bytes)
            except BaseException:
                await response.aclose()
                raise


async def _read_error(response: httpx.Response) -> str | None:
    """Read an error answer's body: None once it came whole, else why it did not. Its status
    and Retry-After count either way (a 429 whose body is cut short is still a 429)."""
    try:
        await response.aread()
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class _Frames:
    """The frames of one open event stream, its errors re-raised as ours.

    One object instead of a stack of async generators and context managers: every idle stream
    holds one while it waits for bytes (issue 11: memory per idle stream). No cancel scope or
    task group here: it only decodes and translates.
    """

    __slots__ = ("_chunks", "_closer", "_decoder", "_path", "_ready")

    def __init__(self, response: httpx.Response, path: str, max_frame_bytes: int) -> None:
        encoding = response.headers.get("content-encoding", "").strip().lower()
        plain = encoding in ("", "identity")
        body = body_of(response)
        self._closer: httpx.Response | Connection = response
        if plain and body is not None:
            # The stream transport's connection is the body itself: the response, its request,
            # headers and URL are let go (issue 11: memory per idle stream).
            self._chunks: AsyncIterator[bytes] = body
            self._closer = body
        elif plain and isinstance(response.stream, httpx.AsyncByteStream):
            # Nothing to decode: the transport's own iterator, without the two generators and
            # two context managers of aiter_bytes() that each idle stream would hold.
            self._chunks = aiter(response.stream)
        else:
            self._chunks = response.aiter_bytes()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: list[Frame] = []  # decoded, newest first
        self._path = path

    def __aiter__(self) -> _Frames:
        return self

    async def __anext__(self) -> Frame:
        while not self._ready:
            try:
                chunk = await anext(self._chunks)
            except httpx.ReadTimeout as exc:
                raise StreamStalled(f"GET {self._path}: stream stalled") from exc
            except httpx.HTTPError as exc:
                raise ApiUnavailable(
                    f"GET {self._path}: stream broke: {type(exc).__name__}: {exc}"
                ) from exc
            frames = self._decoder.feed(chunk)
            frames.reverse()
            self._ready = frames
        return self._ready.pop()

    async def aclose(self) -> None:
        await self._closer.aclose()


class _OpenStream:
    """``async with``: opens the stream on entry, closes it on exit (a class, not a generator:
    nothing of it is left on the heap but itself while the stream is open)."""

    __slots__ = ("_frames", "_open")

    def __init__(self, open_stream: Callable[[], Awaitable[_Frames]]) -> None:
        self._open: Callable[[], Awaitable[_Frames]] | None = open_stream
        self._frames: _Frames | None = None

    async def __aenter__(self) -> _Frames:
        open_stream, self._open = self._open, None
        if open_stream is None:
            raise RuntimeError("a stream is opened once")
        self._frames = await open_stream()
        return self._frames

    async def __aexit__(self, *exc_info: object) -> None:
        frames, self._frames = self._frames, None
        if frames is not None:
            await frames.aclose()


class _WrongRoute(ApiError):
    """This route answered, but not with an event stream."""
