"""Where a replay run stands, kept in Kafka: its progress records, read back after a fence, and
the producer that commits each batch of events together with them.

A run is named by its arguments (:attr:`ReplayRequest.run_id`). Its progress lives in a
compacted topic of its own (``BRIDGE_CHECKPOINT_TOPIC`` + ``.replay`` by default), never in the
checkpoint topic, which the bridge loads whole at every start:

- key ``<run id>``: the run: its attempt (a new one at ``--restart``), the arguments, done or
  not, totals;
- key ``<run id>/<thread id>``: a thread of the attempt: its last event id, the items without
  an id handled after it, events and skipped items so far, done or not.

With ``exactly_once`` the producer is transactional (``transactional.id`` =
``qoder-bridge-replay.<run id>``): :meth:`RunStore.open` fences an earlier process of the run
and settles its open transaction, and only then does :meth:`RunStore.load` read the progress,
``read_committed``. Each :meth:`RunStore.commit` is one transaction: the events and the progress
that covers them, visible together or not at all. With ``at_least_once`` the producer is only
idempotent and the progress goes out once the events are acknowledged.

Every run shares the progress topic. A read_committed reader stops at the first record of a
transaction still open there (the last stable offset), and another run's process killed in the
middle of a commit leaves one open until its transaction timeout: what this run committed after
it is behind that point. So :meth:`RunStore.load` never trusts a read that stopped short: it
reads up to the topic's end as it was once the producer had started (the high watermark), and
waits, saying so, while another run's transaction holds the readers back (at most the
transaction timeout and a minute). :meth:`RunStore.close` aborts a transaction of its own that
is still open (Ctrl-C in the middle of a commit), so it holds nobody back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.errors import ProducerFenced as KafkaProducerFenced

from bridge.checkpoints import ensure_topics, topic_record_limits
from bridge.config import KafkaSettings, Settings
from bridge.errors import ConfigError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.publisher import RECORD_OVERHEAD_BYTES
from bridge.records import Record, canonical_json
from bridge.tooling import EXIT_USAGE, ToolFailed, topic_partitions, until_visible

__all__ = [
    "PROGRESS_TOPIC_SUFFIX",
    "TRANSACTIONAL_ID_PREFIX",
    "ReplayRequest",
    "RunState",
    "RunStore",
    "ThreadProgress",
]

PROGRESS_TOPIC_SUFFIX = ".replay"
TRANSACTIONAL_ID_PREFIX = "qoder-bridge-replay."
#: Past a transaction's timeout, how long the broker may take to abort it (its check runs every
#: transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by default), and more.
TRANSACTION_GRACE_S = 60.0
#: Reading the progress topic, besides any wait for another run's transaction.
_READ_TIMEOUT_S = 120.0

log = structlog.get_logger("bridge.replay")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    session_id: str
    thread_id: str | None
    after: str | None
    topic: str
    progress_topic: str
    restart: bool = False

    @property
    def run_id(self) -> str:
        """The same arguments name the same run, wherever the command runs."""
        parts = ["v1", self.session_id, self.thread_id or "*", self.after or "", self.topic]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    @property
    def transactional_id(self) -> str:
        return TRANSACTIONAL_ID_PREFIX + self.run_id


@dataclass(slots=True)
class ThreadProgress:
    last_event_id: str | None = None
    #: Items without an id already handled after ``last_event_id`` (skipped, by place).
    idless_after: int = 0
    events: int = 0
    skipped: int = 0
    done: bool = False


@dataclass(slots=True)
class RunState:
    attempt: str
    started_at: str
    threads: dict[str, ThreadProgress] = field(default_factory=dict)
    done: bool = False


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunStore:
    """The run's topics, its producer and its progress records."""

    def __init__(self, settings: Settings, request: ReplayRequest) -> None:
        self.request = request
        self._delivery = settings.delivery
        self._max_request_bytes = settings.kafka.max_request_bytes
        self.transactional = settings.delivery.mode == "exactly_once"
        # The target in the place of BRIDGE_TOPIC and the progress topic in the place of the
        # checkpoint topic: the bridge's own helpers create, measure and read them.
        self.kafka: KafkaSettings = replace(
            settings.kafka,
            topic=request.topic,
            checkpoint_topic=request.progress_topic,
            alerts_topic=None,
        )
        #: The largest event record the target takes (its max.message.bytes, and ours).
        self.record_limit = self._max_request_bytes - RECORD_OVERHEAD_BYTES
        self._producer: AIOKafkaProducer | None = None
        #: A transaction of ours is open: close() aborts it.
        self._in_transaction = False
        #: The last offset this process wrote to each partition of the target.
        self._target_written: dict[TopicPartition, int] = {}
        #: Why the last load() waited (another run's open transaction), for the curious.
        self.waited_for: str | None = None

    async def open(self) -> None:
        """Create what is missing (the target and progress topics, and the bridge's DLQ topic
        as a bridge start would: the bridge's helper creates them together), then start the
        producer: with ``exactly_once`` that fences an earlier process of this run and settles
        its open transaction, so what :meth:`load` reads next is the whole truth."""
        try:
            await ensure_topics(self.kafka, shard_topic=False)
        except ConfigError as exc:
            raise ToolFailed(str(exc), EXIT_USAGE) from exc
        limit = (await topic_record_limits(self.kafka)).get(self.request.topic)
        if limit is not None:
            self.record_limit = min(self._max_request_bytes, limit) - RECORD_OVERHEAD_BYTES
        kwargs: dict[str, Any] = dict(
            kafka_client_kwargs(self.kafka),
            **producer_tuning_kwargs(self.kafka),
            acks="all",
            enable_idempotence=True,
        )
        kwargs["max_batch_size"] = max(1024, min(256 * 1024, self.record_limit))
        if self.transactional:
            kwargs["transactional_id"] = self.request.transactional_id
            kwargs["transaction_timeout_ms"] = self._delivery.transaction_timeout_ms
        producer = AIOKafkaProducer(**kwargs)
        try:
            with anyio.fail_after(60):
                await producer.start()
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await producer.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise self._translate(exc) from exc
            raise
        self._producer = producer

    async def close(self) -> None:
        """Stop the producer, aborting first a transaction of ours left open (cancelled in the
        middle of a commit): left open, it would hold every reader of the progress topic and
        the target back until its timeout."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        with anyio.CancelScope(shield=True):
            if self._in_transaction:
                self._in_transaction = False
                with anyio.move_on_after(10):
                    try:
                        await producer.abort_transaction()
                    # Fenced, Kafka away, or already committing (aiokafka asserts its state
                    # machine): the next start of the run, or the timeout, settles it.
                    except (KafkaError, AssertionError) as exc:
                        log.info("bridge.replay.abort_failed", error=repr(exc)[:300])
            with anyio.move_on_after(10):
                await producer.stop()

    async def load(self) -> RunState | None:
        """The run's committed progress (read_committed, to the end of the topic as it was
        after open()); None for a run never started."""
        run_id = self.request.run_id
        prefix = run_id + "/"
        docs: dict[str, Any] = {}

        def keep(key: str, value: bytes | None) -> None:
            if key == run_id or key.startswith(prefix):
                docs[key] = _json(value)

        await self._read_progress(keep)
        run = docs.get(run_id)
        if not isinstance(run, dict) or not isinstance(run.get("attempt"), str):
            return None
        state = RunState(run["attempt"], str(run.get("started_at")), done=run.get("done") is True)
        for key, doc in docs.items():
            if key == run_id or not isinstance(doc, dict) or doc.get("attempt") != state.attempt:
                continue  # another attempt's (before a --restart), or a tombstone
            last = doc.get("last_event_id")
            state.threads[key[len(prefix) :]] = ThreadProgress(
                last if isinstance(last, str) else None,
                _count(doc.get("idless_after")),
                _count(doc.get("events")),
                _count(doc.get("skipped")),
                doc.get("done") is True,
            )
        return state

    def _ours(self, key: str) -> bool:
        run_id = self.request.run_id
        return key == run_id or key.startswith(run_id + "/")

    async def _read_progress(self, keep: Callable[[str, bytes | None], None]) -> None:
        """Hand ``keep`` every committed record of the progress topic, in order, up to its high
        watermark as it is now, or as far as a read proves holds all of this run's records
        (see :meth:`_held_back`)."""
        kafka, topic = self.kafka, self.request.progress_topic
        wait_s = self._delivery.transaction_timeout_ms / 1000 + TRANSACTION_GRACE_S
        common: dict[str, Any] = dict(
            kafka_client_kwargs(kafka), enable_auto_commit=False, group_id=None
        )
        committed = AIOKafkaConsumer(
            **common, isolation_level="read_committed", auto_offset_reset="earliest"
        )
        latest = AIOKafkaConsumer(**common, isolation_level="read_uncommitted")
        self.waited_for = None
        try:
            with anyio.fail_after(_READ_TIMEOUT_S + wait_s):
                tps = await topic_partitions(kafka, topic) or []
                if not tps:
                    return
                await committed.start()
                await latest.start()
                ends = await latest.end_offsets(tps)  # high watermarks, not stable offsets
                committed.assign(tps)
                await committed.seek_to_beginning(*tps)
                remaining = set(tps)
                waiting: set[TopicPartition] = set()  # held back, with ours behind: wait
                give_up_at = float("inf")
                while remaining:
                    batches = await committed.getmany(*remaining, timeout_ms=500)
                    for records in batches.values():
                        for r in records:
                            if r.key:
                                keep(r.key.decode(), r.value)
                    for tp in list(remaining):
                        # Positions, not offsets: markers and aborted batches yield no record.
                        if await committed.position(tp) >= ends[tp]:
                            remaining.discard(tp)
                    if remaining - waiting and not batches:
                        whole, held = await self._held_back(
                            committed, latest, remaining - waiting, ends
                        )
                        remaining -= whole
                        if held and not waiting:
                            give_up_at = anyio.current_time() + wait_s
                        waiting |= held
                    if waiting & remaining and anyio.current_time() >= give_up_at:
                        raise ToolFailed(
                            f"{self.waited_for} did not end within {wait_s:.0f} s; "
                            "kafka-transactions.sh --describe-producers names its producer"
                        )
                if self.waited_for is not None:
                    log.info("bridge.replay.waited", topic=topic)
        except TimeoutError as exc:
            cause = describe_kafka_error(exc, kafka.bootstrap_servers)
            raise SinkUnavailable(f"cannot read the progress from {topic}: {cause}") from exc
        except KafkaError as exc:
            cause = describe_kafka_error(exc, kafka.bootstrap_servers)
            raise SinkUnavailable(f"cannot read the progress from {topic}: {cause}") from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await committed.stop()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await latest.stop()

    async def _held_back(
        self,
        committed: AIOKafkaConsumer,
        latest: AIOKafkaConsumer,
        partitions: set[TopicPartition],
        ends: dict[TopicPartition, int],
    ) -> tuple[set[TopicPartition], set[TopicPartition]]:
        """Of ``partitions``, those where the reader stands at the last stable offset, below
        the end: with nothing of this run behind it (read whole, as far as this run goes), and
        with some (to wait for).

        Another run's open transaction holds a read_committed reader back. Behind it, read
        uncommitted, is everything written since (committed, aborted or open). When none of it
        is this run's, what was read is all of this run's progress (this process has written
        nothing yet, and fenced the run's earlier ones). Otherwise, wait for the transaction to
        end (a killed process's ends at its timeout), saying whose it is: ``waited_for``."""
        stable = await committed.end_offsets(list(partitions))
        whole: set[TopicPartition] = set()
        held: set[TopicPartition] = set()
        for tp in sorted(partitions):
            if await committed.position(tp) < stable[tp]:
                continue  # records to come: not held back
            behind = await _read_range(latest, tp, stable[tp], ends[tp])
            if not any(self._ours(key) for key in behind):
                whole.add(tp)
                continue
            held.add(tp)
            run = behind[0].partition("/")[0]
            self.waited_for = (
                f"a transaction of replay run {run} open on {tp.topic} (partition "
                f"{tp.partition}, offset {stable[tp]}; a replay killed while it committed, "
                "or one committing now)"
            )
            wait_s = self._delivery.transaction_timeout_ms / 1000 + TRANSACTION_GRACE_S
            log.warning(
                "bridge.replay.waiting",
                reason="another run's open transaction holds back this run's progress",
                blocking_run=run,
                topic=tp.topic,
                partition=tp.partition,
                offset=stable[tp],
                at_most_s=round(wait_s),
            )
        return whole, held

    async def commit(
        self,
        records: list[Record],
        state: RunState,
        threads: set[str],
        *,
        run: bool = False,
        visible: bool = False,
    ) -> None:
        """Write ``records`` with the progress of ``threads`` (and of the run itself with
        ``run``): one transaction with ``exactly_once``. With ``visible``, return only once a
        read_committed consumer sees all of it."""
        producer = self._producer
        assert producer is not None  # noqa: S101 -- open() ran first
        progress = [self._thread_record(state, tid) for tid in sorted(threads)]
        if run:
            progress.append(self._run_record(state))
        try:
            with anyio.fail_after(self._delivery.transaction_timeout_ms / 1000):
                if self.transactional:
                    await producer.begin_transaction()
                    self._in_transaction = True
                    written = await _send_all(producer, [*records, *progress])
                    await producer.commit_transaction()
                    self._in_transaction = False
                else:
                    written = await _send_all(producer, records)
                    written |= await _send_all(producer, progress)
        except (KafkaError, TimeoutError) as exc:
            raise self._translate(exc) from exc
        for tp, offset in written.items():
            if tp.topic == self.request.topic:
                self._target_written[tp] = max(self._target_written.get(tp, -1), offset)
        if visible and self.transactional and self._target_written:
            # commit_transaction() returns before the markers reach every partition; and
            # another run's transaction left open on the target holds readers back as long.
            wait_s = self._delivery.transaction_timeout_ms / 1000 + TRANSACTION_GRACE_S
            await until_visible(self.kafka, self._target_written, timeout_s=wait_s)

    def _translate(self, exc: BaseException) -> Exception:
        if isinstance(exc, KafkaProducerFenced | InvalidProducerEpoch):
            return ToolFailed(
                f"another process of this run took over (transactional.id "
                f"{self.request.transactional_id} fenced this one); it goes on from there"
            )
        if isinstance(exc, TransactionalIdAuthorizationFailed):
            return ToolFailed(
                f"Kafka does not allow the transactional.id {self.request.transactional_id}: "
                f"grant TransactionalId Write and Describe on the prefix "
                f"{TRANSACTIONAL_ID_PREFIX!r}"
            )
        if isinstance(exc, TopicAuthorizationFailedError):
            return ToolFailed(f"Kafka does not allow writing to a topic: {exc}")
        return SinkUnavailable(describe_kafka_error(exc, self.kafka.bootstrap_servers))

    def _run_record(self, state: RunState) -> Record:
        r = self.request
        threads = state.threads.values()
        doc = {
            "run_id": r.run_id,
            "attempt": state.attempt,
            "session_id": r.session_id,
            "thread_id": r.thread_id,
            "after": r.after,
            "topic": r.topic,
            "started_at": state.started_at,
            "done": state.done,
            "threads": len(state.threads),
            "events": sum(t.events for t in threads),
            "skipped": sum(t.skipped for t in threads),
            "written_at": now(),
        }
        return Record(r.progress_topic, r.run_id.encode(), canonical_json(doc), [])

    def _thread_record(self, state: RunState, thread_id: str) -> Record:
        r, thread = self.request, state.threads[thread_id]
        doc = {
            "run_id": r.run_id,
            "attempt": state.attempt,
            "thread_id": thread_id,
            "last_event_id": thread.last_event_id,
            "idless_after": thread.idless_after,
            "events": thread.events,
            "skipped": thread.skipped,
            "done": thread.done,
            "written_at": now(),
        }
        key = f"{r.run_id}/{thread_id}".encode()
        return Record(r.progress_topic, key, canonical_json(doc), [])


def _json(value: bytes | None) -> Any:
    try:
        return json.loads(value) if value is not None else None
    except ValueError:
        return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> list[str]:
    """The keys of the records of ``tp`` from ``start`` to ``end`` (uncommitted ones too)."""
    consumer.assign([tp])
    consumer.seek(tp, start)
    keys: list[str] = []
    while await consumer.position(tp) < end:
        batches = await consumer.getmany(tp, timeout_ms=500)
        keys.extend(
            r.key.decode(errors="replace") for r in batches.get(tp, ()) if r.key and r.offset < end
        )
    return keys


async def _send_all(producer: AIOKafkaProducer, records: list[Record]) -> dict[TopicPartition, int]:
    """Send, wait for every acknowledgement; the last offset written to each partition."""
    acks = [await producer.send(r.topic, r.value, key=r.key, headers=r.headers) for r in records]
    last: dict[TopicPartition, int] = {}
    for meta in await asyncio.gather(*acks):
        tp = TopicPartition(meta.topic, meta.partition)
        last[tp] = max(last.get(tp, -1), meta.offset)
    return last
