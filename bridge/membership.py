"""The running bridge as a live member of the Kafka consumer group ``BRIDGE_GROUP_ID``.

The first step of scale-out (issue 10, which will share sessions between the members on
Kafka's group coordination). For now membership answers one question for the operators'
tools: *is a bridge running against these topics right now?* ``qoder-bridge checkpoints
reset`` describes the group and refuses to write while it has live members.

One ``AIOKafkaConsumer`` with ``group_id = BRIDGE_GROUP_ID``, subscribed to the checkpoint
topic (the topic every bridge of a deployment shares), with no offset commits. Its assigned
partitions are paused as soon as they are assigned: it reads nothing, it only polls, so the
group keeps it (a member with no pending poll for ``max_poll_interval_ms`` is dropped). It is
off the data path: it never blocks a pump or the publisher, its errors are logged (one warning
per outage) and it tries again with a capped backoff; the bridge runs on without it.

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
from aiokafka.errors import GroupIdNotFound, KafkaError, for_code

from bridge.config import KafkaSettings, Settings
from bridge.errors import SinkUnavailable
from bridge.kafka_conn import CLIENT_ID, describe_kafka_error, kafka_client_kwargs

__all__ = ["SESSION_TIMEOUT_MS", "Member", "keep_membership", "live_members", "member_client_id"]

log = structlog.get_logger("bridge.membership")

#: Without a heartbeat for this long, a member is dropped from the group (aiokafka's default).
SESSION_TIMEOUT_MS = 10_000
#: How long one poll waits; the group only needs a poll in every ``max_poll_interval_ms``.
_POLL_MS = 1_000
_BACKOFF_INITIAL_S, _BACKOFF_MAX_S = 1.0, 30.0


@dataclass(frozen=True, slots=True)
class Member:
    """A live member of the group, as the group coordinator describes it."""

    member_id: str
    client_id: str
    client_host: str


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
                        log.info("bridge.membership.rejoined", group=kafka.group_id)
                    else:
                        log.info("bridge.membership.joined", group=kafka.group_id)
                    delay, failures = _BACKOFF_INITIAL_S, 0
        except (KafkaError, TimeoutError, OSError) as exc:
            # One warning per outage; the retries go to debug. Nothing waits on this task.
            emit = log.warning if not failures else log.debug
            emit(
                "bridge.membership.failed",
                group=kafka.group_id,
                error=describe_kafka_error(exc, kafka.bootstrap_servers),
                retry_in_s=delay,
            )
            failures += 1
        except Exception:
            # Off the data path: whatever aiokafka raises here never takes the bridge down.
            log.warning("bridge.membership.crashed", group=kafka.group_id, exc_info=True)
            failures += 1
        finally:
            # LeaveGroup, so that a stopped bridge is not listed until the session timeout.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()
        await anyio.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX_S)


async def live_members(kafka: KafkaSettings, *, timeout_s: float = 30) -> list[Member]:
    """The live members of ``BRIDGE_GROUP_ID`` (none when the group is empty or unknown).

    Raises SinkUnavailable when the group cannot be described (Kafka unreachable, no
    ``Describe`` ACL on the group): the caller cannot tell, and must not guess "nobody".
    """
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(kafka))
    retry: list[str] = []  # why the last answer said to ask again
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            while True:
                members = await _describe(admin, kafka.group_id, retry)
                if members is not None:
                    return members
                # No coordinator yet, or it moved (a new cluster creates __consumer_offsets
                # on the first ask): ask again.
                await anyio.sleep(0.5)
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
            code, members_raw = group[0], group[5]
            if code == GroupIdNotFound.errno:
                continue  # never joined by anyone: nobody is live
            if code != 0:
                error: Any = for_code(code)
                if error.retriable:
                    retry.append(error.__name__)
                    return None
                raise error(f"describing the group {group_id!r}")
            members.extend(Member(m[0], m[1], m[2]) for m in members_raw)
    return members
