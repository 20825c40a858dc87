"""Shared bits of the simulator tests: an authenticated client, SSE reading, raw list pages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from bridge.simulator import Simulator

TOKEN = "pt-test"


@asynccontextmanager
async def client(sim: Simulator, token: str = TOKEN) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sim.base_url, headers=headers, timeout=10) as c:
        yield c


async def read_sse(
    c: httpx.AsyncClient,
    path: str,
    count: int,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    skip_heartbeats: bool = True,
) -> list[ServerSentEvent]:
    """The first ``count`` frames of a stream (comment-only heartbeat frames left out)."""
    got: list[ServerSentEvent] = []
    async with aconnect_sse(c, "GET", path, headers=headers or {}, params=params) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if skip_heartbeats and (sse.event == "heartbeat" or not sse.data):
                continue
            got.append(sse)
            if len(got) == count:
                break
    return got


async def all_pages(c: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of a list, following next_page; checks the envelope on the way."""
    pages: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        r = await c.get(path, params={**params, **({"page": page} if page else {})})
        r.raise_for_status()
        body = r.json()
        assert set(body) == {"data", "next_page", "first_id", "last_id", "has_more"}
        pages.append(body)
        real = [item["id"] for item in body["data"] if is_event(item)]
        if real:
            assert (body["first_id"], body["last_id"]) == (real[0], real[-1])
        elif not body["data"]:
            assert body["first_id"] is None and body["last_id"] is None
        assert (body["next_page"] is not None) == body["has_more"]
        page = body["next_page"]
        if not page:
            return pages


async def all_pages_by_id(c: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of a list the older way, ``after_id`` = the previous ``last_id``, for the
    envelope without ``next_page`` (``pagination="after_id"``)."""
    pages: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        r = await c.get(path, params={**params, **({"after_id": after} if after else {})})
        r.raise_for_status()
        body = r.json()
        assert list(body) == ["data", "first_id", "last_id", "has_more"]
        pages.append(body)
        if not body["has_more"]:
            return pages
        assert body["last_id"] and body["last_id"] != after
        after = body["last_id"]


def page_items_raw(body: bytes) -> bytes:
    """The bytes between ``{"data":[`` and the envelope's tail: the items as served."""
    assert body.startswith(b'{"data":[')
    tail = b'],"next_page"' if b'],"next_page"' in body else b'],"first_id"'
    return body[len(b'{"data":[') : body.rindex(tail)]


def is_event(item: Any) -> bool:
    """False for the malformed items a log may carry (no id, or not an object at all)."""
    return isinstance(item, dict) and "id" in item


def sse_frame(raw: bytes) -> bytes:
    """The frame a stream serves for an item of a log (``raw`` may be invalid UTF-8)."""
    item = json.loads(raw.decode("utf-8", "surrogateescape"))
    head = b""
    if is_event(item):
        head = b"id: %s\n" % item["id"].encode()
    if isinstance(item, dict):
        head += b"event: %s\n" % item["type"].encode()
    return head + b"data: " + raw + b"\n\n"


def ids(raw_events: list[bytes]) -> list[str]:
    return [json.loads(e)["id"] for e in raw_events]
