"""The bridge's SSE decoder: bytes kept exact, ids only where the frame set one, size bounded."""

from __future__ import annotations

import pytest

from bridge.sse import EXCERPT_BYTES, Frame, FrameDecoder


def _decode(stream: bytes, *, chunk: int = 7, max_frame_bytes: int = 1 << 20) -> list[Frame]:
    decoder = FrameDecoder(max_frame_bytes)
    frames: list[Frame] = []
    for i in range(0, len(stream), chunk):
        frames += decoder.feed(stream[i : i + chunk])
    return frames + decoder.flush()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_frames_split_on_every_sse_line_ending(chunk: int, newline: bytes) -> None:
    """Every line ending of the spec, at any chunk boundary; U+2028 is not a line ending."""
    text = "a\u2028b".encode()
    stream = newline.join(
        [b"id: evt_1", b"event: agent.message", b'data: {"t":"' + text + b'"}', b"", b""]
    )
    frames = _decode(stream, chunk=chunk)
    assert frames == [Frame("agent.message", b'{"t":"' + text + b'"}', "evt_1", len(text) + 8)]


def test_a_frame_without_its_own_id_has_none() -> None:
    """httpx-sse repeats the previous id; here only a frame's own `id:` line counts."""
    stream = (
        b"id: evt_1\nevent: agent.message\ndata: {}\n\n"
        b": heartbeat\n\n"
        b'event: event_delta\ndata: {"delta":1}\n\n'
        b"event: heartbeat\ndata: {}\n\n"
    )
    frames = _decode(stream)
    assert [(f.event, f.id) for f in frames] == [
        ("agent.message", "evt_1"),
        ("event_delta", None),
        ("heartbeat", None),
    ]


def test_invalid_utf8_stays_as_sent() -> None:
    """The decoder never replaces bytes: the pump decides what invalid UTF-8 means."""
    (frame,) = _decode(b'id: evt_1\ndata: {"t":"\xff\xe2\x82"}\n\n')
    assert frame.data == b'{"t":"\xff\xe2\x82"}'


def test_multi_line_data_is_joined_with_newlines() -> None:
    (frame,) = _decode(b"id: e\ndata: {\ndata: }\n\n")
    assert frame.data == b"{\n}"


@pytest.mark.parametrize("chunk", [1000, 65536])
def test_an_oversize_frame_is_cut_to_an_excerpt_and_the_stream_goes_on(chunk: int) -> None:
    """A 1 MiB data line against a 64 KiB limit: an excerpt, its id, and the next frame whole."""
    huge = b"x" * (1 << 20)
    stream = b"id: evt_big\nevent: agent.tool_result\ndata: " + huge + b"\n\n"
    stream += b"id: evt_next\ndata: {}\n\n"
    decoder = FrameDecoder(64 * 1024)
    frames: list[Frame] = []
    held = 0
    for i in range(0, len(stream), chunk):
        frames += decoder.feed(stream[i : i + chunk])
        held = max(held, decoder._pending_len)
    big, nxt = frames
    assert big.oversize and big.id == "evt_big" and big.event == "agent.tool_result"
    assert big.data == huge[:EXCERPT_BYTES]
    assert big.size >= len(huge)
    assert nxt == Frame("", b"{}", "evt_next", 2)
    assert held <= 64 * 1024 + chunk


def test_many_data_lines_past_the_limit_are_oversize() -> None:
    stream = b"id: e\n" + b"data: 0123456789\n" * 10_000 + b"\n"
    (frame,) = _decode(stream, chunk=4096, max_frame_bytes=65536)
    assert frame.oversize and len(frame.data) <= EXCERPT_BYTES
    assert frame.size > 65536


def test_a_frame_cut_by_the_end_of_the_stream_is_not_a_frame() -> None:
    assert _decode(b'id: evt_1\ndata: {}\n\nid: evt_2\ndata: {"half') == [
        Frame("", b"{}", "evt_1", 2)
    ]


def test_a_leading_bom_is_ignored() -> None:
    assert _decode(b"\xef\xbb\xbfid: e\ndata: 1\n\n") == [Frame("", b"1", "e", 1)]
