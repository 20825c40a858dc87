"""The periodic ``bridge.summary`` line: a sign of progress at info level, from the metrics."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import structlog

from bridge import metrics
from bridge.config import LogSettings
from bridge.health import HealthState
from bridge.logs import configure_logging
from bridge.summary import Snapshot, log_summary, summary_fields

pytestmark = pytest.mark.anyio


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(LogSettings(format="json", level="info"), stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def summaries(stream: io.StringIO) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [r for r in records if r["event"] == "bridge.summary"]


async def test_summary_lines_show_threads_events_and_lag(log_stream: io.StringIO) -> None:
    """Scenario: a bridge at info level follows 3 threads and publishes 7 events, then 2. One
    line per interval says so: threads, events since the last line and in total, the lag."""
    HealthState()  # what the bridge has: qoder_bridge_kafka_reachable = 1
    metrics.THREADS_FOLLOWED.set(3)
    total_before = sum(
        s.value
        for f in metrics.REGISTRY.collect()
        if f.name == "qoder_bridge_events_published"
        for s in f.samples
        if s.name.endswith("_total")
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(log_summary, 0.2)
            metrics.EVENTS_PUBLISHED.labels(type="agent.message").inc(7)
            for lag in (0.2, 0.4, 0.6):
                metrics.END_TO_END_LAG.observe(lag)
            while not summaries(log_stream):
                await anyio.sleep(0.02)
            metrics.EVENTS_PUBLISHED.labels(type="other").inc(2)
            while len(summaries(log_stream)) < 2:
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    first, second = summaries(log_stream)[:2]
    assert first["level"] == "info"
    assert first["threads"] == 3
    assert first["events"] == 7
    assert first["events_total"] == int(total_before) + 7
    assert first["lag_avg_s"] == pytest.approx(0.4)
    assert first["lag_p99_s"] == 1.0  # the upper bound of the bucket holding the 99th
    assert first["kafka_reachable"] is True
    assert second["events"] == 2 and second["events_total"] == int(total_before) + 9
    assert second["lag_avg_s"] is None  # no event acknowledged in that interval


async def test_interval_zero_turns_the_summary_off(log_stream: io.StringIO) -> None:
    with anyio.fail_after(5):
        await log_summary(0)
    assert summaries(log_stream) == []


def test_rates_are_per_second_of_the_interval() -> None:
    zero = dict.fromkeys(
        (
            "published",
            "received",
            "reconnects",
            "dlq",
            "threads",
            "open_streams",
            "inflight_bytes",
            "ready",
            "kafka_reachable",
            "lag_count",
            "lag_sum",
        ),
        0.0,
    )
    fields = summary_fields(
        Snapshot(0.0, zero), Snapshot(60.0, {**zero, "published": 600.0, "reconnects": 4.0})
    )
    assert fields["events_per_s"] == 10.0
    assert fields["reconnects"] == 4
