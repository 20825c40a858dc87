"""An event stream as QoderApi hands it to a pump: frames decoded from whatever the server
sent (plain or gzip), its errors re-raised as the bridge's, and the response closed when the
``async with`` ends, however it ends."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import httpx
import pytest

from bridge.api import QoderApi, RateLimiter
from bridge.errors import ApiUnavailable, StreamStalled
from bridge.records import ThreadRef

pytestmark = pytest.mark.anyio

BASE = "http://qoder.test/api/v1/cloud"
THREAD = ThreadRef("sess_01a22a37f07f7004ab3a505789491f4a", "sthr_01a22a37f07f7002aadbb8625121f6f9")
SSE = (
    b": heartbeat\n\n"
    b'id: evt_1\nevent: agent.message\ndata: {"id":"evt_1","text":"caf\xc3\xa9"}\n\n'
    b"event: heartbeat\ndata: {}\n\n"
    b'id: evt_2\ndata: {"id":"evt_2",\ndata: "n":1}\n\n'
)


class Chunks(httpx.AsyncByteStream):
    """A response body sent in the given pieces, then an error (or the end); remembers being
    closed."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks, self.error, self.closed = chunks, error, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


def _api(body: Chunks, headers: dict[str, str]) -> QoderApi:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=body, headers=headers)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return QoderApi(
        client,
        client,
        BASE,
        lambda: "token",
        RateLimiter(1000),
        stall_timeout_s=5,
        request_timeout_s=5,
        max_event_bytes=1 << 20,
    )


async def _frames(api: QoderApi) -> list[tuple[str, bytes, str | None]]:
    async with api.stream_thread(THREAD, None) as frames:
        return [(f.event, f.data, f.id) async for f in frames]


EXPECTED = [
    ("agent.message", b'{"id":"evt_1","text":"caf\xc3\xa9"}', "evt_1"),
    ("heartbeat", b"{}", None),
    ("", b'{"id":"evt_2",\n"n":1}', "evt_2"),
]


@pytest.mark.parametrize("pieces", [1, 7, len(SSE)])
async def test_a_plain_stream_gives_its_frames_whatever_the_pieces(pieces: int) -> None:
    """Scenario: the same stream arrives in one piece, in pieces of 7 bytes, or byte by byte:
    the same frames, bytes unchanged, and the response is closed after the ``async with``."""
    size = -(-len(SSE) // pieces)
    body = Chunks([SSE[i : i + size] for i in range(0, len(SSE), size)])
    assert await _frames(_api(body, {"content-type": "text/event-stream"})) == EXPECTED
    assert body.closed


async def test_a_gzip_stream_is_decoded() -> None:
    """Scenario: a server (or a proxy) compresses the event stream: the frames are those of
    the decompressed bytes."""
    packed = gzip.compress(SSE)
    body = Chunks([packed[:10], packed[10:]])
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    assert await _frames(_api(body, headers)) == EXPECTED
    assert body.closed


async def test_a_stream_that_breaks_is_an_api_error_and_is_closed() -> None:
    """Scenario: the connection drops after the first frame: that frame comes, then the
    bridge's ApiUnavailable (never an httpx error), and the response is closed."""
    body = Chunks(
        [SSE[: SSE.index(b"\n\n", 13) + 2]], httpx.RemoteProtocolError("peer closed connection")
    )
    seen: list[str | None] = []
    with pytest.raises(ApiUnavailable, match="stream broke: RemoteProtocolError"):
        async with _api(body, {"content-type": "text/event-stream"}).stream_thread(
            THREAD, None
        ) as frames:
            async for frame in frames:
                seen.append(frame.id)
    assert seen == ["evt_1"]
    assert body.closed


async def test_a_stream_without_bytes_for_too_long_is_stalled() -> None:
    """Scenario: the read times out (no byte, not even a heartbeat): StreamStalled."""
    body = Chunks([], httpx.ReadTimeout("timed out"))
    with pytest.raises(StreamStalled):
        await _frames(_api(body, {"content-type": "text/event-stream"}))
    assert body.closed


async def test_a_pump_that_stops_reading_closes_the_stream() -> None:
    """Scenario: the reader leaves the ``async with`` early (a drain, a rewind, an error of
    its own): the response is closed all the same."""
    body = Chunks([SSE])
    with pytest.raises(LookupError):
        async with _api(body, {"content-type": "text/event-stream"}).stream_thread(
            THREAD, None
        ) as frames:
            async for _frame in frames:
                raise LookupError("the reader's own error")
    assert body.closed
