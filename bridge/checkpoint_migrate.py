"""``qoder-bridge checkpoints migrate``: an old checkpoint topic into the 32 shards.

    qoder-bridge checkpoints migrate [--fence-transactional-id ID ...] [--execute] [--force]

Releases before scale-out kept BRIDGE_CHECKPOINT_TOPIC in one partition (or any number, keyed
by Kafka's partitioner on the whole key); the bridge now keeps each session's checkpoints and
settled mark in partition ``shard_of(session_id)`` of a 32-partition topic and refuses any
other count. The migration, with every old bridge stopped (deploy/design/scale-out.md §3.4):

1. fence the old bridges' transactional ids given with --fence-transactional-id
   (InitProducerId: a forgotten old process can commit nothing afterwards), and refuse if the
   old topic still has an open transaction (a writer not fenced: its records would be missed);
2. read the old topic read_committed to its end and keep the latest record of each key
   (``{session}/{thread}`` checkpoints, ``{session}`` settled marks; a tombstone removes it);
3. copy them to ``<topic>.migrating`` (32 partitions, each record in its session's shard, the
   configs of :data:`bridge.checkpoints.CHECKPOINT_TOPIC_CONFIGS` under the old topic's own
   and BRIDGE_CHECKPOINT_TOPIC_CONFIG), check it holds every one, then mark it complete (the
   record keyed :data:`COMPLETE_KEY`, never copied back);
4. delete ``<topic>`` and create it again with 32 partitions and the same configs;
5. copy every record back, to the same partition; delete ``<topic>.migrating``.

Records are copied byte for byte (key and value) in transactions of :data:`BATCH`
records (transactional.id ``qoder-bridge-migrate.<topic>``; with BRIDGE_DELIVERY=at_least_once,
idempotent sends) and a copy writes only what the destination does not hold yet, so every
step can be run again: after a crash (kill -9 anywhere) the next run starts from what the two
topics say, fences the crashed run's open transaction, and finishes the job without a record
lost or doubled. While copying back, a key the new topic already holds (a bridge started
early wrote it) is left as it is: it is newer than the copy.

Nothing changes without --execute: the default prints what would be done, with the counts.
A topic that has 32 partitions already (and no ``.migrating`` beside it) is left alone.
--execute is refused, unless --force, while a bridge is live in BRIDGE_GROUP_ID on this topic
or, when the topic was written within the last minute, writes to it while it is watched
(bridge.reset_guard).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from bridge.checkpoints import CHECKPOINT_TOPIC_CONFIGS, admin_client, is_session_key
from bridge.checkpoints import read_checkpoints as _read_checkpoints
from bridge.config import Settings
from bridge.errors import SinkError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.reset_guard import RECENT_S, WATCH_S, group_owners, last_write, writes
from bridge.shards import SHARDS, shard_of
from bridge.tooling import EXIT_USAGE, ToolFailed, until_visible

__all__ = [
    "BATCH",
    "COMPLETE_KEY",
    "TEMP_SUFFIX",
    "TRANSACTIONAL_ID_PREFIX",
    "Migration",
    "migrate",
]

TEMP_SUFFIX = ".migrating"
TRANSACTIONAL_ID_PREFIX = "qoder-bridge-migrate."
#: Records per transaction: a crash loses at most one open transaction, aborted on the rerun.
BATCH = 500
#: The key of the record that says the temporary topic holds every record (``#`` is in no id).
COMPLETE_KEY = "#migration-complete"

#: Latest record of each key: its value, None for a tombstone.
Latest = dict[str, bytes | None]


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic as the migration needs it: partitions, replicas and its own (non-default)
    configs; ``partitions == 0`` when it does not exist."""

    name: str
    partitions: int
    replicas: int = 0
    configs: tuple[tuple[str, str], ...] = ()

    @property
    def exists(self) -> bool:
        return self.partitions > 0


def partition_of(key: str) -> int:
    """The shard of the record's session: ``{session}/{thread}`` and ``{session}`` alike."""
    return shard_of(key.partition("/")[0])


