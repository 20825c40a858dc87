"""Server-Sent Events, decoded from bytes, one frame at a time, with nothing taken on trust.

httpx-sse decodes text (invalid UTF-8 silently becomes U+FFFD), gives every frame the last
``id:`` seen on the stream (a delta or a malformed frame would then move a cursor), and holds a
frame of any size in memory. The bridge needs the opposite on all three counts, so frames are
decoded here, per the WHATWG rules for lines and fields:

- ``data`` stays bytes, exactly as sent (lines joined with ``\\n``);
- ``id`` is the frame's *own* ``id:`` line, or None: only such a frame may move a cursor;
- a frame larger than ``max_frame_bytes`` is not held: its first bytes are kept as an excerpt,
  the rest is counted and dropped, and the frame comes out marked ``oversize``.

Comment lines (``: heartbeat``) never make a frame.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

#: How much of an oversize frame is kept, for the dead letter.
EXCERPT_BYTES = 4096
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Frame:
    event: str  # "" when the frame has no ``event:`` line
    data: bytes
    id: str | None  # the frame's own ``id:`` line only
    size: int = 0  # bytes of data, counted in full even when oversize
    oversize: bool = False


class FrameDecoder:
    """Bytes in, frames out. Memory is bounded by ``max_frame_bytes`` whatever the stream does."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._skipping_line = False  # inside an over-long line: drop bytes until its end
        self._skipping_data = False  # ... and that line is a data line (it counts as size)
        self._after_cr = False
        self._first = True
        self._head = b""  # the first bytes, until a BOM split across chunks can be told
        self._reset()

    def _reset(self) -> None:
        self._event = ""
        self._data: list[bytes] = []
        self._id: str | None = None
        self._size = 0
        self._oversize = False
        self._bad_id = False
        self._any = False

    def feed(self, chunk: bytes) -> list[Frame]:
        if self._first and chunk:
            head = self._head + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return []
            self._first, self._head = False, b""
            chunk = head.removeprefix(_BOM)
        if self._after_cr and chunk:
            # The last chunk ended in \r, already taken as a line end: \r\n is one ending.
            self._after_cr = False
            chunk = chunk.removeprefix(b"\n")
        if b"\n" not in chunk and b"\r" not in chunk:
            # The common case for a big frame: more of the same line. Joined once, at its end.
            self._pending.append(chunk)
            self._pending_len += len(chunk)
            self._bound_pending()
            return []
        buffer = b"".join(self._pending) + chunk
        self._pending, self._pending_len = [], 0
        self._after_cr = buffer.endswith(b"\r")
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        partial = lines.pop()
        frames: list[Frame] = []
        for line in lines:
            if self._skipping_line:
                self._skipping_line = False  # the over-long line ends here
                if self._skipping_data:
                    self._size += len(line)
                continue
            frame = self._line(line)
            if frame is not None:
                frames.append(frame)
        if partial:
            self._pending, self._pending_len = [partial], len(partial)
            self._bound_pending()
        return frames

    def _bound_pending(self) -> None:
        """One line longer than any frame may be: keep its start, drop the rest as it comes."""
        if self._skipping_line:
            if self._skipping_data:
                self._size += self._pending_len
        elif self._pending_len > self._max:
            head = b"".join(self._pending)[: EXCERPT_BYTES + 16]
            name = head.partition(b":")[0]
            self._skipping_data = name == b"data"
            if name in (b"data", b"id"):
                # A data line: the frame is oversize. An id line that long is no id: the
                # frame goes to the dead letters without one.
                self._line(head, truncated_to=self._pending_len)
            self._skipping_line = True
        else:
            return
        self._pending, self._pending_len = [], 0

    def flush(self) -> list[Frame]:
        """End of stream: a frame without its closing blank line is not a frame (the spec)."""
        self._pending, self._pending_len = [], 0
        self._reset()
        return []

    def _line(self, line: bytes, truncated_to: int | None = None) -> Frame | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._any = True
            size = (truncated_to or len(line)) - (len(line) - len(value))
            self._size += size + (1 if self._data else 0)
            if self._size > self._max or truncated_to is not None:
                self._oversize = True
            if not self._oversize:
                self._data.append(value)
            elif sum(len(d) for d in self._data) < EXCERPT_BYTES:
                self._data.append(value[:EXCERPT_BYTES])
        elif name == b"event":
            self._any = True
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self._any = True
            if truncated_to is not None:
                self._id, self._oversize = None, True
                self._bad_id = True
            elif b"\0" not in value and not self._bad_id:
                self._id = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> Frame | None:
        if not self._any:
            self._reset()
            return None
        data = b"\n".join(self._data)
        if self._oversize:
            data = data[:EXCERPT_BYTES]
        frame = Frame(self._event, data, self._id or None, self._size, self._oversize)
        self._reset()
        return frame


async def decode_frames(chunks: AsyncIterator[bytes], max_frame_bytes: int) -> AsyncIterator[Frame]:
    # No cancel scope or task group here: this generator only decodes.
    decoder = FrameDecoder(max_frame_bytes)
    async for chunk in chunks:
        for frame in decoder.feed(chunk):
            yield frame
