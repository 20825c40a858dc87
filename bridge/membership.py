"""The running bridge as a live member of the Kafka consumer group ``BRIDGE_GROUP_ID``.

The first step of scale-out (issue 10, which will share sessions between the members on
Kafka's group coordination). For now membership answers one question for the operators'
tools: *is a bridge running against these topics right now?* ``qoder-bridge checkpoints
reset`` describes the group and refuses to write while it has live members subscribed to its
checkpoint topic (:func:`live_members`: the group's member metadata names each member's
topics, so a deployment that shares the group id with another, on topics of its own, is not
counted).

One ``AIOKafkaConsumer`` with ``group_id = BRIDGE_GROUP_ID``, subscribed to the checkpoint
topic (the topic every bridge of a deployment shares), with no offset commits. Its assigned
partitions are paused as soon as they are assigned: it reads nothing, it only polls, so the
group keeps it (a member with no pending poll for ``max_poll_interval_ms`` is dropped). It is
off the data path: it never blocks a pump or the publisher, its errors are logged and it tries
again with a capped backoff; the bridge runs on without it. Since ``checkpoints reset`` relies on
it, an outage is a warning (``bridge.membership.failed``) when it begins and again every
:data:`REWARN_S` while it lasts (with ``failing_for_s``), and ``bridge.membership.rejoined``
when it ends.

A member leaves the group when the bridge stops (LeaveGroup, at the very end of a drain). A
bridge that dies without stopping (kill -9, a lost node) stays listed until the group's session
timeout, :data:`SESSION_TIMEOUT_MS`, passes without a heartbeat.

The member's client id names the bridge: ``qoder-kafka-bridge/<version>/<BRIDGE_TRANSACTIONAL_ID>``
(the chart sets that id to the pod name); the broker adds the member's host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata
from aiokafka.errors import GroupIdNotFound, KafkaError, for_code

from bridge.config import KafkaSettings, Settings
from bridge.errors import SinkUnavailable
from bridge.kafka_conn import CLIENT_ID, describe_kafka_error, kafka_client_kwargs

__all__ = [
    "REWARN_S",
    "SESSION_TIMEOUT_MS",
    "Member",
    "keep_membership",
    "live_members",
    "member_client_id",
]

log = structlog.get_logger("bridge.membership")

#: Without a heartbeat for this long, a member is dropped from the group (aiokafka's default).
SESSION_TIMEOUT_MS = 10_000
#: How long one poll waits; the group only needs a poll in every ``max_poll_interval_ms``.
_POLL_MS = 1_000
_BACKOFF_INITIAL_S, _BACKOFF_MAX_S = 1.0, 30.0
#: While membership keeps failing, the warning is repeated this often (the retries in between
#: go to debug).
REWARN_S = 600.0
#: How long :func:`live_members` asks again while the group rebalances (its members are then
#: described without their topics).
_SETTLE_S = 10.0


@dataclass(frozen=True, slots=True)
class Member:
    """A live member of the group, as the group coordinator describes it."""

    member_id: str
    client_id: str
    client_host: str
    #: The topics it subscribed to (a bridge: its checkpoint topic), from the group's member
    #: metadata; None when the coordinator did not say (a group rebalancing, another protocol).
    topics: tuple[str, ...] | None = None


def member_client_id(settings: Settings) -> str:
    """The client id this bridge joins the group with: what ``checkpoints reset`` names."""
    return f"{CLIENT_ID}/{settings.delivery.transactional_id}"


class _PauseOnAssign(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Pauses every partition it is given: the member polls to stay alive, it never reads."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            self._consumer.pause(*assigned)


async def keep_membership(settings: Settings) -> None:
    """Keep this bridge a live member of ``BRIDGE_GROUP_ID`` until cancelled."""
    kafka = settings.kafka
    delay, failures = _BACKOFF_INITIAL_S, 0
    failing_since = warned_at = 0.0
    while True:
        consumer = AIOKafkaConsumer(
            **{**kafka_client_kwargs(kafka), "client_id": member_client_id(settings)},
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        try:
            with anyio.fail_after(60):
                await consumer.start()
            consumer.subscribe([kafka.checkpoint_topic], listener=_PauseOnAssign(consumer))
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
        except (KafkaError, TimeoutError, OSError) as exc:
            # A warning when an outage begins and every REWARN_S of it (checkpoints reset
            # cannot see this bridge meanwhile); the retries go to debug. Nothing waits on this.
            now = anyio.current_time()
            if not failures:
                failing_since = warned_at = now
                emit = log.warning
            elif now - warned_at >= REWARN_S:
                warned_at, emit = now, log.warning
            else:
                emit = log.debug
            emit(
                "bridge.membership.failed",
                group=kafka.group_id,
                error=describe_kafka_error(exc, kafka.bootstrap_servers),
                retry_in_s=delay,
                failing_for_s=round(now - failing_since),
                consequence="checkpoints reset cannot see this bridge in the group",
            )
            failures += 1
        except Exception:
            # Off the data path: whatever aiokafka raises here never takes the bridge down.
            log.warning("bridge.membership.crashed", group=kafka.group_id, exc_info=True)
            if not failures:
                failing_since = warned_at = anyio.current_time()
            failures += 1
        finally:
            # LeaveGroup, so that a stopped bridge is not listed until the session timeout.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()
        await anyio.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX_S)


async def live_members(kafka: KafkaSettings, *, timeout_s: float = 30) -> list[Member]:
    """The live members of ``BRIDGE_GROUP_ID`` subscribed to ``kafka.checkpoint_topic``: the
    bridges of this deployment (none when the group is empty or unknown). A member whose topics
    the coordinator does not say (the group rebalancing for longer than a few seconds, or not
    a consumer group) is counted: it may be one.

    Raises SinkUnavailable when the group cannot be described (Kafka unreachable, no
    ``Describe`` ACL on the group): the caller cannot tell, and must not guess "nobody".
    """
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(kafka))
    retry: list[str] = []  # why the last answer said to ask again
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            settle_by = anyio.current_time() + _SETTLE_S
            while True:
                members = await _describe(admin, kafka.group_id, retry)
                if members is not None:
                    if all(m.topics is not None for m in members):
                        break
                    if anyio.current_time() >= settle_by:
                        break
                # No coordinator yet, or it moved (a new cluster creates __consumer_offsets
                # on the first ask), or a rebalance: ask again.
                await anyio.sleep(0.5)
            topic = kafka.checkpoint_topic
            return [m for m in members if m.topics is None or topic in m.topics]
    except (KafkaError, TimeoutError, OSError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        if retry:
            cause += f" (the last answer: {retry[-1]})"
        raise SinkUnavailable(f"cannot describe the group {kafka.group_id!r}: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()


async def _describe(
    admin: AIOKafkaAdminClient, group_id: str, retry: list[str]
) -> list[Member] | None:
    """The group's members; None when the answer says to ask again (why: in ``retry``)."""
    try:
        responses = await admin.describe_consumer_groups([group_id])
    except KafkaError as exc:
        if exc.retriable:
            retry.append(type(exc).__name__)
            return None
        raise
    members: list[Member] = []
    for response in responses:
        for group in response.groups:
            code, protocol_type, members_raw = group[0], group[3], group[5]
            if code == GroupIdNotFound.errno:
                continue  # never joined by anyone: nobody is live
            if code != 0:
                error: Any = for_code(code)
                if error.retriable:
                    retry.append(error.__name__)
                    return None
                raise error(f"describing the group {group_id!r}")
            members.extend(
                Member(m[0], m[1], m[2], _subscription(protocol_type, m[3])) for m in members_raw
            )
    return members


def _subscription(protocol_type: str, metadata: bytes) -> tuple[str, ...] | None:
    """The topics in a member's metadata; None when it has none (described while the group
    rebalances) or of a protocol other than the consumers'."""
    if protocol_type != ConsumerProtocol.PROTOCOL_TYPE or not metadata:
        return None
    try:
        decoded: Any = ConsumerProtocolMemberMetadata.decode(metadata)
    except Exception:  # bytes of someone else's making: unknown, never a crash
        return None
    topics = decoded.subscription
    return tuple(topics) if isinstance(topics, list) else None
