"""What the bridge stored in its checkpoint topic, and moving threads' cursors.

    qoder-bridge checkpoints list [--session S] [--json]
    qoder-bridge checkpoints reset --session S [--thread T]
                                   (--to EVENT_ID | --to-start | --to-latest) [--execute] [--force]

``list`` reads BRIDGE_CHECKPOINT_TOPIC as the bridge does at start (read_committed, to the end,
the last record of each key) and prints each thread's cursor, as a table or as JSON.

``reset`` writes, for each thread, a checkpoint in the bridge's own format (the same key and
value as bridge.records.checkpoint_record) that the bridge takes at its next start:
- --to EVENT_ID: the cursor at that event, which must be in the thread's list (checked);
  the bridge republishes what follows it.
- --to-start: no cursor; the bridge republishes the thread from its first event.
- --to-latest: the thread's last event id in the API now; the bridge skips everything so far.
Each checkpoint also carries the ids up to the new cursor (to drop replays at the boundary, as
the bridge's own do) and no drain mark, so the bridge reads the thread after the cursor even if
it finished long ago; the session's settled mark, if any, is cleared (a tombstone on the key
``{session_id}``) so the session is looked at. With BRIDGE_DELIVERY=exactly_once they are
written in one transaction (transactional.id ``qoder-bridge-reset.<checkpoint topic>``), so a
read_committed reader sees all of them or none.

Nothing is written without --execute: the default is a dry run that prints the before/after
table. A running bridge keeps its cursors in memory and would overwrite a reset with its next
commit, so --execute refuses while the bridge's consumer group (BRIDGE_GROUP_ID) has live
members, naming them (client id, host); --force writes anyway. How it finds out: every running
bridge is a member of that group (bridge.membership); the group is described with Kafka's admin
API. A bridge that was killed stays listed until the group's session timeout (10 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.api import QoderApi
from bridge.checkpoints import Checkpoint, ensure_topics, parse_checkpoint, read_checkpoints
from bridge.cli import add_settings_flags, settings_from_args
from bridge.config import KafkaSettings, Settings, require_token
from bridge.cursor import CHECKPOINT_RECENT_IDS
from bridge.errors import ApiError, ApiUnavailable, ConfigError, SinkError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.logs import configure_logging
from bridge.membership import Member, live_members
from bridge.records import ThreadRef, checkpoint_record
from bridge.tooling import (
    EXIT_USAGE,
    ApiRetry,
    ToolFailed,
    check_id,
    fail,
    open_api,
    session_threads,
    until_visible,
)

__all__ = ["HELP", "Stored", "add_arguments", "main", "stored_checkpoints"]

HELP = "list the bridge's checkpoints, or move threads' cursors (dry run unless --execute)"
TRANSACTIONAL_ID_PREFIX = "qoder-bridge-reset."


@dataclass(frozen=True, slots=True)
class Stored:
    """A thread's checkpoint as the bridge would load it, and when it was written."""

    session_id: str
    thread_id: str
    checkpoint: Checkpoint
    written_at: str | None

    def to_json(self) -> dict[str, Any]:
        c = self.checkpoint
        return {
            "session_id": self.session_id,
            "thread_id": self.thread_id,
            "last_event_id": c.last_event_id,
            "drained_updated_at": c.drained_updated_at,
            "recent_ids": list(c.recent_ids),
            "idless_after": c.idless_after,
            "written_at": self.written_at,
        }


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reset puts a thread: the cursor and what the checkpoint carries with it."""

    last_event_id: str | None
    recent_ids: tuple[str, ...] = ()
    idless_after: int = 0


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="checkpoints_action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        allow_abbrev=False,
        help="each thread's stored cursor (read_committed, as the bridge loads them)",
        description="Each thread's stored cursor, as the bridge loads it at start.",
    )
    listing.add_argument("--session", metavar="SESSION_ID", help="only this session's threads")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    add_settings_flags(listing)

    reset = actions.add_parser(
        "reset",
        allow_abbrev=False,
        help="move threads' cursors; prints the change, writes only with --execute",
        description="Move threads' cursors for the bridge's next start. A dry run unless "
        "--execute; refused while a bridge is live in BRIDGE_GROUP_ID unless --force.",
    )
    reset.add_argument("--session", required=True, metavar="SESSION_ID", help="the session")
    reset.add_argument("--thread", metavar="THREAD_ID", help="only this thread (default: all)")
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="EVENT_ID", help="the cursor at this event (needs --thread)")
    where.add_argument(
        "--to-start", action="store_true", help="no cursor: republish from the first event"
    )
    where.add_argument(
        "--to-latest", action="store_true", help="the thread's last event now: skip all so far"
    )
    reset.add_argument("--execute", action="store_true", help="write (default: a dry run)")
    reset.add_argument(
        "--force", action="store_true", help="write even while a bridge is live in the group"
    )
    add_settings_flags(reset)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    kafka_client_kwargs(settings.kafka)  # TLS files: a ConfigError (exit 2) before any I/O
    try:
        check_id("--session", args.session)
        if args.checkpoints_action == "list":
            configure_logging(settings.log, quiet_third_party=True)
            return anyio.run(
                _list, settings, args.session, args.json, sys.stdout, backend="asyncio"
            )
        check_id("--thread", args.thread)
        check_id("--to", args.to)
        if args.to is not None and args.thread is None:
            raise ToolFailed("--to needs --thread: an event id belongs to one thread", EXIT_USAGE)
        require_token(settings.api)
        producer_tuning_kwargs(settings.kafka)
        configure_logging(settings.log, quiet_third_party=True)
        return anyio.run(_reset, settings, args, sys.stdout, backend="asyncio")
    except ToolFailed as exc:
        return fail(f"checkpoints {args.checkpoints_action}", exc)


# -- list -----------------------------------------------------------------------------------


async def stored_checkpoints(kafka: KafkaSettings, session_id: str | None = None) -> list[Stored]:
    """Every thread's checkpoint (of ``session_id`` only, if given), sorted by key."""
    rows: dict[str, Stored] = {}

    def keep(records: list[tuple[str, bytes | None]]) -> None:
        for key, value in records:
            session, sep, thread = key.partition("/")
            if not sep or (session_id is not None and session != session_id):
                continue  # a session's own record, or another session's
            checkpoint = parse_checkpoint(value)
            if checkpoint is None:
                rows.pop(key, None)  # a tombstone: the bridge forgets the thread too
                continue
            written = _field(value, "written_at")
            rows[key] = Stored(session, thread, checkpoint, written)

    try:
        # No topic, no checkpoints (and aiokafka trips over a consumer stopped right after it
        # started with nothing assigned: not asked to read one).
        if await _topic_exists(kafka, kafka.checkpoint_topic):
            await read_checkpoints(kafka, keep)
    except SinkError as exc:
        raise ToolFailed(str(exc)) from exc
    return [rows[key] for key in sorted(rows)]


