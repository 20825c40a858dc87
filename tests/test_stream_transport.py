"""The stream transport (bridge/stream_transport.py) under the bridge's event streams, against
a raw HTTP/1.1 server on a real socket that sends exactly the bytes each scenario needs:
bodies framed every way HTTP/1.1 allows, servers that stall, cut, reset or answer with errors,
TLS, and frames of many megabytes. What is asserted is what a pump sees (frames, byte for byte,
or the bridge's error) and what the server sees (the request, the disconnect)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import struct
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from bridge import stream_transport
from bridge.api import QoderApi, RateLimiter
from bridge.app import _json_client
from bridge.errors import ApiUnavailable, AuthRejected, StreamRefused, StreamStalled
from bridge.records import ThreadRef
from bridge.stream_transport import HIGH_WATER, StreamTransport, body_of
from tests.kafka_broker import KafkaPki

pytestmark = pytest.mark.anyio

THREAD = ThreadRef("sess_01a22a37f07f7004ab3a505789491f4a", "sthr_01a22a37f07f7002aadbb8625121f6f9")
EVENTS_PATH = f"/api/v1/cloud/sessions/{THREAD.session_id}/threads/{THREAD.thread_id}/events"
SSE = (
    b": heartbeat\n\n"
    b'id: evt_1\nevent: agent.message\ndata: {"id":"evt_1","text":"caf\xc3\xa9"}\n\n'
    b"event: heartbeat\ndata: {}\n\n"
    b'id: evt_2\r\ndata: {"id":"evt_2",\r\ndata: "n":1}\r\n\r\n'
)
EXPECTED = [
    ("agent.message", b'{"id":"evt_1","text":"caf\xc3\xa9"}', "evt_1"),
    ("heartbeat", b"{}", None),
    ("", b'{"id":"evt_2",\n"n":1}', "evt_2"),
]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNKED_HEAD = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
MiB = 1 << 20


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def frame(event_id: str, data: bytes) -> bytes:
    return f"id: {event_id}\ndata: ".encode() + data + b"\n\n"


# -- a server that sends what the scenario says ----------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Served:
    url: str
    heads: list[bytes] = field(default_factory=list)
    gone: anyio.Event = field(default_factory=anyio.Event)  # a client closed its connection
    sent: int = 0  # body bytes a script has had accepted so far, where it counts them


@asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """An asyncio server on 127.0.0.1 (its port yielded) whose connections go to ``handle``;
    each is aborted once its handler ends, and on the way out every handler is waited for."""
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.append(writer)
        try:
            await handle(reader, writer)
        finally:
            writer.transport.abort()
            handlers.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # A handler still running (its client may be closing this very moment) ends once its
        # connection is gone; cancelling it would make asyncio's server log an error.
        for writer in writers:
            writer.transport.abort()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def serving(
    script: Callable[[Served, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[Served]:
    """Each connection: its request head is read and kept, then ``script`` runs; after it (unless
    it closed the connection) the server reads until the client goes and sets ``gone``."""
    served = Served("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            served.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await script(served, reader, writer)
            if not writer.is_closing():
                while await reader.read(65536):
                    pass
                served.gone.set()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            served.gone.set()

    async with raw_server(handle, tls) as port:
        served.url = f"{'https' if tls else 'http'}://{host}:{port}/api/v1/cloud"
        yield served


@asynccontextmanager
async def stream_api(
    base_url: str,
    *,
    stall_timeout_s: float = 10.0,
    tls: ssl.SSLContext | None = None,
    max_event_bytes: int = 1 * MiB,
    request_timeout_s: float = 10.0,
) -> AsyncIterator[QoderApi]:
    """The API as the daemon builds it: JSON requests on the keep-alive pool, streams on the
    stream transport."""
    async with (
        _json_client(8, tls or ssl.create_default_context()) as json_client,
        httpx.AsyncClient(transport=StreamTransport(tls), trust_env=False) as stream_client,
    ):
        yield QoderApi(
            json_client,
            stream_client,
            base_url,
            lambda: "pt-test",
            RateLimiter(1000),
            stall_timeout_s=stall_timeout_s,
            request_timeout_s=request_timeout_s,
            max_event_bytes=max_event_bytes,
        )


async def read_frames(
    api: QoderApi, after_id: str | None = None
) -> list[tuple[str, bytes, str | None]]:
    async with api.stream_thread(THREAD, after_id) as frames:
        return [(f.event, f.data, f.id) async for f in frames]


async def ids_until_cancelled(api: QoderApi) -> list[str | None]:
    """A pump that reads the stream's first frame and is then cancelled as it waits for the
    next: the ids it read."""
    got: list[str | None] = []
    first = anyio.Event()

    async def pump() -> None:
        async with api.stream_thread(THREAD, None) as frames:
            async for f in frames:
                got.append(f.id)
                first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        with anyio.fail_after(5):
            await first.wait()
        tg.cancel_scope.cancel()
    return got


async def ids_until_stalled(api: QoderApi, busy_s: float = 0) -> list[str | None]:
    """The ids of the frames read before the stream is StreamStalled (which it must be), the
    reader taking ``busy_s`` over each (a pump busy with its event)."""
    got: list[str | None] = []
    with pytest.raises(StreamStalled):
        async with api.stream_thread(THREAD, None) as frames:
            async for f in frames:
                got.append(f.id)
                await anyio.sleep(busy_s)
    return got


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """No scenario may leave an unclosed socket or transport, a task destroyed while pending or
    a future's exception unread: asyncio would say so in a ResourceWarning or its log."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    gc.collect()  # what earlier tests left (a Publisher never run) is not this scenario's
    logging.getLogger("asyncio").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    logging.getLogger("asyncio").removeHandler(handler)
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert [r.getMessage() for r in records] == []


