"""The JSON client's keep-alive pool (``KeepAliveTransport``, bridge/stream_transport.py)
against a raw HTTP/1.1 server on a real socket that answers each request of a connection as
the scenario says: what is asserted is what a caller gets (each body, byte for byte, its own)
and what the server sees (how many connections, which requests on which)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from bridge.api import QoderApi, RateLimiter
from bridge.app import _json_client
from bridge.errors import ApiUnavailable
from bridge.stream_transport import KeepAliveTransport, KeptConnectionClosed
from tests.bridge_harness import api_requests_counted
from tests.kafka_broker import KafkaPki
from tests.test_stream_transport import nothing_left_behind, raw_server, server_tls

pytestmark = pytest.mark.anyio
__all__ = ["nothing_left_behind"]  # autouse: no socket, task or future left behind

#: (connection number, request number on it, the request's target) -> bytes to send; None:
#: close the connection without an answer.
Answer = Callable[[int, int, str], Awaitable[bytes | None]]
#: (connection number, request number on it, target, the writer) -> keep the connection? It
#: answers (or resets) through the writer itself.
Script = Callable[[int, int, str, asyncio.StreamWriter], Awaitable[bool]]


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(
        body
    )
    return head + b"".join(extra) + b"\r\n" + body


def echo(target: str) -> bytes:
    return b'{"target":"%s"}' % target.encode()


@dataclass
class Server:
    url: str
    #: a list per connection, of the targets asked on it
    connections: list[list[str]] = field(default_factory=list)
    #: set once the client has ended a connection (the server read its end)
    client_ended: anyio.Event = field(default_factory=anyio.Event)


def answering(answer: Answer) -> Script:
    """A script that sends what ``answer`` gives, and closes the connection on None."""

    async def script(connection: int, request: int, target: str, w: asyncio.StreamWriter) -> bool:
        data = await answer(connection, request, target)
        if data is not None:
            w.write(data)
        return data is not None

    return script


@asynccontextmanager
async def keep_alive_server(
    script: Script, *, tls: ssl.SSLContext | None = None, idle_close_s: float | None = None
) -> AsyncIterator[Server]:
    """A raw HTTP/1.1 server: each request of a connection goes to ``script``; a connection
    that waits ``idle_close_s`` for its next request is closed."""
    server_state = Server("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked: list[str] = []
        server_state.connections.append(asked)
        number = len(server_state.connections) - 1
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_close_s)
                except TimeoutError:
                    break
                except asyncio.IncompleteReadError:
                    server_state.client_ended.set()
                    break
                target = head.split(b" ", 2)[1].decode()
                asked.append(target)
                if not await script(number, len(asked) - 1, target, writer):
                    break
                await writer.drain()
        except ConnectionError:
            server_state.client_ended.set()
        except ssl.SSLError:
            pass

    async with raw_server(handle, tls) as port:
        server_state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        yield server_state


@asynccontextmanager
async def json_server(
    answer: Answer, *, idle_close_s: float | None = None
) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    """A keep-alive server answering with ``answer``, and the daemon's JSON client."""
    async with (
        keep_alive_server(answering(answer), idle_close_s=idle_close_s) as server,
        _json_client(8, ssl.create_default_context()) as client,
    ):
        yield server, client


async def echoing(connection: int, request: int, target: str) -> bytes | None:
    return ok(echo(target))


