"""The bridge's own alerts: one per token outage, whatever the interleaving of requests."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from bridge.alerts import BridgeAlerts
from bridge.health import HealthState

pytestmark = pytest.mark.anyio


class RecordingPublisher:
    def __init__(self) -> None:
        self.items: list[Any] = []

    async def submit(self, item: Any) -> None:
        self.items.append(item)


async def test_a_request_from_before_the_rejection_does_not_end_the_outage():
    """Scenario: request A starts, the token is revoked, request B gets 401 (alert), then A
    completes with 200 (it was authorised before), then request C gets 401. One alert, and
    readiness stays off until a request that started after the rejection succeeds."""
    publisher, health = RecordingPublisher(), HealthState()
    alerts = BridgeAlerts(publisher, "alerts", health)  # type: ignore[arg-type]
    alerts.token_accepted(anyio.current_time())
    a_started = anyio.current_time()
    await anyio.sleep(0.01)
    await alerts.token_rejected("401 from B")
    alerts.token_accepted(a_started)
    assert not health.api_authorized
    await alerts.token_rejected("401 from C")
    assert [json.loads(i.records[0].value)["type"] for i in publisher.items] == [
        "bridge.token_rejected"
    ]
    alerts.token_accepted(anyio.current_time())
    assert health.api_authorized