# -- bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 64, len(SSE)])
async def test_a_chunked_stream_gives_its_frames_byte_for_byte_then_ends(piece: int) -> None:
    """Scenario: the events arrive as chunks of 1, 7, 64 bytes or all at once, each written on
    its own, so chunk boundaries fall inside lines and frames. The pump gets every frame
    unchanged, the stream ends cleanly at the last chunk, and the request carried the cursor."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD)
        for at in range(0, len(SSE), piece):
            writer.write(chunk(SSE[at : at + piece]))
            await writer.drain()
        writer.write(LAST_CHUNK)
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await read_frames(api, "evt_0") == EXPECTED
        with anyio.fail_after(5):
            await served.gone.wait()  # the body ended: the connection was closed
    (head,) = served.heads
    request_line, *header_lines = head.decode().split("\r\n")
    assert request_line == f"GET {EVENTS_PATH}?after_id=evt_0 HTTP/1.1"
    headers = {k.lower(): v for k, _, v in (h.partition(": ") for h in header_lines if h)}
    assert headers["host"] == served.url.split("/")[2]
    assert headers["accept"] == "text/event-stream"
    assert headers["last-event-id"] == "evt_0"
    assert headers["authorization"] == "Bearer pt-test"


async def test_a_body_the_connection_end_delimits_ends_with_the_connection() -> None:
    """Scenario: no Content-Length, no chunks: the body is what comes until the server closes
    (``Connection: close``). Every frame arrives and the stream ends without an error."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SSE_HEAD + b"Connection: close\r\n\r\n")
        for at in range(0, len(SSE), 10):
            writer.write(SSE[at : at + 10])
            await writer.drain()
        writer.close()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await read_frames(api) == EXPECTED


async def test_a_content_length_body_ends_at_its_length() -> None:
    """Scenario: a body with a Content-Length, the server keeping the connection open after
    it: the stream ends at the last byte, and the bridge closes the connection."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(SSE) + SSE)
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await read_frames(api) == EXPECTED
        with anyio.fail_after(5):
            await served.gone.wait()


# -- stalls ----------------------------------------------------------------------------------------


async def test_a_server_that_goes_silent_is_a_stalled_stream() -> None:
    """Scenario: a frame, then nothing at all (not even a heartbeat) for longer than the stall
    timeout: the frame is read, then the stream is StreamStalled and its socket closed."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", b"{}")))
        await writer.drain()

    async with serving(script) as served, stream_api(served.url, stall_timeout_s=0.5) as api:
        assert await ids_until_stalled(api) == ["evt_1"]
        with anyio.fail_after(5):
            await served.gone.wait()


async def test_a_server_that_never_answers_is_a_stalled_stream() -> None:
    """Scenario: the connection is accepted, the request read, and no response head ever comes:
    opening the stream fails as stalled (not hanging), and the socket is closed."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pass

    async with serving(script) as served, stream_api(served.url, stall_timeout_s=0.5) as api:
        with pytest.raises(StreamStalled):
            await read_frames(api)
        with anyio.fail_after(5):
            await served.gone.wait()


async def test_heartbeats_keep_a_stream_alive_and_a_busy_reader_is_no_stall() -> None:
    """Scenario (stall timeout 1 s): heartbeats every 0.2 s for 2.5 s, then two events, then
    silence. The heartbeats keep the stream up well past one stall timeout; a reader that
    then takes 1.5 s over the first event (Kafka slow) still gets the second one, which was
    waiting; only the silence after it is a stall."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD)
        for _ in range(12):
            writer.write(chunk(b": heartbeat\n\n"))
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.write(chunk(frame("evt_1", b"{}") + frame("evt_2", b"{}")))
        await writer.drain()

    async with serving(script) as served, stream_api(served.url, stall_timeout_s=1.0) as api:
        assert await ids_until_stalled(api, busy_s=1.5) == ["evt_1", "evt_2"]


