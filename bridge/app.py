"""Composition root: builds every resource once and runs them in one task group.

Start-up order matters and is explicit: the HTTP probes first (alive, not ready), then the topics,
the producer (with ``exactly_once`` this fences any previous instance and aborts its open
transaction), the checkpoints read to the end of their topic, and only then the supervisor and
its pumps. Ready means all of that is up, the API accepts the token, and we are not draining.

Shutdown has two tiers. The first SIGTERM/SIGINT drains: readiness off, the pumps stop reading,
the publisher flushes what it holds and commits the checkpoints, within ``drain_timeout_s``;
then exit 0. A second signal, or the deadline, stops at once (exit 1). Nothing is lost either
way: what was not committed is read again from the API after the checkpoint.
"""

from __future__ import annotations

import gc
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import TypeVar

import anyio
import anyio.abc
import certifi
import httpx
import structlog

from bridge import __version__, metrics
from bridge.alerts import BridgeAlerts
from bridge.api import QoderApi, RateLimiter
from bridge.checkpoint_index import CheckpointIndex
from bridge.checkpoints import ensure_topics
from bridge.config import Settings
from bridge.errors import ConfigError, ProducerFenced, SinkForbidden, SinkUnavailable
from bridge.health import HealthState, serve_http
from bridge.kafka_watch import watch_kafka
from bridge.ownership import ShardAssignor, keep_ownership
from bridge.secrets import TokenProvider
from bridge.sharding import ShardedPublisher, ShardManager
from bridge.status import StatusView
from bridge.stream_transport import KeepAliveTransport, StreamTransport
from bridge.summary import log_summary
from bridge.supervisor import Supervisor

log = structlog.get_logger("bridge.app")

EXIT_OK, EXIT_FATAL = 0, 1
_E = TypeVar("_E", bound=BaseException)
#: JSON requests get a pool of their own; streams need none (see _stream_client).
JSON_POOL_SIZE = 64


def _json_client(connections: int, tls: ssl.SSLContext) -> httpx.AsyncClient:
    """The client of JSON requests: up to ``connections`` kept open between requests (the
    caller bounds those in flight to as many). Not httpcore's pool: it checks every idle
    connection's socket on each request, and with its locks and cancel scopes a page request
    cost 1 ms of CPU at 64 in flight (issue 11; tests/experiments/exp_json_request_cost.py)."""
    return httpx.AsyncClient(
        transport=KeepAliveTransport(tls, keep=connections),
        follow_redirects=False,
        trust_env=False,
    )


