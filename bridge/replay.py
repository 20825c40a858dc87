"""Re-export a session's history from the Qoder API into a Kafka topic, exactly once per run.

    qoder-bridge replay --session S [--thread T] [--after EVENT_ID] [--topic TOPIC] [--restart]

--topic is the flag of BRIDGE_TOPIC: the target is BRIDGE_TOPIC unless it is given.

Records are the bridge's own (bridge.records.event_record): same key, value bytes and
CloudEvents headers, in the API's order per key. Only events: no alerts, no dead letters
(items that cannot be events are counted, logged and skipped).

How it is exactly once, and resumable:
- A run is named by its arguments: run id = a digest of session, thread, --after and the
  target topic. Running the same command again resumes that run; --restart begins it anew.
- Its producer is transactional with transactional.id "qoder-bridge-replay.<run id>". Each
  transaction holds a batch of event records *and* the run's progress records (each thread's
  last event id, counts, done). Starting the producer fences an earlier process of the same run
  (Ctrl-C, kill -9, a crash) and settles its open transaction; only then is the progress read
  (read_committed), so the run goes on exactly after what is committed: nothing lost, nothing
  twice for a read_committed consumer.
- Progress lives in a compacted topic of its own, BRIDGE_CHECKPOINT_TOPIC + ".replay" (or
  --progress-topic), keyed "<run id>" and "<run id>/<thread id>". Never in the checkpoint topic:
  the bridge loads every record there at start, and a replay must never move its cursors. The
  bridge never reads the progress topic; nothing changes for it.
- With BRIDGE_DELIVERY=at_least_once (for brokers without transactions) the producer is only
  idempotent: each batch's progress is written after its events are acknowledged. A crash
  between the two re-exports that batch on resume: nothing lost, at most one batch twice.
  Two processes of the same run are then not fenced: run one at a time.
- The API's refusals (429 with Retry-After, 5xx, resets, timeouts) cost a retry of that one
  request, as in the bridge's pumps (bridge.tooling.ApiRetry): the batch read so far stays, and
  the run gives up only once the API has answered nothing for API_GIVE_UP_S. Kafka away ends the
  attempt: the uncommitted batch is dropped, and the run goes on from its committed progress
  (MAX_FAILURES attempts in a row that commit nothing, then it gives up).
- A listed thread whose id cannot go into a URL is named (bridge.replay.thread_not_replayed)
  and the run ends with exit 1 once the others are replayed: never a silent gap.

This module reads and batches; bridge/replay_store.py keeps the run in Kafka (topics, producer,
progress records); bridge/progress.py shows how far it got.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TextIO

import anyio
import structlog

from bridge.api import QoderApi
from bridge.cli import add_settings_flags, settings_from_args
from bridge.config import Settings, require_token
from bridge.errors import (
    ApiError,
    ApiUnavailable,
    AuthRejected,
    BadCursor,
    NotFound,
    SinkUnavailable,
)
from bridge.kafka_conn import kafka_client_kwargs, producer_tuning_kwargs
from bridge.logs import configure_logging
from bridge.progress import ReplayProgress
from bridge.records import Event, Record, Rejected, ThreadRef, event_record
from bridge.replay_store import (
    PROGRESS_TOPIC_SUFFIX,
    ReplayRequest,
    RunState,
    RunStore,
    ThreadProgress,
    now,
)
from bridge.tooling import (
    EXIT_FATAL,
    EXIT_USAGE,
    ApiRetry,
    ToolFailed,
    check_id,
    fail,
    open_api,
    session_threads,
)

__all__ = ["HELP", "Replay", "ReplayRequest", "add_arguments", "main"]

HELP = "re-export a session's history from the API into a topic (exactly once per run)"
#: Attempts in a row that Kafka ended before they committed anything: then the run gives up.
MAX_FAILURES = 8
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")

log = structlog.get_logger("bridge.replay")


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--session", required=True, metavar="SESSION_ID", help="the session")
    parser.add_argument(
        "--thread", metavar="THREAD_ID", help="only this thread (default: all of the session's)"
    )
    parser.add_argument(
        "--after", metavar="EVENT_ID", help="only the events after this one (needs --thread)"
    )
    parser.add_argument(
        "--progress-topic",
        metavar="TOPIC",
        help="compacted topic keeping the run's progress (default: BRIDGE_CHECKPOINT_TOPIC"
        f" + '{PROGRESS_TOPIC_SUFFIX}')",
    )
    parser.add_argument(
        "--restart", action="store_true", help="begin this run again instead of resuming it"
    )
    add_settings_flags(parser)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        request = _request(args, settings)
    except ToolFailed as exc:
        return fail("replay", exc)
    require_token(settings.api)
    kafka_client_kwargs(settings.kafka)  # TLS files and codecs: a ConfigError (exit 2) now
    producer_tuning_kwargs(settings.kafka)
    configure_logging(settings.log, quiet_third_party=True)
    if getattr(args, "BRIDGE_TOPIC", None) is None:
        print(
            f"note: replaying into BRIDGE_TOPIC ({request.topic}), which the bridge writes "
            "too: its consumers see these events a second time",
            file=sys.stderr,
        )
    job = Replay(settings, request)
    try:
        anyio.run(job.run, backend="asyncio")
    except ToolFailed as exc:
        return fail("replay", exc)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {job.events:,} events committed; the same command resumes "
            f"run {request.run_id}",
            file=sys.stderr,
        )
        return 130
    print(job.summary())
    if job.not_replayed:
        print(
            f"qoder-bridge replay: {len(job.not_replayed)} thread(s) of {request.session_id} "
            f"not replayed, their ids cannot go into a URL: {', '.join(job.not_replayed)}",
            file=sys.stderr,
        )
        return EXIT_FATAL
    return 0


def _request(args: argparse.Namespace, settings: Settings) -> ReplayRequest:
    kafka = settings.kafka
    for flag, value in (("--session", args.session), ("--thread", args.thread)):
        check_id(flag, value)
    check_id("--after", args.after)
    if args.after is not None and args.thread is None:
        raise ToolFailed("--after needs --thread: an event id belongs to one thread", EXIT_USAGE)
    # --topic is BRIDGE_TOPIC's own flag: the settings already keep it apart from the
    # checkpoint, DLQ and alerts topics (a configuration error, exit 2).
    topic = kafka.topic
    progress = args.progress_topic or kafka.checkpoint_topic + PROGRESS_TOPIC_SUFFIX
    if not _TOPIC.fullmatch(progress) or progress in (".", ".."):
        raise ToolFailed(f"--progress-topic: {progress[:80]!r} is not a topic name", EXIT_USAGE)
    if progress in (topic, kafka.checkpoint_topic, kafka.dlq_topic, kafka.alerts_topic):
        raise ToolFailed(
            f"--progress-topic {progress} is --topic or one of the bridge's topics: choose another",
            EXIT_USAGE,
        )
    return ReplayRequest(args.session, args.thread, args.after, topic, progress, args.restart)


# -- the run --------------------------------------------------------------------------------


class _Batch:
    """Event records read since the last commit, and the threads whose progress they move."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.records: list[Record] = []
        self.size = 0
        self.touched: set[str] = set()
        self.started: float | None = None

    def add(self, thread_id: str, record: Record | None) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.touched.add(thread_id)
        if record is not None:
            self.records.append(record)
            self.size += record.size


