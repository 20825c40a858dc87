"""What the bridge stored in its checkpoint topic, and moving threads' cursors.

    qoder-bridge checkpoints list [--session S] [--json]
    qoder-bridge checkpoints reset --session S [--thread T]
                                   (--to EVENT_ID | --to-start | --to-latest) [--execute] [--force]
    qoder-bridge checkpoints migrate [--fence-transactional-id ID ...] [--execute] [--force]

``migrate`` moves the checkpoints of a topic from before scale-out into the 32 partitions the
bridge needs (bridge/checkpoint_migrate.py), with every old bridge stopped.

``list`` reads BRIDGE_CHECKPOINT_TOPIC as the bridge does at start (read_committed, to the end,
the last record of each key) and prints each thread's cursor, and apart from them the sessions
marked settled (keyed by the session alone: the bridge does not look at them again until their
updated_at moves), as tables or as JSON.

``reset`` writes, for each thread, a checkpoint in the bridge's own format that the bridge
takes at its next start (--to EVENT_ID, --to-start, --to-latest; what each means, and the
transaction they are written in: bridge/checkpoint_reset.py).

Nothing is written without --execute: the default is a dry run that prints the before/after
table. A running bridge keeps its cursors in memory and would overwrite a reset with its next
commit. How --execute finds one out (bridge/reset_guard.py):
- the consumer group BRIDGE_GROUP_ID: live members subscribed to this checkpoint topic (every
  running bridge is one, bridge.membership), named (client id, host): refused; a group that
  cannot be described: refused. A bridge that was killed stays listed until the group's session
  timeout (6 s).
- the topic: a bridge outside the group the reset asks (another BRIDGE_GROUP_ID) may still
  write. When a checkpoint was written within the last 60 s, the topic is
  watched for 3 s first: a new checkpoint meanwhile is a bridge writing: refused.
--force writes anyway. After writing, the topic is watched 3 s more and the group described
again: a checkpoint of a reset thread written after the reset (a bridge overwrote
it), or, without --force, any checkpoint written or a member of ours that joined meanwhile, and
the command exits 1 saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
from aiokafka.errors import KafkaError

from bridge.checkpoints import (
    Checkpoint,
    admin_client,
    is_session_key,
    parse_checkpoint,
    parse_settled,
    read_checkpoints,
)
from bridge.cli import add_settings_flags, settings_from_args
from bridge.config import KafkaSettings, Settings, require_token
from bridge.errors import SinkError, SinkUnavailable
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.logs import configure_logging
from bridge.shards import SHARDS
from bridge.tooling import (
    EXIT_USAGE,
    ToolFailed,
    check_id,
    fail,
)

__all__ = [
    "HELP",
    "Settled",
    "Stored",
    "add_arguments",
    "main",
    "print_table",
    "stored_checkpoints",
    "stored_topic",
]

HELP = (
    "list the bridge's checkpoints, move threads' cursors, or migrate an old checkpoint topic "
    "(dry run unless --execute)"
)


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
class Settled:
    """A session's settled mark: the bridge looks at the session again only once its
    ``updated_at`` is past ``settled_updated_at``."""

    session_id: str
    settled_updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "settled_updated_at": self.settled_updated_at}


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
        "--execute; refused while a bridge is live in BRIDGE_GROUP_ID on this checkpoint topic, "
        "or writes to the topic while watched, unless --force; exit 1 if a bridge overwrote "
        "the reset.",
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
        "--force", action="store_true", help="write even while a bridge seems to run"
    )
    add_settings_flags(reset)

    migrate = actions.add_parser(
        "migrate",
        allow_abbrev=False,
        help=f"move an old checkpoint topic's checkpoints into {SHARDS} partitions, one per "
        "shard; prints the plan, migrates only with --execute",
        description=f"Move the checkpoints of an old checkpoint topic into {SHARDS} partitions "
        "(a partition per shard): copy to <topic>.migrating, delete and recreate the topic, copy "
        "back, delete the copy; a rerun after a crash finishes the job. Stop every old bridge "
        "first. A dry run unless --execute; refused while a bridge is live in BRIDGE_GROUP_ID "
        "on this checkpoint topic, unless --force.",
    )
    migrate.add_argument(
        "--fence-transactional-id",
        action="append",
        default=[],
        metavar="ID",
        help="an old bridge's BRIDGE_TRANSACTIONAL_ID, fenced first so that it can commit "
        "nothing more (repeatable)",
    )
    migrate.add_argument("--execute", action="store_true", help="migrate (default: a dry run)")
    migrate.add_argument(
        "--force", action="store_true", help="migrate even while a bridge seems to run"
    )
    add_settings_flags(migrate)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    kafka_client_kwargs(settings.kafka)  # TLS files: a ConfigError (exit 2) before any I/O
    try:
        if args.checkpoints_action == "migrate":
            producer_tuning_kwargs(settings.kafka)
            configure_logging(settings.log, quiet_third_party=True)
            from bridge.checkpoint_migrate import migrate  # noqa: PLC0415

            return anyio.run(migrate, settings, args, sys.stdout, backend="asyncio")
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
        # The reset reads the topic with this module's reader: imported here, not at the top.
        from bridge.checkpoint_reset import reset  # noqa: PLC0415

        return anyio.run(reset, settings, args, sys.stdout, backend="asyncio")
    except ToolFailed as exc:
        return fail(f"checkpoints {args.checkpoints_action}", exc)


# -- list -----------------------------------------------------------------------------------


async def stored_checkpoints(kafka: KafkaSettings, session_id: str | None = None) -> list[Stored]:
    """Every thread's checkpoint (of ``session_id`` only, if given), sorted by key."""
    rows, _marks = await stored_topic(kafka, session_id)
    return rows