async def get(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("GET", url, timeout=5) as response:
        assert response.status_code == 200
        return await response.aread()


async def test_requests_one_after_another_share_one_connection() -> None:
    """Five GETs in turn: five answers, each its own, all over one connection."""
    async with json_server(echoing) as (server, client):
        bodies = [await get(client, f"{server.url}/p{i}?limit=100") for i in range(5)]
    assert bodies == [echo(f"/p{i}?limit=100") for i in range(5)]
    assert server.connections == [[f"/p{i}?limit=100" for i in range(5)]]


async def test_concurrent_requests_each_get_their_own_body() -> None:
    """64 GETs at once, 200 in all, on a pool that keeps 4: every caller gets the body of its
    own request (never another's, never part of one), and at most 4 connections stay idle."""
    transport = KeepAliveTransport(keep=4)
    results: dict[int, bytes] = {}

    async def slow_echo(connection: int, request: int, target: str) -> bytes | None:
        await asyncio.sleep(0.001 * (connection % 3))
        return ok(echo(target) * 50)

    async with (
        keep_alive_server(answering(slow_echo)) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        limiter = anyio.Semaphore(64)

        async def one(i: int) -> None:
            async with limiter:
                results[i] = await get(client, f"{server.url}/e{i}")

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert transport.idle_connections <= 4
    assert results == {i: echo(f"/e{i}") * 50 for i in range(200)}
    assert sum(len(asked) for asked in server.connections) == 200
    assert len(server.connections) < 200  # connections were used again


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    """The server closes each connection 50 ms after its answer (its idle timeout): a request
    200 ms later gets its answer over a new connection, not an error from the dead one."""
    async with json_server(echoing, idle_close_s=0.05) as (server, client):
        first = await get(client, f"{server.url}/a")
        await anyio.sleep(0.2)
        second = await get(client, f"{server.url}/b")
    assert (first, second) == (echo("/a"), echo("/b"))
    assert server.connections == [["/a"], ["/b"]]


async def test_a_body_closed_before_its_end_takes_its_connection_with_it() -> None:
    """A caller that stops reading a 1 MiB body half way: the rest of that body must never be
    read as the next answer. The next request goes on a new connection and gets its own
    body."""
    big = b"x" * (1 << 20)

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        return ok(big if target == "/big" else echo(target))

    async with json_server(answer) as (server, client):
        async with client.stream("GET", f"{server.url}/big", timeout=5) as response:
            async for _part in response.aiter_raw():
                break
        assert await get(client, f"{server.url}/next") == echo("/next")
    assert server.connections == [["/big"], ["/next"]]


async def test_a_cancelled_request_does_not_leave_its_connection_to_the_next() -> None:
    """A request cancelled while the server takes its time: its late answer must not become
    the next request's."""
    slow = anyio.Event()

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        if target == "/slow":
            slow.set()
            await asyncio.sleep(0.2)
        return ok(echo(target))

    async with json_server(answer) as (server, client):
        assert await get(client, f"{server.url}/first") == echo("/first")
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(get, client, f"{server.url}/slow")
                await slow.wait()
                tg.cancel_scope.cancel()
        assert not scope.cancel_called
        assert await get(client, f"{server.url}/after") == echo("/after")
    assert server.connections == [["/first", "/slow"], ["/after"]]


@pytest.mark.parametrize(
    "extra",
    [b"connection: close\r\n", b""],
    ids=["connection-close", "bytes-after-the-answer"],
)
async def test_a_connection_the_server_will_not_keep_is_not_used_again(extra: bytes) -> None:
    """An answer with ``Connection: close``, or bytes nobody asked for after an answer: the
    connection is not used again (with the stray bytes, they would be taken for the next
    answer)."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        if extra:
            return ok(echo(target), extra)
        return ok(echo(target)) + ok(b'{"stray":true}')

    async with json_server(answer) as (server, client):
        bodies = [await get(client, f"{server.url}/r{i}") for i in range(3)]
    assert bodies == [echo(f"/r{i}") for i in range(3)]
    assert server.connections == [["/r0"], ["/r1"], ["/r2"]]


def api_over(client: httpx.AsyncClient, url: str, limiter: RateLimiter | None = None) -> QoderApi:
    """The daemon's API over ``client`` (JSON and streams alike)."""
    return QoderApi(
        client,
        client,
        url,
        lambda: "pt-test",
        limiter or RateLimiter(1000),
        stall_timeout_s=10,
        request_timeout_s=10,
    )


async def test_a_kept_connection_closed_as_the_request_left_is_reported_not_resent() -> None:
    """The server closes a kept connection as the next request arrives, without a byte of an
    answer (its idle timeout racing the request): the transport says so
    (``KeptConnectionClosed``) and sends nothing again itself; what was kept for that server
    is dropped, so the next request goes on a new connection."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        return None if request == 1 else ok(echo(target))

    async with json_server(answer) as (server, client):
        assert await get(client, f"{server.url}/a") == echo("/a")
        with pytest.raises(KeptConnectionClosed, match="before answering"):
            await get(client, f"{server.url}/b")
        assert await get(client, f"{server.url}/c") == echo("/c")
    assert server.connections == [["/a", "/b"], ["/c"]]


async def test_the_api_sends_a_page_request_again_once_counting_both() -> None:
    """Through the daemon's API client: a page request whose kept connection was ended as it
    left is sent once more, on a new connection, and its caller sees only the answer; both
    requests the server saw are counted in ``qoder_bridge_api_requests_total``."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        return None if request == 1 else ok(echo(target))

    async with json_server(answer) as (server, client):
        api = api_over(client, server.url)
        before = api_requests_counted()
        first = await api.get_session("sess_a")
        second = await api.get_session("sess_b")
        counted = api_requests_counted() - before
    assert (first, second) == ({"target": "/sessions/sess_a"}, {"target": "/sessions/sess_b"})
    assert server.connections == [["/sessions/sess_a", "/sessions/sess_b"], ["/sessions/sess_b"]]
    assert counted == 3


async def test_a_server_that_never_answers_is_an_error_not_a_loop() -> None:
    """A server that ends every connection at the request: a page request on a new connection
    fails at once (nothing sent again), and one on a kept connection is sent again once, then
    fails; every request the server saw is counted."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        return ok(echo(target)) if target.endswith("/ok") else None

    async with json_server(answer) as (server, client):
        api = api_over(client, server.url)
        before = api_requests_counted()
        with pytest.raises(ApiUnavailable, match="without sending a response"):
            await api.get_session("fresh")
        assert await api.get_session("ok") == {"target": "/sessions/ok"}
        with pytest.raises(ApiUnavailable, match="without sending a response"):
            await api.get_session("kept")
        counted = api_requests_counted() - before
    assert server.connections == [
        ["/sessions/fresh"],
        ["/sessions/ok", "/sessions/kept"],
        ["/sessions/kept"],
    ]
    assert counted == 4


async def test_each_request_has_its_own_read_timeout_on_a_kept_connection() -> None:
    """A kept connection's first request allowed 5 s, the next 0.1 s: the server's 1 s pause
    before the second answer is a read timeout, and that connection is not kept."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        if target == "/slow":
            await asyncio.sleep(1)
        return ok(echo(target))

    async with json_server(answer) as (server, client):
        assert await get(client, f"{server.url}/a") == echo("/a")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{server.url}/slow", timeout=0.1)
        assert await get(client, f"{server.url}/b") == echo("/b")
    assert server.connections == [["/a", "/slow"], ["/b"]]


async def test_an_error_answer_read_whole_keeps_its_connection() -> None:
    """A 429 with a body, read whole as the API client reads error bodies: the next request
    goes on the same connection."""

    async def answer(connection: int, request: int, target: str) -> bytes | None:
        if target == "/limited":
            body = b'{"error":"rate limited"}'
            return (
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
                % (
                    len(body),
                    body,
                )
            )
        return ok(echo(target))

    async with json_server(answer) as (server, client):
        limited = await client.get(f"{server.url}/limited", timeout=5)
        assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
        assert await get(client, f"{server.url}/a") == echo("/a")
    assert server.connections == [["/limited", "/a"]]


async def test_https_connections_are_kept_too(kafka_pki: KafkaPki) -> None:
    """Over TLS with the daemon's context: three answers, one connection, one handshake."""
    async with (
        keep_alive_server(answering(echoing), tls=server_tls(kafka_pki)) as server,
        _json_client(8, ssl.create_default_context(cafile=kafka_pki.ca)) as client,
    ):
        bodies = [await get(client, f"{server.url}/t{i}") for i in range(3)]
    assert bodies == [echo(f"/t{i}") for i in range(3)]
    assert server.connections == [["/t0", "/t1", "/t2"]]


async def test_a_connection_idle_past_its_time_is_not_used_again() -> None:
    """Kept at most ``idle_s``: past it the next request opens a new connection (the server
    may be closing the old one at that very moment)."""
    async with (
        keep_alive_server(answering(echoing)) as server,
        httpx.AsyncClient(transport=KeepAliveTransport(keep=8, idle_s=0.05)) as client,
    ):
        await get(client, f"{server.url}/a")
        await anyio.sleep(0.1)
        await get(client, f"{server.url}/b")
    assert server.connections == [["/a"], ["/b"]]
