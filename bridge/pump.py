"""One thread: read its events from the API and hand them, in order, to the publisher.

Each attempt backfills through the JSON list strictly after the cursor, then streams over SSE
with ``after_id``/``Last-Event-ID`` set to the same cursor. Heartbeats and stream-only delta
frames never move the cursor; an event already handed on (a replay at a resume boundary) is
dropped by id. Errors are classified here: retriable ones back off with full jitter and
reconnect, a 401 waits slowly for a good token, a 404 ends the pump.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

import anyio
import structlog

from bridge import metrics
from bridge.alerts import BridgeAlerts
from bridge.api import BACKGROUND, QoderApi
from bridge.config import Settings
from bridge.cursor import ThreadCursor, place_key
from bridge.errors import (
    ApiError,
    ApiUnavailable,
    AuthRejected,
    BadCursor,
    ListCursorStuck,
    NotFound,
    StreamRefused,
    StreamStalled,
)
from bridge.publisher import Outgoing, PublisherClosed, Sink
from bridge.records import (
    DELTA_FRAME_TYPES,
    Event,
    Rejected,
    alert_reason,
    alert_record,
    dead_letter_record,
    event_record,
)
from bridge.slots import StreamSlots
from bridge.sse import Frame

_log = structlog.get_logger("bridge.pump")

#: A stream that stayed up this long resets the backoff.
HEALTHY_AFTER_S = 30.0


class PumpState(Enum):
    BACKFILLING = "backfilling"
    STREAMING = "streaming"
    LIST_POLLING = "list_polling"
    BACKOFF = "backoff"
    AUTH_WAIT = "auth_wait"
    DRAINING = "draining"
    WAITING_SLOT = "waiting_slot"


class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog), capped, reset when healthy."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s, self.attempt = initial_s, max_s, 0

    def next_delay(self, at_least_s: float = 0.0) -> float:
        ceiling = min(self.max_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return max(at_least_s, random.uniform(0, ceiling))  # noqa: S311 -- jitter, not crypto

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class PumpLimits:
    streams: StreamSlots
    #: A thread without a stream slot is read through the list this often.
    list_poll_interval_s: float = 5.0


class Pump:
    def __init__(
        self,
        cursor: ThreadCursor,
        api: QoderApi,
        publisher: Sink,
        alerts: BridgeAlerts,
        settings: Settings,
        limits: PumpLimits,
        *,
        follow: bool = True,
    ) -> None:
        self.cursor = cursor
        self.thread = cursor.thread
        self._api = api
        self._publisher = publisher
        self._alerts = alerts
        self._kafka = settings.kafka
        self._publish_deltas = settings.delivery.publish_deltas
        self._limits = limits
        self._backoff = Backoff(settings.api.backoff_initial_s, settings.api.backoff_max_s)
        #: False: a catch-up pass through the JSON list only (the thread is not running).
        self._follow = follow
        self._drain_updated_at: str | None = None
        self._stream_scope: anyio.CancelScope | None = None
        self._epoch = cursor.epoch
        #: The last id read and how often each id-less item followed it: an item without an
        #: id is known by its place (after which id, which repeat) and its bytes.
        self._anchor: str | None = None
        self._gap = 0
        #: The stream refused our cursor (400): find it through the list first.
        self._cursor_lost = False
        #: The last attempt failed: read the list before trying the stream again, so a thread
        #: whose stream cannot be opened (or stays silent) is still read.
        self._list_first = False
        self.gone = False
        #: Started by a hint that the thread runs: when (the supervisor's look in flight does
        #: not undo it), and until when a 404 means "not there yet" rather than "gone".
        self.hinted_at = float("-inf")
        self.new_until = float("-inf")
        #: What an operator sees of it (GET /status): where it is and how it went lately.
        self.state: PumpState | None = None
        self.reconnects = 0
        self.last_error: str | None = None
        #: The last event handed on: its ``processed_at`` and when (wall clock) it was read.
        self.last_event_time: str | None = None
        self.last_event_read_at: float | None = None
        #: When the current stream went live (caught up), wall clock; None when not streaming.
        self.live_since: float | None = None
        self._log: structlog.typing.FilteringBoundLogger | None = None

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """This thread's logger, bound on first use: most idle pumps never log a line."""
        if self._log is None:
            self._log = _log.bind(
                session_id=self.thread.session_id, thread_id=self.thread.thread_id
            )
        return self._log

    # -- control from the supervisor -------------------------------------------------------

    def drain(self, updated_at: str | None) -> None:
        """The thread stopped running: read what is left through the list, then finish."""
        self._follow = False
        self._drain_updated_at = updated_at
        if self._stream_scope is not None:
            self._stream_scope.cancel()

    def follow(self) -> None:
        self._follow = True

    @property
    def following(self) -> bool:
        """False while the thread is drained or caught up (a final pass through the list)."""
        return self._follow

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        # Not through self.log, which would bind a logger for a line hardly ever shown.
        _log.debug(
            "bridge.pump.started",
            session_id=self.thread.session_id,
            thread_id=self.thread.thread_id,
            cursor=self.cursor.submitted_id,
            follow=self._follow,
        )
        try:
            while not await self._read_until_drained():
                pass  # the drain's batch failed and was rewound: read again
        except PublisherClosed:
            self.log.debug("bridge.pump.stopped_by_drain", cursor=self.cursor.submitted_id)

    async def _read_until_drained(self) -> bool:
        """Read until a complete final pass; False when the drain's batch was rewound."""
        while True:
            self._epoch = self.cursor.epoch
            attempt_started = anyio.current_time()
            reason: str | None = None
            delay = 0.0
            try:
                with self._reading():
                    if self._cursor_lost:
                        # Inside the attempt, so a failure here backs off like any other read.
                        with self._state(PumpState.BACKFILLING):
                            await self._rescan()
                        self._cursor_lost = False
                    # Only a backfill that began after the drain request has read everything
                    # the thread wrote before it stopped running; the mark is the thread's
                    # updated_at as of that request, not of a later one.
                    final = not self._follow
                    mark = self._drain_updated_at
                    # History (a catch-up, a drain's final pass) waits behind live threads.
                    BACKGROUND.set(final)
                    if final or self.cursor.submitted_id is None or self._list_first:
                        # The list is read only where the stream cannot start at the cursor
                        # (there is none yet) and for a drain's final pass; a thread with a
                        # cursor resumes its stream directly: one request, not two.
                        with self._state(PumpState.BACKFILLING):
                            await self._backfill()
                        self._alerts.token_accepted(attempt_started)
                        if final and not self._follow and self._drain_updated_at == mark:
                            break
                        if not self._follow:
                            continue  # drained again meanwhile: one more, complete pass
                    # A drain must never wait for a stream slot: it cancels this scope.
                    with anyio.CancelScope() as scope:
                        self._stream_scope = scope
                        try:
                            if await self._stream_slot():
                                try:
                                    await self._stream()
                                finally:
                                    self._limits.streams.release()
                            else:
                                await self._list_pass()
                        finally:
                            self._stream_scope = None
                continue  # a rewind or a stream that ended: backfill again, then stream
            except StreamStalled:
                reason, delay = "stall", self._backoff.next_delay()
            except StreamRefused as exc:
                reason = _unavailable_reason(exc)
                delay = self._backoff.next_delay(exc.retry_after_s or 0.0)
                if self._limits.streams.refused():
                    self.log.info("bridge.pump.stream_cap", limit=self._limits.streams.limit)
            except ApiUnavailable as exc:
                reason = _unavailable_reason(exc)
                delay = self._backoff.next_delay(exc.retry_after_s or 0.0)
            except AuthRejected as exc:
                # A rejected token will not heal by hammering: retry at the slowest pace.
                reason, delay = "auth", self._backoff.max_s * random.uniform(0.8, 1.2)  # noqa: S311
                await self._alerts.token_rejected(str(exc))
            except BadCursor as exc:
                # Never a loop without a pause: the stream may refuse a cursor the list knows.
                reason, delay = "bad_cursor", self._backoff.next_delay()
                self.log.warning("bridge.pump.bad_cursor", error=str(exc))
                self._cursor_lost = True
            except NotFound as exc:
                if anyio.current_time() >= self.new_until:
                    metrics.RECONNECTS.labels(reason="not_found").inc()
                    self.log.info("bridge.pump.thread_gone", error=str(exc))
                    await self._alerts.send("bridge.thread_unreachable", "not_found", self.thread)
                    self.gone = True
                    return True
                # Announced a moment ago: the thread's own endpoints may not know it yet.
                reason, delay = "not_found", self._backoff.next_delay()
                self.log.info("bridge.pump.thread_not_there_yet", error=str(exc))
            except ListCursorStuck as exc:
                reason, delay = "other", self._backoff.max_s
                self.log.error("bridge.pump.list_stuck", error=str(exc))
                await self._alerts.send(
                    "bridge.list_stuck", "cursor_not_advancing", self.thread, {"error": str(exc)}
                )
            except ApiError as exc:
                reason, delay = "other", self._backoff.next_delay()
                self.log.warning("bridge.pump.api_error", error=str(exc))
            self._list_first = True
            self.reconnects += 1
            self.last_error = reason
            metrics.RECONNECTS.labels(reason=reason).inc()
            self.log.info("bridge.pump.reconnecting", reason=reason, delay_s=round(delay, 3))
            state = PumpState.AUTH_WAIT if reason == "auth" else PumpState.BACKOFF
            with self._state(state):
                await anyio.sleep(delay)
        return await self._commit_drain()

    async def _commit_drain(self) -> bool:
        """Hand on the drain mark and wait until it is stored: a thread whose last batch fails
        is read again by this pump, whether or not anyone still watches its session."""
        with self._state(PumpState.DRAINING):
            epoch = self.cursor.epoch
            drained = self._drain_updated_at
            committed = self.cursor.drains_committed
            await self._publisher.submit(
                Outgoing(self.cursor, epoch, [], drained_updated_at=drained, drain=True)
            )
            if epoch != self.cursor.epoch:
                return False
            self.cursor.pending_drained_updated_at = drained
            while self.cursor.epoch == epoch and self.cursor.drains_committed == committed:
                await self.cursor.settled.wait()
        if self.cursor.epoch != epoch:
            self.log.info("bridge.pump.drain_rewound", cursor=self.cursor.committed_id)
            return False
        self.log.debug("bridge.pump.drained", cursor=self.cursor.submitted_id)
        return True

    def _reading(self) -> _Reading:
        """A cancel scope around one attempt, registered on the cursor so that a rewind can
        interrupt it."""
        return _Reading(self.cursor)

    def _state(self, state: PumpState) -> _InState:
        """What GET /status and the pumps gauge show for the duration of a ``with``."""
        return _InState(self, state)

    async def _stream_slot(self) -> bool:
        """A stream slot, or False after ``list_poll_interval_s`` without one (capped)."""
        with (
            anyio.move_on_after(self._limits.list_poll_interval_s),
            self._state(PumpState.WAITING_SLOT),
        ):
            await self._limits.streams.acquire()
            return True
        return False

    async def _list_pass(self) -> None:
        """No stream for this thread now: one pass through the list, then back in the queue
        for a slot (the longest waiting gets the next one)."""
        slots = self._limits.streams
        if not slots.alerted:
            slots.alerted = True
            self.log.warning("bridge.pump.streams_capped", limit=slots.limit, max=slots.max)
            await self._alerts.send(
                "bridge.streams_capped",
                "connection_cap" if slots.limit < slots.max else "max_streams",
                self.thread,
                {"stream_limit": slots.limit, "max_streams": slots.max},
            )
        with self._state(PumpState.LIST_POLLING):
            await self._backfill()
        metrics.LIST_POLLS.inc()

    def _read_from(self, anchor: str | None) -> None:
        self._anchor = anchor
        self._gap = 0

    async def _backfill(self) -> None:
        self._read_from(self.cursor.submitted_id)
        async for page in self._api.thread_events(self.thread, self.cursor.submitted_id):
            for event in page:
                await self._handle(event)

    async def _rescan(self) -> None:
        """The API no longer knows our cursor: find it from the start, or republish everything."""
        lost = self.cursor.submitted_id
        found = False
        async for page in self._api.thread_events(self.thread, None):
            for event in page:
                if found:
                    await self._handle(event)
                elif event.id is not None and event.id == lost:
                    found = True
                    self._read_from(lost)
        if not found:
            await self._alerts.send(
                "bridge.cursor_lost", "cursor_unknown_to_api", self.thread, {"cursor": lost}
            )
            self._read_from(None)
            async for page in self._api.thread_events(self.thread, None):
                for event in page:
                    await self._handle(event)

    async def _stream(self) -> None:
        after = self.cursor.submitted_id
        self._read_from(after)
        started, started_at = time.monotonic(), anyio.current_time()
        async with self._api.stream_thread(self.thread, after) as frames:
            self._alerts.token_accepted(started_at)
            self._limits.streams.opened()
            self._list_first = False
            metrics.OPEN_STREAMS.inc()
            try:
                with self._state(PumpState.STREAMING):
                    if after is None:
                        # A fresh connection may start at the live tail: anything created between
                        # our empty backfill and this connection is fetched through the list.
                        await self._backfill()
                    if not self._follow:
                        return  # drained while connecting: the final pass reads the rest
                    self.live_since = time.time()
                    async for frame in frames:
                        await self._on_frame(frame)
                        if time.monotonic() - started > HEALTHY_AFTER_S:
                            self._backoff.reset()
            finally:
                self.live_since = None
                metrics.OPEN_STREAMS.dec()
        if time.monotonic() - started < 1.0 and self._follow:
            # The server closed at once: don't spin.
            raise ApiUnavailable("the stream closed right after it opened")

    async def _on_frame(self, frame: Frame) -> None:
        kind = frame.event or "message"
        if kind == "heartbeat" or (not frame.data and not frame.oversize):
            # A heartbeat event (a comment heartbeat makes no frame at all): never published,
            # never a cursor move.
            return
        if kind in DELTA_FRAME_TYPES and not self._publish_deltas:
            return
        # A delta may carry the id of the event in progress (qoder-api.md 5.3): never its own.
        own_id = None if kind in DELTA_FRAME_TYPES else frame.id
        if frame.oversize:
            await self._handle(Rejected("too_large", frame.data, own_id, frame.event, frame.size))
            return
        try:
            fields = json.loads(frame.data.decode("utf-8"))
        except UnicodeDecodeError:
            await self._handle(
                Rejected("invalid_utf8", frame.data, own_id, frame.event, frame.size)
            )
            return
        except ValueError:
            await self._handle(Rejected("not_json", frame.data, own_id, frame.event, frame.size))
            return
        except RecursionError:
            await self._handle(Rejected("too_deep", frame.data, own_id, frame.event, frame.size))
            return
        if not isinstance(fields, dict):
            await self._handle(Rejected("not_object", frame.data, own_id, None, frame.size))
            return
        event_type = fields.get("type") if isinstance(fields.get("type"), str) else frame.event
        if kind in DELTA_FRAME_TYPES or event_type in DELTA_FRAME_TYPES:
            if self._publish_deltas:
                await self._publish_delta(Event("", str(event_type), frame.data, fields))
            return
        event_id = fields.get("id") if isinstance(fields.get("id"), str) else frame.id
        if not event_id:
            await self._handle(Rejected("missing_id", frame.data, None, event_type, frame.size))
            return
        await self._handle(Event(str(event_id), str(event_type or ""), frame.data, fields))

    async def _publish_delta(self, delta: Event) -> None:
        """A stream-only frame: published, but it has no id of its own, so it is neither a
        cursor nor remembered; its CloudEvents id is derived from its bytes."""
        digest = hashlib.sha256(delta.data).hexdigest()[:32]
        event = Event(f"{delta.type}:{digest}", delta.type, delta.data, delta.fields)
        record = event_record(self._kafka.topic, self.thread, event)
        await self._submit(Outgoing(self.cursor, self._epoch, [record], event_type=delta.type))

    async def _handle(self, event: Event | Rejected) -> None:
        if event.id is not None:
            self._read_from(event.id)
        if isinstance(event, Rejected):
            if event.id is not None and not self.cursor.seen(event.id):
                # It moves the cursor; its time cannot be read.
                self.last_event_time, self.last_event_read_at = None, time.time()
            await self._dead_letter(event)
            return
        if self.cursor.seen(event.id):
            return  # replayed at a resume boundary
        self.last_event_time, self.last_event_read_at = event.time, time.time()
        metrics.events_received(event.type).inc()
        record = event_record(self._kafka.topic, self.thread, event)
        limit = self._publisher.record_limit(self._kafka.topic)
        if record.size > limit:
            await self._dead_letter(
                Rejected("too_large", event.data, event.id, event.type, len(event.data))
            )
            return
        records = [record]
        reason = alert_reason(event)
        if reason is not None and self._kafka.alerts_topic:
            alert = alert_record(
                self._kafka.alerts_topic, self.thread, "qoder." + event.type, reason, event=event
            )
            if alert.size > self._publisher.record_limit(self._kafka.alerts_topic):
                # The copy of a huge event would not fit: the alert names it instead.
                alert = alert_record(
                    self._kafka.alerts_topic,
                    self.thread,
                    "qoder." + event.type,
                    reason,
                    detail={"event_id": event.id, "event_omitted": "too_large"},
                )
            records.append(alert)
            metrics.ALERTS.labels(type="qoder." + event.type).inc()
        item = Outgoing(
            self.cursor,
            self._epoch,
            records,
            event_id=event.id or None,
            event_type=event.type,
            event_time=event.time,
        )
        await self._submit(item)

    async def _dead_letter(self, rejected: Rejected) -> None:
        """DLQ and alert, once: an item with an id moves the cursor past it; one without is
        remembered by its digest (in the checkpoint too), so no pass repeats it."""
        key = rejected.id or self._place_key()
        if self.cursor.seen(key):
            return
        metrics.DLQ_RECORDS.labels(reason=rejected.reason).inc()
        self.log.warning(
            "bridge.pump.dead_letter",
            reason=rejected.reason,
            event_id=rejected.id,
            size=rejected.size,
        )
        records = [
            dead_letter_record(
                self._kafka.dlq_topic,
                self.thread,
                rejected.reason,
                rejected.data,
                event_id=rejected.id,
                event_type=rejected.type,
                limit_bytes=self._publisher.record_limit(self._kafka.dlq_topic),
                size=rejected.size,
            ),
        ]
        if self._kafka.alerts_topic:
            records.append(
                alert_record(
                    self._kafka.alerts_topic,
                    self.thread,
                    "bridge.dead_letter",
                    rejected.reason,
                    detail={"event_id": rejected.id, "size_bytes": rejected.size},
                )
            )
        await self._submit(
            Outgoing(self.cursor, self._epoch, records, event_id=rejected.id, dedupe_key=key)
        )

    def _place_key(self) -> str:
        self._gap += 1
        return place_key(self._anchor, self._gap - 1)

    async def _submit(self, item: Outgoing) -> None:
        await self._publisher.submit(item)
        if item.dedupe_key:
            # False after a rewind: the item is stale and dropped by the publisher, and the
            # rewind cancelled our read scope, so this read unwinds at its next await.
            self.cursor.mark_submitted(
                item.epoch, item.dedupe_key, moves_cursor=item.event_id is not None
            )


class _Reading:
    # Classes, not @contextmanager generators: an idle stream's pump sits inside both for as
    # long as the stream is open, and a generator with its frame costs several times more.
    __slots__ = ("_cursor", "_scope")

    def __init__(self, cursor: ThreadCursor) -> None:
        self._cursor = cursor
        self._scope = anyio.CancelScope()

    def __enter__(self) -> None:
        self._cursor.reading(self._scope.__enter__())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._cursor.reading(None)
        return bool(self._scope.__exit__(exc_type, exc, traceback))


class _InState:
    __slots__ = ("_gauge", "_previous", "_pump", "_state")

    def __init__(self, pump: Pump, state: PumpState) -> None:
        self._pump, self._state = pump, state
        self._gauge = metrics.PUMPS.labels(state=state.value)
        self._previous: PumpState | None = None

    def __enter__(self) -> None:
        self._gauge.inc()
        self._previous, self._pump.state = self._pump.state, self._state

    def __exit__(self, *exc_info: object) -> None:
        self._pump.state = self._previous
        self._gauge.dec()


def _unavailable_reason(exc: ApiUnavailable) -> str:
    if exc.status == 429:
        return "throttled"
    if exc.status is not None and exc.status >= 500:
        return "server_error"
    return "disconnect"
