"""Secure Kafka (issue 5.4): SASL PLAIN and SCRAM-SHA-256/512 over TLS, mutual TLS, and the
failures a user must be able to tell apart, against a real broker (``secure_kafka``).

Every client here is built the way the bridge builds its own: ``load_settings(env)`` ->
``kafka_client_kwargs(settings.kafka)``. The test helpers (topic creation, ``read_topic``) use
the same broker's plaintext listener.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from bridge.config import Settings, load_settings
from bridge.errors import ConfigError
from bridge.kafka_conn import build_ssl_context, kafka_client_kwargs
from bridge.simulator import running_simulator
from tests.bridge_harness import TOKEN, bridge_settings, running_bridge, wait_for_delivery
from tests.kafka_broker import KafkaPki, KafkaTopics, SecureKafka, create_topics

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
WRONG_PASSWORD = "not-the-password"

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]


def settings_for(env: Mapping[str, str]) -> Settings:
    """The bridge's settings from these Kafka variables (plus a token, which load needs)."""
    return load_settings({"QODER_ACCESS_TOKEN": TOKEN, **env})


def sample_records(count: int) -> list[Record]:
    """Keys over three threads; values that are not ASCII, not JSON, and every byte value."""
    return [
        (
            f"sess_01/sthr_{i % 3:02d}".encode(),
            f'{{"id":"evt_{i:03d}","text":"héllo ✓ {i}"}}'.encode() + bytes(range(256)),
            [("ce_id", f"evt_{i:03d}".encode()), ("empty", b"")],
        )
        for i in range(count)
    ]


@asynccontextmanager
async def started(client: Any) -> AsyncIterator[Any]:
    await client.start()
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await client.stop()


async def produce_in_transactions(settings: Settings, topic: str, records: list[Record]) -> None:
    """An aborted transaction of decoys, then one committed transaction of ``records``."""
    producer = AIOKafkaProducer(
        **kafka_client_kwargs(settings.kafka),
        transactional_id=f"{topic}.txn",
        acks="all",
        enable_idempotence=True,
    )
    async with started(producer):
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted", key=b"decoy")
        await producer.abort_transaction()
        await producer.begin_transaction()
        for key, value, headers in records:
            await producer.send(topic, value, key=key, headers=headers)
        await producer.commit_transaction()


async def consume_committed(
    settings: Settings, topic: str, partitions: int, count: int
) -> list[Record]:
    """The first ``count`` records a read_committed consumer fetches, per partition in order."""
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=100,
    )
    got: list[Record] = []
    async with started(consumer):
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        # The commit markers land just after commit_transaction() returns: until then
        # read_committed stops short, so keep fetching until everything is there.
        while len(got) < count:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                got.extend((r.key, r.value, list(r.headers)) for r in batch)
    return got


def by_key(records: list[Record]) -> dict[bytes, list[Record]]:
    out: dict[bytes, list[Record]] = {}
    for record in records:
        out.setdefault(record[0], []).append(record)
    return out


async def round_trip(settings: Settings, plaintext_bootstrap: str) -> None:
    topic = f"t.secure.{uuid.uuid4().hex[:8]}"
    await create_topics(plaintext_bootstrap, [topic], partitions=3)
    sent = sample_records(30)
    await produce_in_transactions(settings, topic, sent)
    got = await consume_committed(settings, topic, 3, len(sent))
    assert len(got) == len(sent)
    assert by_key(got) == by_key(sent)  # byte for byte, per key in order, no decoy


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_sasl_ssl_transactions_round_trip(secure_kafka: SecureKafka, mechanism: str) -> None:
    """Scenario: the bridge is configured for SASL_SSL with this mechanism and the CA file.
    A transactional producer aborts one transaction and commits one; a read_committed consumer
    gets exactly the committed records back, byte for byte, in order per key."""
    settings = settings_for(secure_kafka.sasl_env(mechanism))
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_mechanism == mechanism
    with anyio.fail_after(30):
        await round_trip(settings, secure_kafka.plaintext_bootstrap)


async def test_mutual_tls_with_client_certificate(secure_kafka: SecureKafka) -> None:
    """Scenario: SSL (no SASL) to the listener that requires a client certificate, with
    KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE signed by the CA it trusts: transactions round-trip."""
    settings = settings_for(secure_kafka.mtls_env())
    with anyio.fail_after(30):
        await round_trip(settings, secure_kafka.plaintext_bootstrap)


async def connect_fails(settings: Settings, caplog: pytest.LogCaptureFixture) -> str:
    """Start a producer that must fail to connect; aiokafka's log lines that say why.

    It must fail at once, not after aiokafka's 40 s request timeout: the broker says no.
    """
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings.kafka))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), anyio.fail_after(10):
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
            await producer.start()
        await producer.stop()
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("aiokafka"))


@pytest.mark.parametrize(
    ("mechanism", "reason"),
    [
        ("PLAIN", "Invalid username or password"),
        ("SCRAM-SHA-256", "invalid credentials with SASL mechanism SCRAM-SHA-256"),
        ("SCRAM-SHA-512", "invalid credentials with SASL mechanism SCRAM-SHA-512"),
    ],
)
async def test_wrong_password_is_refused(
    secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture, mechanism: str, reason: str
) -> None:
    """Scenario: the right user with a wrong password. The client fails at once, and the log
    says the broker rejected the credentials (without echoing the password)."""
    settings = settings_for(secure_kafka.sasl_env(mechanism, password=WRONG_PASSWORD))
    why = await connect_fails(settings, caplog)
    assert "SaslAuthenticationFailed" in why
    assert reason in why
    assert WRONG_PASSWORD not in why


