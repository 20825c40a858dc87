"""The JSON client's network backend: idle connections checked without anyio's attribute
table, and still found dead when the server closed them."""

from __future__ import annotations

import socket
import ssl

import anyio
import pytest

from bridge.app import _json_client
from bridge.http_pool import CheapIdleCheckBackend, socket_readable

pytestmark = pytest.mark.anyio


def test_a_socket_is_readable_when_data_or_the_end_waits_and_when_it_is_gone() -> None:
    ours, theirs = socket.socketpair()
    try:
        assert not socket_readable(ours)
        theirs.sendall(b"x")
        assert socket_readable(ours)
        ours.recv(1)
        assert not socket_readable(ours)
        theirs.close()  # the peer closed: the next read returns b""
        assert socket_readable(ours)
    finally:
        ours.close()
    assert socket_readable(ours)  # closed here: no file descriptor
    assert socket_readable(None)


def test_the_json_client_pool_uses_the_cheap_idle_check() -> None:
    """httpx takes no network backend: it is set on its pool's private attribute, and this
    fails if a new httpx or httpcore keeps it elsewhere."""
    client = _json_client(8, ssl.create_default_context())
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool._network_backend, CheapIdleCheckBackend)


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    """A keep-alive server that closes each connection 50 ms after its answer: a second request
    200 ms later gets its answer over a new connection, not an error from the dead one."""
    connections: list[int] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        connections.append(1)
        async with stream:
            await stream.receive(65536)
            body = b'{"ok":true}'
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n"
            await stream.send(head.encode() + b"content-type: application/json\r\n\r\n" + body)
            await anyio.sleep(0.05)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (anyio, not Django)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with _json_client(8, ssl.create_default_context()) as client:
            first = await client.get(f"http://127.0.0.1:{port}/a")
            await anyio.sleep(0.2)
            second = await client.get(f"http://127.0.0.1:{port}/b")
        tg.cancel_scope.cancel()
    assert (first.json(), second.json()) == ({"ok": True}, {"ok": True})
    assert len(connections) == 2