async def _topic_exists(kafka: KafkaSettings, topic: str, *, timeout_s: float = 30) -> bool:
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(kafka))
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            return topic in await admin.list_topics()
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot list the topics: {cause}") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()


def _field(value: bytes | None, name: str) -> str | None:
    try:
        doc = json.loads(value) if value is not None else None
    except ValueError:
        return None
    found = doc.get(name) if isinstance(doc, dict) else None
    return found if isinstance(found, str) else None


async def _list(settings: Settings, session_id: str | None, as_json: bool, out: TextIO) -> int:
    rows = await stored_checkpoints(settings.kafka, session_id)
    if as_json:
        print(json.dumps([row.to_json() for row in rows], indent=2), file=out)
        return 0
    if not rows:
        scope = f" of session {session_id}" if session_id else ""
        print(f"no checkpoints{scope} in {settings.kafka.checkpoint_topic}", file=out)
        return 0
    table = [("SESSION", "THREAD", "LAST_EVENT_ID", "DRAINED_UPDATED_AT", "WRITTEN_AT")]
    for row in rows:
        c = row.checkpoint
        table.append(
            (
                row.session_id,
                row.thread_id,
                c.last_event_id or "(start)",
                c.drained_updated_at or "-",
                row.written_at or "-",
            )
        )
    _print_table(table, out)
    return 0


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


