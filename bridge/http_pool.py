# ruff: noqa: ASYNC109  (the timeout parameters are httpcore's interface)
"""The JSON client's network backend: httpcore's own (anyio), with the idle check made cheap.

Each time httpcore's pool assigns a request, and each time a response is closed, it asks every
connection whether it has expired; for an idle HTTP/1.1 connection that asks the network stream
whether its socket is readable, and anyio's stream builds its table of attribute getters anew
on every such call to find the raw socket. At 1,000 threads starting at once this was about a
third of a JSON request's CPU (issue 11's profile). Here each stream finds its socket once.
"""

from __future__ import annotations

import select
import socket
import typing

import httpcore
import httpx

SocketOptions = typing.Iterable[
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
]


def socket_readable(sock: socket.socket | None) -> bool:
    """Would a read return at once (data, or the end of a connection the server closed)? A
    socket that is gone counts as readable, as httpcore counts it: its next read ends it."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    __slots__ = ("_socket", "_stream")

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._socket: socket.socket | None = stream.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return socket_readable(self._socket)
        return self._stream.get_extra_info(info)


class CheapIdleCheckBackend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, its streams wrapped in ``_Stream``."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: SocketOptions | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: SocketOptions | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def use_cheap_idle_check(transport: httpx.AsyncHTTPTransport) -> None:
    """Give the transport's pool this backend (httpx does not take one as an argument; its pool
    keeps it in ``_network_backend``, and tests/test_http_pool.py fails if that changes)."""
    pool = transport._pool
    if not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpcore's pool keeps its network backend elsewhere now")
    pool._network_backend = CheapIdleCheckBackend()
