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
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.errors import (
    ProducerFenced as KafkaProducerFenced,
)

from bridge import metrics
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import ProducerFenced, SinkError, SinkUnavailable, TransactionAborted
from bridge.health import HealthState
from bridge.kafka_conn import kafka_client_kwargs, producer_tuning_kwargs
from bridge.records import Record, ThreadRef, checkpoint_record

log = structlog.get_logger("bridge.publisher")

#: Bookkeeping cost of one queued item, so that many tiny items are bounded too.
ITEM_OVERHEAD_BYTES = 512
_FRACTION = re.compile(r"(\.\d{6})\d+")


@dataclass(slots=True)
class Outgoing:
    """One unit of work: the records for one event (or a bridge alert, or a drain marker)."""

    cursor: ThreadCursor | None
    epoch: int
    records: list[Record]
    event_id: str | None = None
    event_type: str | None = None
    event_time: str | None = None
    drained_updated_at: str | None = None
    read_at: float = field(default_factory=time.monotonic)
    size: int = 0

    def __post_init__(self) -> None:
        self.size = ITEM_OVERHEAD_BYTES + sum(r.size for r in self.records)

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

    async def acquire(self, size: int) -> None:
        size = min(size, self.limit)  # one huge item may pass alone
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            metrics.INFLIGHT_BYTES.set(self.used)
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
        metrics.INFLIGHT_BYTES.set(self.used)

    def release(self, size: int) -> None:
        self.used = max(0, self.used - min(size, self.limit))
        self._wake()
        metrics.INFLIGHT_BYTES.set(self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size, granted = self._waiters.popleft()
            self.used += size
            granted.set()


def _seconds_since(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", timestamp.replace("Z", "+00:00")))
    except ValueError:
        return None
    return time.time() - moment.timestamp()


def _translate(exc: BaseException) -> SinkError:
    if isinstance(exc, KafkaProducerFenced | InvalidProducerEpoch):
        return ProducerFenced(f"another bridge took over our transactional.id: {exc!r}")
    if isinstance(exc, TransactionalIdAuthorizationFailed):
        return ProducerFenced(f"not authorised to use the transactional.id: {exc!r}")
    if isinstance(exc, KafkaTimeoutError | TimeoutError):
        return SinkUnavailable(f"Kafka did not acknowledge in time: {exc!r}")
    return TransactionAborted(f"Kafka refused the batch: {exc!r}")


class Publisher:
    def __init__(self, settings: Settings, health: HealthState) -> None:
        self._settings = settings
        self._kafka = settings.kafka
        self._delivery = settings.delivery
        self._transactional = settings.delivery.mode == "exactly_once"
        self._health = health
        self._budget = ByteBudget(settings.delivery.max_in_flight_bytes)
        self._send, self._recv = anyio.create_memory_object_stream[Outgoing](math.inf)
        self._producer: AIOKafkaProducer | None = None
        #: True once everything submitted before close() was published.
        self.drained = False
        self._last_commit = time.monotonic()
        metrics.CHECKPOINT_AGE.set_function(lambda: time.monotonic() - self._last_commit)

    # -- the pumps' side -------------------------------------------------------------------

    async def submit(self, item: Outgoing) -> None:
        """Queue work; waits while too much is in flight (Kafka slow or down)."""
        await self._budget.acquire(item.size)
        try:
            self._send.send_nowait(item)
        except BaseException:
            self._budget.release(item.size)
            raise

    def close(self) -> None:
        """No more work will come: the loop publishes what is queued, then returns."""
        self._send.close()

    # -- the producer's side ---------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        kwargs: dict[str, Any] = dict(
            kafka_client_kwargs(self._kafka),
            **producer_tuning_kwargs(self._kafka),
            acks="all",
            enable_idempotence=True,
        )
        if self._transactional:
            kwargs["transactional_id"] = self._delivery.transactional_id
            kwargs["transaction_timeout_ms"] = self._delivery.transaction_timeout_ms
        return AIOKafkaProducer(**kwargs)

    async def _start_producer(self) -> None:
        producer = self._new_producer()
        try:
            with anyio.fail_after(60):
                await producer.start()
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await producer.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise _translate(exc) from exc
            raise
        self._producer = producer
        self._health.producer_connected = True
        log.info("bridge.publisher.connected", transactional=self._transactional)

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._health.producer_connected = False
        if producer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await producer.stop()

    async def _connect(self) -> None:
        """Start a producer, retrying until Kafka answers (the pumps wait meanwhile)."""
        delay = 0.5
        while True:
            try:
                await self._start_producer()
                return
            except SinkUnavailable as exc:
                log.warning("bridge.publisher.connect_failed", error=str(exc), retry_in_s=delay)
            except TransactionAborted as exc:
                log.warning("bridge.publisher.connect_failed", error=str(exc), retry_in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self._connect()
        task_status.started()
        try:
            while (batch := await self._collect()) is not None:
                await self._publish_until_done(batch)
            self.drained = True
            log.info("bridge.publisher.drained")
        finally:
            await self._stop_producer()

    async def _collect(self) -> list[Outgoing] | None:
        try:
            first = await self._recv.receive()
        except anyio.EndOfStream:
            return None
        batch, count = [first], len(first.records)
        window = self._delivery.commit_interval_ms / 1000 if self._transactional else 0.005
        deadline = anyio.current_time() + window
        while count < self._delivery.batch_max_records:
            try:
                item = self._recv.receive_nowait()
            except anyio.WouldBlock:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    break
                with anyio.move_on_after(remaining):
                    try:
                        item = await self._recv.receive()
                    except anyio.EndOfStream:
                        break
                    batch.append(item)
                    count += len(item.records)
                continue
            except anyio.EndOfStream:
                break
            batch.append(item)
            count += len(item.records)
        return batch

    async def _publish_until_done(self, batch: list[Outgoing]) -> None:
        delay = 0.2
        acquired = sum(item.size for item in batch)  # released once, whatever happens below
        try:
            while live := [item for item in batch if not item.stale]:
                try:
                    await self._publish(live)
                except ProducerFenced:
                    log.error(
                        "bridge.publisher.fenced", transactional_id=self._delivery.transactional_id
                    )
                    raise
                except SinkError as exc:
                    metrics.TRANSACTIONS.labels(outcome="aborted").inc()
                    threads = {i.cursor.thread.key for i in live if i.cursor is not None}
                    log.warning(
                        "bridge.publisher.batch_failed", error=str(exc), threads=len(threads)
                    )
                    for item in live:
                        if item.cursor is not None and not item.stale:
                            item.cursor.rewind()  # the pumps read these events again
                    # Bridge alerts have no API to be read again from: keep them for the retry.
                    batch = [i for i in live if i.cursor is None]
                    await self._stop_producer()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    await self._connect()
                    continue
                self._committed(live)
                return
        finally:
            self._budget.release(acquired)

    async def _publish(self, batch: list[Outgoing]) -> None:
        producer = self._producer
        assert producer is not None  # noqa: S101 -- _connect() ran before any batch
        checkpoints = self._checkpoints(batch)
        budget_s = self._delivery.transaction_timeout_ms / 1000
        try:
            with anyio.fail_after(budget_s):
                if self._transactional:
                    await producer.begin_transaction()
                acks = [await self._send_record(producer, r) for i in batch for r in i.records]
                if self._transactional:
                    acks += [await self._send_record(producer, r) for r in checkpoints]
                    await asyncio.gather(*acks)
                    await producer.commit_transaction()
                else:
                    await asyncio.gather(*acks)
                    acks = [await self._send_record(producer, r) for r in checkpoints]
                    await asyncio.gather(*acks)
        except (KafkaError, TimeoutError) as exc:
            raise _translate(exc) from exc

    @staticmethod
    async def _send_record(producer: AIOKafkaProducer, record: Record) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await producer.send(
            record.topic, record.value, key=record.key, headers=record.headers
        )
        return future

    def _checkpoints(self, batch: list[Outgoing]) -> list[Record]:
        latest: dict[ThreadRef, tuple[str | None, str | None]] = {}
        for item in batch:
            if item.cursor is None:
                continue
            ref = item.cursor.thread
            last_id, drained = latest.get(ref, (item.cursor.committed_id, None))
            latest[ref] = (item.event_id or last_id, item.drained_updated_at or drained)
        topic = self._kafka.checkpoint_topic
        cursors = {i.cursor.thread: i.cursor for i in batch if i.cursor is not None}
        return [
            checkpoint_record(topic, ref, last_id, drained or cursors[ref].drained_updated_at)
            for ref, (last_id, drained) in latest.items()
        ]

    def _committed(self, batch: list[Outgoing]) -> None:
        now = time.monotonic()
        self._last_commit = now
        if self._transactional:
            metrics.TRANSACTIONS.labels(outcome="committed").inc()
        for item in batch:
            if item.cursor is not None:
                item.cursor.mark_committed(item.epoch, item.event_id, item.drained_updated_at)
            if item.event_type is not None:
                metrics.EVENTS_PUBLISHED.labels(
                    type=metrics.event_type_label(item.event_type)
                ).inc()
                metrics.PUBLISH_LATENCY.observe(now - item.read_at)
                lag = _seconds_since(item.event_time)
                if lag is not None:
                    metrics.END_TO_END_LAG.observe(max(0.0, lag))