# -- broken connections ----------------------------------------------------------------------------


async def test_a_reset_mid_frame_breaks_the_stream_after_the_whole_frames() -> None:
    """Scenario: a frame; while the pump is busy with it, a second frame and half of a third
    arrive, then a TCP reset. The pump still gets the second frame (it had arrived), never the
    half one, and then the stream fails as ApiUnavailable naming the ReadError (a reset)."""
    took_first, was_reset = anyio.Event(), anyio.Event()

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", b"{}")))
        await writer.drain()
        await took_first.wait()
        writer.write(chunk(frame("evt_2", b"{}")) + chunk(b'id: evt_3\ndata: {"ha'))
        await writer.drain()
        await asyncio.sleep(0.2)  # the bytes have reached the client (a reset drops the rest)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await asyncio.sleep(0.2)  # ... and so has the reset
        was_reset.set()

    async with serving(script) as served, stream_api(served.url) as api:
        got = []
        with pytest.raises(ApiUnavailable, match="stream broke: ReadError") as caught:
            async with api.stream_thread(THREAD, None) as frames:
                async for f in frames:
                    got.append((f.id, f.data))
                    if f.id == "evt_1":
                        took_first.set()
                        await was_reset.wait()  # the pump busy meanwhile
        assert got == [("evt_1", b"{}"), ("evt_2", b"{}")]
        assert "reset" in str(caught.value).lower()


async def test_a_body_cut_short_breaks_the_stream() -> None:
    """Scenario: the server closes (FIN) in the middle of a chunk: that is no clean end of the
    stream but a broken one (ApiUnavailable, incomplete chunked read), after the whole frame."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", b"{}")) + b"40\r\nid: evt_2\n")
        await writer.drain()
        writer.close()

    async with serving(script) as served, stream_api(served.url) as api:
        got = []
        with pytest.raises(ApiUnavailable, match=r"RemoteProtocolError.*incomplete chunked read"):
            async with api.stream_thread(THREAD, None) as frames:
                async for f in frames:
                    got.append(f.id)
        assert got == ["evt_1"]


async def test_a_refused_connection_is_a_refused_stream() -> None:
    """Scenario: nothing listens on the port: StreamRefused, naming the ConnectError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with stream_api(f"http://127.0.0.1:{port}/api/v1/cloud") as api:
        with pytest.raises(StreamRefused, match="ConnectError"):
            await read_frames(api)


async def test_a_server_that_accepts_no_connection_is_a_refused_stream() -> None:
    """Scenario: the server's accept queue is full, so the connection never completes: after
    the connect timeout (the request timeout, 0.5 s here) the stream is StreamRefused, naming
    the ConnectTimeout, and nothing is left open."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        try:
            for sock in queued:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
            url = f"http://127.0.0.1:{port}/api/v1/cloud"
            async with stream_api(url, request_timeout_s=0.5) as api:
                with pytest.raises(
                    StreamRefused, match=r"ConnectTimeout: no connection within 0\.5 s"
                ):
                    await read_frames(api)
        finally:
            for sock in queued:
                sock.close()


# -- cancellation ----------------------------------------------------------------------------------


async def test_a_cancelled_reader_closes_its_socket_at_once() -> None:
    """Scenario: a pump waiting on an idle stream is cancelled (unfollowed, drained): the
    server sees the connection go, and nothing is left behind (see nothing_left_behind)."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", b"{}")))
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await ids_until_cancelled(api) == ["evt_1"]
        with anyio.fail_after(5):
            await served.gone.wait()


async def test_a_reader_cancelled_before_the_answer_closes_its_socket() -> None:
    """Scenario: cancelled while the server has not answered yet: the connection goes too."""
    answered = anyio.Event()

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        answered.set()  # the request has come; no answer follows

    async with serving(script) as served, stream_api(served.url) as api:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_frames, api)
            with anyio.fail_after(5):
                await answered.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await served.gone.wait()


# -- answers that are not an event stream ----------------------------------------------------------


