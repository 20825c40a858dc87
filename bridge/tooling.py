"""What the operators' tools (``replay``, ``checkpoints``) share with each other and the bridge.

The API client is built the way the composition root builds it (one pool, the token provider,
the request budget of ``BRIDGE_API_MAX_RPS``); a session and its threads are looked up with
errors an operator can act on; a tool that cannot do what it was asked raises
:class:`ToolFailed` with the one line it prints and its exit code. A tool that wrote in a
transaction waits, before it says it is done, until read_committed readers see what it wrote
(:func:`until_visible`).
"""

from __future__ import annotations

import re
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import certifi
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.api import QoderApi, RateLimiter
from bridge.config import KafkaSettings, Settings
from bridge.errors import ApiError, ApiUnavailable, AuthRejected, NotFound, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs
from bridge.records import ThreadRef
from bridge.secrets import TokenProvider

__all__ = [
    "EXIT_FATAL",
    "EXIT_USAGE",
    "ToolFailed",
    "check_id",
    "fail",
    "open_api",
    "session_threads",
    "until_visible",
]

EXIT_FATAL, EXIT_USAGE = 1, 2
#: What a session, thread or event id may look like before it goes into a URL path.
_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
#: Tries at looking a session up when the API is busy or briefly away.
_LOOKUPS = 4


class ToolFailed(Exception):
    """The tool stops: ``str()`` is the line it prints on stderr, ``code`` its exit status."""

    def __init__(self, message: str, code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.code = code


def check_id(flag: str, value: str | None) -> None:
    """A usage error (exit 2) for an id that cannot be one (and must not reach a URL)."""
    if value is not None and not _ID.fullmatch(value):
        raise ToolFailed(
            f"{flag}: {value[:80]!r} is not an id (letters, digits, _ and -)", EXIT_USAGE
        )


def fail(command: str, exc: ToolFailed) -> int:
    """Print why the tool stopped; its exit code."""
    print(f"qoder-bridge {command}: {exc}", file=sys.stderr)
    return exc.code


@asynccontextmanager
async def open_api(settings: Settings) -> AsyncIterator[QoderApi]:
    """The Qoder API client for one tool run (requests only, no streams)."""
    tokens = TokenProvider.from_settings(settings.api)
    tls = ssl.create_default_context(cafile=certifi.where())
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(
        limits=limits, verify=tls, follow_redirects=False, trust_env=False
    ) as client:
        yield QoderApi(
            client,
            [client],
            settings.api.url,
            lambda: tokens.current().reveal(),
            RateLimiter(settings.api.max_requests_per_s),
            stall_timeout_s=settings.api.stall_timeout_s,
            request_timeout_s=settings.api.request_timeout_s,
            max_event_bytes=settings.api.max_event_bytes,
            json_in_flight=8,
        )


async def session_threads(
    api: QoderApi, session_id: str, thread_id: str | None = None
) -> tuple[dict[str, Any], list[ThreadRef]]:
    """The session and its threads (only ``thread_id`` when given), in the API's order.

    Raises ToolFailed naming the session or thread the API does not know, or why it did not
    answer.
    """
    try:
        for attempt in range(1, _LOOKUPS + 1):
            try:
                session = await api.get_session(session_id)
                threads = await api.list_threads(session_id)
                break
            except ApiUnavailable as exc:  # 429, 5xx, a timeout: worth another try or two
                if attempt == _LOOKUPS:
                    raise
                await anyio.sleep(min(exc.retry_after_s or attempt, 10.0))
    except NotFound:
        raise ToolFailed(
            f"session {session_id} not found (HTTP 404): check the id, and that "
            "QODER_ACCESS_TOKEN belongs to the session's account"
        ) from None
    except AuthRejected as exc:
        raise ToolFailed(f"the API refused the token: {exc}") from None
    except ApiError as exc:
        raise ToolFailed(f"the API did not answer for session {session_id}: {exc}") from None
    refs = [
        ThreadRef(session_id, t["id"])
        for t in threads
        if isinstance(t.get("id"), str) and _ID.fullmatch(t["id"])
    ]
    if thread_id is not None:
        refs = [ref for ref in refs if ref.thread_id == thread_id]
        if not refs:
            raise ToolFailed(
                f"thread {thread_id} is not a thread of session {session_id} "
                f"(the API lists {len(threads)})"
            )
    return session, refs


async def until_visible(
    kafka: KafkaSettings, offsets: dict[TopicPartition, int], *, timeout_s: float = 60
) -> None:
    """Wait until a read_committed reader gets past ``offsets`` (the last record written to
    each partition). ``commit_transaction()`` returns once the coordinator has logged the
    commit; the markers that let readers past it reach each partition a little later, and a
    bridge started at once would read its checkpoints without them."""
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(kafka),
        isolation_level="read_committed",
        enable_auto_commit=False,
        group_id=None,
    )
    try:
        with anyio.fail_after(timeout_s):
            await consumer.start()
            consumer.assign(list(offsets))
            for tp, offset in offsets.items():
                consumer.seek(tp, offset)
            pending = set(offsets)
            while pending:
                await consumer.getmany(*pending, timeout_ms=200)
                for tp in list(pending):
                    if await consumer.position(tp) > offsets[tp]:
                        pending.discard(tp)
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot see the committed records: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()
