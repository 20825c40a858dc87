"""``qoder-bridge checkpoints reset``: move threads' cursors for the bridge's next start.

    qoder-bridge checkpoints reset --session S [--thread T]
                                   (--to EVENT_ID | --to-start | --to-latest) [--execute] [--force]

For each thread, a checkpoint in the bridge's own format (the same key and value as
bridge.records.checkpoint_record) that the bridge takes at its next start:
- --to EVENT_ID: the cursor at that event, which must be in the thread's list (checked);
  the bridge republishes what follows it.
- --to-start: no cursor; the bridge republishes the thread from its first event (and the
  alerts of its alert-worthy events: they are published again too).
- --to-latest: the thread's last event id in the API now; the bridge skips everything so far.
Each checkpoint also carries the ids up to the new cursor (to drop replays at the boundary, as
the bridge's own do) and no drain mark, so the bridge reads the thread after the cursor even if
it finished long ago; the session's settled mark, if any, is cleared (a tombstone on the key
``{session_id}``) so the session is looked at. With BRIDGE_DELIVERY=exactly_once they are
written in one transaction (transactional.id ``qoder-bridge-reset.<checkpoint topic>``), so a
read_committed reader sees all of them or none.

Nothing is written without --execute. Whether a bridge would overwrite it: bridge.reset_guard
(the group, the topic written recently and watched, and both again after writing).
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.api import QoderApi
from bridge.checkpoint_admin import print_table, stored_topic
from bridge.checkpoints import ensure_topics, parse_checkpoint
from bridge.config import KafkaSettings, Settings
from bridge.cursor import CHECKPOINT_RECENT_IDS
from bridge.errors import ApiError, ApiUnavailable, ConfigError, SinkError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.records import ThreadRef, checkpoint_record
from bridge.reset_guard import (
    RECENT_S,
    WATCH_S,
    Owners,
    Write,
    group_owners,
    last_write,
    writes,
)
from bridge.shards import shard_of
from bridge.tooling import (
    EXIT_USAGE,
    ApiRetry,
    ToolFailed,
    open_api,
    session_threads,
    until_visible,
)

__all__ = ["TRANSACTIONAL_ID_PREFIX", "reset"]

TRANSACTIONAL_ID_PREFIX = "qoder-bridge-reset."


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reset puts a thread: the cursor and what the checkpoint carries with it."""

    last_event_id: str | None
    recent_ids: tuple[str, ...] = ()
    idless_after: int = 0