ERROR_BODY = b'{"error":{"type":"overloaded_error","message":"try later"},"request_id":"req_7"}'


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_error_answer_is_read_and_reported(framing: str) -> None:
    """Scenario: 503 with a JSON error body and Retry-After, framed by length or by chunks: the
    stream is refused with the API's own message and request id, and the hint to wait 7 s."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        head += b"Retry-After: 7\r\n"
        if framing == "length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(ERROR_BODY) + ERROR_BODY)
        else:
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            writer.write(chunk(ERROR_BODY[:20]) + chunk(ERROR_BODY[20:]) + LAST_CHUNK)
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        with pytest.raises(StreamRefused) as caught:
            await read_frames(api)
    assert str(caught.value) == f"GET {EVENTS_PATH}: HTTP 503 try later (request_id req_7)"
    assert caught.value.retry_after_s == 7


async def test_a_rejected_token_is_reported_from_the_body() -> None:
    """Scenario: 401 with the API's error envelope: AuthRejected, with its message."""
    body = b'{"error":{"type":"authentication_error","message":"bad token"}}'

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        with pytest.raises(AuthRejected, match="HTTP 401 bad token"):
            await read_frames(api)


async def test_json_on_the_events_route_moves_to_the_stream_route() -> None:
    """Scenario: a server whose events route answers JSON even to ``Accept: text/event-stream``
    and whose ``/stream`` route streams: the frames come from ``/stream``, which is learnt."""
    page = b'{"data":[],"has_more":false}'

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if b"/events " in served.heads[-1]:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(page) + page
            )
        else:
            writer.write(CHUNKED_HEAD + chunk(SSE) + LAST_CHUNK)
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await read_frames(api) == EXPECTED
        assert api.stream_route == "stream"
    assert [h.split(b" ")[1].rsplit(b"/", 1)[1] for h in served.heads] == [b"events", b"stream"]


async def test_a_gzip_stream_is_decoded() -> None:
    """Scenario: the stream comes gzip-encoded (Content-Encoding): httpx decodes it on top of
    the transport, and the frames are the same."""
    import gzip  # noqa: PLC0415

    body = gzip.compress(SSE)

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            SSE_HEAD[:-2] + b"\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(chunk(body[:9]) + chunk(body[9:]) + LAST_CHUNK)
        await writer.drain()

    async with serving(script) as served, stream_api(served.url) as api:
        assert await read_frames(api) == EXPECTED


# -- TLS -------------------------------------------------------------------------------------------


def server_tls(pki: KafkaPki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.broker_cert, pki.broker_key)  # localhost and 127.0.0.1
    return context


