"""Writes one SSE connection: backlog in large batches, then live events, heartbeats, faults.

Frames are pre-built per event (:class:`~bridge.simulator.state.Event`), so a batch is one
``b"".join`` and one ``send``. The slow path (frame by frame) runs only when this connection has
faults or delta frames to weave in.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from bridge.simulator.faults import StreamPlan
from bridge.simulator.state import Event, EventLog, canonical

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Outcome = Literal["end", "drop"]

HEARTBEATS = {"comment": b": heartbeat\n\n", "event": b"event: heartbeat\ndata: {}\n\n"}
BATCH_BYTES = 256 * 1024
BATCH_FRAMES = 2048
_DELTA_TYPES = ("agent.message", "agent.thinking")


@dataclass
class StreamConn:
    log: EventLog
    pos: int  # next index to send
    live_from: int  # events at or past this index were appended while connected
    plan: StreamPlan
    heartbeat: bytes
    heartbeat_s: float
    deltas: bool
    is_final: Callable[[], bool] | None  # set when the stream ends on a final thread/session
    served: list[str] = field(default_factory=list)
    frames: int = 0


async def write_stream(send: Send, conn: StreamConn) -> Outcome:
    """Serves until cancelled, a planned drop ("drop") or a final thread or session ("end")."""
    log, plan = conn.log, conn.plan
    slow = plan.frame_faults or plan.non_json_rate > 0 or conn.deltas
    while True:
        changed = log.changed()
        if conn.pos < len(log):
            if slow:
                if await _send_slow(send, conn):
                    return "drop"
            else:
                await _send_batch(send, conn)
            continue
        if conn.is_final is not None and conn.is_final():
            return "end"
        with anyio.move_on_after(conn.heartbeat_s) as waited:
            await changed.wait()
        if waited.cancelled_caught:
            await _body(send, conn.heartbeat)


async def _send_batch(send: Send, conn: StreamConn) -> None:
    events = conn.log.events
    end, size = conn.pos, 0
    stop = min(len(events), conn.pos + BATCH_FRAMES)
    while end < stop and size < BATCH_BYTES:
        size += len(events[end].frame)
        end += 1
    batch = events[conn.pos : end]
    conn.pos = end
    conn.frames += len(batch)
    conn.served.extend(e.id for e in batch if e.id)
    await _body(send, b"".join(e.frame for e in batch))


async def _send_slow(send: Send, conn: StreamConn) -> bool:
    """One batch, frame by frame; True when the planned drop happened."""
    plan, chunks, size = conn.plan, [], 0
    stop = min(len(conn.log), conn.pos + BATCH_FRAMES)
    while conn.pos < stop and size < BATCH_BYTES:
        event = conn.log.events[conn.pos]
        frames = [] if (bad := plan.garbage(conn.frames)) is None else [bad]
        if conn.deltas and event.id and conn.pos >= conn.live_from and event.type in _DELTA_TYPES:
            frames.extend(delta_frames(event))
        frames.append(event.frame)
        for frame in frames:
            if conn.frames == plan.drop_after:
                if plan.drop_mid_frame:
                    chunks.append(frame[: max(1, len(frame) // 2)])
                await _body(send, b"".join(chunks))
                return True
            if conn.frames == plan.stall_after:
                plan.stall_after = None
                await _body(send, b"".join(chunks))
                chunks, size = [], 0
                await anyio.sleep(plan.stall_s)  # nothing at all, not even heartbeats
            chunks.append(frame)
            size += len(frame)
            conn.frames += 1
        if event.id:
            conn.served.append(event.id)
        conn.pos += 1
    await _body(send, b"".join(chunks))
    return False


def delta_frames(event: Event) -> list[bytes]:
    """Stream-only frames announcing ``event`` before it is sent whole (G4 ``event_deltas``)."""
    head = f"id: {event.id}\nevent: ".encode()
    start = {"event": {"id": event.id, "type": event.type}, "type": "event_start"}
    frames = [head + b"event_start\ndata: " + canonical(start) + b"\n\n"]
    if event.type == "agent.message":  # thinking deltas are start-only
        data = json.loads(event.raw.decode("utf-8", "replace"))  # raw may be invalid UTF-8
        text = "".join(b.get("text", "") for b in data.get("content", []))
        step = max(1, len(text) // 3)
        for at in range(0, len(text), step):
            content = {"text": text[at : at + step], "type": "text"}
            delta = {"content": content, "index": 0, "type": "content_delta"}
            data = {"delta": delta, "event_id": event.id, "type": "event_delta"}
            frames.append(head + b"event_delta\ndata: " + canonical(data) + b"\n\n")
    return frames


async def _body(send: Send, chunk: bytes) -> None:
    if chunk:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _transport(send: Send) -> asyncio.Transport | None:
    # uvicorn hands the app its request cycle's bound ``send``; the cycle holds the transport.
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


async def cut(send: Send, receive: Receive, *, reset: bool = False) -> None:
    """Closes the connection under the response: what the client sees is an incomplete body
    (or, with ``reset``, a TCP reset before any byte)."""
    transport = _transport(send)
    if transport is None:
        raise ConnectionAbortedError("cannot reach the transport to cut the connection")
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()  # flushes what was written, then FIN
    with anyio.move_on_after(2):  # until uvicorn has seen the connection go
        while (await receive())["type"] != "http.disconnect":
            pass
