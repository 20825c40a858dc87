"""The probe/metrics server over a real socket: routes, readiness, and slow-client limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge import metrics
from bridge.config import HttpSettings
from bridge.errors import ConfigError
from bridge.health import HealthState, serve_http

pytestmark = pytest.mark.anyio

METRIC_NAMES = {
    # name as exposed (counters without the _total suffix in the parser's family names)
    "qoder_bridge_events_received": "counter",
    "qoder_bridge_events_published": "counter",
    "qoder_bridge_publish_latency_seconds": "histogram",
    "qoder_bridge_end_to_end_lag_seconds": "histogram",
    "qoder_bridge_open_streams": "gauge",
    "qoder_bridge_reconnects": "counter",
    "qoder_bridge_pumps": "gauge",
    "qoder_bridge_api_requests": "counter",
    "qoder_bridge_dlq_records": "counter",
    "qoder_bridge_alerts": "counter",
    "qoder_bridge_transactions": "counter",
    "qoder_bridge_checkpoint_age_seconds": "gauge",
    "qoder_bridge_token_rejected": "gauge",
    "qoder_bridge_threads_followed": "gauge",
    "qoder_bridge_inflight_bytes": "gauge",
    "qoder_bridge_ready": "gauge",
    "qoder_bridge_kafka_reachable": "gauge",
    "qoder_bridge_build_info": "gauge",
}
# What any Prometheus exporter is expected to show (prometheus_client's default collectors).
PROCESS_METRICS = {
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
    "python_gc_objects_collected": "counter",
}


@asynccontextmanager
async def server(
    state: HealthState, **kwargs: float
) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_http(
                    HttpSettings(host="127.0.0.1", port=0), state, task_status=task_status, **kwargs
                )
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                yield client, port
            tg.cancel_scope.cancel()


def ready_gauge() -> float:
    value = metrics.REGISTRY.get_sample_value("qoder_bridge_ready")
    assert value is not None
    return value


async def test_livez_answers_ok_on_an_ephemeral_port() -> None:
    """Port 0 binds a free port, reported through task_status; /livez says ok."""
    async with server(HealthState()) as (client, port):
        assert port > 0
        response = await client.get("/livez")
        assert response.status_code == 200
        assert response.text == "ok\n"
        assert response.headers["connection"] == "close"


async def test_readyz_names_the_failing_checks_until_everything_is_up() -> None:
    """A fresh bridge is not ready (producer and API unknown); ready once both are up;
    not ready again while draining. qoder_bridge_ready follows."""
    state = HealthState()
    async with server(state) as (client, _):
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "ready": False,
            "failing": ["producer_connected", "api_authorized"],
        }
        assert ready_gauge() == 0

        state.producer_connected = True
        state.api_authorized = True
        response = await client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"ready": True, "failing": []}
        assert ready_gauge() == 1

        state.draining = True
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert json.loads(response.content)["failing"] == ["not_draining"]
        assert ready_gauge() == 0


async def test_readyz_says_why_kafka_is_unreachable() -> None:
    """Scenario: the Kafka watcher's probe fails. /readyz names kafka_reachable with the cause
    in the operator's words, qoder_bridge_kafka_reachable is 0; both recover together."""
    state = HealthState()
    state.producer_connected = state.api_authorized = True
    cause = "connection refused by 127.0.0.1:9092: nothing listens there"
    async with server(state) as (client, _):
        state.set_kafka_reachable(False, cause)
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "ready": False,
            "failing": ["kafka_reachable"],
            "detail": {"kafka_reachable": cause},
        }
        assert metrics.REGISTRY.get_sample_value("qoder_bridge_kafka_reachable") == 0
        state.kafka_reachable = True
        assert (await client.get("/readyz")).json() == {"ready": True, "failing": []}
        assert metrics.REGISTRY.get_sample_value("qoder_bridge_kafka_reachable") == 1


async def test_a_missing_session_is_a_discovery_failure_not_a_token_one() -> None:
    """Scenario: BRIDGE_SESSIONS names a session with a typo, which answers 404. The token is
    fine: /readyz names discovery_ok and the session, not api_authorized."""
    state = HealthState()
    state.producer_connected = state.api_authorized = True
    async with server(state) as (client, _):
        assert state.session_missing("sess_typo") is True
        assert state.session_missing("sess_typo") is False  # warn and alert once
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "ready": False,
            "failing": ["discovery_ok"],
            "detail": {"discovery_ok": "session sess_typo: not found (HTTP 404)"},
        }
        assert state.missing_sessions == ("sess_typo",)
        state.session_found("sess_typo")
        assert (await client.get("/readyz")).status_code == 200

        state.set_discovery(False, "listing sessions failed: HTTP 503")
        body = (await client.get("/readyz")).json()
        assert body["failing"] == ["discovery_ok"]
        assert body["detail"] == {"discovery_ok": "listing sessions failed: HTTP 503"}


