"""Which shards this bridge owns: Kafka's group coordination, not a protocol of our own.

Every bridge is a member of the consumer group ``BRIDGE_GROUP_ID``, subscribed to the
checkpoint topic, whose 32 partitions are the shards (bridge/shards.py). The group's assignment
of those partitions is the ownership: a member follows the sessions of the shards it is
assigned, and nothing else. The member reads nothing through this consumer (its partitions are
paused as soon as they are assigned); one ``getmany`` always pending keeps it in the group
however busy the bridge is.

- **Assignor**: :class:`ShardAssignor`, sticky and balanced, an instance per member (aiokafka's
  own sticky assignor keeps its state in class attributes, aio-libs/aiokafka#1175, and never
  learns its generation, #1176). Each member says in its join metadata which shards it holds;
  the leader keeps them where they are, up to a fair share, and hands out the rest to the
  least loaded. A shard claimed by two members (one of them a zombie back from a pause) goes
  to one of them only.
- **Callbacks** never wait on the bridge's work: ``on_partitions_assigned`` runs while the
  member's heartbeats are stopped, so it records the assignment and returns; the bridge
  acquires and releases shards in its own task (:class:`Ownership`). Rebalances are eager
  (aiokafka has no cooperative protocol): the revocation of everything before each one is
  ignored, and the assignment that follows says what changed.
- **Missed rebalances**: an assignment whose generation does not follow the previous one
  directly means this member was away (paused, partitioned) while the group moved on; every
  shard it holds may have been owned by someone else meanwhile, so all of them are acquired
  again (a new producer fences whoever wrote since, the checkpoints are read again).
- **Timeouts**: a session timeout of 6 s (the broker's minimum by default) and a heartbeat
  every second: a dead member's shards move after at most about 7 s. No static membership:
  a static member never sends LeaveGroup, so a SIGTERM hand-off would wait out the session
  timeout (7.5 s measured against 1.6 s, deploy/design/scale-out.md §4.4).

Membership is off the data path: if it fails (Kafka away), the bridge keeps the shards it
holds and tries again; another member that takes them fences this one's producers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError

from bridge import metrics
from bridge.config import Settings
from bridge.health import HealthState
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs
from bridge.membership import REWARN_S, member_client_id

__all__ = [
    "HEARTBEAT_INTERVAL_MS",
    "SESSION_TIMEOUT_MS",
    "Assignment",
    "ShardAssignor",
    "balanced_assignment",
    "keep_ownership",
]

log = structlog.get_logger("bridge.ownership")

#: Without a heartbeat for this long a member is dropped and its shards move.
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 1_000
_POLL_MS = 1_000
_BACKOFF_INITIAL_S, _BACKOFF_MAX_S = 1.0, 30.0


@dataclass(frozen=True, slots=True)
class Assignment:
    """The shards the group gave this member, and the group generation that gave them."""

    shards: frozenset[int]
    generation: int
    #: The generation does not follow the previous assignment's: rebalances were missed.
    gap: bool


def balanced_assignment(
    partitions: Iterable[int], claims: Mapping[str, Iterable[int]]
) -> dict[str, list[int]]:
    """Each member keeps what it claims, up to its fair share; the rest go to the least
    loaded. Deterministic: every leader computes the same from the same join."""
    members = sorted(claims)
    if not members:
        return {}
    pool = sorted(set(partitions))
    base, extra = divmod(len(pool), len(members))
    owner: dict[int, str] = {}
    kept: dict[str, list[int]] = {m: [] for m in members}
    # Members that claim the most keep their extra one first, so fewer shards move.
    for member in sorted(members, key=lambda m: (-len(set(claims[m])), m)):
        quota = base + (1 if extra > 0 else 0)
        for shard in sorted(set(claims[member])):
            if shard in owner or shard not in pool or len(kept[member]) >= quota:
                continue
            owner[shard] = member
            kept[member].append(shard)
        if len(kept[member]) > base:
            extra -= 1
    for shard in pool:
        if shard in owner:
            continue
        # The least loaded member that is still under its share takes it.
        member = min(members, key=lambda m: (len(kept[m]), m))
        owner[shard] = member
        kept[member].append(shard)
    return {m: sorted(kept[m]) for m in members}


class ShardAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka is untyped
    """Sticky and balanced; an instance of its own per member (see the module's docstring)."""

    name = "qoder-shards-v1"
    version = 0

    def __init__(self, held: Callable[[], Iterable[int]] = frozenset) -> None:
        #: The shards this member holds now: said in its next join, so the leader keeps them.
        self._held = held
        #: The member's consumer while it is in the group (set by keep_ownership).
        self.consumer: AIOKafkaConsumer | None = None

    def rejoin(self) -> None:
        """Ask the group for a new assignment (a rebalance; nothing moves that need not)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is not None:
            coordinator.request_rejoin()

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        claims = json.dumps({"held": sorted(self._held())}).encode()
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), claims)

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({t for m in members.values() for t in m.subscription})
        result: dict[str, dict[str, list[int]]] = {member: {} for member in members}
        for topic in topics:
            partitions = cluster.partitions_for_topic(topic) or set()
            subscribed = {m: meta for m, meta in members.items() if topic in meta.subscription}
            claims = {m: _claims(meta.user_data) for m, meta in subscribed.items()}
            for member, shards in balanced_assignment(partitions, claims).items():
                result[member][topic] = shards
        return {
            member: ConsumerProtocolMemberAssignment(self.version, sorted(by.items()), b"")
            for member, by in result.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        return None


def _claims(user_data: bytes | None) -> list[int]:
    """The shards a member says it holds; nothing for metadata of any other making."""
    try:
        held = json.loads(user_data or b"{}").get("held", [])
    except (ValueError, AttributeError):
        return []
    return [s for s in held if isinstance(s, int)] if isinstance(held, list) else []


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        assigned: Callable[[frozenset[int], int], None],
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None  # eager: everything, before every rebalance; the assignment says what moved

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # Heartbeats are stopped while this runs: record and return, never wait here.
        if assigned:
            self._consumer.pause(*assigned)
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", -1)
        shards = frozenset(tp.partition for tp in assigned if tp.topic == self._topic)
        self._assigned(shards, generation if isinstance(generation, int) else -1)


async def keep_ownership(
    settings: Settings,
    assignor: ShardAssignor,
    assigned: Callable[[Assignment], None],
    health: HealthState | None = None,
) -> None:
    """Be a member of ``BRIDGE_GROUP_ID`` until cancelled; every assignment goes to
    ``assigned`` (called on the event loop, at once: it must not block)."""
    kafka = settings.kafka
    delay, failures = _BACKOFF_INITIAL_S, 0
    failing_since = warned_at = 0.0
    last_generation: int | None = None

    def on_assigned(shards: frozenset[int], generation: int) -> None:
        nonlocal last_generation
        gap = last_generation is not None and generation != last_generation + 1
        last_generation = generation
        metrics.REBALANCES.inc()
        assigned(Assignment(shards, generation, gap))

    while True:
        consumer = AIOKafkaConsumer(
            **{**kafka_client_kwargs(kafka), "client_id": member_client_id(settings)},
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            rebalance_timeout_ms=SESSION_TIMEOUT_MS,
            partition_assignment_strategy=(assignor,),
        )
        try:
            with anyio.fail_after(60):
                await consumer.start()
            assignor.consumer = consumer
            listener = _Listener(consumer, kafka.checkpoint_topic, on_assigned)
            consumer.subscribe([kafka.checkpoint_topic], listener=listener)
            polled = False
            while True:
                await consumer.getmany(timeout_ms=_POLL_MS)
                if not polled:
                    polled = True
                    if failures:
                        log.info(
                            "bridge.membership.rejoined",
                            group=kafka.group_id,
                            failed_for_s=round(anyio.current_time() - failing_since),
                        )
                    else:
                        log.info("bridge.membership.joined", group=kafka.group_id)
                    delay, failures = _BACKOFF_INITIAL_S, 0
                    if health is not None:
                        health.set_group_member(True)
        except (KafkaError, TimeoutError, OSError) as exc:
            now = anyio.current_time()
            if not failures:
                failing_since = warned_at = now
                emit = log.warning
            elif now - warned_at >= REWARN_S:
                warned_at, emit = now, log.warning
            else:
                emit = log.debug
            cause = describe_kafka_error(exc, kafka.bootstrap_servers)
            if health is not None:
                health.set_group_member(False, f"not a member of {kafka.group_id!r}: {cause}")
            emit(
                "bridge.membership.failed",
                group=kafka.group_id,
                error=cause,
                retry_in_s=delay,
                failing_for_s=round(now - failing_since),
                consequence="the shards held stay held; another member may take them",
            )
            failures += 1
        except Exception:
            log.warning("bridge.membership.crashed", group=kafka.group_id, exc_info=True)
            if not failures:
                failing_since = warned_at = anyio.current_time()
            failures += 1
        finally:
            assignor.consumer = None
            # LeaveGroup: the shards move at once, not after the session timeout.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()
        # A new member id next time: whatever this member holds may have moved meanwhile, so
        # the next assignment counts as one after missed rebalances.
        last_generation = -2
        await anyio.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX_S)