async def reset(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    kafka = settings.kafka
    retry = ApiRetry(settings.api, "bridge.checkpoints.api_retry")
    async with open_api(settings) as api:
        listed = await session_threads(api, args.session, args.thread, retry=retry)
        positions: dict[ThreadRef, Position] = {}
        for ref in listed.threads:
            if args.to_start:
                positions[ref] = Position(None)
            else:
                positions[ref] = await _position(api, ref, args.to, retry)
    rows, _marks = await stored_topic(kafka)
    before = {(s.session_id, s.thread_id): s for s in rows if s.session_id == args.session}

    target = f"--to {args.to}" if args.to else "--to-start" if args.to_start else "--to-latest"
    mode = "writing" if args.execute else "dry run, nothing is written"
    print(f"session {args.session}: {len(positions)} thread(s), {target} ({mode})", file=out)
    table = [("THREAD", "BEFORE", "AFTER")]
    for ref, position in positions.items():
        stored = before.get((ref.session_id, ref.thread_id))
        was = "(no checkpoint)" if stored is None else stored.checkpoint.last_event_id or "(start)"
        table.append((ref.thread_id, was, position.last_event_id or "(start)"))
    for thread_id in listed.unusable:
        table.append((thread_id, "-", "(not reset: the id cannot go into a URL)"))
    print_table(table, out)
    if listed.unusable:
        print(
            f"{len(listed.unusable)} thread(s) listed by the API cannot be reset (nor followed "
            "by the bridge): their ids cannot go into a URL",
            file=out,
        )
    if any(p.last_event_id is None for p in positions.values()):
        print(
            "(start): no cursor; at its next start the bridge republishes the thread from its "
            "first event, and the alerts of its alert-worthy events again",
            file=out,
        )
    print(
        "the bridge takes these at its next start and reads each thread after its new cursor, "
        "even a thread it had finished",
        file=out,
    )

    owners = await group_owners(kafka)
    print(owners.describe(), file=out)
    age_s = last_write(row.written_at for row in rows)
    recent = age_s is not None and age_s < RECENT_S and not owners.running
    if recent:
        print(
            f"the checkpoint topic was written {age_s:.0f} s ago: a bridge that has just "
            "stopped, or one running outside the group (its membership failed: it logs "
            "bridge.membership.failed)",
            file=out,
        )

    if not args.execute:
        if owners.running:
            print("--execute would be refused (see above) unless --force", file=out)
        elif recent:
            print(
                f"--execute first watches the topic for {WATCH_S:.0f} s, and is refused if a "
                "bridge writes to it meanwhile (unless --force)",
                file=out,
            )
        print("dry run: nothing written; add --execute to write", file=out)
        return 0
    if owners.running and not args.force:
        raise ToolFailed(
            f"refused: {owners.describe()}. A running bridge would overwrite the reset with "
            "its own cursors; stop it first, or --force"
        )
    if recent and not args.force:
        seen = await _writes(kafka, WATCH_S)
        if seen:
            raise ToolFailed(
                f"refused: {_what(seen)} while the group {kafka.group_id} has no live member "
                "on this topic: a bridge is running outside the group (its membership failed: "
                "its log says bridge.membership.failed) and would overwrite the reset; stop it "
                "first, or --force"
            )
        print(f"nothing written to the topic for {WATCH_S:.0f} s: no bridge is writing", file=out)

    written = await _write(settings, args.session, positions)
    print(f"written: {len(positions)} checkpoint(s) to {kafka.checkpoint_topic}", file=out)
    problems = await _after(kafka, args, positions, written, owners)
    if listed.unusable:
        problems.append(f"not reset: thread(s) {', '.join(listed.unusable)} (unusable ids)")
    if problems:
        raise ToolFailed("; ".join(problems))
    print(f"no bridge wrote to the topic for {WATCH_S:.0f} s after the reset: it holds", file=out)
    return 0


async def _after(
    kafka: KafkaSettings,
    args: argparse.Namespace,
    positions: dict[ThreadRef, Position],
    written: dict[TopicPartition, int],
    owners: Owners,
) -> list[str]:
    """What says, once the reset is written, that a bridge overwrote it or may: a newer
    checkpoint of a reset thread (or the session's settled mark again), any write without
    --force, a member of ours that was not in the group before."""
    seen = await _writes(kafka, WATCH_S, after=written)
    ours = {ref.key for ref in positions} | {args.session}
    overwritten = [w for w in seen if w.key in ours and w.value is not None]
    problems = []
    if overwritten:
        problems.append(
            f"OVERWRITTEN: {_what(overwritten)} after the reset: a bridge is running and wrote "
            "its own cursor over it; stop it (every bridge on this checkpoint topic) and reset "
            "again"
        )
    elif seen and not args.force:
        problems.append(
            f"{_what(seen)} after the reset: a bridge is running on this topic and will "
            "overwrite the reset when it writes these threads; stop it and reset again"
        )
    now = await group_owners(kafka)
    known = {m.member_id for m in owners.members or ()}
    joined = [m for m in now.members or () if m.member_id not in known]
    if joined and not args.force:
        names = "; ".join(f"client id {m.client_id}, host {m.client_host}" for m in joined)
        problems.append(
            f"a bridge joined the group {kafka.group_id} while the reset was written ({names}): "
            "it may have read its checkpoints before the reset; `checkpoints list` shows what "
            "holds, stop it and reset again if the reset is gone"
        )
    return problems


async def _writes(
    kafka: KafkaSettings, seconds: float, *, after: dict[TopicPartition, int] | None = None
) -> list[Write]:
    try:
        return await writes(kafka, seconds, after=after)
    except SinkUnavailable as exc:
        raise ToolFailed(f"cannot tell whether a bridge writes: {exc}") from exc


def _what(seen: list[Write]) -> str:
    """A few words on what was written: which keys, which cursor."""
    first = seen[0]
    checkpoint = parse_checkpoint(first.value)
    where = f" (its cursor {checkpoint.last_event_id or '(start)'})" if checkpoint else ""
    more = f" and {len(seen) - 1} more" if len(seen) > 1 else ""
    return f"a checkpoint was written: {first.key}{where}{more}"


async def _position(
    api: QoderApi, ref: ThreadRef, event_id: str | None, retry: ApiRetry
) -> Position:
    """The thread's list read from its start: up to ``event_id`` (which must be there), or to
    its end (--to-latest), with the ids before it and the id-less items after it. A request the
    API refuses for now reads the list again (``retry``)."""
    while True:
        try:
            return await _read_position(api, ref, event_id, retry)
        except ApiUnavailable as exc:
            await retry.wait(exc, f"reading thread {ref.thread_id}")


async def _read_position(
    api: QoderApi, ref: ThreadRef, event_id: str | None, retry: ApiRetry
) -> Position:
    ids: deque[str] = deque(maxlen=CHECKPOINT_RECENT_IDS)
    idless = 0
    try:
        async for page in api.thread_events(ref, None):
            retry.answered()
            for item in page:
                if item.id is None:
                    idless += 1
                    continue
                ids.append(item.id)
                idless = 0
                if event_id is not None and item.id == event_id:
                    return Position(item.id, tuple(ids))
    except ApiUnavailable:
        raise
    except ApiError as exc:
        raise ToolFailed(f"cannot read thread {ref.thread_id}: {exc}") from exc
    if event_id is not None:
        raise ToolFailed(f"event {event_id} is not in the list of thread {ref.thread_id}")
    # --to-latest: every id-less item after the last id counts as handled, as the bridge's do.
    return Position(ids[-1], tuple(ids), idless) if ids else Position(None)


async def _write(
    settings: Settings, session_id: str, positions: dict[ThreadRef, Position]
) -> dict[TopicPartition, int]:
    """Write the checkpoints and the session's tombstone; the last offset in each partition."""
    kafka = settings.kafka
    topic = kafka.checkpoint_topic
    # Before a bridge's first start (--to-latest: begin from now on) the topic may not exist
    # yet: created as the bridge creates it, compacted, never auto-created by a send.
    try:
        await ensure_topics(kafka)
    except ConfigError as exc:
        raise ToolFailed(str(exc), EXIT_USAGE) from exc
    except SinkError as exc:
        raise ToolFailed(str(exc)) from exc
    kwargs: dict[str, Any] = dict(
        kafka_client_kwargs(kafka),
        **producer_tuning_kwargs(kafka),
        acks="all",
        enable_idempotence=True,
    )
    transactional = settings.delivery.mode == "exactly_once"
    if transactional:
        kwargs["transactional_id"] = TRANSACTIONAL_ID_PREFIX + topic
    producer = AIOKafkaProducer(**kwargs)
    try:
        with anyio.fail_after(60):
            await producer.start()
            if transactional:
                await producer.begin_transaction()
            acks = []
            for ref, position in positions.items():
                record = checkpoint_record(
                    topic,
                    ref,
                    position.last_event_id,
                    None,  # no drain mark: the bridge reads the thread after the cursor
                    list(position.recent_ids),
                    position.idless_after,
                )
                acks.append(
                    await producer.send(
                        topic, record.value, key=record.key, partition=record.partition
                    )
                )
            # A session that settled is not looked at until its updated_at moves: forget it.
            shard = shard_of(session_id)
            acks.append(await producer.send(topic, None, key=session_id.encode(), partition=shard))
            written: dict[TopicPartition, int] = {}
            for ack in acks:
                meta = await ack
                tp = TopicPartition(meta.topic, meta.partition)
                written[tp] = max(written.get(tp, -1), meta.offset)
            if transactional:
                await producer.commit_transaction()
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise ToolFailed(f"cannot write the checkpoints to {topic}: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await producer.stop()
    if transactional:
        # Written means a bridge that starts now reads them, not only that Kafka logged them.
        try:
            await until_visible(kafka, written)
        except SinkUnavailable as exc:
            raise ToolFailed(f"written, but not yet visible to readers: {exc}") from exc
    return written