async def test_metrics_exposes_every_documented_name() -> None:
    """/metrics is Prometheus text with the right content type and every metric the
    dashboards and alert rules use, with no per-session labels."""
    metrics.EVENTS_RECEIVED.labels(type=metrics.event_type_label("agent.message")).inc()
    metrics.EVENTS_RECEIVED.labels(type=metrics.event_type_label("agent.brand_new")).inc()
    async with server(HealthState()) as (client, _):
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        for name, kind in METRIC_NAMES.items():
            assert name in families, name
            assert families[name].type == kind, name
        labels = {
            key
            for family in families.values()
            if family.name.startswith("qoder_bridge_")
            for s in family.samples
            for key in s.labels
        }
        assert labels <= {"type", "reason", "state", "route", "status", "outcome", "version", "le"}
        received = {s.labels["type"] for s in families["qoder_bridge_events_received"].samples}
        assert {"agent.message", "other"} <= received
        assert "agent.brand_new" not in received

        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")


async def test_metrics_shows_the_process_memory_cpu_and_files() -> None:
    """Scenario: an operator graphs the bridge's memory. /metrics has the process_* figures
    (RSS, CPU, open files) and python_* ones, and the RSS is this process's."""
    async with server(HealthState()) as (client, _):
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in PROCESS_METRICS.items():
        assert name in families, name
        assert families[name].type == kind, name
    (rss,) = families["process_resident_memory_bytes"].samples
    assert 10 * 2**20 < rss.value < 4 * 2**30
    assert families["process_open_fds"].samples[0].value > 0


async def test_unknown_paths_and_methods() -> None:
    """404 for anything else, 405 for a write to a probe, HEAD without a body."""
    async with server(HealthState()) as (client, _):
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/healthz")).status_code == 404
        post = await client.post("/livez")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
        head = await client.head("/livez")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/livez?verbose=1")).status_code == 200


async def raw_exchange(port: int, data: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        chunks = []
        try:
            while True:
                chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        return b"".join(chunks)


async def test_oversized_request_head_is_refused() -> None:
    """A request head beyond the size bound gets 431, not an ever-growing buffer."""
    async with server(HealthState()) as (_, port):
        answer = await raw_exchange(port, b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 20000)
        assert answer.startswith(b"HTTP/1.1 431 ")


async def test_garbage_request_line_is_a_400() -> None:
    """A request line that is not HTTP/1.x gets 400."""
    async with server(HealthState()) as (_, port):
        answer = await raw_exchange(port, b"HELLO\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")


async def test_slowloris_is_cut_off_and_does_not_block_probes() -> None:
    """A client that sends half a request and stalls is disconnected after the read timeout;
    meanwhile other probes are answered."""
    async with server(HealthState(), read_timeout_s=0.3) as (client, port):
        slow = await anyio.connect_tcp("127.0.0.1", port)
        async with slow:
            await slow.send(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            assert (await client.get("/livez")).status_code == 200
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await slow.receive()


async def test_connection_cap_answers_busy_instead_of_queueing() -> None:
    """With every connection slot held by idle clients, a new one gets a quick 503."""
    async with server(HealthState(), max_connections=1, read_timeout_s=30) as (client, port):
        idle = await anyio.connect_tcp("127.0.0.1", port)
        async with idle:
            await idle.send(b"GET /livez HTTP/1.1\r\n")
            with anyio.fail_after(5):
                # until the idle connection's handler holds the only slot
                while (await client.get("/livez")).status_code != 503:
                    await anyio.lowlevel.checkpoint()


async def test_port_in_use_is_a_config_error() -> None:
    """Binding a port that is taken names the setting."""
    async with server(HealthState()) as (_, port):
        with pytest.raises(ConfigError, match="BRIDGE_HTTP_PORT"):
            await serve_http(HttpSettings(host="127.0.0.1", port=port), HealthState())


def test_metric_label_helpers() -> None:
    """Bounded labels: unknown event types are 'other'; no response is status 'error'."""
    assert metrics.event_type_label("session.status_idle") == "session.status_idle"
    assert metrics.event_type_label("x" * 300) == "other"
    assert metrics.api_status_label(None) == "error"
    assert metrics.api_status_label(429) == "429"


def test_pump_state_changes_move_one_pump() -> None:
    """pump_state_changed decrements the old state and increments the new one."""

    def count(state: str) -> float:
        value = metrics.REGISTRY.get_sample_value("qoder_bridge_pumps", {"state": state})
        assert value is not None
        return value

    before = count("streaming"), count("backoff")
    metrics.pump_state_changed(None, "streaming")
    metrics.pump_state_changed("streaming", "backoff")
    assert (count("streaming"), count("backoff")) == (before[0], before[1] + 1)
    metrics.pump_state_changed("backoff", None)
    assert count("backoff") == before[1]


def test_checkpoint_age_is_computed_at_scrape_time() -> None:
    """Before the first acknowledged checkpoint the age counts from start; after, from it."""
    now = [100.0]
    last: list[float | None] = [None]
    metrics.track_checkpoint_age(lambda: last[0], clock=lambda: now[0])
    now[0] = 130.0
    assert metrics.REGISTRY.get_sample_value("qoder_bridge_checkpoint_age_seconds") == 30.0
    last[0] = 125.0
    assert metrics.REGISTRY.get_sample_value("qoder_bridge_checkpoint_age_seconds") == 5.0
