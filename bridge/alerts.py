"""The bridge's own alerts (token rejected, thread unreachable, dead letters) on the alerts topic.

Alerts travel through the publisher like events, so with ``exactly_once`` they are part of the
same transactions. The token state is shared: the first pump to see a 401 raises one alert and
turns readiness off; the first success afterwards clears it.
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from bridge import metrics
from bridge.health import HealthState
from bridge.publisher import Outgoing, Sink
from bridge.records import ThreadRef, alert_record

log = structlog.get_logger("bridge.alerts")


class BridgeAlerts:
    def __init__(self, publisher: Sink, topic: str | None, health: HealthState) -> None:
        self._publisher = publisher
        self._topic = topic
        self._health = health
        self._token_rejected = False
        self._rejected_at = float("-inf")

    async def send(
        self,
        alert_type: str,
        reason: str,
        thread: ThreadRef | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        metrics.ALERTS.labels(type=alert_type).inc()
        log.warning(
            "bridge.alert",
            alert_type=alert_type,
            reason=reason,
            session_id=thread.session_id if thread else None,
            thread_id=thread.thread_id if thread else None,
        )
        if self._topic is None:
            return
        record = alert_record(self._topic, thread, alert_type, reason, detail=detail)
        await self._publisher.submit(Outgoing(None, 0, [record]))

    async def token_rejected(self, message: str) -> None:
        self._rejected_at = anyio.current_time()
        if self._token_rejected:
            return
        self._token_rejected = True
        self._health.api_authorized = False
        metrics.TOKEN_REJECTED.set(1)
        await self.send("bridge.token_rejected", "authentication_error", detail={"error": message})

    def discovered(self) -> None:
        """The API answered a discovery look (a listing, or a configured session's GET)."""
        self._health.set_discovery(True)

    def discovery_failed(self, cause: str) -> None:
        self._health.set_discovery(False, cause)

    def session_missing(self, session_id: str) -> bool:
        """A session to follow answered 404: readiness names it under discovery_ok. True the
        first time (warn and alert then, not on every look)."""
        return self._health.session_missing(session_id)

    def session_found(self, session_id: str) -> None:
        self._health.session_found(session_id)

    def token_accepted(self, started_at: float) -> None:
        """A request that *started* at ``started_at`` succeeded. One that was already under
        way when the token was rejected proves nothing about the token in use now."""
        if started_at < self._rejected_at:
            return
        if self._token_rejected:
            log.info("bridge.token.accepted_again")
        self._token_rejected = False
        self._health.api_authorized = True
        metrics.TOKEN_REJECTED.set(0)
