"""Readiness follows Kafka within seconds: the watcher against a dedicated broker that the test
stops and starts again, /readyz over a real socket, and the log lines an operator sees."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import structlog

from bridge.config import HttpSettings, KafkaSettings, LogSettings
from bridge.health import HealthState, serve_http
from bridge.kafka_watch import KafkaProbe, KafkaUnreachable, watch_kafka
from bridge.logs import configure_logging

pytestmark = pytest.mark.anyio

#: The promise: /readyz turns 503 within this many seconds of the broker going away.
UNREADY_WITHIN_S = 5.0


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


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    found = []
    for line in stream.getvalue().splitlines():
        record = json.loads(line)
        if record["event"] == name:
            found.append(record)
    return found


async def readyz(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status_code, response.json()


@pytest.mark.kafka
async def test_readiness_turns_off_within_seconds_of_a_broker_stop_and_back_on(
    kafka_broker_factory: Any, log_stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scenario: the only broker is stopped while the bridge is ready. /readyz answers 503
    naming kafka_reachable, with "connection refused" as the cause, within a few seconds (it
    used to take 90); one bridge.kafka.unreachable warning, no matter how long it stays
    down. The broker comes back: ready again, one bridge.kafka.reachable info."""
    broker = kafka_broker_factory()
    health = HealthState()
    health.producer_connected = health.api_authorized = True
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap)
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            await tg.start(watch_kafka, settings, health)
            port = await tg.start(serve_http, HttpSettings(host="127.0.0.1", port=0), health)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert await readyz(client) == (200, {"ready": True, "failing": []})

                stop_requested = time.monotonic()
                async with anyio.create_task_group() as stopper:
                    stopper.start_soon(broker.astop)
                    while (await readyz(client))[0] == 200:
                        await anyio.sleep(0.05)
                    unready = time.monotonic()
                stopped = time.monotonic()
                status, body = await readyz(client)
                assert status == 503
                assert body["failing"] == ["kafka_reachable"]
                assert "connection refused" in body["detail"]["kafka_reachable"]
                # The broker closes its listener somewhere in its clean shutdown (which `stop`
                # waits for): unready within a few seconds of the broker being gone.
                seconds = unready - stop_requested
                assert seconds < (stopped - stop_requested) + UNREADY_WITHIN_S

                # Down for a while: still exactly one warning.
                await anyio.sleep(5)
                assert (await readyz(client))[0] == 503

                await broker.astart()
                restarted = time.monotonic()
                while (await readyz(client))[0] != 200:
                    await anyio.sleep(0.05)
                ready_again = time.monotonic() - restarted
            tg.cancel_scope.cancel()

    down = events(log_stream, "bridge.kafka.unreachable")
    assert len(down) == 1, down
    assert down[0]["level"] == "warning"
    assert down[0]["cause"].startswith(f"connection refused by {broker.bootstrap}")
    back = events(log_stream, "bridge.kafka.reachable")
    assert len(back) == 1 and back[0]["level"] == "info" and back[0]["brokers"] == 1
    with capsys.disabled():
        print(
            f"\nbroker stop -> /readyz 503: {seconds:.1f} s after the stop request "
            f"(the stop took {stopped - stop_requested:.1f} s); ready {ready_again:.1f} s "
            "after the broker answered again"
        )


@pytest.mark.kafka
async def test_a_controller_port_is_not_a_broker(kafka_broker_factory: Any) -> None:
    """Scenario: KAFKA_BOOTSTRAP_SERVERS points at the KRaft controller port. The probe says
    it is not a broker's client listener, not "IncompatibleBrokerVersion"."""
    broker = kafka_broker_factory()
    probe = KafkaProbe(
        KafkaSettings(bootstrap_servers=f"127.0.0.1:{broker.controller_port}"), timeout_s=3
    )
    with anyio.fail_after(30), pytest.raises(KafkaUnreachable) as info:
        await probe.check()
    probe.close()
    assert str(info.value) == (
        f"127.0.0.1:{broker.controller_port} is not a Kafka broker's client listener: it does "
        "not serve Metadata (a KRaft controller port?)"
    )
    good = KafkaProbe(KafkaSettings(bootstrap_servers=broker.bootstrap))
    with anyio.fail_after(30):
        assert await good.check() == 1
        assert await good.check() == 1  # the same connection, asked again
    good.close()


async def test_a_silent_port_times_out_in_the_probe_not_forever() -> None:
    """Scenario: something accepts connections and never answers (a paused broker, a
    firewall's tarpit). The probe gives up after its timeout and says so."""
    accepted: list[anyio.abc.SocketStream] = []

    async def hold(stream: anyio.abc.SocketStream) -> None:
        accepted.append(stream)
        await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 -- anyio
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        probe = KafkaProbe(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), timeout_s=0.5)
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(KafkaUnreachable, match="timed out"):
            await probe.check()
        probe.close()
        assert time.monotonic() - started < 4
        tg.cancel_scope.cancel()


async def test_an_unresolvable_name_says_dns(log_stream: io.StringIO) -> None:
    """Scenario: a typo in the broker's name. Readiness fails at the first probe, and the one
    warning names the DNS failure."""
    health = HealthState()
    settings = KafkaSettings(bootstrap_servers="nosuchhost.invalid:9092")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(watch_kafka, settings, health)
            tg.cancel_scope.cancel()
    assert not health.kafka_reachable
    assert "kafka_reachable" in health.failing_checks()
    (warning,) = events(log_stream, "bridge.kafka.unreachable")
    assert warning["cause"].startswith("cannot resolve nosuchhost.invalid:9092: DNS lookup failed")
