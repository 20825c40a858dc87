"""Adversarial review of issue 13 (Kafka down, start-up SIGTERM, session typos, messages in the
operator's words, README truth). Each test is one finding of the review: it failed on the code
it was written against, and pins the fix."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from bridge import metrics
from bridge.app import Bridge
from bridge.checkpoints import load_checkpoints
from bridge.config import load_settings
from bridge.errors import SinkUnavailable
from bridge.health import HealthState
from bridge.kafka_watch import KafkaProbe, KafkaUnreachable
from bridge.logs import configure_logging
from bridge.publisher import Publisher
from bridge.records import REJECTION_MESSAGES
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import TOKEN, bridge_env, bridge_settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

PYTHON_INTERNALS = re.compile(
    r"AddressFamily|<AIOKafkaConnection|<class '|Error\(['\"]|Connect call failed \(|\[Errno"
)


def section(title: str) -> str:
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.MULTILINE)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def _settings(**extra: str) -> Any:
    return load_settings({"QODER_ACCESS_TOKEN": TOKEN, **extra})


# -- finding 1: the checkpoint step still says Python ------------------------------------------


@pytest.mark.anyio
async def test_checkpoint_load_failure_is_in_the_operators_words() -> None:
    """Scenario: Kafka answers for the topics, then goes away before the checkpoints are read
    (or a restart finds it down at that step). The `bridge.kafka.unavailable step=checkpoints`
    line must give the cause, not aiokafka's exception repr."""
    settings = _settings(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    with pytest.raises(SinkUnavailable) as caught:
        with anyio.fail_after(60):
            await load_checkpoints(settings.kafka)
    message = str(caught.value)
    assert not PYTHON_INTERNALS.search(message), message
    assert "connection refused" in message, message


# -- finding 2: SASL against a plaintext listener ----------------------------------------------


@pytest.mark.anyio
@pytest.mark.kafka
async def test_sasl_against_a_plaintext_listener_names_the_protocol_not_the_password(
    kafka_bootstrap: str,
) -> None:
    """Scenario: KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT, but the port is the broker's
    plaintext listener. The cause is the protocol (the listener does not do SASL); the
    credentials were never looked at."""
    settings = _settings(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_USERNAME="bridge",
        KAFKA_SASL_PASSWORD="right-password",  # noqa: S106 -- a test credential
    )
    probe = KafkaProbe(settings.kafka, timeout_s=3.0, follow_brokers=False)
    try:
        with pytest.raises(KafkaUnreachable) as caught:
            await probe.check()
    finally:
        probe.close()
    message = str(caught.value)
    assert not PYTHON_INTERNALS.search(message), message
    assert "KAFKA_SECURITY_PROTOCOL" in message, message


# -- finding 3: `check` prints aiokafka's own lines next to its verdict ------------------------


def test_check_says_each_kafka_failure_once_in_words(tmp_path: Path) -> None:
    """Scenario: a new user runs `qoder-bridge check` with a wrong Kafka port. They get the
    FAIL line in words, and nothing else about Kafka in Python's words."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QODER_", "BRIDGE_", "KAFKA_"))}
    env.update(
        QODER_API_URL="http://127.0.0.1:1/api/v1/cloud",
        QODER_ACCESS_TOKEN=TOKEN,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  kafka   connection refused by 127.0.0.1:1" in done.stdout, done.stdout
    output = done.stdout + done.stderr
    assert not PYTHON_INTERNALS.search(output), output


# -- finding 4: BRIDGE_SESSIONS that are all typos: a "clean" exit 0 ---------------------------


@pytest.mark.anyio
@pytest.mark.kafka
async def test_a_bridge_whose_only_session_is_a_typo_stays_up_and_says_why(
    kafka_bootstrap: str, kafka_topics: Any
) -> None:
    typo = "sess_0000000000000000000000000000typo"
    scenario = Scenario(
        name="typo-only", seed=27, instant=True, sessions=(SessionSpec(ThreadSpec(events=3)),)
    )
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_SESSIONS=typo
        )
        configure_logging(settings.log)
        bridge = Bridge(settings)
        result: list[int] = []
        ready: httpx.Response | None = None

        async def run() -> None:
            result.append(await bridge.run())

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.sleep(8)  # start-up, the lookup (404), the alert: all long done
                still_running = not result
                if still_running:
                    async with httpx.AsyncClient() as client:
                        ready = await client.get(f"http://127.0.0.1:{bridge.http_port}/readyz")
                    bridge.drain()
    assert still_running, f"the bridge stopped by itself with exit code {result}"
    assert ready is not None and ready.status_code == 503
    body = ready.json()
    assert body["failing"] == ["discovery_ok"], body
    assert typo in body["detail"]["discovery_ok"], body
    assert "has answered yet" not in body["detail"]["discovery_ok"], body


# -- finding 5: Kafka down at start-up: a warning every 10 s, not one -------------------------


@pytest.mark.anyio
async def test_a_long_kafka_outage_at_start_up_is_one_warning(monkeypatch: Any) -> None:
    """Scenario: Kafka is down for ~2 minutes while the bridge starts (12 retries of the topic
    step). The issue asks for one bridge warning when Kafka becomes unreachable."""
    bridge = Bridge(_settings(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    attempts = 0

    async def step() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 12:
            raise SinkUnavailable("connection refused by 127.0.0.1:1: nothing listens there")

    real_sleep = anyio.sleep

    async def no_wait(_delay: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(anyio, "sleep", no_wait)
    with capture_logs() as logs:
        await bridge._until_kafka("topics", step)
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert attempts == 13
    assert len(warnings) <= 1, [e["event"] for e in warnings]


@pytest.mark.anyio
async def test_the_publisher_reconnecting_through_an_outage_is_one_warning(
    monkeypatch: Any,
) -> None:
    publisher = Publisher(_settings(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"), HealthState())
    attempts = 0

    async def start() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 12:
            raise SinkUnavailable("connection refused by 127.0.0.1:1: nothing listens there")

    real_sleep = anyio.sleep

    async def no_wait(_delay: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(publisher, "_start_producer", start)
    monkeypatch.setattr(anyio, "sleep", no_wait)
    with capture_logs() as logs:
        await publisher._connect()
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert attempts == 13
    assert len(warnings) <= 1, [e["event"] for e in warnings]


# -- finding 6: Ctrl-C at a terminal while Kafka is down waits the whole drain ----------------


@pytest.mark.anyio
@pytest.mark.kafka
async def test_ctrl_c_at_a_terminal_with_kafka_down_does_not_hang_for_the_drain_timeout(
    kafka_broker_factory: Any, kafka_topics: Any, tmp_path: Path
) -> None:
    broker = kafka_broker_factory()
    scenario = Scenario(
        name="ctrl-c-kafka-down",
        seed=28,
        sessions=(SessionSpec(ThreadSpec(events=5000, rate=40)),),
    )
    output: list[bytes] = []
    async with running_simulator(scenario, token=TOKEN) as sim:
        env = {
            **os.environ,
            **bridge_env(sim.base_url, broker.bootstrap, kafka_topics, BRIDGE_DRAIN_TIMEOUT_S="20"),
        }
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            env=env,
            cwd=REPO,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)

        def pump_pty() -> None:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                output.append(chunk)

        reader = threading.Thread(target=pump_pty, daemon=True)
        reader.start()

        def logged(event: str) -> bool:
            return f'"event": "{event}"'.encode() in b"".join(output)

        try:
            with anyio.fail_after(60):
                while not logged("bridge.ready_to_read"):
                    await anyio.sleep(0.2)
            await anyio.sleep(3)  # events flowing
            await broker.astop()
            with anyio.fail_after(30):
                while not logged("bridge.kafka.unreachable"):
                    await anyio.sleep(0.2)
            await anyio.sleep(2)  # the pumps keep reading: events are in flight
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the foreground group
            started = time.monotonic()
            code = await anyio.to_thread.run_sync(lambda: proc.wait(60))
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            os.close(master)
    text = b"".join(output).decode(errors="replace")
    assert took < 5.0, f"Ctrl-C took {took:.1f} s (exit {code}):\n{text[-3000:]}"


# -- finding 7: README vs code on dead letters and alerts --------------------------------------


def test_readme_documents_every_dead_letter_reason_and_header() -> None:
    kafka_records = section("Kafka records")
    for reason in REJECTION_MESSAGES:
        assert f"`{reason}`" in kafka_records, reason
    for header in ("dlq_reason", "dlq_message", "dlq_source", "dlq_size_bytes"):
        assert f"`{header}`" in kafka_records, header
    assert "data_base64" in kafka_records


def test_dlq_metric_reasons_are_the_reasons_dead_letters_carry() -> None:
    assert set(metrics.DLQ_REASONS) == set(REJECTION_MESSAGES)


def test_every_bridge_alert_type_is_in_the_readme_alerts_table() -> None:
    source = "".join(p.read_text() for p in (REPO / "bridge").glob("*.py"))
    sent = set(re.findall(r'send\(\s*"(bridge\.[a-z_]+)"', source))
    sent |= set(re.findall(r'"(bridge\.[a-z_]+)",\s*\n?\s*"[a-z_]+"', source))
    documented = set(re.findall(r"`(bridge\.[a-z_]+)`", section("Kafka records")))
    assert sent, "no alert types found in the source"
    assert sent <= documented, sorted(sent - documented)


# -- finding 8: an exit-1 path whose log line the README does not name -------------------------


def test_every_fatal_log_line_is_named_in_the_exit_code_table() -> None:
    app = (REPO / "bridge" / "app.py").read_text()
    fatal_events = set(re.findall(r'"(bridge\.fatal[a-z_.]*)"', app))
    table = section("Signals and exit codes")
    named = set(re.findall(r"`(bridge\.[a-z_.]+)`", table))
    assert fatal_events <= named, sorted(fatal_events - named)