# -- reset ----------------------------------------------------------------------------------


async def _reset(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    kafka = settings.kafka
    retry = ApiRetry(settings.api, "bridge.checkpoints.api_retry")
    async with open_api(settings) as api:
        listed = await session_threads(api, args.session, args.thread, retry=retry)
        threads = listed.threads
        positions: dict[ThreadRef, Position] = {}
        for ref in threads:
            if args.to_start:
                positions[ref] = Position(None)
            else:
                positions[ref] = await _position(api, ref, args.to, retry)
    before = {(s.session_id, s.thread_id): s for s in await stored_checkpoints(kafka, args.session)}

    target = f"--to {args.to}" if args.to else "--to-start" if args.to_start else "--to-latest"
    mode = "writing" if args.execute else "dry run, nothing is written"
    print(f"session {args.session}: {len(threads)} thread(s), {target} ({mode})", file=out)
    table = [("THREAD", "BEFORE", "AFTER")]
    for ref, position in positions.items():
        stored = before.get((ref.session_id, ref.thread_id))
        was = "(no checkpoint)" if stored is None else stored.checkpoint.last_event_id or "(start)"
        table.append((ref.thread_id, was, position.last_event_id or "(start)"))
    for thread_id in listed.unusable:
        table.append((thread_id, "-", "(not reset: the id cannot go into a URL)"))
    _print_table(table, out)
    if listed.unusable:
        print(
            f"{len(listed.unusable)} thread(s) listed by the API cannot be reset (nor followed "
            "by the bridge): their ids cannot go into a URL",
            file=out,
        )
    if any(p.last_event_id is None for p in positions.values()):
        print(
            "(start): no cursor; at its next start the bridge republishes the thread from its "
            "first event",
            file=out,
        )
    print(
        "the bridge takes these at its next start and reads each thread after its new cursor, "
        "even a thread it had finished",
        file=out,
    )

    try:
        members: list[Member] | None = await live_members(kafka)
        unknown = ""
    except SinkUnavailable as exc:
        members, unknown = None, str(exc)
    if members:
        names = "; ".join(f"client id {m.client_id}, host {m.client_host}" for m in members)
        owners = f"a bridge is running: {len(members)} live member(s) of {kafka.group_id}: {names}"
    elif members is None:
        owners = f"cannot tell whether a bridge is running ({unknown})"
    else:
        owners = f"no bridge is running: the group {kafka.group_id} has no live member"
    print(owners, file=out)

    if not args.execute:
        if members or members is None:
            print("--execute would be refused (see above) unless --force", file=out)
        print("dry run: nothing written; add --execute to write", file=out)
        return 0
    if (members or members is None) and not args.force:
        raise ToolFailed(
            f"refused: {owners}. A running bridge would overwrite the reset with its own "
            "cursors; stop it first, or --force"
        )
    await _write(settings, args.session, positions)
    print(f"written: {len(positions)} checkpoint(s) to {kafka.checkpoint_topic}", file=out)
    if listed.unusable:
        raise ToolFailed(f"not reset: thread(s) {', '.join(listed.unusable)} (unusable ids)")
    return 0


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


async def _write(settings: Settings, session_id: str, positions: dict[ThreadRef, Position]) -> None:
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
                acks.append(await producer.send(topic, record.value, key=record.key))
            # A session that settled is not looked at until its updated_at moves: forget it.
            acks.append(await producer.send(topic, None, key=session_id.encode()))
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