def _stream_client(tls: ssl.SSLContext) -> httpx.AsyncClient:
    """Event streams: a connection each for as long as it lives, so no pool (httpcore's scans
    every connection on each request) and none of httpcore's per-connection and per-read
    layers, which an idle stream would hold for hours (issue 11: memory per idle stream)."""
    return httpx.AsyncClient(
        transport=StreamTransport(tls), follow_redirects=False, trust_env=False
    )


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = HealthState()
        #: GET /status; the supervisor is set on it once it exists.
        self.status = StatusView(self.health, group=settings.kafka.group_id)
        self.publisher = ShardedPublisher(settings, self.health)
        self._outer: anyio.CancelScope | None = None
        self._readers: anyio.CancelScope | None = None
        self._draining = False
        self._nothing_read = False
        self.exit_code = EXIT_OK
        self.http_port: int | None = None

    def drain(self) -> None:
        """First signal: stop reading, flush, commit, stop. Second: stop now."""
        if self._draining:
            log.warning("bridge.shutdown.forced")
            os._exit(EXIT_FATAL)  # "at once": the checkpoints make this safe
        self._draining = True
        self.health.draining = True
        deadline_s = self.settings.shutdown.drain_timeout_s
        if self._readers is None:
            # Still starting: nothing was read, so nothing is to be flushed. Stop now.
            log.info("bridge.shutdown.before_reading")
            self._nothing_read = True
            self.publisher.close()
            if self._outer is not None:
                self._outer.cancel()
            return
        if not self.health.kafka_reachable:
            # Nothing read can be flushed while Kafka is away: waiting out the deadline helps
            # nobody. What was not committed is read again after the checkpoints.
            log.warning("bridge.shutdown.kafka_unreachable", unflushed=True)
            self.exit_code = EXIT_FATAL
            self._nothing_read = True  # not a deadline: nothing could be flushed
            self._readers.cancel()
            if self._outer is not None:
                self._outer.cancel()
            return
        log.info(
            "bridge.shutdown.draining",
            deadline_s=deadline_s,
            hint="a second SIGTERM or Ctrl-C stops at once",
        )
        # The readers stop first; the publisher is closed once none of them can submit any
        # more (run() does it), then flushes and commits what they handed on.
        self._readers.cancel()
        if self._outer is not None:
            self._outer.deadline = min(self._outer.deadline, anyio.current_time() + deadline_s)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("bridge.shutdown.signal", signal=signal.Signals(signum).name)
                self.drain()

    async def _until_kafka(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        delay, failures = 0.5, 0
        while True:
            try:
                await step()
                if failures:
                    log.info("bridge.kafka.available", step=what, after_failures=failures)
                return
            except SinkUnavailable as exc:
                # One warning per outage; the retries go to debug (the Kafka watcher says
                # when it is back).
                emit = log.warning if not failures else log.debug
                emit("bridge.kafka.unavailable", step=what, error=str(exc), retry_in_s=delay)
                failures += 1
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _publisher_then_stop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.publisher.run(task_status=task_status)
        # The publisher returns only once drained: everything else can stop now.
        if self._outer is not None:
            self._outer.cancel()

    async def run(self) -> int:
        settings = self.settings
        metrics.BUILD_INFO.labels(version=__version__).set(1)
        tokens = TokenProvider.from_settings(settings.api)
        # One TLS context for every pool: each would otherwise load the CA bundle (~0.7 MiB).
        tls = ssl.create_default_context(cafile=certifi.where())
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(_json_client(JSON_POOL_SIZE, tls))
            stream_client = await stack.enter_async_context(_stream_client(tls))
            limiter = RateLimiter(settings.api.max_requests_per_s)
            api = QoderApi(
                client,
                stream_client,
                settings.api.url,
                lambda: tokens.current().reveal(),
                limiter,
                stall_timeout_s=settings.api.stall_timeout_s,
                request_timeout_s=settings.api.request_timeout_s,
                max_event_bytes=settings.api.max_event_bytes,
                json_in_flight=JSON_POOL_SIZE,
            )
            async with anyio.create_task_group() as tg:
                self._outer = tg.cancel_scope
                serve = partial(serve_http, status=self.status.answer)
                port = self.http_port = await tg.start(serve, settings.http, self.health)
                tg.start_soon(self._signals)
                tg.start_soon(limiter.run)
                tg.start_soon(watch_kafka, settings.kafka, self.health)
                tg.start_soon(log_summary, settings.log.summary_interval_s)
                self.health.set_discovery(False, "no session listing or lookup has answered yet")
                log.info(
                    "bridge.started",
                    version=__version__,
                    http_port=port,
                    delivery=settings.delivery.mode,
                )
                await self._until_kafka("topics", lambda: ensure_topics(settings.kafka))
                await tg.start(self._publisher_then_stop)
                checkpoints = CheckpointIndex()
                stack.callback(checkpoints.close)
                alerts = BridgeAlerts(self.publisher, settings.kafka.alerts_topic, self.health)
                supervisor = Supervisor(settings, api, self.publisher, alerts, checkpoints)
                supervisor.own_nothing()  # only what the group assigns
                owner = ShardManager(settings, self.publisher, checkpoints)
                owner.follow, owner.unfollow = supervisor.follow, supervisor.unfollow
                self.status.supervisor = supervisor
                self.status.shards = lambda: sorted(owner.held)
                if not self._draining:
                    async with anyio.create_task_group() as readers:
                        self._readers = readers.cancel_scope
                        await readers.start(supervisor.run)
                        readers.start_soon(owner.run)
                        # A member of BRIDGE_GROUP_ID from now on: its assignments are the
                        # shards it follows. Not before the topics exist (a broker that
                        # auto-creates would make an uncompacted one). It leaves the group at
                        # the very end of a drain, once everything it read is committed.
                        assignor = ShardAssignor(lambda: owner.held)
                        owner.rejoin = assignor.rejoin
                        tg.start_soon(
                            keep_ownership, settings, assignor, owner.assigned, self.health
                        )
                        log.info("bridge.ready_to_read")
                    # Every reader has stopped: nothing can be submitted any more.
                    self.publisher.close()
            if (
                tg.cancel_scope.cancelled_caught
                and self._draining
                and not self._nothing_read
                and not self.publisher.drained
            ):
                log.error("bridge.shutdown.deadline_exceeded")
                self.exit_code = EXIT_FATAL
        log.info("bridge.stopped", exit_code=self.exit_code)
        return self.exit_code


async def _run(settings: Settings) -> int:
    bridge = Bridge(settings)
    code = EXIT_FATAL
    try:
        code = await bridge.run()
    except* ProducerFenced as group:
        # A shard's producer fenced is dropped (bridge/sharding.py); one anywhere else is a
        # bug: stop publishing at once and let the orchestrator restart us.
        log.error("bridge.fatal.fenced", error=str(_first(group)))
    except* SinkForbidden as group:
        log.error("bridge.fatal.forbidden", error=str(_first(group)))
    return code


def _first(group: BaseExceptionGroup[_E]) -> _E:
    """The first exception of a group, however deep the task groups nested it."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


#: Allocations between collections of the youngest generation (CPython's default: 700), and
#: the older generations' counts (20 and 10: a full collection every 4 million allocations).
GC_THRESHOLDS = (20_000, 20, 10)


def _tune_gc() -> None:
    """Garbage collection for a daemon that allocates a few dozen objects an event and frees
    nearly all of them by reference count. With CPython's defaults a full collection walked
    every object the process had, the imported modules included, several times a minute under
    load: 20 % of the bridge's CPU at 20,000 events/s, and 50-60 ms pauses (issue 11's profile).
    What exists once the modules are imported is frozen (never walked again), and collections
    come 30 times less often; each still finds the cycles the others did."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(settings: Settings) -> int:
    """Run the daemon until it is told to stop; returns the process exit code."""
    _tune_gc()
    try:
        return anyio.run(_run, settings, backend="asyncio")
    except ConfigError:
        raise  # the CLI turns it into exit code 2 with the setting's name
    except ExceptionGroup as group:
        config = group.subgroup(ConfigError)
        if config is not None:
            raise _first(config) from None
        log.exception("bridge.fatal")
        return EXIT_FATAL
    except Exception:
        log.exception("bridge.fatal")
        return EXIT_FATAL
