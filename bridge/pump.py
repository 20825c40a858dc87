"""One thread: read its events from the API and hand them, in order, to the publisher.

Each attempt backfills through the JSON list strictly after the cursor, then streams over SSE
with ``after_id``/``Last-Event-ID`` set to the same cursor. Heartbeats and stream-only delta
frames never move the cursor; an event already handed on (a replay at a resume boundary) is
dropped by id. Errors are classified here: retriable ones back off with full jitter and
reconnect, a 401 waits slowly for a good token, a 404 ends the pump.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import anyio
import structlog
from httpx_sse import ServerSentEvent

from bridge import metrics
from bridge.alerts import BridgeAlerts
from bridge.api import QoderApi
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import (
    ApiError,
    ApiUnavailable,
    AuthRejected,
    BadCursor,
    NotFound,
    StreamStalled,
)
from bridge.publisher import Outgoing, Publisher
from bridge.records import (
    DELTA_FRAME_TYPES,
    Event,
    alert_reason,
    alert_record,
    dead_letter_record,
    event_record,
)

#: A stream that stayed up this long resets the backoff.
HEALTHY_AFTER_S = 30.0


class PumpState(Enum):
    BACKFILLING = "backfilling"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    AUTH_WAIT = "auth_wait"
    DRAINING = "draining"


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
    streams: anyio.CapacityLimiter


class Pump:
    def __init__(
        self,
        cursor: ThreadCursor,
        api: QoderApi,
        publisher: Publisher,
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
        self.gone = False
        self.log = structlog.get_logger("bridge.pump").bind(
            session_id=self.thread.session_id, thread_id=self.thread.thread_id
        )

    # -- control from the supervisor -------------------------------------------------------

    def drain(self, updated_at: str | None) -> None:
        """The thread stopped running: read what is left through the list, then finish."""
        self._follow = False
        self._drain_updated_at = updated_at
        if self._stream_scope is not None:
            self._stream_scope.cancel()

    def follow(self) -> None:
        self._follow = True

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        self.log.debug("bridge.pump.started", cursor=self.cursor.submitted_id, follow=self._follow)
        while True:
            self._epoch = self.cursor.epoch
            attempt_started = anyio.current_time()
            reason: str | None = None
            delay = 0.0
            try:
                with self._reading():
                    # Only a backfill that began after the drain request has read everything
                    # the thread wrote before it stopped running.
                    final = not self._follow
                    with self._state(PumpState.BACKFILLING):
                        await self._backfill()
                    self._alerts.token_accepted(attempt_started)
                    if final:
                        break
                    if not self._follow:
                        continue  # drained while backfilling: one more, complete pass
                    async with self._limits.streams:
                        await self._stream()
                continue  # a rewind or a stream that ended: backfill again, then stream
            except StreamStalled:
                reason, delay = "stall", self._backoff.next_delay()
            except ApiUnavailable as exc:
                reason = _unavailable_reason(exc)
                delay = self._backoff.next_delay(exc.retry_after_s or 0.0)
            except AuthRejected as exc:
                # A rejected token will not heal by hammering: retry at the slowest pace.
                reason, delay = "auth", self._backoff.max_s * random.uniform(0.8, 1.2)  # noqa: S311
                await self._alerts.token_rejected(str(exc))
            except BadCursor as exc:
                reason = "bad_cursor"
                self.log.warning("bridge.pump.bad_cursor", error=str(exc))
                await self._rescan()
                continue
            except NotFound as exc:
                metrics.RECONNECTS.labels(reason="not_found").inc()
                self.log.info("bridge.pump.thread_gone", error=str(exc))
                await self._alerts.send("bridge.thread_unreachable", "not_found", self.thread)
                self.gone = True
                return
            except ApiError as exc:
                reason, delay = "other", self._backoff.next_delay()
                self.log.warning("bridge.pump.api_error", error=str(exc))
            metrics.RECONNECTS.labels(reason=reason).inc()
            self.log.info("bridge.pump.reconnecting", reason=reason, delay_s=round(delay, 3))
            state = PumpState.AUTH_WAIT if reason == "auth" else PumpState.BACKOFF
            with self._state(state):
                await anyio.sleep(delay)
        with self._state(PumpState.DRAINING):
            epoch = self.cursor.epoch
            drained = self._drain_updated_at
            await self._publisher.submit(
                Outgoing(self.cursor, epoch, [], drained_updated_at=drained)
            )
            if epoch == self.cursor.epoch:
                self.cursor.pending_drained_updated_at = drained
        self.log.debug("bridge.pump.drained", cursor=self.cursor.submitted_id)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            self.cursor.reading(scope)
            try:
                yield
            finally:
                self.cursor.reading(None)

    @contextmanager
    def _state(self, state: PumpState) -> Iterator[None]:
        gauge = metrics.PUMPS.labels(state=state.value)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    async def _backfill(self) -> None:
        async for page in self._api.thread_events(self.thread, self.cursor.submitted_id):
            for event in page:
                await self._handle(event)

    async def _rescan(self) -> None:
        """The API no longer knows our cursor: find it from the start, or republish everything."""
        lost = self.cursor.submitted_id
        found = False
        with self._reading():
            async for page in self._api.thread_events(self.thread, None):
                for event in page:
                    if found:
                        await self._handle(event)
                    elif event.id == lost:
                        found = True
            if not found:
                await self._alerts.send(
                    "bridge.cursor_lost", "cursor_unknown_to_api", self.thread, {"cursor": lost}
                )
                async for page in self._api.thread_events(self.thread, None):
                    for event in page:
                        await self._handle(event)

    async def _stream(self) -> None:
        after = self.cursor.submitted_id
        started = time.monotonic()
        async with self._api.stream_thread(self.thread, after) as frames:
            metrics.OPEN_STREAMS.inc()
            try:
                with self._state(PumpState.STREAMING):
                    if after is None:
                        # A fresh connection may start at the live tail: anything created between
                        # our empty backfill and this connection is fetched through the list.
                        await self._backfill()
                    with anyio.CancelScope() as scope:
                        self._stream_scope = scope
                        if not self._follow:
                            scope.cancel()
                        async for frame in frames:
                            await self._on_frame(frame)
                            if time.monotonic() - started > HEALTHY_AFTER_S:
                                self._backoff.reset()
            finally:
                self._stream_scope = None
                metrics.OPEN_STREAMS.dec()
        if time.monotonic() - started < 1.0 and self._follow:
            # The server closed at once: don't spin.
            raise ApiUnavailable("the stream closed right after it opened")

    async def _on_frame(self, frame: ServerSentEvent) -> None:
        kind = frame.event  # httpx-sse names a frame without `event:` "message"
        if kind == "heartbeat" or not frame.data:
            # A heartbeat, as an event or as a comment (httpx-sse yields a comment-only frame
            # with empty data and the previous id). It never moves the cursor.
            return
        if kind in DELTA_FRAME_TYPES and not self._publish_deltas:
            return
        data = frame.data.encode()
        try:
            fields = json.loads(data)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            # httpx-sse repeats the previous id on a frame without one: only a new id is its own.
            own_id = frame.id if frame.id and frame.id != self.cursor.submitted_id else None
            await self._dead_letter("not_json", data, own_id, None if kind == "message" else kind)
            return
        if fields.get("type") in DELTA_FRAME_TYPES and not self._publish_deltas:
            return
        event_id = fields.get("id") if isinstance(fields.get("id"), str) else frame.id
        event_type = fields.get("type") if isinstance(fields.get("type"), str) else kind
        await self._handle(Event(str(event_id or ""), str(event_type or ""), data, fields))

    async def _handle(self, event: Event) -> None:
        if event.id and self.cursor.seen(event.id):
            return  # replayed at a resume boundary
        metrics.EVENTS_RECEIVED.labels(type=metrics.event_type_label(event.type)).inc()
        record = event_record(self._kafka.topic, self.thread, event)
        if record.size > self._kafka.max_request_bytes - 1024:
            await self._dead_letter("too_large", event.data, event.id, event.type)
            return
        records = [record]
        reason = alert_reason(event)
        if reason is not None and self._kafka.alerts_topic:
            records.append(
                alert_record(
                    self._kafka.alerts_topic,
                    self.thread,
                    "qoder." + event.type,
                    reason,
                    event=event,
                )
            )
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

    async def _dead_letter(
        self, reason: str, data: bytes, event_id: str | None, event_type: str | None
    ) -> None:
        if event_id and self.cursor.seen(event_id):
            return
        metrics.DLQ_RECORDS.labels(reason=reason).inc()
        self.log.warning(
            "bridge.pump.dead_letter", reason=reason, event_id=event_id, size=len(data)
        )
        records = [
            dead_letter_record(
                self._kafka.dlq_topic,
                self.thread,
                reason,
                data,
                event_id=event_id,
                event_type=event_type,
                limit_bytes=self._kafka.max_request_bytes // 2,
            ),
        ]
        if self._kafka.alerts_topic:
            records.append(
                alert_record(
                    self._kafka.alerts_topic,
                    self.thread,
                    "bridge.dead_letter",
                    reason,
                    detail={"event_id": event_id, "size_bytes": len(data)},
                )
            )
        await self._submit(Outgoing(self.cursor, self._epoch, records, event_id=event_id))

    async def _submit(self, item: Outgoing) -> None:
        await self._publisher.submit(item)
        if item.event_id:
            # False after a rewind: the item is stale and dropped by the publisher, and the
            # rewind cancelled our read scope, so this read unwinds at its next await.
            self.cursor.mark_submitted(item.epoch, item.event_id)


def _unavailable_reason(exc: ApiUnavailable) -> str:
    if exc.status == 429:
        return "throttled"
    if exc.status is not None and exc.status >= 500:
        return "server_error"
    return "disconnect"
