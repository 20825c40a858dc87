"""Cursor pagination shared by every list route, and the error type every route raises.

Listing order is ``asc`` (oldest first) or ``desc``; ``after_id`` and ``before_id`` are relative
to it. ``next_page`` is an opaque token naming the anchor and the direction, so a page stays
stable while items are added. ``page``, ``after_id`` and ``before_id`` are mutually exclusive.
The older generation (``pagination="after_id"``) knows only the two id cursors: its envelope
has no ``next_page`` key and it refuses ``page``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bridge.simulator.state import canonical

Query = Mapping[str, list[str]]


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,  # Forward bodies add one
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param
        self.code = code
        self.headers = list(headers)

    def body(self, request_id: str) -> bytes:
        error = {"type": self.kind, "message": self.message}
        if self.param:
            error["param"] = self.param
        if self.code:
            error["code"] = self.code
        envelope = {"type": "error", "request_id": request_id, "error": error}
        return canonical(envelope)


def bad_request(message: str, param: str) -> HttpError:
    return HttpError(400, "invalid_request_error", message, param=param)


def first(query: Query, *names: str) -> str | None:
    for name in names:
        values = query.get(name)
        if values and values[0] != "":
            return values[0]
    return None


def many(query: Query, *names: str) -> set[str]:
    """Repeated (``statuses[]=a&statuses[]=b``) or comma-separated (``statuses=a,b``)."""
    return {v for n in names for raw in query.get(n, ()) for v in raw.split(",") if v}


@dataclass(frozen=True)
class PageQuery:
    limit: int
    anchor: str | None  # an item id
    forward: bool  # after the anchor (or from the start) vs before it
    param: str  # which parameter named the anchor, for the 400
    desc: bool
    skip: int = 0  # page tokens only: items past the anchor already served (malformed ones)


@dataclass(frozen=True)
class Page:
    picked: list[int]  # item indices, in listing order
    has_more: bool
    next_page: str | None
    first_id: str | None
    last_id: str | None


def parse_page_query(
    query: Query, *, default_order: str = "asc", pagination: str = "next_page"
) -> PageQuery:
    if pagination == "after_id" and "page" in query:
        raise bad_request("page is not supported here; page with after_id or before_id.", "page")
    raw_limit = first(query, "limit")
    try:
        limit = 20 if raw_limit is None else int(raw_limit)
    except ValueError:
        raise bad_request(f"limit must be an integer, got {raw_limit!r}.", "limit") from None
    if not 1 <= limit <= 100:
        raise bad_request(f"limit must be between 1 and 100, got {limit}.", "limit")
    order = first(query, "order") or default_order
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}.", "order")
    given = {n: v for n in ("page", "after_id", "before_id") if (v := first(query, n))}
    if len(given) > 1:
        names = " and ".join(sorted(given))
        raise bad_request(f"{names} are mutually exclusive; pass only one.", sorted(given)[-1])
    desc = order == "desc"
    if "page" in given:
        forward, anchor, skip = _decode_page(given["page"])
        return PageQuery(limit, anchor, forward, "page", desc, skip)
    if "before_id" in given:
        return PageQuery(limit, given["before_id"], False, "before_id", desc)
    return PageQuery(limit, given.get("after_id"), True, "after_id", desc)


def _encode_page(forward: bool, anchor: str, skip: int) -> str:
    raw = ("a:" if forward else "b:") + anchor + (f":{skip}" if skip else "")
    return "page_" + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page(token: str) -> tuple[bool, str, int]:
    try:
        if not token.startswith("page_"):
            raise ValueError(token)
        data = token[5:]
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
        direction, anchor, *rest = raw.split(":")
        skip = int(rest[0]) if len(rest) == 1 else 0
        if direction not in ("a", "b") or not anchor or len(rest) > 1 or skip < 0:
            raise ValueError(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad_request(f"Invalid page cursor {token!r}.", "page") from None
    return direction == "a", anchor, skip


def select(
    count: int,
    id_at: Callable[[int], str],
    index: Mapping[str, int],
    q: PageQuery,
    match: Callable[[int], bool] | None = None,
) -> Page:
    """One page in listing order. Items without an id (malformed ones) take their place like
    any other, but cannot be cursors: first_id/last_id name the page's outermost real ids
    (with none, the nearest one on the anchor's side), ``next_page`` counts the id-less items
    past its anchor, and a page is extended past ``limit`` until it holds a real id, so that
    ``after_id=last_id`` always moves on."""

    def item(p: int) -> int:  # listing position <-> item index: its own inverse
        return count - 1 - p if q.desc else p

    if q.anchor is None:
        start = 0
    else:
        at = index.get(q.anchor)
        if at is None:
            raise bad_request(f"Unknown cursor {q.anchor!r}.", q.param)
        start = item(at) + 1 + q.skip if q.forward else item(at) - 1 - q.skip
    step = 1 if q.forward else -1
    picked: list[int] = []
    p, has_more, has_id = start, False, False
    while 0 <= p < count:
        i = item(p)
        if match is None or match(i):
            if len(picked) >= q.limit and has_id:
                has_more = True
                break
            picked.append(i)
            has_id = has_id or bool(id_at(i))
        p += step
    if not q.forward:
        picked.reverse()
    real = [i for i in picked if id_at(i)]
    first_id = last_id = None
    if real:
        first_id, last_id = id_at(real[0]), id_at(real[-1])
    elif picked:  # id-less items only: the nearest real id on the anchor's side
        edge = item(picked[0] if q.forward else picked[-1])
        first_id = last_id = _nearest_id(count, item, id_at, edge - step, -step)
    next_page = None
    if has_more:  # then the page holds a real id
        anchor = real[-1] if q.forward else real[0]
        skip = abs(item(picked[-1] if q.forward else picked[0]) - item(anchor))
        next_page = _encode_page(q.forward, id_at(anchor), skip)
    return Page(picked, has_more, next_page, first_id, last_id)


def _nearest_id(
    count: int, item: Callable[[int], int], id_at: Callable[[int], str], p: int, step: int
) -> str | None:
    while 0 <= p < count:
        if found := id_at(item(p)):
            return found
        p += step
    return None


def envelope(items: Sequence[bytes], page: Page, pagination: str = "next_page") -> bytes:
    """The list envelope, joined around the items' own bytes (never re-serialised)."""
    tail: dict[str, object] = {"next_page": page.next_page} if pagination == "next_page" else {}
    tail["first_id"] = page.first_id
    tail["last_id"] = page.last_id
    tail["has_more"] = page.has_more
    rest = json.dumps(tail, separators=(",", ":"))
    return b'{"data":[' + b",".join(items) + b"]," + rest[1:].encode()