async def _tls_script(
    served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(CHUNKED_HEAD + chunk(SSE) + LAST_CHUNK)
    await writer.drain()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_an_https_stream_is_verified_against_the_given_ca(
    kafka_pki: KafkaPki, host: str
) -> None:
    """Scenario: https with a server certificate from a private CA, the client trusting that
    CA (the daemon's one TLS context): the frames come, byte for byte."""
    client = ssl.create_default_context(cafile=kafka_pki.ca)
    async with (
        serving(_tls_script, tls=server_tls(kafka_pki), host=host) as served,
        stream_api(served.url, tls=client) as api,
    ):
        assert await read_frames(api) == EXPECTED


async def test_an_https_server_with_an_unknown_certificate_is_refused(kafka_pki: KafkaPki) -> None:
    """Scenario: the client trusts another CA: the stream is refused (certificate verify
    failed), no byte of it read, and nothing left open."""
    client = ssl.create_default_context(cafile=kafka_pki.other_ca)
    async with (
        serving(_tls_script, tls=server_tls(kafka_pki)) as served,
        stream_api(served.url, tls=client) as api,
    ):
        with pytest.raises(StreamRefused, match=r"ConnectError.*CERTIFICATE_VERIFY_FAILED"):
            await read_frames(api)
    assert served.heads == []


async def test_a_cancelled_https_reader_closes_its_connection(kafka_pki: KafkaPki) -> None:
    """Scenario: the idle-stream cancellation of above, over TLS: the server sees it go."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", b"{}")))
        await writer.drain()

    client = ssl.create_default_context(cafile=kafka_pki.ca)
    async with (
        serving(script, tls=server_tls(kafka_pki)) as served,
        stream_api(served.url, tls=client) as api,
    ):
        assert await ids_until_cancelled(api) == ["evt_1"]
        with anyio.fail_after(5):
            await served.gone.wait()


async def test_an_idle_https_stream_holds_no_big_buffer(kafka_pki: KafkaPki) -> None:
    """Scenario: 20 https streams open and idle. Each holds a few KiB of Python objects, not
    the 256 KiB read buffer asyncio's own SSL transport gives every connection (which would
    make 10,000 streams cost 2.5 GiB): at most 16 KiB a stream, TLS state and all."""

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(b": heartbeat\n\n"))
        await writer.drain()

    client = ssl.create_default_context(cafile=kafka_pki.ca)
    async with (
        serving(script, tls=server_tls(kafka_pki)) as served,
        httpx.AsyncClient(transport=StreamTransport(client), trust_env=False) as http,
    ):
        bodies = []
        tracemalloc.start(32)  # deep enough to see the client's calls under the loop's
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(20):
                request = http.build_request("GET", served.url, timeout=httpx.Timeout(10))
                body = body_of(await http.send(request, stream=True))
                assert body is not None
                assert await anext(body) == b": heartbeat\n\n"
                bodies.append(body)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
            for body in bodies:
                await body.aclose()
    # The client's allocations only: the server here is asyncio's, with its own big buffers.
    client_side = [tracemalloc.Filter(True, stream_transport.__file__, all_frames=True)]
    diff = after.filter_traces(client_side).compare_to(
        before.filter_traces(client_side), "filename"
    )
    held = sum(stat.size_diff for stat in diff) / len(bodies)
    assert 0 < held <= 16 * 1024, f"{held / 1024:.1f} KiB a stream"


# -- big frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
async def test_frames_of_megabytes_arrive_whole_or_as_counted_dead_letters(
    secure: bool, request: pytest.FixtureRequest
) -> None:
    """Scenario (BRIDGE_MAX_EVENT_BYTES 8 MiB), plain and over TLS: a 6 MiB frame in one chunk,
    a 40 MiB frame written in 1 MiB pieces, then a small one. The first arrives byte for byte;
    the second comes out oversize with its size counted in full and its first 4 KiB; the third
    intact."""
    pki: KafkaPki | None = request.getfixturevalue("kafka_pki") if secure else None
    big = b'{"id":"evt_1","blob":"' + bytes(range(65, 91)) * (6 * MiB // 26) + b'"}'
    huge_piece = b"x" * MiB

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_HEAD + chunk(frame("evt_1", big)))
        writer.write(chunk(b"id: evt_2\ndata: "))
        for _ in range(40):
            writer.write(chunk(huge_piece))
            await writer.drain()
        writer.write(chunk(b"\n\n" + frame("evt_3", b'{"id":"evt_3"}')) + LAST_CHUNK)
        await writer.drain()

    async with (
        serving(script, tls=server_tls(pki) if pki else None) as served,
        stream_api(
            served.url,
            max_event_bytes=8 * MiB,
            tls=ssl.create_default_context(cafile=pki.ca) if pki else None,
        ) as api,
        api.stream_thread(THREAD, None) as frames,
    ):
        got = [f async for f in frames]
    assert [(f.id, f.oversize, f.size) for f in got] == [
        ("evt_1", False, len(big)),
        ("evt_2", True, 40 * MiB),
        ("evt_3", False, 14),
    ]
    assert got[0].data == big
    assert got[1].data == b"x" * 4096
    assert got[2].data == b'{"id":"evt_3"}'


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
async def test_a_reader_that_stops_reading_stops_the_socket_being_read(
    secure: bool, request: pytest.FixtureRequest
) -> None:
    """Scenario, plain and over TLS: the server pushes a 64 MiB body into a reader that takes
    1 MiB and then stops (Kafka away): the transport stops reading the socket with at most
    HIGH_WATER plus one socket read held, so the server is held back (its writes wait) instead
    of the bridge's memory growing; once read again, every byte arrives in order."""
    pki: KafkaPki | None = request.getfixturevalue("kafka_pki") if secure else None
    total, piece = 64 * MiB, bytes(range(256)) * 4096  # 1 MiB

    async def script(
        served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()
            served.sent += len(piece)

    tls = ssl.create_default_context(cafile=pki.ca) if pki else None
    async with (
        serving(script, tls=server_tls(pki) if pki else None) as served,
        httpx.AsyncClient(transport=StreamTransport(tls), trust_env=False) as client,
    ):
        get = client.build_request("GET", served.url, timeout=httpx.Timeout(10))
        response = await client.send(get, stream=True)
        body = body_of(response)
        assert body is not None
        try:
            received = bytearray()
            while len(received) < MiB:
                received += await anext(body)
            with anyio.fail_after(10):
                while not body.reading_paused:
                    await anyio.sleep(0.01)
            assert body.unread_bytes <= HIGH_WATER + 256 * 1024
            assert served.sent < total // 2  # the rest waits in the server
            async for part in body:
                received += part
        finally:
            await body.aclose()
    assert len(received) == total
    assert received == piece * (total // len(piece))
