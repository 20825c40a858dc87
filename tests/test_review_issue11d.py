"""Review of 84086ec (JSON pages on ``KeepAliveTransport``): what it gets wrong, as failing
tests. Each was marked ``xfail(strict=True)`` until the transport was fixed; the markers are
gone. What is asserted is what a user would check: what the API (the server) saw
against what the bridge counted, and which connections stay open."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

import anyio
import httpx
import pytest

from bridge.app import _json_client
from bridge.errors import ApiUnavailable
from bridge.stream_transport import KeepAliveTransport
from tests.bridge_harness import api_requests_counted
from tests.test_keepalive_transport import (
    api_over,
    keep_alive_server,
    ok,
)
from tests.test_stream_transport import nothing_left_behind

pytestmark = pytest.mark.anyio
__all__ = ["nothing_left_behind"]  # autouse: no socket, task or future left behind


async def resets_the_second(
    connection: int, request: int, target: str, w: asyncio.StreamWriter
) -> bool:
    """A gateway's script: the first request of a connection answered (its id, from the
    path), the next one reset."""
    if request >= 1:
        reset(w)
        return False
    w.write(ok(b'{"id":"%s"}' % target.rsplit("/", 1)[1].encode()))
    return True


def reset(writer: asyncio.StreamWriter) -> None:
    """A TCP reset, no HTTP answer at all (the gateway's third way to refuse, qoder-api.md
    section 8.3)."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_get_the_gateway_resets_on_a_kept_connection_is_counted_as_the_api_saw_it() -> None:
    """The gateway answers the first request of each connection and resets the next one
    (burst suppression: no body, a TCP reset). Two page requests through the daemon's API
    client: every request the gateway saw is one the bridge counted in its requests metric
    (whatever it then does with the reset: report it, or count the one it sent again)."""

    async with (
        keep_alive_server(resets_the_second) as server,
        _json_client(8, ssl.create_default_context()) as client,
    ):
        api = api_over(client, server.url)
        before = api_requests_counted()
        for session in ("sess_a", "sess_b"):
            # A reset reported (ApiUnavailable) is fine; what is checked is the count.
            with contextlib.suppress(ApiUnavailable):
                await api.get_session(session)
        counted = api_requests_counted() - before
    seen = sum(len(asked) for asked in server.connections)
    assert counted == seen, server.connections


async def test_a_connection_idle_past_its_time_is_closed_without_another_request() -> None:
    """One GET on a pool that keeps a connection at most 50 ms, then no request at all: the
    server sees the client end that connection (within 2 s, forty times ``idle_s``)."""

    async def script(connection: int, request: int, target: str, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b'{"target":"%s"}' % target.encode()))
        return True

    async with (
        keep_alive_server(script) as server,
        httpx.AsyncClient(transport=KeepAliveTransport(keep=8, idle_s=0.05)) as client,
    ):
        response = await client.get(f"{server.url}/a", timeout=5)
        assert response.content == b'{"target":"/a"}'
        with anyio.move_on_after(2):
            await server.client_ended.wait()
        ended = server.client_ended.is_set()
    assert (server.connections, ended) == ([["/a"]], True)
