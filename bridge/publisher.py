"""The one Kafka producer: batches of events, and the checkpoints that cover them.

Pumps ``submit`` work; one loop here takes it in batches, bounded by time and size.

- ``exactly_once``: each batch is one transaction holding the events of any number of threads,
  their alerts and dead letters, *and* the checkpoints of those threads. A read_committed
  consumer sees an event only together with the cursor that covers it.
- ``at_least_once``: an idempotent producer; the checkpoints are written after every record of
  the batch was acknowledged.

Either way a failed batch rewinds the cursors of its threads to their committed position, the
producer is rebuilt (which aborts an open transaction), and the pumps read the lost part again
from the API. ``ProducerFenced`` is fatal: another instance owns our ``transactional.id``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import anyio
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.errors import (
    ProducerFenced as KafkaProducerFenced,
)
from aiokafka.partitioner import DefaultPartitioner, murmur2

from bridge import metrics
from bridge.checkpoints import (
    WRITER_HEADER,
    foreign_checkpoints,
    topic_record_limits,
    transaction_committed,
)
from bridge.config import Settings
from bridge.cursor import CHECKPOINT_RECENT_IDS, ThreadCursor
from bridge.errors import (
    ProducerFenced,
    SinkError,
    SinkForbidden,
    SinkUnavailable,
    TransactionAborted,
)
from bridge.health import HealthState
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.records import Record, ThreadRef, checkpoint_record, dead_letter_record, utc_now

log = structlog.get_logger("bridge.publisher")

#: Bookkeeping cost of one queued item, so that many tiny items are bounded too.
ITEM_OVERHEAD_BYTES = 512
#: Room for the batch and record headers around one record.
RECORD_OVERHEAD_BYTES = 1024
#: A checkpoint (32 recent ids and its fields) and its batch fit in this, with room to spare.
MIN_CHECKPOINT_TOPIC_BYTES = 16 * 1024
_FRACTION = re.compile(r"(\.[0-9]{6})[0-9]+")


@dataclass(slots=True)
class Outgoing:
    """One unit of work: the records for one event (or a bridge alert, or a drain marker)."""

    cursor: ThreadCursor | None
    epoch: int
    records: list[Record]
    event_id: str | None = None  # moves the cursor once committed
    event_type: str | None = None
    event_time: str | None = None
    drained_updated_at: str | None = None
    #: Remembered against replays: the event id, or a dead letter's digest when it has none.
    dedupe_key: str | None = None
    #: A drain marker whose pump waits for it to be committed (or rewound).
    drain: bool = False
    read_at: float = field(default_factory=time.monotonic)
    size: int = 0
    #: The session of an item without a cursor (a settled mark): it goes to its shard.
    session_id: str | None = None

    def __post_init__(self) -> None:
        self.size = ITEM_OVERHEAD_BYTES + sum(r.size for r in self.records)
        if self.dedupe_key is None:
            self.dedupe_key = self.event_id

    @property
    def stale(self) -> bool:
        return self.cursor is not None and self.epoch != self.cursor.epoch


class ByteBudget:
    """Backpressure: at most ``limit`` bytes of work between the pumps and Kafka's acks.

    Waiters are served first come, first served, and a release wakes only those that now fit:
    thousands of pumps waiting after an outage must not all wake for every batch.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()
        # Read at scrape time: setting a gauge takes a lock, twice an event.
        metrics.INFLIGHT_BYTES.set_function(lambda: self.used)

    async def acquire(self, size: int) -> None:
        size = min(size, self.limit)  # one huge item may pass alone
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return
        entry = (size, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.release(size)  # granted as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, size: int) -> None:
        self.used = max(0, self.used - min(size, self.limit))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size, granted = self._waiters.popleft()
            self.used += size
            granted.set()


class KeyPartitioner:
    """Kafka's default partitioner (murmur2 of the key, as the Java client and aiokafka place
    keys), with each key's hash remembered. aiokafka's murmur2 is pure Python, about 10 µs
    for a 55-byte ``sess_.../sthr_...`` key, and a thread's key repeats for all its events."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys
        self._default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(self._default(key, all_partitions, available))
        positive = self._hashes.get(key)
        if positive is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()  # bounded; the keys of running threads come back at once
            positive = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[positive % len(all_partitions)]


def _seconds_since(timestamp: str | None, now: float | None = None) -> float | None:
    """Seconds from an RFC 3339 timestamp to ``now`` (default: the wall clock), or None."""
    if not timestamp:
        return None
    now = time.time() if now is None else now
    # The API's form, 2026-01-02T03:04:05.123456789Z: the whole second parsed once a second.
    if len(timestamp) > 20 and timestamp[19] == "." and timestamp[-1] == "Z":
        whole = _whole_second(timestamp[:19])
        fraction = timestamp[19:-1]
        # isascii: str.isdigit also takes "²" or "٣", which float() refuses.
        digits = fraction[1:]
        if whole is not None and digits.isascii() and digits.isdigit():
            return now - whole - float("0" + fraction[:10])
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", timestamp.replace("Z", "+00:00")))
        return now - moment.timestamp()
    except (ValueError, OverflowError):
        return None  # a time the bridge cannot read has no lag; it never stops the bridge


def _observe_lag(item: Outgoing, wall: float, lags: metrics.Observations) -> None:
    """The event's end-to-end lag, from its ``processed_at`` as the API wrote it. The batch has
    committed by now: a field the bridge cannot read costs this figure, never the bridge."""
    try:
        lag = _seconds_since(item.event_time, wall)
    except Exception:  # a bad event field after the commit: no lag, and go on
        log.warning("bridge.publisher.lag_unreadable", event_id=item.event_id)
        return
    if lag is not None:
        lags.add(max(0.0, lag))


def _append(batch: Any, record: Record) -> bool:
    """Into an aiokafka ``BatchBuilder``; False when it is full."""
    added = batch.append(timestamp=None, key=record.key, value=record.value, headers=record.headers)
    return added is not None


@functools.lru_cache(maxsize=256)
def _whole_second(prefix: str) -> float | None:
    try:
        return datetime.fromisoformat(prefix + "+00:00").timestamp()
    except (ValueError, OverflowError):
        return None


def _translate(
    exc: BaseException, bootstrap: str, transactional_id: str | None = None
) -> SinkError:
    if isinstance(exc, KafkaProducerFenced | InvalidProducerEpoch):
        return ProducerFenced(
            "another bridge started with our transactional.id and fenced this one: "
            f"{type(exc).__name__}"
        )
    if isinstance(exc, TransactionalIdAuthorizationFailed):
        # Not a fence: retrying (or another member) can never succeed until an ACL changes.
        return SinkForbidden(
            f"Kafka does not allow this bridge to use the transactional.id {transactional_id}: "
            "grant Write and Describe on the TransactionalId prefix <BRIDGE_GROUP_ID>- "
            f"({type(exc).__name__})"
        )
    if isinstance(exc, TopicAuthorizationFailedError):
        return SinkForbidden(f"Kafka does not allow this bridge to write to a topic: {exc}")
    if isinstance(exc, KafkaTimeoutError | TimeoutError):
        return SinkUnavailable(describe_kafka_error(exc, bootstrap))
    return TransactionAborted(f"the batch failed: {describe_kafka_error(exc, bootstrap)}")


class Sink(Protocol):
    """What the readers (pumps, supervisor, alerts) need of a publisher."""

    async def submit(self, item: Outgoing) -> None: ...

    def record_limit(self, topic: str) -> int: ...


class PublisherClosed(Exception):
    """The bridge is draining: nothing more is taken. What was not taken is read again."""


class _LetGo(Exception):
    """A let-go publisher needed a new producer: it stops instead (see Publisher.let_go)."""


class BatchTooLarge(SinkError):
    """Kafka refused a batch of several records for its size: the topic's limit is read again
    and the batch sent again (one record a batch if the limit did not change), so that a
    refusal names its record."""

    def __init__(self, message: str, written: set[int]) -> None:
        super().__init__(message)
        self.written = written  # id() of each Record Kafka acknowledged in the same round


class CommitOutcomeUnknown(SinkError):
    """EndTxn was sent, but whether it committed is unknown (timed out, connection lost)."""

    def __init__(self, message: str, marker: tuple[TopicPartition, int] | None) -> None:
        super().__init__(message)
        #: One checkpoint record of the transaction: visible to read_committed iff committed.
        self.marker = marker


class RecordsRejected(SinkError):
    """The broker refused records for what they are (too large for the topic): retrying the
    same records can never succeed."""

    def __init__(self, message: str, records: set[int], written: set[int] | None = None) -> None:
        super().__init__(message)
        self.records = records  # id() of each refused Record
        #: id() of each Record Kafka acknowledged in the same round: at_least_once does not send
        #: them again (a transaction's are aborted with it, and are).
        self.written = written or set()


class Publisher:
    def __init__(
        self,
        settings: Settings,
        health: HealthState,
        *,
        budget: ByteBudget | None = None,
        transactional_id: str | None = None,
        shard: int | None = None,
        stop_timeout_s: float = 10.0,
        topic_limits: dict[str, int] | None = None,
    ) -> None:
        """``transactional_id``: a transactional producer with that id (exactly_once), else an
        idempotent one; ``shard``: the shard it writes for (it reports nothing to the health
        state, which the member's own publisher does)."""
        self._settings = settings
        self._kafka = settings.kafka
        self._delivery = settings.delivery
        self._transactional_id = transactional_id
        self._transactional = transactional_id is not None
        self._health = health
        self.shard = shard
        self._report = shard is None
        self._stop_timeout_s = stop_timeout_s
        self._budget = budget or ByteBudget(settings.delivery.max_in_flight_bytes)
        self._send, self._recv = anyio.create_memory_object_stream[Outgoing](math.inf)
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = KeyPartitioner()
        #: The collection window's sleep, which close() ends.
        self._window: anyio.CancelScope | None = None
        self._latencies = metrics.Observations(metrics.PUBLISH_LATENCY)
        self._lags = metrics.Observations(metrics.END_TO_END_LAG)
        #: Largest record each topic takes (its max.message.bytes), learnt from the broker.
        self._topic_limits: dict[str, int] = dict(topic_limits or {})
        #: True once everything submitted before close() was published.
        self.drained = False
        #: Its shard was let go: it never starts another producer (Publisher.let_go).
        self._let_go = False
        #: A shard's publisher: the header its checkpoints carry, and the offset of its
        #: shard's checkpoint partition up to which everything committed is known to be the
        #: previous owners' (read before this one wrote) or its own (Publisher._sole_writer).
        self._writer = (WRITER_HEADER, uuid.uuid4().hex.encode())
        self._known_from: int | None = None
        self._producers_started = 0
        self.last_commit = time.monotonic()

    # -- the pumps' side -------------------------------------------------------------------

    @property
    def topic_limits(self) -> dict[str, int]:
        """Each topic's max.message.bytes, as learnt from the broker at start."""
        return self._topic_limits

    def record_limit(self, topic: str) -> int:
        """The largest record ``topic`` takes: the broker's limit for it, and ours."""
        ours = self._kafka.max_request_bytes
        return min(ours, self._topic_limits.get(topic, ours)) - RECORD_OVERHEAD_BYTES

    async def submit(self, item: Outgoing) -> None:
        """Queue work; waits while too much is in flight (Kafka slow or down)."""
        if self._transactional and item.cursor is None:
            self._sign(item)  # (rare: a settled mark; a thread's checkpoints are made here)
        await self._budget.acquire(item.size)
        try:
            self._send.send_nowait(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._budget.release(item.size)
            raise PublisherClosed("the bridge is draining") from None
        except BaseException:
            self._budget.release(item.size)
            raise

    def close(self) -> None:
        """No more work will come: the loop publishes what is queued, then returns."""
        self._send.close()
        if self._window is not None:
            self._window.cancel()  # what is queued goes now, not at the window's end

    def checkpoints_read(self, end: int) -> None:
        """The shard's checkpoints were read up to ``end`` after this publisher's producer
        started: nobody else can have committed before it unseen."""
        self._known_from = max(end, self._known_from or 0)

    def let_go(self) -> None:
        """As close(), for a shard that may be someone else's from now on: what is queued is
        published with the producer it has, or not at all. A new producer of the same
        transactional.id would be the newest: it would fence the shard's next owner and commit
        what this one holds over what that owner committed since, twice."""
        self._let_go = True
        self.close()

    # -- the producer's side ---------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        kwargs: dict[str, Any] = dict(
            kafka_client_kwargs(self._kafka),
            **producer_tuning_kwargs(self._kafka),
            acks="all",
            enable_idempotence=True,
            partitioner=self._partitioner,
        )
        if self._topic_limits:
            # A batch larger than a topic takes would take every record in it down with it.
            smallest = min(self._topic_limits.values()) - RECORD_OVERHEAD_BYTES
            kwargs["max_batch_size"] = max(1024, min(kwargs["max_batch_size"], smallest))
        if self._transactional:
            kwargs["transactional_id"] = self._transactional_id
            kwargs["transaction_timeout_ms"] = self._delivery.transaction_timeout_ms
        return AIOKafkaProducer(**kwargs)

    async def _start_producer(self) -> None:
        if not self._topic_limits:  # (a shard's publisher is given the member's)
            self._topic_limits = await topic_record_limits(self._kafka)
        topic = self._kafka.checkpoint_topic
        limit = self._topic_limits.get(topic)
        if limit is not None and limit < MIN_CHECKPOINT_TOPIC_BYTES:
            raise SinkForbidden(
                f"the checkpoint topic {topic} takes records of at most {limit} bytes "
                f"(max.message.bytes); a checkpoint may need up to {MIN_CHECKPOINT_TOPIC_BYTES}: "
                "raise it (BRIDGE_CHECKPOINT_TOPIC_CONFIG, or the topic's config)"
            )
        producer = self._new_producer()
        try:
            with anyio.fail_after(60):
                await producer.start()
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await producer.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise _translate(
                    exc, self._kafka.bootstrap_servers, self._transactional_id
                ) from exc
            raise
        self._producer = producer
        if self._report:
            self._health.producer_connected = True
        if self._report:
            log.info("bridge.publisher.connected", transactional=self._transactional)
        else:
            log.debug("bridge.publisher.connected", shard=self.shard)

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if self._report:
            self._health.producer_connected = False
        if producer is not None:
            # A broker that is away cannot take the close: do not wait for it.
            timeout_s = self._stop_timeout_s if self._health.kafka_reachable else 1
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
                await producer.stop()

    async def _connect(self) -> None:
        """Start a producer, retrying until Kafka answers (the pumps wait meanwhile)."""
        delay, failures = 0.5, 0
        while True:
            if self._let_go:
                raise _LetGo
            try:
                await self._start_sole_producer()
            except (SinkUnavailable, TransactionAborted) as exc:
                # One warning per outage; the retries go to debug.
                emit = log.warning if not failures else log.debug
                emit("bridge.publisher.connect_failed", error=str(exc), retry_in_s=delay)
                failures += 1
            else:
                if self._let_go:  # let go while it started: it publishes nothing with it
                    raise _LetGo
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _start_sole_producer(self) -> None:
        """Start a producer; a shard's second and later ones only while no one else wrote
        the shard since this publisher last knew it (checked before it starts, not to fence
        the shard's new owner for nothing, and after, when it is the newest)."""
        renewing = self._producers_started > 0 and self.shard is not None and self._transactional
        if renewing:
            await self._sole_writer()
            if self._let_go:  # let go while it read: the shard may be someone else's now
                raise _LetGo
        await self._start_producer()
        self._producers_started += 1
        if renewing:
            try:
                await self._sole_writer()
            except BaseException:
                await self._stop_producer()
                raise

    async def _sole_writer(self) -> None:
        """Raise ProducerFenced if someone else committed to the shard's checkpoint partition
        since this publisher last knew it.

        The producer epoch fences the shard's previous owners, but a producer of our own
        started again is the newest of the transactional.id: a member that lost the shard
        without knowing it yet (paused, cut off from the group) would fence the new owner and
        commit what it holds over what that owner committed since. aiokafka cannot tie a
        transaction to the group's generation as Kafka's own clients do (KIP-447: its
        TxnOffsetCommit request is version 0), so the checkpoints say who wrote."""
        assert self.shard is not None  # noqa: S101 -- a shard's publisher only
        if self._known_from is None:
            raise ProducerFenced(
                f"shard {self.shard}: the producer was replaced before the shard's checkpoints "
                "were read; the shard is taken again from the group"
            )
        foreign = await foreign_checkpoints(
            self._kafka, self.shard, self._known_from, self._writer[1]
        )
        if foreign:
            log.error(
                "bridge.publisher.superseded",
                shard=self.shard,
                checkpoints_by_others=foreign,
                since_offset=self._known_from,
            )
            raise ProducerFenced(
                f"shard {self.shard}: {foreign} checkpoint(s) were committed by another writer "
                "while this member's producer was away; the shard is theirs"
            )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            await self._connect()
            task_status.started()
            started = True
            while (batch := await self._collect()) is not None:
                await self._publish_until_done(batch)
            self.drained = True
            (log.info if self._report else log.debug)("bridge.publisher.drained", shard=self.shard)
        except _LetGo:
            # What it holds is read again by the shard's next owner, from the checkpoint.
            log.info("bridge.publisher.let_go", shard=self.shard)
            if not started:
                task_status.started()
        finally:
            self._discard_queued()
            await self._stop_producer()

    def _discard_queued(self) -> None:
        """Stopped (fenced, or let go past its bound): what is still queued will never be
        published here, and the budget it holds is the member's, shared by every shard. Its
        threads are read again by whoever owns them next; later submits are refused."""
        while True:
            try:
                item = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            self._budget.release(item.size)
        self._recv.close()  # (no await since the last receive: nothing slipped in)

    async def _collect(self) -> list[Outgoing] | None:
        try:
            first = await self._recv.receive()
        except anyio.EndOfStream:
            return None
        batch, count = [first], len(first.records)
        try:
            return await self._collect_more(batch, count)
        except BaseException:
            # Cancelled while collecting (a shard let go): give their budget back.
            self._budget.release(sum(item.size for item in batch))
            raise

    async def _collect_more(self, batch: list[Outgoing], count: int) -> list[Outgoing]:
        """What else comes within the window: it sleeps once and takes what is queued, instead
        of waking for every item (at thousands of events a second, a timeout and a task switch
        each cost more than the item's own work).

        The window (a transaction's ``commit_interval_ms``, else 5 ms) counts from the moment
        its first item was read, not from when the publisher got to it: an event that came
        while the last batch was being published does not wait that and then a whole window.
        """
        window = self._delivery.commit_interval_ms / 1000 if self._transactional else 0.005
        deadline = batch[0].read_at + window
        limit = self._delivery.batch_max_records
        while count < limit:
            try:
                item = self._recv.receive_nowait()
            except anyio.WouldBlock:
                if deadline <= anyio.current_time():
                    break
                with anyio.CancelScope(deadline=deadline) as self._window:
                    await anyio.sleep_forever()
                self._window = None
                continue
            except anyio.EndOfStream:
                break
            batch.append(item)
            count += len(item.records)
        return batch

    async def _publish_until_done(self, batch: list[Outgoing]) -> None:
        delay = 0.2
        alone = False  # one record a batch, once a batch of several was refused for its size
        acquired = sum(item.size for item in batch)  # released once, whatever happens below
        try:
            while live := [item for item in batch if not item.stale]:
                try:
                    await self._publish(live, alone=alone)
                except ProducerFenced:
                    log.error("bridge.publisher.fenced", transactional_id=self._transactional_id)
                    raise
                except SinkForbidden as exc:
                    log.error("bridge.publisher.forbidden", error=str(exc))
                    raise
                except RecordsRejected as exc:
                    # Not the batch's fault: the refused records become dead letters (small
                    # ones), everything else is published as it is. Nothing is read again.
                    log.warning("bridge.publisher.records_rejected", error=str(exc))
                    written = set() if self._transactional else exc.written
                    batch = [self._dead_lettered(item, exc.records, written) for item in live]
                    await self._restart_producer(delay)
                except BatchTooLarge as exc:
                    # A topic's limit was lowered while we run: learn it, and batches fit again;
                    # if it did not change, one record a batch names the record too large.
                    log.warning("bridge.publisher.batch_too_large", error=str(exc))
                    if not self._transactional:
                        batch = [self._dead_lettered(item, set(), exc.written) for item in live]
                    alone = not await self._relearn_limits()
                    await self._restart_producer(delay)
                except CommitOutcomeUnknown as exc:
                    log.warning("bridge.publisher.commit_outcome_unknown", error=str(exc))
                    await self._restart_producer(delay)  # completes or aborts that transaction
                    if await self._was_committed(exc):
                        log.info("bridge.publisher.commit_outcome", committed=True)
                        self._knows_own(exc.marker)
                        self._committed(live)
                        return
                    log.info("bridge.publisher.commit_outcome", committed=False)
                    batch = self._failed(live)
                except SinkError as exc:
                    metrics.TRANSACTIONS.labels(outcome="aborted").inc()
                    threads = {i.cursor.thread.key for i in live if i.cursor is not None}
                    log.warning(
                        "bridge.publisher.batch_failed", error=str(exc), threads=len(threads)
                    )
                    batch = self._failed(live)
                    await self._restart_producer(delay)
                else:
                    self._committed(live)
                    return
                delay = min(delay * 2, 5.0)
        finally:
            self._budget.release(acquired)

    def _failed(self, live: list[Outgoing]) -> list[Outgoing]:
        """Rewind the batch's threads (the pumps read them again); keep what cannot be re-read."""
        for item in live:
            if item.cursor is not None and not item.stale:
                item.cursor.rewind()
                item.cursor.settle()
        # Bridge alerts have no API to be read again from: keep them for the retry.
        return [i for i in live if i.cursor is None]

    async def _restart_producer(self, delay: float) -> None:
        await self._stop_producer()
        await anyio.sleep(delay)
        await self._connect()

    async def _was_committed(self, exc: CommitOutcomeUnknown) -> bool:
        """Ask the checkpoint topic, after the new producer settled the old transaction."""
        if exc.marker is None:
            return False  # nothing of it was written: nothing can have been committed
        while True:
            try:
                return await transaction_committed(self._kafka, *exc.marker)
            except SinkError as error:
                log.warning("bridge.publisher.commit_outcome_unknown", error=str(error))
                await anyio.sleep(1.0)

    async def _relearn_limits(self) -> bool:
        """Read the topics' limits again; True if one changed (the next producer's batches
        fit them)."""
        try:
            limits = await topic_record_limits(self._kafka)
        except SinkError as exc:
            log.warning("bridge.publisher.limits_unread", error=str(exc))
            return False
        changed = limits != self._topic_limits
        self._topic_limits = limits
        return changed

    def _dead_lettered(
        self, item: Outgoing, refused: set[int], written: set[int] | None = None
    ) -> Outgoing:
        """The item without what Kafka already has (``written``) and with a dead letter for
        each ``refused`` record."""
        written = written or set()
        if not any(id(r) in refused or id(r) in written for r in item.records):
            return item
        records = []
        for record in item.records:
            if id(record) in written:
                continue
            if id(record) not in refused:
                records.append(record)
            elif item.cursor is not None and record.topic != self._kafka.dlq_topic:
                records.append(
                    dead_letter_record(
                        self._kafka.dlq_topic,
                        item.cursor.thread,
                        "too_large",
                        record.value,
                        event_id=item.event_id,
                        event_type=item.event_type,
                        limit_bytes=self.record_limit(self._kafka.dlq_topic),
                    )
                )
            # else: a dead letter or a bridge alert the broker refuses even small: dropped,
            # with the warning above; the event it names stays readable through the API.
        if any(id(r) in refused for r in item.records):
            metrics.DLQ_RECORDS.labels(reason="too_large").inc()
        return Outgoing(
            item.cursor,
            item.epoch,
            records,
            event_id=item.event_id,
            event_type=item.event_type,
            event_time=item.event_time,
            drained_updated_at=item.drained_updated_at,
            dedupe_key=item.dedupe_key,
            drain=item.drain,
            read_at=item.read_at,
            session_id=item.session_id,
        )

    async def _publish(self, batch: list[Outgoing], *, alone: bool = False) -> None:
        producer = self._producer
        assert producer is not None  # noqa: S101 -- _connect() ran before any batch
        checkpoints = self._checkpoints(batch)
        records = [r for item in batch for r in item.records]
        budget_s = self._delivery.transaction_timeout_ms / 1000
        marker: tuple[TopicPartition, int] | None = None
        committing = False
        try:
            with anyio.fail_after(budget_s):
                if self._transactional:
                    await producer.begin_transaction()
                    # One round: the checkpoints need not wait for the events' acknowledgements
                    # (read_committed sees all of the transaction or none of it).
                    done = await self._send_checkpoints(
                        producer, checkpoints, alone=alone, events=records
                    )
                    if done:
                        marker = (TopicPartition(done[0].topic, done[0].partition), done[0].offset)
                    committing = True
                    await producer.commit_transaction()
                    self._knows_own(marker)
                else:
                    await self._send_all(producer, records, alone=alone)
                    await self._send_checkpoints(producer, checkpoints, alone=alone)
        except (KafkaError, TimeoutError) as exc:
            if committing and not isinstance(exc, KafkaProducerFenced | InvalidProducerEpoch):
                cause = describe_kafka_error(exc, self._kafka.bootstrap_servers)
                raise CommitOutcomeUnknown(f"the commit did not answer: {cause}", marker) from exc
            raise _translate(exc, self._kafka.bootstrap_servers, self._transactional_id) from exc
        except AssertionError as exc:
            # aiokafka asserts its transaction state: a producer whose sender routine died (a
            # broker restart can do it) raises this from begin/commit. Broken, not fenced: a
            # new producer settles whatever it left, as for a commit that did not answer.
            if committing:
                raise CommitOutcomeUnknown(f"the producer broke: {exc!r}", marker) from exc
            raise SinkUnavailable(f"the producer broke: {exc!r}") from exc

    def _knows_own(self, marker: tuple[TopicPartition, int] | None) -> None:
        """A transaction of ours committed at ``marker``: nobody else wrote the shard between
        this producer's start and it (they would have fenced it), so checking who wrote can
        start there."""
        if marker is not None and marker[0].partition == self.shard:
            self._known_from = max(marker[1], self._known_from or 0)

    async def _send_checkpoints(
        self,
        producer: AIOKafkaProducer,
        checkpoints: list[Record],
        *,
        alone: bool = False,
        events: list[Record] | None = None,
    ) -> list[Any]:
        """Send the checkpoints (after ``events``, in the same round); returns the metadata of
        the checkpoints' batches, the first checkpoint's first."""
        topic = self._kafka.checkpoint_topic
        try:
            done = await self._send_all(producer, [*(events or ()), *checkpoints], alone=alone)
        except RecordsRejected as exc:
            if not any(id(r) in exc.records for r in checkpoints):
                raise
            # Nothing can be committed without them: an operator must raise the topic's limit.
            largest = max(r.size for r in checkpoints)
            limit = self._topic_limits.get(topic)
            raise SinkForbidden(
                f"the checkpoint topic {topic} refuses checkpoints of up to {largest} bytes "
                f"(its max.message.bytes is {limit}): raise it (BRIDGE_CHECKPOINT_TOPIC_CONFIG "
                "or the topic's config) to 64 KiB or more"
            ) from exc
        return [metadata for metadata in done if metadata.topic == topic]

    async def _send_all(
        self, producer: AIOKafkaProducer, records: list[Record], *, alone: bool = False
    ) -> list[Any]:
        """Send the records in batches, a partition's in their order, then wait for every
        acknowledgement; returns each batch's metadata, the first batch's first.

        aiokafka's batch API: ``send()`` makes, resolves and awaits a future and a metadata
        object per record, about a third of what a record cost the bridge in all; a batch has
        one. ``alone``: one record a batch. A record Kafka refuses for its size, alone in its
        batch, is named (``RecordsRejected``); a larger batch refused for size (a topic's limit
        lowered while we run) raises ``BatchTooLarge``. Either says which records Kafka has.
        """
        groups: dict[tuple[str, int], list[Record]] = {}
        known: dict[str, list[int]] = {}
        for record in records:
            partition = record.partition
            if partition is None:
                partitions = known.get(record.topic)
                if partitions is None:
                    partitions = sorted(await producer.partitions_for(record.topic))
                    known[record.topic] = partitions
                partition = self._partitioner(record.key, partitions, partitions)
            groups.setdefault((record.topic, partition), []).append(record)
        sent: list[tuple[asyncio.Future[Any], list[Record]]] = []
        for (topic, partition), group in groups.items():
            batch: Any = producer.create_batch()
            members: list[Record] = []
            for record in group:
                if members and not alone and _append(batch, record):
                    members.append(record)
                    continue
                if members:  # full: send it, and start the next
                    sent.append(
                        (await producer.send_batch(batch, topic, partition=partition), members)
                    )
                    batch, members = producer.create_batch(), []
                _append(batch, record)  # a batch's first record always goes in
                members.append(record)
            sent.append((await producer.send_batch(batch, topic, partition=partition), members))
        results: list[Any] = []
        written: set[int] = set()
        refused: set[int] = set()
        too_large: list[int] = []
        failures: list[BaseException] = []
        for ack, members in sent:
            try:
                results.append(await ack)
            except (MessageSizeTooLargeError, RecordTooLargeError):
                if len(members) == 1:
                    refused.add(id(members[0]))
                else:
                    too_large.append(len(members))
            except Exception as exc:
                failures.append(exc)
            else:
                written.update(id(r) for r in members)
        if refused or too_large:
            # The batches after a refused one on its partition fail for it (their sequence
            # numbers follow one the broker never stored): those failures are its, and go
            # with it. Any other failure (a fence above all) is not, and is raised.
            failures = [f for f in failures if not isinstance(f, OutOfOrderSequenceNumber)]
        if failures:
            raise failures[0]
        if too_large:
            message = f"Kafka refused a batch of {too_large[0]} records as too large"
            raise BatchTooLarge(message, written)
        if refused:
            message = f"Kafka refused {len(refused)} record(s) as too large"
            raise RecordsRejected(message, refused, written)
        return results

    def _checkpoints(self, batch: list[Outgoing]) -> list[Record]:
        """One checkpoint per thread of the batch, as of its last item in the batch."""
        state: dict[ThreadRef, tuple[str | None, str | None, list[str], int]] = {}
        for item in batch:
            cursor = item.cursor
            if cursor is None:
                continue
            ref = cursor.thread
            last_id, drained, ids, idless = state.get(
                ref,
                (
                    cursor.committed_id,
                    cursor.drained_updated_at,
                    list(cursor.committed_ids),
                    cursor.committed_idless,
                ),
            )
            if item.event_id is not None:
                last_id, idless = item.event_id, 0
                ids.append(item.event_id)
            elif item.dedupe_key is not None:
                idless += 1
            state[ref] = (last_id, item.drained_updated_at or drained, ids, idless)
        topic = self._kafka.checkpoint_topic
        now = utc_now()
        headers = [self._writer] if self._transactional else None
        return [
            checkpoint_record(
                topic,
                ref,
                last_id,
                drained,
                ids[-CHECKPOINT_RECENT_IDS:],
                idless,
                written_at=now,
                headers=headers,
            )
            for ref, (last_id, drained, ids, idless) in state.items()
        ]

    def _sign(self, item: Outgoing) -> None:
        """A session's settled mark goes to the checkpoint partition too: signed as well."""
        topic, writer = self._kafka.checkpoint_topic, self._writer
        for record in item.records:
            if record.topic == topic and writer not in record.headers:
                record.headers = [*record.headers, writer]

    def _committed(self, batch: list[Outgoing]) -> None:
        now = time.monotonic()
        self.last_commit = now
        if self._transactional:
            metrics.TRANSACTIONS.labels(outcome="committed").inc()
        settled: set[ThreadCursor] = set()
        published: dict[str, int] = {}
        wall = time.time()
        latencies, lags = self._latencies, self._lags
        for item in batch:
            if item.cursor is not None:
                item.cursor.mark_committed(
                    item.epoch,
                    item.event_id,
                    item.drained_updated_at,
                    item.dedupe_key,
                    drain=item.drain,
                )
                settled.add(item.cursor)
            if item.event_type is not None:
                published[item.event_type] = published.get(item.event_type, 0) + 1
                latencies.add(now - item.read_at)
                _observe_lag(item, wall, lags)
        latencies.flush()
        lags.flush()
        # Counted once a type a batch: a batch holds thousands of events of a dozen types.
        for event_type, count in published.items():
            metrics.events_published(event_type).inc(count)
        for cursor in settled:
            cursor.settle()
