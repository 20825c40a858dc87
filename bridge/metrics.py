"""Every metric the bridge exports, on one dedicated registry.

Dashboards and alert rules are built on these names: change one only with them. Labels have
bounded values (no session or thread ids): event types outside the known catalog count as
``other``, and every other label takes one of the values listed next to it, all pre-created at
zero so a rate() works from the first scrape.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from bridge import __version__

__all__ = [
    "ALERTS",
    "API_REQUESTS",
    "API_ROUTES",
    "BUILD_INFO",
    "CHECKPOINT_AGE",
    "DLQ_REASONS",
    "DLQ_RECORDS",
    "END_TO_END_LAG",
    "EVENTS_PUBLISHED",
    "EVENTS_RECEIVED",
    "EVENT_TYPES",
    "FULL_SCANS",
    "INFLIGHT_BYTES",
    "KAFKA_REACHABLE",
    "LIST_POLLS",
    "OPEN_STREAMS",
    "PUBLISH_LATENCY",
    "PUMPS",
    "PUMP_STATES",
    "READY",
    "REBALANCES",
    "RECONNECTS",
    "RECONNECT_REASONS",
    "REGISTRY",
    "SHARDS_FENCED",
    "SHARDS_OWNED",
    "SHARD_RESUME",
    "STREAMS_WAITING",
    "STREAM_LIMIT",
    "THREADS_FOLLOWED",
    "TOKEN_REJECTED",
    "TRANSACTIONS",
    "TRANSACTION_OUTCOMES",
    "ApiRoute",
    "DlqReason",
    "PumpState",
    "ReconnectReason",
    "TransactionOutcome",
    "api_status_label",
    "event_type_label",
    "events_published",
    "events_received",
    "pump_state_changed",
    "track_checkpoint_age",
]

# The *_created series double every counter's series count and no dashboard of ours uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
REGISTRY = CollectorRegistry(auto_describe=True)
# What operators expect from any exporter: process_* (RSS, CPU, open files, start time) and
# python_* (version, GC). prometheus_client registers these on its default registry only; ours
# is dedicated, so they are added here (the same collector objects: they hold no state).
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

# The public Qoder event catalog (qoder-api.md §5), including both incremental models and the
# stream-only delta frames. Anything else is counted as "other".
EVENT_TYPES: frozenset[str] = frozenset(
    {
        "user.message",
        "user.interrupt",
        "user.tool_confirmation",
        "user.tool_result",
        "user.custom_tool_result",
        "user.define_outcome",
        "system.message",
        "agent.message",
        "agent.thinking",
        "agent.tool_use",
        "agent.tool_result",
        "agent.custom_tool_use",
        "agent.mcp_tool_use",
        "agent.mcp_tool_result",
        "agent.artifact_delivered",
        "agent.thread_message_sent",
        "agent.thread_message_received",
        "agent.thread_context_compacted",
        "agent.message_start",
        "agent.content_block_start",
        "agent.content_block_delta",
        "agent.content_block_stop",
        "agent.message_delta",
        "agent.message_stop",
        "session.status_running",
        "session.status_idle",
        "session.status_rescheduled",
        "session.status_terminated",
        "session.error",
        "session.updated",
        "session.deleted",
        "session.thread_created",
        "session.thread_status_running",
        "session.thread_status_idle",
        "session.thread_status_rescheduled",
        "session.thread_status_terminated",
        "terminated",
        "span.model_request_start",
        "span.model_request_end",
        "span.outcome_evaluation_start",
        "span.outcome_evaluation_ongoing",
        "span.outcome_evaluation_end",
        "event_start",
        "event_delta",
    }
)

ReconnectReason = Literal[
    "disconnect", "stall", "throttled", "server_error", "auth", "bad_cursor", "not_found", "other"
]
RECONNECT_REASONS: tuple[ReconnectReason, ...] = (
    "disconnect",
    "stall",
    "throttled",
    "server_error",
    "auth",
    "bad_cursor",
    "not_found",
    "other",
)
PumpState = Literal["backfilling", "streaming", "list_polling", "backoff", "auth_wait", "draining"]
PUMP_STATES: tuple[PumpState, ...] = (
    "backfilling",
    "streaming",
    "list_polling",
    "backoff",
    "auth_wait",
    "draining",
)
ApiRoute = Literal["sessions", "session", "threads", "thread", "events", "stream", "session_events"]
API_ROUTES: tuple[ApiRoute, ...] = (
    "sessions",
    "session",
    "threads",
    "thread",
    "events",
    "stream",
    "session_events",
)
DlqReason = Literal["not_json", "not_object", "missing_id", "invalid_utf8", "too_large", "too_deep"]
DLQ_REASONS: tuple[DlqReason, ...] = (
    "not_json",
    "not_object",
    "missing_id",
    "invalid_utf8",
    "too_large",
    "too_deep",
)
TransactionOutcome = Literal["committed", "aborted"]
TRANSACTION_OUTCOMES: tuple[TransactionOutcome, ...] = ("committed", "aborted")

# API read -> Kafka ack: dominated by linger and the commit interval.
_PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# processed_at -> Kafka ack: seconds when live, up to hours while catching up after an outage.
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

EVENTS_RECEIVED = Counter(
    "qoder_bridge_events_received_total",
    "Events read from the Qoder API, by event type (unknown types: other).",
    ["type"],
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "qoder_bridge_events_published_total",
    "Events acknowledged by Kafka on the events topic, by event type (unknown types: other).",
    ["type"],
    registry=REGISTRY,
)
PUBLISH_LATENCY = Histogram(
    "qoder_bridge_publish_latency_seconds",
    "From reading an event off the API to Kafka's acknowledgement.",
    buckets=_PUBLISH_BUCKETS,
    registry=REGISTRY,
)
END_TO_END_LAG = Histogram(
    "qoder_bridge_end_to_end_lag_seconds",
    "Kafka acknowledgement time minus the event's processed_at.",
    buckets=_LAG_BUCKETS,
    registry=REGISTRY,
)
OPEN_STREAMS = Gauge(
    "qoder_bridge_open_streams", "Thread event streams currently open.", registry=REGISTRY
)
STREAM_LIMIT = Gauge(
    "qoder_bridge_stream_limit",
    "Most thread streams the bridge opens now: BRIDGE_MAX_STREAMS, or less where the API "
    "refused connections beyond a count.",
    registry=REGISTRY,
)
LIST_POLLS = Counter(
    "qoder_bridge_list_polls",
    "Passes through the JSON list for running threads that have no stream slot.",
    registry=REGISTRY,
)
STREAMS_WAITING = Gauge(
    "qoder_bridge_streams_waiting",
    "Running threads without a stream slot, read through the JSON list in rotation.",
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "qoder_bridge_reconnects_total",
    "Stream reconnects, by reason: " + ", ".join(RECONNECT_REASONS) + ".",
    ["reason"],
    registry=REGISTRY,
)
PUMPS = Gauge(
    "qoder_bridge_pumps",
    "Thread pumps by state: " + ", ".join(PUMP_STATES) + ".",
    ["state"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "qoder_bridge_api_requests_total",
    "Qoder API requests by route and HTTP status (or 'error' when no response arrived).",
    ["route", "status"],
    registry=REGISTRY,
)
DLQ_RECORDS = Counter(
    "qoder_bridge_dlq_records_total",
    "Frames written to the dead-letter topic, by reason: " + ", ".join(DLQ_REASONS) + ".",
    ["reason"],
    registry=REGISTRY,
)
ALERTS = Counter(
    "qoder_bridge_alerts_total",
    "Alerts published to the alerts topic, by alert type.",
    ["type"],
    registry=REGISTRY,
)
TRANSACTIONS = Counter(
    "qoder_bridge_transactions_total",
    "Kafka transactions by outcome: committed, aborted.",
    ["outcome"],
    registry=REGISTRY,
)
CHECKPOINT_AGE = Gauge(
    "qoder_bridge_checkpoint_age_seconds",
    "Seconds since the last checkpoint write was acknowledged (since start before the first).",
    registry=REGISTRY,
)
TOKEN_REJECTED = Gauge(
    "qoder_bridge_token_rejected",
    "1 while the Qoder API rejects the token (401/403), else 0.",
    registry=REGISTRY,
)
THREADS_FOLLOWED = Gauge(
    "qoder_bridge_threads_followed", "Threads the bridge is following.", registry=REGISTRY
)
FULL_SCANS = Counter(
    "qoder_bridge_full_scans",
    "Listings of the whole session history (archived too); running ones are listed each poll.",
    registry=REGISTRY,
)
INFLIGHT_BYTES = Gauge(
    "qoder_bridge_inflight_bytes",
    "Bytes handed to the producer and not yet acknowledged.",
    registry=REGISTRY,
)
SHARDS_OWNED = Gauge(
    "qoder_bridge_shards_owned",
    "Shards (of 32) this member owns and follows: summed over the members, 32 when all is well.",
    registry=REGISTRY,
)
REBALANCES = Counter(
    "qoder_bridge_rebalances_total",
    "Assignments of shards this member received from the group (one per group rebalance).",
    registry=REGISTRY,
)
SHARD_RESUME = Histogram(
    "qoder_bridge_shard_resume_seconds",
    "From an assignment to the shard being followed: producer started (fencing the previous "
    "owner) and the shard's checkpoints read.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
SHARDS_FENCED = Counter(
    "qoder_bridge_shards_fenced_total",
    "Shards this member lost because another member's producer fenced it (it was a zombie).",
    registry=REGISTRY,
)
READY = Gauge("qoder_bridge_ready", "1 when /readyz answers 200, else 0.", registry=REGISTRY)
KAFKA_REACHABLE = Gauge(
    "qoder_bridge_kafka_reachable",
    "1 when the last Kafka metadata probe was answered, else 0.",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "qoder_bridge_build_info", "Always 1; the version is the label.", ["version"], registry=REGISTRY
)

BUILD_INFO.labels(version=__version__).set(1)
for _reason in RECONNECT_REASONS:
    RECONNECTS.labels(reason=_reason)
for _state in PUMP_STATES:
    PUMPS.labels(state=_state)
for _dlq_reason in DLQ_REASONS:
    DLQ_RECORDS.labels(reason=_dlq_reason)
for _outcome in TRANSACTION_OUTCOMES:
    TRANSACTIONS.labels(outcome=_outcome)


def event_type_label(event_type: str) -> str:
    """The ``type`` label for an event type: itself if in the catalog, else ``other``."""
    return event_type if event_type in EVENT_TYPES else "other"


# Children by event type, looked up once: labels() takes a lock and builds a key every call,
# and these two are counted for every event. Only catalog types (and "other") are kept.
_RECEIVED: dict[str, Counter] = {}
_PUBLISHED: dict[str, Counter] = {}


def _child(children: dict[str, Counter], parent: Counter, event_type: str) -> Counter:
    label = event_type_label(event_type)
    child = children.get(label)
    if child is None:
        child = children[label] = parent.labels(type=label)
    return child


def events_received(event_type: str) -> Counter:
    """The ``qoder_bridge_events_received_total`` child for this event type."""
    return _child(_RECEIVED, EVENTS_RECEIVED, event_type)


def events_published(event_type: str) -> Counter:
    """The ``qoder_bridge_events_published_total`` child for this event type."""
    return _child(_PUBLISHED, EVENTS_PUBLISHED, event_type)


def api_status_label(status: int | None) -> str:
    """The ``status`` label: the HTTP code as text, or ``error`` when no response arrived."""
    return "error" if status is None else str(status)


def pump_state_changed(old: PumpState | None, new: PumpState | None) -> None:
    """Move one pump between states in ``qoder_bridge_pumps`` (None: not counted)."""
    if old == new:
        return
    if old is not None:
        PUMPS.labels(state=old).dec()
    if new is not None:
        PUMPS.labels(state=new).inc()


def track_checkpoint_age(
    last_ack: Callable[[], float | None], *, clock: Callable[[], float] = time.monotonic
) -> None:
    """Make ``qoder_bridge_checkpoint_age_seconds`` computed at scrape time.

    ``last_ack`` returns the ``clock()`` time of the last acknowledged checkpoint write, or None
    before the first: the age then counts from this call, so a bridge that never manages to
    checkpoint still trips an age alert.
    """
    started = clock()

    def age() -> float:
        acked = last_ack()
        value = clock() - (started if acked is None else acked)
        return max(0.0, value) if math.isfinite(value) else math.nan

    CHECKPOINT_AGE.set_function(age)


class Observations:
    """A batch's observations of one histogram, counted locally and added once a bucket.

    ``Histogram.observe`` takes two locks an observation (the sum and the bucket), which at
    thousands of events a second is more than the rest of an event's bookkeeping. The result
    in the histogram is the same as observing each value (tests/test_metrics_batch.py).
    """

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = list(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def add(self, amount: float) -> None:
        self._sum += amount
        if amount <= math.inf:  # (NaN falls in no bucket, as with observe)
            self._counts[bisect.bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        """Into the histogram; the local counts start again from zero."""
        buckets = self._histogram._buckets
        for i, count in enumerate(self._counts):
            if count:
                buckets[i].inc(count)
                self._counts[i] = 0
        if self._sum:
            self._histogram._sum.inc(self._sum)
            self._sum = 0.0