async def test_unknown_ca_fails_tls_verification(
    secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: KAFKA_SSL_CAFILE names a CA that did not sign the broker's certificate: the
    TLS handshake fails certificate verification, before any credentials are sent."""
    env = secure_kafka.sasl_env("SCRAM-SHA-512", cafile=secure_kafka.pki.other_ca)
    why = await connect_fails(settings_for(env), caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in why


async def test_ssl_listener_refuses_a_client_without_certificate(
    secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: the mutual-TLS listener without KAFKA_SSL_CERTFILE: the broker drops the
    connection, so the mutual-TLS round trip above did authenticate with its certificate."""
    why = await connect_fails(settings_for(secure_kafka.mtls_env(client_cert=False)), caplog)
    assert f"Connection at {secure_kafka.ssl_bootstrap} closed" in why


def test_encrypted_client_key_is_a_config_error(kafka_pki: KafkaPki, tmp_path: Path) -> None:
    """Scenario: KAFKA_SSL_KEYFILE is encrypted (the bridge has no setting for its password):
    a configuration error naming the variable, not OpenSSL prompting on the terminal."""
    encrypted = tmp_path / "client-encrypted.key"
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-in", kafka_pki.client_key, "-out", encrypted,
         "-passout", "pass:secret"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    settings = settings_for(
        {
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(kafka_pki.ca),
            "KAFKA_SSL_CERTFILE": str(kafka_pki.client_cert),
            "KAFKA_SSL_KEYFILE": str(encrypted),
        }
    )
    with pytest.raises(ConfigError, match=r"^KAFKA_SSL_KEYFILE: .* is encrypted"):
        build_ssl_context(settings.kafka)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_check(kafka_env: Mapping[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``python -m bridge check`` as a user runs it; the API on a port nobody listens on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "BRIDGE_", "QODER_"))}
    env.update(
        {
            "QODER_ACCESS_TOKEN": TOKEN,
            "QODER_API_URL": f"http://127.0.0.1:{closed_port()}/api/v1/cloud",
            "BRIDGE_LOG_FORMAT": "json",
            **kafka_env,
        }
    )
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "bridge", "check"], env=env, check=False
        )


def check_line(stdout: bytes, name: str) -> str:
    lines = [line for line in stdout.decode().splitlines() if line.split()[1:2] == [name]]
    assert len(lines) == 1, stdout.decode()
    return lines[0]


async def test_check_says_kafka_ok_over_sasl_ssl(secure_kafka: SecureKafka) -> None:
    """Scenario: `qoder-bridge check` with SASL_SSL SCRAM-SHA-512 and the CA file: the kafka
    line is ok (the API line fails: nothing listens there, so the exit status is 1)."""
    done = await run_check(secure_kafka.sasl_env("SCRAM-SHA-512"))
    assert done.returncode == 1, done.stderr.decode()
    config = check_line(done.stdout, "config")
    assert config.startswith("ok ") and "protocol=SASL_SSL" in config
    kafka = check_line(done.stdout, "kafka")
    assert kafka.split()[0] == "ok", done.stdout.decode() + done.stderr.decode()
    assert f"{secure_kafka.bootstrap} reachable" in kafka
    assert check_line(done.stdout, "api").startswith("FAIL ")


async def test_check_names_rejected_credentials(secure_kafka: SecureKafka) -> None:
    """Scenario: `qoder-bridge check` with a wrong SCRAM password: the kafka line fails and
    says why in words (authentication failed, which settings to check), never the password;
    aiokafka's own lines are not printed next to it."""
    done = await run_check(secure_kafka.sasl_env("SCRAM-SHA-512", password=WRONG_PASSWORD))
    assert done.returncode == 1
    line = check_line(done.stdout, "kafka")
    assert line.startswith("FAIL ") and "authentication failed" in line, line
    assert "KAFKA_SASL_PASSWORD" in line, line
    stderr = done.stderr.decode()
    assert "aiokafka" not in stderr, stderr
    assert WRONG_PASSWORD not in done.stdout.decode() + stderr


async def test_bridge_delivers_everything_over_sasl_ssl_scram_sha_512(
    secure_kafka: SecureKafka, kafka_topics: KafkaTopics
) -> None:
    """Scenario: the whole bridge (exactly_once) against the simulator's "tiny" scenario,
    with Kafka over SASL_SSL SCRAM-SHA-512: it creates its topics, publishes in transactions
    and checkpoints through the secure listener; a read_committed consumer finds every event
    once, in order."""
    async with running_simulator("tiny", token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url,
            secure_kafka.bootstrap,
            kafka_topics,
            **secure_kafka.sasl_env("SCRAM-SHA-512"),
        )
        assert settings.kafka.security_protocol == "SASL_SSL"
        async with running_bridge(settings):
            with anyio.fail_after(30):
                await sim.wait_idle()
            _, delivery = await wait_for_delivery(
                secure_kafka.plaintext_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
    assert delivery.expected > 0
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
