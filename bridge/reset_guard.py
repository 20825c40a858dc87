"""Is a bridge running that would overwrite a reset, and did one? ``checkpoints reset`` asks.

A running bridge keeps its cursors in memory (a thread's in its pump, the history's in its
local index) and writes them with its next commit: a reset written under it is lost, at once
for a thread it is publishing, later for one that runs again. Two kinds of evidence, neither
enough alone:

- **The group.** Every bridge is a live member of ``BRIDGE_GROUP_ID`` subscribed to its
  checkpoint topic (bridge.membership); :func:`group_owners` counts the members subscribed to
  *this* checkpoint topic (another deployment that shares the group id is not counted). But a
  bridge whose membership failed (no ``Read`` ACL on the group, a coordinator error, its
  backoff) runs outside the group: it logs ``bridge.membership.failed``.
- **The topic.** A bridge that publishes writes checkpoints (each commit, every
  ``BRIDGE_COMMIT_INTERVAL_MS`` while events flow). :func:`last_write` says when the topic was
  last written (the values' ``written_at``); within :data:`RECENT_S`, :func:`writes` watches
  the topic for a few seconds: a new checkpoint while the group has no member of ours is a
  bridge outside the group. After the reset is written, watching again shows a bridge that
  overwrote it.

A bridge that runs outside the group and writes nothing while watched (its threads quiet) is
not seen: that is why membership failures are warnings, repeated while they last.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import KafkaSettings
from bridge.errors import SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs
from bridge.membership import Member, live_members
from bridge.tooling import topic_partitions

__all__ = ["RECENT_S", "WATCH_S", "Owners", "Write", "group_owners", "last_write", "writes"]

#: A checkpoint written within this long: the topic is watched before a reset is written.
RECENT_S = 60.0
#: How long the topic is watched, before writing (when it was written recently) and after.
WATCH_S = 3.0


@dataclass(frozen=True, slots=True)
class Owners:
    """What the group says: its members on this checkpoint topic, or why it cannot say."""

    group_id: str
    members: list[Member] | None
    unknown: str = ""

    @property
    def running(self) -> bool:
        """Refuse: members of ours, or nobody can tell."""
        return self.members is None or bool(self.members)

    def describe(self) -> str:
        if self.members is None:
            return f"cannot tell whether a bridge is running ({self.unknown})"
        if not self.members:
            return f"no bridge is running: the group {self.group_id} has no live member"
        names = "; ".join(f"client id {m.client_id}, host {m.client_host}" for m in self.members)
        return (
            f"a bridge is running: {len(self.members)} live member(s) of {self.group_id}: {names}"
        )


async def group_owners(kafka: KafkaSettings) -> Owners:
    try:
        return Owners(kafka.group_id, await live_members(kafka))
    except SinkUnavailable as exc:
        return Owners(kafka.group_id, None, str(exc))


def last_write(written_at: Iterable[str | None]) -> float | None:
    """Seconds since the newest of these ``written_at`` (a writer's clock: ahead of ours
    counts as just now); None when there is none."""
    newest: datetime | None = None
    for text in written_at:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
        except ValueError:
            continue
        if when is not None and when.tzinfo is not None and (newest is None or when > newest):
            newest = when
    if newest is None:
        return None
    return max(0.0, (datetime.now(UTC) - newest).total_seconds())


@dataclass(frozen=True, slots=True)
class Write:
    """A record written to the checkpoint topic while it was watched."""

    key: str
    value: bytes | None
    partition: int
    offset: int


async def writes(
    kafka: KafkaSettings,
    seconds: float,
    *,
    after: dict[TopicPartition, int] | None = None,
) -> list[Write]:
    """The records written to the checkpoint topic during the next ``seconds``, read
    uncommitted (a transaction still open is evidence too): from past ``after`` where given
    (the offsets a reset just wrote), else from the end of each partition now."""
    topic = kafka.checkpoint_topic
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(kafka),
        isolation_level="read_uncommitted",
        enable_auto_commit=False,
        group_id=None,
    )
    seen: list[Write] = []
    try:
        tps = await topic_partitions(kafka, topic) or []
        if not tps:
            await anyio.sleep(seconds)
            return seen
        with anyio.fail_after(seconds + 30):
            await consumer.start()
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                start = (after or {}).get(tp)
                consumer.seek(tp, start + 1 if start is not None else ends[tp])
            with anyio.move_on_after(seconds):
                while True:
                    batches = await consumer.getmany(*tps, timeout_ms=200)
                    for tp, records in batches.items():
                        seen.extend(
                            Write(r.key.decode(errors="replace"), r.value, tp.partition, r.offset)
                            for r in records
                            if r.key
                        )
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot watch {topic}: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()
    return seen
