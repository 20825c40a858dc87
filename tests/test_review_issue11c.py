"""Adversarial review of the stream transport (bridge/stream_transport.py, issue 11) and its
wiring in bridge/api.py, against raw servers on real sockets.

Each test is a defect found by the review, marked xfail(strict=True) until it was fixed (both
are): what is asserted is what a user or a pump would see (the connection on the server's side,
the error a pump gets)."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import warnings

import anyio
import pytest

from bridge.api import QoderApi
from bridge.errors import ApiUnavailable, StreamRefused
from bridge.records import ThreadRef
from tests.test_stream_transport import stream_api  # the API as the daemon builds it

pytestmark = pytest.mark.anyio

THREAD = ThreadRef("sess_01a22a37f07f7004ab3a505789491f4a", "sthr_01a22a37f07f7002aadbb8625121f6f9")


async def read_frames(api: QoderApi) -> list[bytes]:
    async with api.stream_thread(THREAD, None) as frames:
        return [f.data async for f in frames]


# -- cancellation while connecting to a host name --------------------------------------------------


async def test_a_stream_cancelled_as_its_connection_is_accepted_leaves_no_connection_open() -> None:
    """Scenario: the API URL names its host (as the production URL does: api.qoder.com), and
    the pump opening a stream is cancelled (a drain, an unfollow, a rewind, or the connect
    timeout) the moment the server accepts its TCP connection. The server must see that
    connection closed at once, like any other cancelled stream (see test_stream_transport's
    cancellation tests), and nothing may be left for the garbage collector to close.

    Garbage collection is held off while the server waits, as the daemon holds it off between
    its rare collections (bridge/app.py _tune_gc: gc.freeze(), collections about 30 times
    rarer than by default): a socket that only a collection closes stays open until one runs."""
    loop = asyncio.get_running_loop()
    reader = anyio.CancelScope()
    accepted: list[asyncio.Transport] = []
    closed = asyncio.Event()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)  # type: ignore[arg-type]
            reader.cancel()  # the pump is cancelled the moment its connection is accepted

        def eof_received(self) -> bool:
            closed.set()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            closed.set()

    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with stream_api(f"http://localhost:{port}/api/v1/cloud") as api:
                with reader:
                    await read_frames(api)
                assert reader.cancelled_caught
                assert len(accepted) == 1
                with anyio.move_on_after(2):
                    await closed.wait()
                closed_at_once = closed.is_set()
            gc.collect()
    finally:
        if was_enabled:
            gc.enable()
        for transport in accepted:
            transport.abort()
        server.close()
        await server.wait_closed()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert closed_at_once, f"the server still holds the cancelled connection; then: {unclosed}"
    assert unclosed == []


# -- a throttled answer whose body does not arrive whole -------------------------------------------


ERROR_BODY = b'{"error":{"type":"rate_limit_error","message":"slow down"},"request_id":"req_9"}'


@pytest.mark.parametrize("cut", ["fin", "reset"])
async def test_a_throttled_answer_cut_short_still_says_throttled_and_when_to_retry(
    cut: str,
) -> None:
    """Scenario (qoder-api.md 8: the gateway throttles with 429 and Retry-After, or resets):
    the head of a 429 with ``Retry-After: 30`` and a Content-Length arrives, then the
    connection ends before the whole error body (closed, or reset). The head has already said
    what matters: the pump must get StreamRefused with status 429 and retry_after_s 30, as it
    does for the same answer sent whole (test_stream_transport's error-answer test)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                b"Retry-After: 30\r\nContent-Length: %d\r\n\r\n" % len(ERROR_BODY) + ERROR_BODY[:20]
            )
            await writer.drain()
            if cut == "reset":
                await asyncio.sleep(0.2)  # the head has reached the client; then a TCP reset
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            if cut == "reset":
                writer.transport.abort()
            else:
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with stream_api(f"http://127.0.0.1:{port}/api/v1/cloud") as api:
            with pytest.raises(ApiUnavailable) as caught:
                with anyio.fail_after(5):
                    await read_frames(api)
    finally:
        server.close()
        await server.wait_closed()
    error = caught.value
    assert (type(error), error.status, error.retry_after_s) == (StreamRefused, 429, 30), str(error)
