"""Kafka connection settings as the producer gets them, and Kafka failures in the operator's
words: real clients against real ports (a closed one, an HTTP server, the real broker)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from anyio.abc import SocketStream

from bridge.config import KafkaSettings, Settings, load_settings
from bridge.health import HealthState
from bridge.kafka_conn import (
    bootstrap_hosts,
    describe_kafka_error,
    kafka_client_kwargs,
    producer_tuning_kwargs,
)
from bridge.publisher import Publisher

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    """Something that is not Kafka: answers every connection with an HTTP 400."""

    async def answer(stream: SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 -- anyio
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        yield f"127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def start_fails(bootstrap: str, **kwargs: object) -> str:
    """Start a real producer that cannot connect; the one line the bridge would say."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, **kwargs)
    try:
        with anyio.fail_after(20):
            await producer.start()
    except Exception as exc:  # what the publisher and `check` catch
        return describe_kafka_error(exc, bootstrap)
    finally:
        await producer.stop()
    raise AssertionError(f"the producer started against {bootstrap}")


def assert_operator_words(line: str) -> None:
    """No Python internals: no address-family enums, tuples or exception reprs."""
    for internal in (
        "AddressFamily",
        "[(",
        "Unable to bootstrap",
        "Error(",
        "KafkaConnectionError",
    ):
        assert internal not in line, line


async def test_connection_refused_in_one_line() -> None:
    """Scenario: nothing listens on the bootstrap port (Kafka down, wrong port)."""
    bootstrap = f"127.0.0.1:{closed_port()}"
    line = await start_fails(bootstrap)
    assert line == (
        f"connection refused by {bootstrap}: nothing listens there (wrong port, or Kafka is down)"
    )


async def test_dns_failure_names_the_host_and_the_cause() -> None:
    """Scenario: a typo in the broker's host name. The real cause ("Name or service not
    known") used to be on another line; now it is in the one line."""
    line = await start_fails("nosuchhost.invalid:9092")
    assert line.startswith("cannot resolve nosuchhost.invalid:9092: DNS lookup failed (")
    assert_operator_words(line)


async def test_a_web_server_is_not_a_broker() -> None:
    """Scenario: KAFKA_BOOTSTRAP_SERVERS points at an HTTP port."""
    async with http_server() as bootstrap:
        line = await start_fails(bootstrap)
    assert line == f"{bootstrap} answered in HTTP: not a Kafka broker (wrong port?)"


async def test_every_bootstrap_server_gets_its_cause() -> None:
    """Scenario: two bootstrap servers, two different problems: both named, in order."""
    port = closed_port()
    bootstrap = f"127.0.0.1:{port},nosuchhost.invalid:9092"
    line = await start_fails(bootstrap)
    assert line.startswith(f"connection refused by 127.0.0.1:{port}: ")
    assert "; cannot resolve nosuchhost.invalid:9092: DNS lookup failed" in line
    assert_operator_words(line)


@pytest.mark.kafka
async def test_tls_to_a_plaintext_listener_says_so(kafka_bootstrap: str) -> None:
    """Scenario: KAFKA_SECURITY_PROTOCOL=SSL against the broker's plaintext port."""
    bootstrap = kafka_bootstrap.split(",", maxsplit=1)[0]
    line = await start_fails(
        bootstrap, security_protocol="SSL", ssl_context=ssl.create_default_context()
    )
    assert "plaintext listener reached with TLS" in line or "TLS handshake" in line, line
    assert_operator_words(line)


def test_describe_without_a_remembered_cause_still_reads_well() -> None:
    """Timeouts and aiokafka errors that carry no cause: still one sentence each."""
    assert describe_kafka_error(TimeoutError(), "k:9092") == (
        "no answer from k:9092 in time (timed out): Kafka down, paused or firewalled"
    )
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert describe_kafka_error(outer, "k:9092").startswith("connection refused by k:9092")


def test_bootstrap_hosts_parses_the_setting() -> None:
    assert bootstrap_hosts("k0:9092, [::1]:9093,k2") == [
        ("k0", 9092),
        ("::1", 9093),
        ("k2", 9092),
    ]


def test_producer_pass_through_wins_over_the_bridge_defaults() -> None:
    """KAFKA_PRODUCER_* lands in the producer's keyword arguments, over the tuning the bridge
    chose, and the dedicated settings' aliases fill those settings."""
    settings = load_settings(
        {
            "KAFKA_PRODUCER_CLIENT_ID": "bridge-eu-1",
            "KAFKA_PRODUCER_REQUEST_TIMEOUT_MS": "12000",
            "KAFKA_PRODUCER_BATCH_SIZE": "65536",
            "KAFKA_PRODUCER_METADATA_MAX_AGE_MS": "60000",
            "KAFKA_PRODUCER_RETRY_BACKOFF_MS": "250",
            "KAFKA_PRODUCER_CONNECTIONS_MAX_IDLE_MS": "300000",
            "KAFKA_PRODUCER_LINGER_MS": "20",
            "KAFKA_PRODUCER_COMPRESSION_TYPE": "none",
            "KAFKA_PRODUCER_MAX_REQUEST_SIZE": "2097152",
        }
    ).kafka
    tuning = producer_tuning_kwargs(settings)
    assert tuning == {
        "compression_type": None,
        "linger_ms": 20,
        "max_request_size": 2097152,
        "max_batch_size": 65536,
        "request_timeout_ms": 12000,
        "client_id": "bridge-eu-1",
        "metadata_max_age_ms": 60000,
        "retry_backoff_ms": 250,
        "connections_max_idle_ms": 300000,
    }
    assert settings.max_request_bytes == 2097152  # the DLQ threshold follows
    merged = dict(kafka_client_kwargs(settings), **tuning)
    assert merged["client_id"] == "bridge-eu-1"


@pytest.mark.kafka
async def test_a_pass_through_setting_reaches_the_started_producer(kafka_bootstrap: str) -> None:
    """Scenario: an operator sets KAFKA_PRODUCER_CLIENT_ID and KAFKA_PRODUCER_REQUEST_TIMEOUT_MS
    for their broker quotas. The publisher's producer carries them, and starts against the
    real broker with them."""
    settings: Settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "BRIDGE_DELIVERY": "at_least_once",
            "KAFKA_PRODUCER_CLIENT_ID": "bridge-quota-group-7",
            "KAFKA_PRODUCER_REQUEST_TIMEOUT_MS": "15000",
        }
    )
    producer = Publisher(settings, HealthState())._new_producer()
    try:
        with anyio.fail_after(30):
            await producer.start()
        assert producer.client._client_id == "bridge-quota-group-7"
        assert producer.client._request_timeout_ms == 15000
    finally:
        await producer.stop()


def test_kafka_settings_without_overrides_keep_the_bridge_tuning() -> None:
    tuning = producer_tuning_kwargs(KafkaSettings())
    assert tuning["request_timeout_ms"] == 30000
    assert "client_id" not in tuning
