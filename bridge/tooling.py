"""What the operators' tools (``replay``, ``checkpoints``) share with each other and the bridge.

The API client is built the way the composition root builds it (one pool, the token provider,
the request budget of ``BRIDGE_API_MAX_RPS``); a session and its threads are looked up with
errors an operator can act on; a tool that cannot do what it was asked raises
:class:`ToolFailed` with the one line it prints and its exit code. A tool that wrote in a
transaction waits, before it says it is done, until read_committed readers see what it wrote
(:func:`until_visible`).

Requests ride out what the bridge's pumps ride out (429, 5xx, resets, timeouts) the way they
do (:class:`ApiRetry`): each failed request is tried again after a full-jitter backoff
(``BRIDGE_BACKOFF_INITIAL_S`` doubling to ``BRIDGE_BACKOFF_MAX_S``), never sooner than the
API's ``Retry-After``; a tool gives up only once the API has answered nothing for
:data:`API_GIVE_UP_S`.

Ids are taken as the bridge takes them (the supervisor's ``_SAFE_ID``: letters, digits, ``_``,
``-``, ``.`` and ``:``), except ``.`` and ``..``, which a URL path would resolve away. A thread
whose id cannot be used is never dropped in silence: :func:`session_threads` returns it, and
the tool says so.
"""

from __future__ import annotations

import random
import re
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import certifi
import httpx
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.api import QoderApi, RateLimiter
from bridge.checkpoints import admin_client, described_partitions
from bridge.config import ApiSettings, KafkaSettings, Settings
from bridge.errors import ApiError, ApiUnavailable, AuthRejected, NotFound, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs
from bridge.records import ThreadRef
from bridge.secrets import TokenProvider

__all__ = [
    "API_GIVE_UP_S",
    "EXIT_FATAL",
    "EXIT_USAGE",
    "ApiRetry",
    "SessionThreads",
    "ToolFailed",
    "check_id",
    "fail",
    "open_api",
    "session_threads",
    "topic_partitions",
    "until_visible",
]

EXIT_FATAL, EXIT_USAGE = 1, 2
#: What a session, thread or event id may look like before it goes into a URL path: what the
#: bridge's supervisor follows (its _SAFE_ID), but for the path segments "." and "..".
_ID = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.:-]{1,200}")
#: A tool gives up once the API has answered none of its requests for this long (the bridge
#: itself never gives up): long enough for a gateway's burst suppression or a deploy.
API_GIVE_UP_S = 300.0

log = structlog.get_logger("bridge.tooling")
T = TypeVar("T")