async def stored_topic(
    kafka: KafkaSettings, session_id: str | None = None
) -> tuple[list[Stored], list[Settled]]:
    """The topic as the bridge loads it: every thread's checkpoint and every session's settled
    mark (of ``session_id`` only, if given), each sorted by key."""
    rows: dict[str, Stored] = {}
    marks: dict[str, Settled] = {}

    def keep(records: list[tuple[str, bytes | None]]) -> None:
        for key, value in records:
            if is_session_key(key):
                if session_id is not None and key != session_id:
                    continue
                mark = parse_settled(value)
                if mark is None:
                    marks.pop(key, None)  # a tombstone: the bridge looks at the session
                else:
                    marks[key] = Settled(key, mark)
                continue
            session, _, thread = key.partition("/")
            if session_id is not None and session != session_id:
                continue  # another session's
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
    return [rows[key] for key in sorted(rows)], [marks[key] for key in sorted(marks)]


async def _topic_exists(kafka: KafkaSettings, topic: str, *, timeout_s: float = 30) -> bool:
    try:
        with anyio.fail_after(timeout_s):
            async with admin_client(kafka) as admin:
                return topic in await admin.list_topics()
    except (KafkaError, TimeoutError) as exc:
        cause = describe_kafka_error(exc, kafka.bootstrap_servers)
        raise SinkUnavailable(f"cannot list the topics: {cause}") from exc


def _field(value: bytes | None, name: str) -> str | None:
    try:
        doc = json.loads(value) if value is not None else None
    except ValueError:
        return None
    found = doc.get(name) if isinstance(doc, dict) else None
    return found if isinstance(found, str) else None


async def _list(settings: Settings, session_id: str | None, as_json: bool, out: TextIO) -> int:
    rows, marks = await stored_topic(settings.kafka, session_id)
    if as_json:
        doc = {
            "threads": [row.to_json() for row in rows],
            "settled_sessions": [mark.to_json() for mark in marks],
        }
        print(json.dumps(doc, indent=2), file=out)
        return 0
    scope = f" of session {session_id}" if session_id else ""
    if not rows:
        print(f"no checkpoints{scope} in {settings.kafka.checkpoint_topic}", file=out)
    else:
        _print_threads(rows, out)
    if marks:
        print(
            f"\n{len(marks)} session(s) settled: the bridge does not look at them again until "
            "their updated_at is past SETTLED_UPDATED_AT (a reset clears the mark)",
            file=out,
        )
        print_table(
            [("SESSION", "SETTLED_UPDATED_AT")]
            + [(m.session_id, m.settled_updated_at) for m in marks],
            out,
        )
    elif rows:
        print(f"\nno session{scope} marked settled", file=out)
    return 0


def _print_threads(rows: list[Stored], out: TextIO) -> None:
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
    print_table(table, out)


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