def live(records: Latest) -> dict[str, bytes]:
    """Each key's latest value, without tombstones and the completion mark."""
    return {k: v for k, v in records.items() if v is not None and k != COMPLETE_KEY}


class Migration:
    """The steps, each safe to run again; :meth:`run` runs those the topics still need."""

    def __init__(self, settings: Settings, out: TextIO, fence_ids: Iterable[str] = ()) -> None:
        self.kafka = settings.kafka
        self.name = self.kafka.checkpoint_topic
        self.temp = self.name + TEMP_SUFFIX
        self.transactional = settings.delivery.mode == "exactly_once"
        self.fence_ids = list(dict.fromkeys(fence_ids))
        self.out = out

    def say(self, line: str) -> None:
        print(line, file=self.out)

    # -- what is there ---------------------------------------------------------------------

    async def describe(self, name: str) -> Topic:
        try:
            with anyio.fail_after(30):
                async with admin_client(self.kafka) as admin:
                    (described,) = await admin.describe_topics([name])
                    code = described.get("error_code", 0)
                    if code == UnknownTopicOrPartitionError.errno:
                        return Topic(name, 0)
                    if code != 0:
                        raise SinkUnavailable(f"cannot describe the topic {name}: error {code}")
                    parts = described.get("partitions") or []
                    (response,) = await admin.describe_configs(
                        [ConfigResource(ConfigResourceType.TOPIC, name)]
                    )
        except (KafkaError, TimeoutError) as exc:
            cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
            raise SinkUnavailable(f"cannot describe the topic {name}: {cause}") from exc
        own: list[tuple[str, str]] = []
        for _code, _message, _type, _name, entries in response.resources:
            for entry in entries:
                # v0 says is_default; v1+ says where the value comes from (1: set on the topic)
                is_own = not entry[3] if response.API_VERSION == 0 else entry[3] == 1
                if is_own and entry[1] is not None:
                    own.append((entry[0], entry[1]))
        replicas = max((len(p.get("replicas") or ()) for p in parts), default=1)
        return Topic(name, len(parts), replicas, tuple(sorted(own)))

    async def read(self, name: str, *, strict: bool = True) -> tuple[Latest, int]:
        """The topic's latest record per key, read_committed to its end; the records read.
        ``strict``: refused while a transaction is open on it (what follows it is unread)."""
        if strict:
            await self._no_open_transaction(name)
        latest: Latest = {}

        def keep(batch: list[tuple[str, bytes | None]]) -> None:
            latest.update(batch)

        count = await _read_checkpoints(
            dataclasses.replace(self.kafka, checkpoint_topic=name), keep
        )
        return latest, count

    async def _no_open_transaction(self, name: str, *, settle_s: float = 10) -> None:
        """The last stable offset of every partition at its high watermark (the markers of a
        commit reach the partitions a moment after it): no transaction open."""
        with anyio.move_on_after(settle_s):
            while True:
                stuck = await self._open_partitions(name)
                if not stuck:
                    return
                await anyio.sleep(0.5)
        raise ToolFailed(
            f"{name} has an open transaction in partition(s) {', '.join(map(str, stuck))}: a "
            "bridge (or a tool) still writing, or killed mid-transaction. Stop every old bridge "
            "and pass each one's BRIDGE_TRANSACTIONAL_ID with --fence-transactional-id (or wait "
            "for the broker's transaction timeout), then run this again"
        )

    async def high_watermarks(self, name: str) -> dict[int, int]:
        """Each partition's end (read_uncommitted): it only grows while the topic lives."""
        _committed, high = await self._ends(name)
        return {tp.partition: end for tp, end in high.items()}

    async def _open_partitions(self, name: str) -> list[int]:
        committed, high = await self._ends(name)
        return sorted(tp.partition for tp, end in committed.items() if end < high[tp])

    async def _ends(self, name: str) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """The end of each partition for read_committed (the last stable offset) and for
        read_uncommitted (the high watermark)."""
        ends: dict[str, dict[TopicPartition, int]] = {}
        try:
            with anyio.fail_after(30):
                for level in ("read_committed", "read_uncommitted"):
                    consumer = AIOKafkaConsumer(
                        **kafka_client_kwargs(self.kafka), isolation_level=level, group_id=None
                    )
                    try:
                        await consumer.start()
                        tps = [TopicPartition(name, p) for p in await self._partition_ids(name)]
                        ends[level] = await consumer.end_offsets(tps) if tps else {}
                    finally:
                        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                            await consumer.stop()
        except (KafkaError, TimeoutError) as exc:
            cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
            raise SinkUnavailable(f"cannot read the end of {name}: {cause}") from exc
        return ends["read_committed"], ends["read_uncommitted"]

    async def _partition_ids(self, name: str) -> list[int]:
        return list(range((await self.describe(name)).partitions))

    # -- the steps -------------------------------------------------------------------------

    async def fence(self) -> None:
        """Start and stop a transactional producer per old id, and for this command's own
        (an earlier run killed mid-transaction): InitProducerId bumps the id's epoch and
        aborts its open transaction, so the old holder can never commit again."""
        own = [TRANSACTIONAL_ID_PREFIX + self.name] if self.transactional else []
        for transactional_id in [*self.fence_ids, *own]:
            producer = AIOKafkaProducer(
                **kafka_client_kwargs(self.kafka), transactional_id=transactional_id
            )
            try:
                with anyio.fail_after(60):
                    await producer.start()
            except (KafkaError, TimeoutError) as exc:
                cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
                raise ToolFailed(
                    f"cannot fence transactional id {transactional_id}: {cause}"
                ) from exc
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await producer.stop()
            if transactional_id not in own:
                self.say(f"fenced transactional id {transactional_id}: it can commit no more")

    async def copy_to_temp(self, old: Topic) -> int:
        """Step 3: the old topic's latest records into the temporary topic, checked, then
        marked complete. Makes the temporary topic hold exactly the old topic's records."""
        ends = await self.high_watermarks(self.name)
        source, _count = await self.read(self.name)
        await self.create_temp(old)
        dest, _ = await self.read(self.temp)
        wanted: Latest = dict(live(source))
        # The temporary topic follows the old one: what it holds of an earlier run and the old
        # topic no longer has, it forgets.
        wanted.update(dict.fromkeys((k for k in live(dest) if k not in wanted), None))
        written = await self.write(self.temp, wanted, dest)
        check, _ = await self.read(self.temp)
        if live(check) != live(source):
            raise ToolFailed(
                f"{self.temp} does not hold what {self.name} holds after the copy "
                f"({len(live(check))} of {len(live(source))} keys): nothing deleted; run again"
            )
        if await self.high_watermarks(self.name) != ends:
            raise ToolFailed(
                f"{self.name} was written while it was copied: a bridge is running; stop every "
                "bridge, then run this again"
            )
        # The old topic's ends say, on a rerun, whether it is still the topic copied.
        doc = {"migrated_from": self.name, "end_offsets": {str(p): e for p, e in ends.items()}}
        await self.write(self.temp, {COMPLETE_KEY: json.dumps(doc).encode()}, {})
        return written

    async def create_temp(self, old: Topic) -> None:
        """The temporary topic, unless it exists: 32 partitions, the configs the bridge
        creates the topic with, under the old topic's own and BRIDGE_CHECKPOINT_TOPIC_CONFIG
        (the topic is created again from these)."""
        if (await self.describe(self.temp)).exists:
            return
        configs = {**CHECKPOINT_TOPIC_CONFIGS, **dict(old.configs)}
        configs.update(self.kafka.checkpoint_topic_config)
        await self.create(self.temp, old.replicas, configs)

    async def recreate(self) -> None:
        """The topic again, unless it exists: 32 partitions, the temporary topic's configs."""
        if (await self.describe(self.name)).exists:
            return
        temp = await self.describe(self.temp)
        await self.create(self.name, temp.replicas, dict(temp.configs))
        self.say(f"created {self.name} with {SHARDS} partitions")

    async def drop_old(self) -> None:
        """Step 4, first half: the old topic goes (the temporary one holds its records)."""
        await self.delete(self.name)
        self.say(f"deleted {self.name}")

    async def copy_back(self) -> int:
        """Steps 4 and 5: the topic created again with 32 partitions and the temporary
        topic's configs, then every record copied back that it does not hold yet."""
        await self.recreate()
        source, _ = await self.read(self.temp)
        dest, _ = await self.read(self.name)
        kept = [k for k in live(source) if k in dest and dest[k] != source[k]]
        if kept:
            self.say(
                f"kept {len(kept)} newer record(s) {self.name} already held (a bridge wrote "
                "them since)"
            )
        wanted = {k: source[k] for k in live(source) if k not in dest}
        written = await self.write(self.name, wanted, {})
        check, _ = await self.read(self.name)
        missing = [k for k in live(source) if k not in check]
        if missing:
            raise ToolFailed(
                f"{self.name} lacks {len(missing)} record(s) after the copy back (the first: "
                f"{missing[0]}): {self.temp} kept; run again"
            )
        return written

    async def drop_temp(self) -> None:
        await self.delete(self.temp)
        self.say(f"deleted {self.temp}")

    # -- Kafka -----------------------------------------------------------------------------

    async def write(self, topic: str, wanted: Latest, dest: Latest) -> int:
        """Send every wanted record the destination does not hold as it is, each to its
        session's shard, :data:`BATCH` a transaction; the records written."""
        # A tombstone only for a key the destination holds; a value it does not hold as is.
        todo = [(k, v) for k, v in sorted(wanted.items()) if dest.get(k) != v]
        if not todo:
            return 0
        kwargs: dict[str, Any] = dict(
            kafka_client_kwargs(self.kafka),
            **producer_tuning_kwargs(self.kafka),
            acks="all",
            enable_idempotence=True,
        )
        if self.transactional:
            kwargs["transactional_id"] = TRANSACTIONAL_ID_PREFIX + self.name
        producer = AIOKafkaProducer(**kwargs)
        last: dict[TopicPartition, int] = {}
        try:
            with anyio.fail_after(120 + len(todo) / 100):
                await producer.start()
                for start in range(0, len(todo), BATCH):
                    if self.transactional:
                        await producer.begin_transaction()
                    acks = [
                        await producer.send(
                            topic,
                            value,
                            key=key.encode(),
                            partition=0 if key == COMPLETE_KEY else partition_of(key),
                        )
                        for key, value in todo[start : start + BATCH]
                    ]
                    for ack in acks:
                        meta = await ack
                        tp = TopicPartition(meta.topic, meta.partition)
                        last[tp] = max(last.get(tp, -1), meta.offset)
                    if self.transactional:
                        await producer.commit_transaction()
        except (KafkaError, TimeoutError) as exc:
            cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
            raise ToolFailed(f"cannot write to {topic}: {cause}") from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await producer.stop()
        try:
            await until_visible(self.kafka, last)
        except SinkUnavailable as exc:
            raise ToolFailed(f"written to {topic}, but not yet visible to readers: {exc}") from exc
        return len(todo)

    async def create(self, name: str, replicas: int, configs: dict[str, str]) -> None:
        """Create the topic with 32 partitions (again, while a deletion of it completes)."""
        try:
            with anyio.fail_after(60):
                async with admin_client(self.kafka) as admin:
                    while True:
                        response = await admin.create_topics(
                            [NewTopic(name, SHARDS, replicas, topic_configs=configs)]
                        )
                        ((_topic, code, *message),) = response.topic_errors
                        if code == 0:
                            break
                        if code != TopicAlreadyExistsError.errno:
                            detail = (message[-1] if message else "") or f"error {code}"
                            raise ToolFailed(f"the broker refused to create {name}: {detail}")
                        await anyio.sleep(0.5)  # still being deleted
                    while True:
                        (described,) = await admin.describe_topics([name])
                        parts = described.get("partitions") or []
                        if len(parts) == SHARDS and all(p.get("leader", -1) >= 0 for p in parts):
                            return
                        await anyio.sleep(0.2)
        except (KafkaError, TimeoutError) as exc:
            cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
            raise ToolFailed(f"cannot create {name}: {cause}") from exc

    async def delete(self, name: str) -> None:
        try:
            with anyio.fail_after(60):
                async with admin_client(self.kafka) as admin:
                    response = await admin.delete_topics([name])
                    for _topic, code, *_rest in response.topic_error_codes:
                        if code not in (0, UnknownTopicOrPartitionError.errno):
                            raise ToolFailed(f"the broker refused to delete {name}: error {code}")
                    while True:
                        if name not in await admin.list_topics():
                            return
                        await anyio.sleep(0.2)
        except (KafkaError, TimeoutError) as exc:
            cause = describe_kafka_error(exc, self.kafka.bootstrap_servers)
            raise ToolFailed(f"cannot delete {name}: {cause}") from exc

    # -- the whole job ---------------------------------------------------------------------

    async def run(self, *, execute: bool, force: bool) -> int:
        old, temp = await self.describe(self.name), await self.describe(self.temp)
        if old.partitions == SHARDS and not temp.exists:
            self.say(f"{self.name} has {SHARDS} partitions already: nothing to migrate")
            return 0
        if not old.exists and not temp.exists:
            self.say(
                f"no topic {self.name}: nothing to migrate (the bridge creates it with "
                f"{SHARDS} partitions)"
            )
            return 0
        if temp.exists and temp.partitions != SHARDS:
            raise ToolFailed(
                f"{self.temp} has {temp.partitions} partition(s), not {SHARDS}: not a topic "
                "this command made; delete it or rename the checkpoint topic",
                EXIT_USAGE,
            )
        building = old.exists and old.partitions != SHARDS
        owners = await group_owners(self.kafka)
        self.say(owners.describe())
        if execute:
            if owners.running and not force:
                raise ToolFailed(
                    f"refused: {owners.describe()}. Stop every bridge on this checkpoint topic "
                    "first (it would write to a topic being moved), or --force"
                )
            if building and not force:
                await self._not_written()
            await self.fence()
        done = None
        if temp.exists:
            done = (await self.read(self.temp, strict=execute))[0].get(COMPLETE_KEY)
        copied = False
        if building and done is not None:
            copied = await self._still_the_copied_topic(done)
        if not building and done is None:
            raise ToolFailed(
                f"{self.temp} is incomplete and {self.name} is not the old topic any more "
                "(deleted or recreated by hand?): nothing to copy it from",
                EXIT_USAGE,
            )
        if building:
            await self._plan_build(old, temp, copied=copied, strict=execute)
        else:
            await self._plan_resume(old, strict=execute)
        if not execute:
            if owners.running:
                self.say("--execute would be refused (see above) unless --force")
            self.say("dry run: nothing changed; add --execute to migrate")
            return 0
        if building:
            if not copied:
                written = await self.copy_to_temp(old)
                self.say(f"copied {written} record(s) to {self.temp} ({SHARDS} partitions)")
            await self.drop_old()
        written = await self.copy_back()
        self.say(f"copied {written} record(s) back to {self.name}")
        await self.drop_temp()
        final, _ = await self.read(self.name)
        threads, marks = _counts(live(final))
        self.say(
            f"migrated: {self.name} has {SHARDS} partitions, {threads} thread checkpoint(s) and "
            f"{marks} settled mark(s), each in its session's shard"
        )
        return 0

    async def _still_the_copied_topic(self, done: bytes) -> bool:
        """The temporary topic is marked complete and the old topic is there: True when the
        old topic is the one copied, unchanged (a run stopped before deleting it); False when
        it was written since (copy again). Refused when it is another topic of that name."""
        try:
            doc = json.loads(done)
            copied_ends = {int(p): int(e) for p, e in doc["end_offsets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            copied_ends = {}
        ends = await self.high_watermarks(self.name)
        if ends == copied_ends:
            return True
        if ends.keys() == copied_ends.keys() and all(ends[p] >= copied_ends[p] for p in ends):
            self.say(f"{self.name} was written after an earlier run copied it: copying again")
            return False
        raise ToolFailed(
            f"{self.temp} holds a complete copy of {self.name}, but {self.name} was created "
            "again since (an old bridge started?): stop it, check what it holds, delete it and "
            "run this again",
            EXIT_USAGE,
        )

    async def _plan_build(self, old: Topic, temp: Topic, *, copied: bool, strict: bool) -> None:
        latest, count = await self.read(self.name, strict=strict)
        kept = live(latest)
        threads, marks = _counts(kept)
        shards = len({partition_of(k) for k in kept})
        self.say(
            f"{self.name}: {old.partitions} partition(s), {count} record(s) read "
            f"(read_committed): {threads} thread checkpoint(s) and {marks} settled mark(s) to "
            f"keep, {count - len(kept)} superseded or deleted record(s) to drop"
        )
        fence = ", ".join(self.fence_ids) or "none given (--fence-transactional-id)"
        again = " (an earlier run stopped: only what it lacks)" if temp.exists else ""
        if copied:
            again = " (done by an earlier run)"
        self.say(
            "the migration:\n"
            f"  1. fence the old bridges' transactional ids: {fence}\n"
            f"  2. copy the {len(kept)} record(s) to {self.temp}{again}, {SHARDS} partitions, "
            f"each in its session's shard ({shards} shard(s) used)\n"
            f"  3. delete {self.name}, create it again with {SHARDS} partitions and the same "
            "configs\n"
            f"  4. copy the {len(kept)} record(s) back, delete {self.temp}"
        )
        if not strict:
            open_in = await self._open_partitions(self.name)
            if open_in:
                self.say(
                    f"{self.name} has an open transaction (partition(s) "
                    f"{', '.join(map(str, open_in))}): --execute fences the ids given and is "
                    "refused while one is still open"
                )

    async def _plan_resume(self, old: Topic, *, strict: bool) -> None:
        latest, _ = await self.read(self.temp, strict=strict)
        threads, marks = _counts(live(latest))
        where = f"{self.name} is deleted" if not old.exists else f"{self.name} was created again"
        self.say(
            f"an earlier run stopped after copying to {self.temp} ({threads} thread "
            f"checkpoint(s), {marks} settled mark(s)); {where}. To finish: create {self.name} "
            f"with {SHARDS} partitions if missing, copy back what it lacks, delete {self.temp}"
        )

    async def _not_written(self) -> None:
        """The old topic written in the last minute: watched; a write meanwhile is a bridge
        running outside the group (an old release, or its membership failed)."""
        latest, _ = await self.read(self.name, strict=False)
        age_s = last_write(_written_at(v) for v in live(latest).values())
        if age_s is None or age_s >= RECENT_S:
            return
        self.say(f"{self.name} was written {age_s:.0f} s ago: watching it for {WATCH_S:.0f} s")
        try:
            seen = await writes(self.kafka, WATCH_S)
        except SinkUnavailable as exc:
            raise ToolFailed(f"cannot tell whether a bridge writes: {exc}") from exc
        if seen:
            raise ToolFailed(
                f"refused: {len(seen)} record(s) written to {self.name} while watched (the "
                f"first: {seen[0].key}): a bridge is running outside the group "
                f"{self.kafka.group_id}; stop every bridge first, or --force"
            )


def _counts(records: dict[str, bytes]) -> tuple[int, int]:
    marks = sum(1 for k in records if is_session_key(k))
    return len(records) - marks, marks


def _written_at(value: bytes) -> str | None:
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    found = doc.get("written_at") if isinstance(doc, dict) else None
    return found if isinstance(found, str) else None


async def migrate(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    migration = Migration(settings, out, args.fence_transactional_id or ())
    try:
        return await migration.run(execute=args.execute, force=args.force)
    except SinkError as exc:
        raise ToolFailed(str(exc)) from exc