class ToolFailed(Exception):
    """The tool stops: ``str()`` is the line it prints on stderr, ``code`` its exit status."""

    def __init__(self, message: str, code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.code = code


def check_id(flag: str, value: str | None) -> None:
    """A usage error (exit 2) for an id that cannot be one (and must not reach a URL)."""
    if value is not None and not _ID.fullmatch(value):
        raise ToolFailed(
            f"{flag}: {value[:80]!r} is not an id (letters, digits, _ - . and :)", EXIT_USAGE
        )


def usable_id(value: object) -> bool:
    """Whether ``value`` is an id a tool can put in a URL path (what :func:`check_id` takes)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


class ApiRetry:
    """Retries of one tool run's API requests: what the bridge's pumps do on 429, 5xx, a reset
    or a timeout (``ApiUnavailable``), the backoff of ``BRIDGE_BACKOFF_*_S`` with full jitter,
    never shorter than ``Retry-After``. ``answered()`` after each request that succeeded;
    ``wait()`` after one that failed raises ToolFailed once nothing has been answered for
    ``give_up_s``."""

    def __init__(
        self,
        settings: ApiSettings,
        event: str,
        *,
        give_up_s: float = API_GIVE_UP_S,
        hint: str = "",
    ) -> None:
        self._initial_s, self._max_s = settings.backoff_initial_s, settings.backoff_max_s
        self._event = event
        self._give_up_s = give_up_s
        self._hint = hint
        self._failures = 0
        self._failing_since: float | None = None
        #: Requests tried again, in all.
        self.retries = 0

    def answered(self) -> None:
        self._failures, self._failing_since = 0, None

    async def wait(self, exc: ApiUnavailable, doing: str) -> None:
        now = anyio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        failing_s = now - self._failing_since
        if failing_s >= self._give_up_s:
            hint = f"; {self._hint}" if self._hint else ""
            raise ToolFailed(
                f"the API answered nothing for {failing_s:.0f} s ({self._failures} tries, "
                f"{doing}; the last: {exc}){hint}"
            )
        ceiling = min(self._max_s, self._initial_s * 2**self._failures)
        delay = max(exc.retry_after_s or 0.0, random.uniform(0, ceiling))  # noqa: S311 -- jitter
        self._failures += 1
        self.retries += 1
        # The first failure of a run of them says so; a long run warns; the rest is detail.
        emit = log.info if self._failures == 1 else log.debug
        if self._failures == 10:
            emit = log.warning
        emit(
            self._event,
            doing=doing,
            error=str(exc),
            status=exc.status,
            failures_in_a_row=self._failures,
            retry_in_s=round(delay, 2),
        )
        await anyio.sleep(delay)

    async def call(self, doing: str, request: Callable[[], Awaitable[T]]) -> T:
        """``await request()``, tried again while the API is unavailable."""
        while True:
            try:
                result = await request()
            except ApiUnavailable as exc:
                await self.wait(exc, doing)
                continue
            self.answered()
            return result


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
            client,
            settings.api.url,
            lambda: tokens.current().reveal(),
            RateLimiter(settings.api.max_requests_per_s),
            stall_timeout_s=settings.api.stall_timeout_s,
            request_timeout_s=settings.api.request_timeout_s,
            max_event_bytes=settings.api.max_event_bytes,
            json_in_flight=8,
        )


@dataclass(frozen=True, slots=True)
class SessionThreads:
    """A session as the API lists it: its threads, in the API's order, and the listed threads
    a tool cannot follow (their id, as ``repr``, shortened)."""

    session: dict[str, Any]
    threads: list[ThreadRef]
    unusable: list[str] = field(default_factory=list)


async def session_threads(
    api: QoderApi,
    session_id: str,
    thread_id: str | None = None,
    *,
    retry: ApiRetry | None = None,
) -> SessionThreads:
    """The session and its threads (only ``thread_id`` when given), in the API's order.

    Raises ToolFailed naming the session or thread the API does not know, or why it did not
    answer (after ``retry``'s tries: by default the bridge's backoff).
    """
    retry = retry if retry is not None else ApiRetry(ApiSettings(), "bridge.tooling.api_retry")
    try:
        session = await retry.call(f"session {session_id}", lambda: api.get_session(session_id))
        threads = await retry.call(
            f"the threads of {session_id}", lambda: api.list_threads(session_id)
        )
    except NotFound:
        raise ToolFailed(
            f"session {session_id} not found (HTTP 404): check the id, and that "
            "QODER_ACCESS_TOKEN belongs to the session's account"
        ) from None
    except AuthRejected as exc:
        raise ToolFailed(f"the API refused the token: {exc}") from None
    except ApiError as exc:
        raise ToolFailed(f"the API did not answer for session {session_id}: {exc}") from None
    refs = [ThreadRef(session_id, t["id"]) for t in threads if usable_id(t.get("id"))]
    unusable = [repr(t.get("id"))[:120] for t in threads if not usable_id(t.get("id"))]
    if thread_id is not None:
        refs = [ref for ref in refs if ref.thread_id == thread_id]
        if not refs:
            raise ToolFailed(
                f"thread {thread_id} is not a thread of session {session_id} "
                f"(the API lists {len(threads)})"
            )
        unusable = []
    return SessionThreads(session, refs, unusable)


async def topic_partitions(
    kafka: KafkaSettings, topic: str, *, timeout_s: float = 30
) -> list[TopicPartition] | None:
    """The topic's partitions, from the admin API; None when there is no such topic."""
    try:
        with anyio.fail_after(timeout_s):
            async with admin_client(kafka) as admin:
                partitions = await described_partitions(admin, topic)
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot describe the topic {topic}: {cause}") from exc
    return None if partitions is None else [TopicPartition(topic, p) for p in partitions]


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
