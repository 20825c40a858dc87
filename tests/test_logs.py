"""structlog output: one JSON object per line, stable fields, and never a token in clear."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from bridge.config import LogSettings
from bridge.logs import ThirdPartyRateLimit, configure_logging, scrub_text
from bridge.secrets import Secret

TOKEN = "pt-logs-test-token-9f8e7d6c5b4a"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("aiokafka", "httpx", "uvicorn")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def configured(fmt: str = "json", level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(LogSettings(format=fmt, level=level), stream=stream)  # type: ignore[arg-type]
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_timestamp_level_and_event() -> None:
    """Each record is one JSON object on its own line, with an ISO UTC timestamp, the level
    and the dotted event name first, then the key/value detail."""
    stream = configured()
    log = structlog.get_logger("bridge.pump")
    log.info("bridge.pump.reconnecting", session_id="sess_1", delay_s=0.5)
    log.debug("bridge.pump.event")  # below the level: not written
    records = lines(stream)
    assert len(records) == 1
    record = records[0]
    assert list(record)[:3] == ["timestamp", "level", "event"]
    assert record["event"] == "bridge.pump.reconnecting"
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]
    assert record["session_id"] == "sess_1" and record["delay_s"] == 0.5


@pytest.mark.usefixtures("restore_logging")
def test_the_token_never_reaches_the_log_output() -> None:
    """Grep the whole output of a configured logger for the token, after it was passed as a
    Secret, revealed into a message, put in an Authorization header, raised in an exception,
    and written by a third-party library's stdlib logger."""
    stream = configured(level="debug")
    secret = Secret(TOKEN)
    log = structlog.get_logger("bridge.test")
    log.info("bridge.test.secret_kwarg", token=secret, api_token=TOKEN)
    log.info("bridge.test.in_text", detail=f"sent {secret.reveal()} to the API")
    log.info("bridge.test.headers", headers={"Authorization": f"Bearer {TOKEN}"})
    log.info("bridge.test.nested", request={"auth": [secret], "password": "hunter2"})
    try:
        raise RuntimeError(f"request with token {TOKEN} failed")
    except RuntimeError:
        log.exception("bridge.test.failed")
    logging.getLogger("httpx").warning("Authorization: Bearer %s", TOKEN)
    logging.getLogger("aiokafka.conn").error("token=%s rejected", TOKEN)

    output = stream.getvalue()
    assert len(output.splitlines()) == 7
    assert TOKEN not in output
    assert "hunter2" not in output
    assert "**********" in output


@pytest.mark.usefixtures("restore_logging")
def test_third_party_stdlib_logs_come_through_at_warning() -> None:
    """aiokafka's warnings are rendered as JSON with the logger's name as the event; its
    info chatter is dropped even when the bridge logs at debug."""
    stream = configured(level="debug")
    kafka_log = logging.getLogger("aiokafka.producer")
    kafka_log.info("metadata refreshed")
    kafka_log.warning("Unable to connect to %s", "broker:9092")
    records = lines(stream)
    assert records == [
        {
            "timestamp": records[0]["timestamp"],
            "level": "warning",
            "event": "aiokafka.producer",
            "message": "Unable to connect to broker:9092",
        }
    ]


@pytest.mark.usefixtures("restore_logging")
def test_console_format_is_readable_and_redacted() -> None:
    """The console renderer (a TTY) shows the event and detail, secrets masked, no colours
    when the stream is not a terminal."""
    stream = configured(fmt="console")
    structlog.get_logger("bridge.app").info("bridge.started", http_port=8080, token=Secret(TOKEN))
    text = stream.getvalue()
    assert "bridge.started" in text and "http_port=8080" in text
    assert TOKEN not in text
    assert "\x1b[" not in text


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_replaces_the_handler() -> None:
    """Reconfiguring (tests, `check`) does not duplicate lines."""
    configured()
    stream = configured()
    structlog.get_logger().warning("bridge.test.once")
    assert len(lines(stream)) == 1


def test_scrub_text_masks_token_shapes() -> None:
    """Bearer values, Qoder PATs and JWTs are masked even when no Secret holds them."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2lnbmF0dXJl"
    text = scrub_text(f"Bearer abc.def pt-abcdefgh12345 {jwt} password=swordfish ok")
    for leaked in ("abc.def", "pt-abcdefgh12345", jwt, "swordfish"):
        assert leaked not in text
    assert text.endswith(" ok")
    assert scrub_text("bridge.token.reloaded token_file=/var/run/token") == (
        "bridge.token.reloaded token_file=/var/run/token"
    )


@pytest.mark.usefixtures("restore_logging")
def test_a_burst_of_aiokafka_errors_is_folded_into_a_few_lines() -> None:
    """Scenario: the broker is down and aiokafka logs the same two errors 1,000 times each
    (about 30 a second in real life). The log gets one line per message shape, not 2,000,
    and the bridge's own warnings are never folded."""
    stream = configured()
    kafka_log = logging.getLogger("aiokafka")
    for n in range(1000):
        kafka_log.error("Unable connect to node with id %s: %s", 1, f"[Errno 111] try {n}")
        kafka_log.error(
            f"Unable to update metadata from [{n % 3}]"
        )  # an f-string, as aiokafka does
    for _ in range(3):
        structlog.get_logger("bridge.kafka").warning("bridge.kafka.unreachable")
    records = lines(stream)
    assert [r["event"] for r in records] == ["aiokafka", "aiokafka"] + [
        "bridge.kafka.unreachable"
    ] * 3
    assert records[0]["message"] == "Unable connect to node with id 1: [Errno 111] try 0"


def test_folded_lines_are_counted_on_the_next_line_after_the_window() -> None:
    """After the window, the next line of that shape says how many were folded meanwhile."""
    now = [0.0]
    limiter = ThirdPartyRateLimit(30.0, clock=lambda: now[0])

    def record(msg: str, *args: object, name: str = "aiokafka") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)

    passed = []
    for second in range(100):  # 100 s of 30 lines a second
        now[0] = float(second)
        for n in range(30):
            rec = record("Unable connect to node with id %s: %s", 1, n)
            if limiter.filter(rec):
                passed.append((second, getattr(rec, "bridge_suppressed", 0)))
    assert passed == [(0, 0), (30, 899), (60, 899), (90, 899)]
    assert limiter.filter(record("something else"))
    assert all(limiter.filter(record("x", name="bridge.publisher")) for _ in range(5))


@pytest.mark.usefixtures("restore_logging")
def test_the_folded_count_reaches_the_json_line() -> None:
    """``suppressed`` is a field of the JSON line that follows a folded burst."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream, third_party_window_s=0.0)
    handler = logging.getLogger().handlers[-1]
    now = [0.0]
    handler.filters[:] = [ThirdPartyRateLimit(30.0, clock=lambda: now[0])]
    kafka_log = logging.getLogger("aiokafka")
    for _ in range(5):
        kafka_log.error("Unable to update metadata from %s", [1])
    now[0] = 31.0
    kafka_log.error("Unable to update metadata from %s", [1])
    records = lines(stream)
    assert len(records) == 2
    assert "suppressed" not in records[0]
    assert records[1]["suppressed"] == 4
