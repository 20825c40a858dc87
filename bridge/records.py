"""What goes to Kafka: event records, alerts, dead letters and checkpoints.

Every record is built here and nowhere else, so the wire format in the README has one source.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from bridge.shards import shard_of

Headers = list[tuple[str, bytes]]

#: Alerts that copy a Qoder event, by event type. ``session.status_idle`` is an alert only when
#: the turn paused for a human (``stop_reason.type == "requires_action"``).
ALERTING_EVENT_TYPES = frozenset(
    {
        "session.error",
        "session.status_terminated",
        "session.thread_status_terminated",
        "session.deleted",
        "terminated",
    }
)

#: Frames that exist only on a stream (Model B deltas, Model A incremental events are real).
DELTA_FRAME_TYPES = frozenset({"event_start", "event_delta"})

DLQ_EXCERPT_BYTES = 4096


def canonical_json(obj: Any) -> bytes:
    """The bytes the API would have sent for this object in a JSON page."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class ThreadRef:
    session_id: str
    thread_id: str

    @property
    def key(self) -> str:
        return f"{self.session_id}/{self.thread_id}"

    @property
    def source(self) -> str:
        return f"/sessions/{self.session_id}/threads/{self.thread_id}"


@dataclass(slots=True)
class Event:
    """One buffered Qoder event: its exact bytes and the parsed fields the bridge looks at.

    Not frozen, as Record and RawItem: a frozen dataclass sets each field through
    ``object.__setattr__``, four times slower, and these are made for every event."""

    id: str
    type: str
    data: bytes
    fields: dict[str, Any] = field(repr=False)

    @property
    def time(self) -> str | None:
        value = self.fields.get("processed_at") or self.fields.get("created_at")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Something read from the API that cannot be published as an event, and why.

    ``reason``: ``not_json``, ``not_object``, ``missing_id``, ``invalid_utf8``, ``too_large``,
    ``too_deep``.
    ``data`` is what was read (only its first bytes when too large); ``size`` the full size.
    """

    reason: str
    data: bytes
    id: str | None
    type: str | None
    size: int


#: What a reason means, for the dead letter's ``dlq_message`` header.
REJECTION_MESSAGES = {
    "not_json": "the frame's data is not JSON",
    "not_object": "the item is JSON but not an object",
    "missing_id": "the event has no id",
    "invalid_utf8": "the event is not valid UTF-8",
    "too_large": "the event is larger than the bridge may read or Kafka may take",
    "too_deep": "the event is nested deeper than the bridge's JSON decoders go",
}


@dataclass(slots=True)
class Record:
    topic: str
    key: bytes
    value: bytes
    headers: Headers
    #: Bytes of key, value and headers, counted once (the budget and the limits ask often);
    #: a builder that knows it passes it, else it is counted here.
    size: int = field(default=-1, repr=False, compare=False)
    #: Where the record must go (a checkpoint: its session's shard); None: by its key.
    partition: int | None = None

    def __post_init__(self) -> None:
        if self.size < 0:
            size = len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers)
            self.size = size


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _thread_headers(thread: ThreadRef) -> Headers:
    return [
        ("qoder_session_id", thread.session_id.encode()),
        ("qoder_thread_id", thread.thread_id.encode()),
    ]


@functools.lru_cache(maxsize=4096)
def _event_parts(thread: ThreadRef) -> tuple[bytes, tuple[str, bytes], Headers, int]:
    """What every event record of a thread shares: its key, ``ce_source``, the trailing
    headers, and their size. Built once per thread, not once per event."""
    key = thread.key.encode()
    source = ("ce_source", thread.source.encode())
    tail = [("content-type", b"application/json"), *_thread_headers(thread)]
    fixed = ("ce_specversion", b"1.0")
    size = len(key) + sum(len(k) + len(v) for k, v in (fixed, source, *tail))
    return key, source, tail, size


_SPECVERSION = ("ce_specversion", b"1.0")
_HEADER_NAMES = len("ce_id") + len("ce_type")


def event_record(topic: str, thread: ThreadRef, event: Event) -> Record:
    """The CloudEvents (Kafka binding, binary mode) record for one Qoder event."""
    key, source, tail, size = _event_parts(thread)
    ce_id, ce_type = event.id.encode(), event.type.encode()
    headers: Headers = [_SPECVERSION, ("ce_id", ce_id), ("ce_type", ce_type), source]
    size += _HEADER_NAMES + len(ce_id) + len(ce_type) + len(event.data)
    time = event.time
    if time is not None:
        ce_time = time.encode()
        headers.append(("ce_time", ce_time))
        size += len("ce_time") + len(ce_time)
    headers.extend(tail)
    return Record(topic, key, event.data, headers, size)


def alert_reason(event: Event) -> str | None:
    """Why this Qoder event deserves an alert, or None."""
    if event.type in ALERTING_EVENT_TYPES:
        if event.type == "session.error":
            error = event.fields.get("error")
            if isinstance(error, dict) and isinstance(error.get("type"), str):
                return str(error["type"])
            return "session_error"
        return "terminated"
    if event.type in {"session.status_idle", "session.thread_status_idle"}:
        stop = event.fields.get("stop_reason")
        if isinstance(stop, dict) and stop.get("type") == "requires_action":
            return "requires_action"
    return None


def alert_record(
    topic: str,
    thread: ThreadRef | None,
    alert_type: str,
    reason: str,
    *,
    event: Event | None = None,
    detail: dict[str, Any] | None = None,
) -> Record:
    """A small JSON alert document; the schema is documented in the README."""
    doc: dict[str, Any] = {
        "type": alert_type,
        "reason": reason,
        "source": "qoder" if event is not None else "bridge",
        "session_id": thread.session_id if thread else None,
        "thread_id": thread.thread_id if thread else None,
        "event_id": event.id if event else None,
        "event_type": event.type if event else None,
        "time": (event.time if event else None) or utc_now(),
    }
    value = _document(doc)
    if event is not None:
        # The event's own bytes (JSON, as the API sent them), not json.dumps of what was decoded
        # from them: 1E400 would be Infinity, a lone surrogate escape would not encode.
        value = value[:-1] + b',"event":' + event.data + b"}"
    if detail:
        value = value[:-1] + b',"detail":' + _document(detail) + b"}"
    key = (thread.key if thread else "bridge").encode()
    headers: Headers = [("content-type", b"application/json"), ("alert_type", alert_type.encode())]
    if thread is not None:
        headers.extend(_thread_headers(thread))
    return Record(topic, key, value, headers)


def _document(doc: dict[str, Any]) -> bytes:
    """``canonical_json``, or with ASCII escapes where a string holds a lone surrogate (the
    API's ``\\ud83d`` decoded): the same JSON value, still valid UTF-8."""
    try:
        return canonical_json(doc)
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def dead_letter_record(
    topic: str,
    thread: ThreadRef,
    reason: str,
    data: bytes,
    *,
    event_id: str | None,
    event_type: str | None,
    limit_bytes: int,
    size: int | None = None,
) -> Record:
    """A frame that cannot be published as an event: why, and as much of it as fits.

    The record, headers and JSON escaping included, never exceeds ``limit_bytes``: a record
    the broker refuses would block every thread. Bytes that are not UTF-8 are kept exactly,
    in ``data_base64``. Headers carry the error context (as Kafka Connect's do).
    """
    size = len(data) if size is None else size
    headers: Headers = [
        ("content-type", b"application/json"),
        ("dlq_reason", reason.encode()),
        ("dlq_message", REJECTION_MESSAGES.get(reason, reason).encode()),
        ("dlq_source", thread.source.encode()),
        ("dlq_size_bytes", str(size).encode()),
        *_thread_headers(thread),
    ]
    if event_id:
        headers.append(("ce_id", event_id.encode()))
    if event_type:
        headers.append(("ce_type", event_type.encode()))
    keep = len(data)
    while True:
        excerpt = data[:keep]
        doc: dict[str, Any] = {
            "reason": reason,
            "session_id": thread.session_id,
            "thread_id": thread.thread_id,
            "event_id": event_id,
            "event_type": event_type,
            "size_bytes": size,
            "truncated": keep < size,
            "time": utc_now(),
        }
        try:
            doc["data"] = excerpt.decode("utf-8")
        except UnicodeDecodeError:
            doc["data_base64"] = base64.b64encode(excerpt).decode()
        record = Record(topic, thread.key.encode(), canonical_json(doc), headers)
        if record.size <= limit_bytes or keep == 0:
            return record
        # Escaping can make the document several times its data: cut by the encoded size.
        keep = min(keep - 1, keep * (limit_bytes - 1024) // record.size, DLQ_EXCERPT_BYTES)
        keep = max(0, keep)


def checkpoint_record(
    topic: str,
    thread: ThreadRef,
    last_event_id: str | None,
    drained_updated_at: str | None,
    recent_ids: list[str] | None = None,
    idless_after: int = 0,
    written_at: str | None = None,
    headers: Headers | None = None,
) -> Record:
    """A thread's checkpoint. ``written_at`` (default: now) is given once for a whole batch;
    ``headers``: the shard publisher's signature, with exactly_once."""
    doc = {
        "last_event_id": last_event_id,
        "session_id": thread.session_id,
        "thread_id": thread.thread_id,
        "drained_updated_at": drained_updated_at,
        "recent_ids": recent_ids or [],
        "idless_after": idless_after,
        "written_at": written_at or utc_now(),
    }
    try:
        # canonical_json's bytes (strings, integers and None only), eight times faster.
        value = _CHECKPOINT_JSON.encode(doc)
    except UnicodeEncodeError:
        value = _document(doc)  # a lone surrogate in an id, escaped
    return Record(
        topic, thread.key.encode(), value, headers or [], partition=shard_of(thread.session_id)
    )


_CHECKPOINT_JSON = msgspec.json.Encoder()
