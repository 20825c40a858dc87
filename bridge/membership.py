"""Who is in the consumer group ``BRIDGE_GROUP_ID``: what the operators' tools ask.

Every running bridge is a member of the group (bridge/ownership.py: its assigned partitions of
the checkpoint topic are the shards it owns). ``qoder-bridge checkpoints reset`` and
``checkpoints migrate`` describe the group and refuse to write while it has live members
subscribed to their checkpoint topic (:func:`live_members`: the group's member metadata names
each member's topics, so a deployment that shares the group id with another, on topics of its
own, is not counted). A member leaves the group when its bridge stops (at the very end of a
drain); one that dies without stopping stays listed until the group's session timeout passes
without a heartbeat (6 s).

The member's client id names the bridge: ``qoder-kafka-bridge/<version>/<BRIDGE_TRANSACTIONAL_ID>``
(the chart sets that id to the pod name); the broker adds the member's host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata
from aiokafka.errors import GroupIdNotFound, KafkaError, for_code

from bridge.config import KafkaSettings, Settings
from bridge.errors import SinkUnavailable
from bridge.kafka_conn import CLIENT_ID, describe_kafka_error, kafka_client_kwargs

__all__ = ["REWARN_S", "Member", "live_members", "member_client_id"]

log = structlog.get_logger("bridge.membership")

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