class Replay:
    """One run: ``await run()``; ``events``, ``threads_done`` and the rest say how far it got
    (committed figures only)."""

    def __init__(
        self, settings: Settings, request: ReplayRequest, *, stream: TextIO | None = None
    ) -> None:
        self._settings = settings
        self.request = request
        self._delivery = settings.delivery
        self._store = RunStore(settings, request)
        self._stream = stream
        self._restart_pending = request.restart
        self.log = log.bind(run=request.run_id, session_id=request.session_id)
        self._api_retry = ApiRetry(
            settings.api,
            "bridge.replay.api_retry",
            hint=f"the same command resumes run {request.run_id}",
        )
        #: Listed threads the run cannot read (their id cannot go into a URL), as repr.
        self.not_replayed: list[str] = []
        #: Threads the API no longer knew when they were read (deleted since the listing).
        self.gone: list[str] = []
        self.events = 0
        self.skipped = 0
        self.threads = 0
        self.threads_done = 0
        self.already_complete = False
        self.resumed = False

    def summary(self) -> str:
        r = self.request
        what = f"{self.events:,} events of {self.threads_done} thread(s) of {r.session_id}"
        skipped = f"; {self.skipped} item(s) skipped (not events, see the log)" * bool(self.skipped)
        if self.gone:
            skipped += f"; {len(self.gone)} thread(s) gone from the API (deleted) when read"
        if self.not_replayed:
            skipped += f"; {len(self.not_replayed)} thread(s) NOT replayed (unusable ids)"
        if self.already_complete:
            return (
                f"nothing to do: run {r.run_id} is complete ({what} in {r.topic}{skipped}); "
                "--restart replays it again"
            )
        return f"replayed {what} into {r.topic}{skipped} (run {r.run_id})"

    async def run(self) -> None:
        async with open_api(self._settings) as api:
            listed = await session_threads(
                api, self.request.session_id, self.request.thread_id, retry=self._api_retry
            )
            threads, self.not_replayed = listed.threads, listed.unusable
            for thread_id in self.not_replayed:
                self.log.warning(
                    "bridge.replay.thread_not_replayed", thread_id=thread_id, reason="unusable_id"
                )
            failures = 0
            while True:
                before = self.events, self.threads_done
                try:
                    await self._attempt(api, threads)
                    return
                except SinkUnavailable as exc:
                    if (self.events, self.threads_done) != before:
                        failures = 0
                    failures += 1
                    if failures >= MAX_FAILURES:
                        raise ToolFailed(
                            f"gave up after {failures} failures in a row: {exc}; the same "
                            f"command resumes run {self.request.run_id}"
                        ) from exc
                    delay = min(0.5 * 2**failures, 15.0)
                    self.log.warning("bridge.replay.retrying", error=str(exc), retry_in_s=delay)
                    await anyio.sleep(delay)

    async def _attempt(self, api: QoderApi, threads: list[ThreadRef]) -> None:
        store = self._store
        await store.open()
        try:
            # Only now: opening settled whatever an earlier process of the run left open.
            state = await store.load()
            if state is not None and state.done and not self._restart_pending:
                self.already_complete = True
                self._count(state)
                return
            if state is None or self._restart_pending:
                state = RunState(uuid.uuid4().hex, now())
                await store.commit([], state, set(), run=True)
                self._restart_pending = False
                self.log.info("bridge.replay.started", attempt=state.attempt)
            else:
                self.resumed = True
                self.log.info("bridge.replay.resumed", attempt=state.attempt)
            for ref in threads:
                state.threads.setdefault(ref.thread_id, self._fresh(ref))
            self._count(state)
            progress = ReplayProgress(
                self.request.run_id,
                len(state.threads),
                self.threads_done,
                self.events,
                stream=self._stream,
            )
            try:
                await self._replay(api, state, threads, progress)
            finally:
                progress.close()  # before any other line: the bar ends its own
            self.log.info("bridge.replay.finished", events=self.events, threads=self.threads_done)
        finally:
            await store.close()

    def _fresh(self, ref: ThreadRef) -> ThreadProgress:
        after = self.request.after if ref.thread_id == self.request.thread_id else None
        return ThreadProgress(last_event_id=after)

    def _count(self, state: RunState) -> None:
        """The committed figures (``state`` as just loaded or just committed)."""
        threads = state.threads.values()
        self.events = sum(t.events for t in threads)
        self.skipped = sum(t.skipped for t in threads)
        self.threads = len(state.threads)
        self.threads_done = sum(t.done for t in threads)

    async def _replay(
        self,
        api: QoderApi,
        state: RunState,
        threads: list[ThreadRef],
        progress: ReplayProgress,
    ) -> None:
        batch = _Batch()

        async def commit(*, final: bool = False) -> None:
            # Done means a read_committed consumer sees it all, not only the coordinator.
            await self._store.commit(batch.records, state, batch.touched, run=final, visible=final)
            batch.clear()
            self._count(state)
            progress.update(self.threads_done, self.events)

        listed = {ref.thread_id for ref in threads}
        for thread_id, thread in state.threads.items():
            if thread_id not in listed and not thread.done:
                thread.done = True  # no longer listed: deleted since the run began
                batch.add(thread_id, None)
        for ref in threads:
            thread = state.threads[ref.thread_id]
            if thread.done:
                continue
            await self._read_thread(api, ref, thread, batch, commit)
            thread.done = True
            batch.add(ref.thread_id, None)
            if self._due(batch):
                await commit()
        state.done = True
        await commit(final=True)

    async def _read_thread(
        self,
        api: QoderApi,
        ref: ThreadRef,
        thread: ThreadProgress,
        batch: _Batch,
        commit: Callable[[], Awaitable[None]],
    ) -> None:
        """Read the thread after its cursor into ``batch``, committing whenever it is due. A
        request the API refuses for now is tried again from the cursor in memory: what the
        batch holds stays."""
        while True:
            try:
                await self._read_pages(api, ref, thread, batch, commit)
                return
            except ApiUnavailable as exc:
                await self._api_retry.wait(exc, f"reading thread {ref.thread_id}")

    async def _read_pages(
        self,
        api: QoderApi,
        ref: ThreadRef,
        thread: ThreadProgress,
        batch: _Batch,
        commit: Callable[[], Awaitable[None]],
    ) -> None:
        # Items without an id after the cursor, already in a batch (committed or not).
        handled_idless = thread.idless_after
        try:
            async for page in api.thread_events(ref, thread.last_event_id):
                self._api_retry.answered()
                for item in page:
                    if item.id is not None:
                        thread.last_event_id, thread.idless_after = item.id, 0
                        handled_idless = 0
                    elif handled_idless:
                        handled_idless -= 1  # handled before the interruption
                        continue
                    else:
                        thread.idless_after += 1
                    record = self._record(ref, item)
                    if record is None:
                        thread.skipped += 1
                    else:
                        thread.events += 1
                    batch.add(ref.thread_id, record)
                if self._due(batch):
                    await commit()
        except NotFound:
            self.log.warning("bridge.replay.thread_gone", thread_id=ref.thread_id)
            self.gone.append(ref.thread_id)
        except BadCursor as exc:
            raise ToolFailed(
                f"the API does not know event {thread.last_event_id} of thread {ref.thread_id} "
                f"({exc}); with --after, check the id; else --restart begins the run again"
            ) from exc
        except AuthRejected as exc:
            raise ToolFailed(f"the API refused the token: {exc}") from exc
        except ApiUnavailable:
            raise
        except ApiError as exc:
            raise ToolFailed(f"the API refused a request: {exc}") from exc

    def _due(self, batch: _Batch) -> bool:
        """A transaction's worth: as many records or bytes as the bridge's, or its interval."""
        if batch.started is None:
            return False
        return (
            len(batch.records) >= self._delivery.batch_max_records
            or batch.size >= self._delivery.max_in_flight_bytes // 2
            or time.monotonic() - batch.started >= self._delivery.commit_interval_ms / 1000
        )

    def _record(self, ref: ThreadRef, item: Event | Rejected) -> Record | None:
        if isinstance(item, Rejected):
            self.log.warning(
                "bridge.replay.skipped", thread_id=ref.thread_id, reason=item.reason, id=item.id
            )
            return None
        record = event_record(self.request.topic, ref, item)
        if record.size > self._store.record_limit:
            self.log.warning(
                "bridge.replay.skipped", thread_id=ref.thread_id, reason="too_large", id=item.id
            )
            return None
        return record
