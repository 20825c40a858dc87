"""Every thread's checkpoint, on local disk: what the bridge needs of its history, out of memory.

The checkpoint topic is the truth; this is a cache of it built at every start (read to the end,
``read_committed``) and kept up to date as threads settle. A thread that runs again finds its
cursor here; a session whose ``updated_at`` is what it was when it settled is not looked at.
Memory stays flat whatever the history (sqlite's page cache); the file lives in ``TMPDIR``
(the chart mounts an ``emptyDir`` on ``/tmp``) and is deleted on exit.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path

from bridge.checkpoints import Checkpoint, is_session_key, parse_checkpoint, parse_settled
from bridge.shards import shard_of

_SCHEMA = """
create table if not exists checkpoints (key text primary key, session text, value blob);
create index if not exists by_session on checkpoints (session);
create table if not exists settled (session text primary key, updated_at text);
"""


class CheckpointIndex(MutableMapping[str, Checkpoint]):
    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="qoder-bridge-")) if directory is None else directory
        )
        self._db = sqlite3.connect(self.directory / "checkpoints.sqlite", isolation_level=None)
        # A cache rebuilt at every start: nothing to gain from a journal or fsync.
        self._db.execute("pragma journal_mode = off")
        self._db.execute("pragma synchronous = off")
        self._db.executescript(_SCHEMA)
        self._db.create_function("shard_of", 1, shard_of, deterministic=True)

    # -- loading ---------------------------------------------------------------------------

    def load(self, records: Iterable[tuple[str, bytes | None]]) -> None:
        """Checkpoint records in topic order: a later one replaces, a tombstone deletes."""
        upserts: list[tuple[str, str, bytes]] = []
        marks: list[tuple[str, str]] = []
        for key, value in records:
            if is_session_key(key):
                # A session's settled mark; a tombstone (or anything else) forgets it.
                mark = parse_settled(value)
                if mark is None:
                    self._flush(upserts, marks)
                    upserts, marks = [], []
                    self._db.execute("delete from settled where session = ?", (key,))
                else:
                    marks.append((key, mark))
            elif value is None or parse_checkpoint(value) is None:
                self._flush(upserts, marks)
                upserts, marks = [], []
                self._db.execute("delete from checkpoints where key = ?", (key,))
            else:
                upserts.append((key, key.partition("/")[0], value))
        self._flush(upserts, marks)

    def _flush(self, upserts: list[tuple[str, str, bytes]], marks: list[tuple[str, str]]) -> None:
        if upserts or marks:
            self._db.execute("begin")
            self._db.executemany("insert or replace into checkpoints values (?, ?, ?)", upserts)
            self._db.executemany("insert or replace into settled values (?, ?)", marks)
            self._db.execute("commit")

    # -- the mapping -----------------------------------------------------------------------

    def __getitem__(self, key: str) -> Checkpoint:
        row = self._db.execute("select value from checkpoints where key = ?", (key,)).fetchone()
        checkpoint = parse_checkpoint(row[0]) if row else None
        if checkpoint is None:
            raise KeyError(key)
        return checkpoint

    def __setitem__(self, key: str, checkpoint: Checkpoint) -> None:
        value = json.dumps(
            {
                "last_event_id": checkpoint.last_event_id,
                "drained_updated_at": checkpoint.drained_updated_at,
                "recent_ids": list(checkpoint.recent_ids),
                "idless_after": checkpoint.idless_after,
            },
            separators=(",", ":"),
        ).encode()
        self._db.execute(
            "insert or replace into checkpoints values (?, ?, ?)",
            (key, key.partition("/")[0], value),
        )

    def __delitem__(self, key: str) -> None:
        if self._db.execute("delete from checkpoints where key = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for (key,) in self._db.execute("select key from checkpoints"):
            yield key

    def forget_shard(self, shard: int) -> None:
        """Everything of the shard's sessions: read again from its partition when it is owned
        again (another member may have moved it on meanwhile)."""
        self._db.execute("delete from checkpoints where shard_of(session) = ?", (shard,))
        self._db.execute("delete from settled where shard_of(session) = ?", (shard,))

    def clear(self) -> None:
        self._db.execute("delete from checkpoints")
        self._db.execute("delete from settled")

    def __len__(self) -> int:
        return int(self._db.execute("select count(*) from checkpoints").fetchone()[0])

    # -- sessions --------------------------------------------------------------------------

    def settled_at(self, session_id: str) -> str | None:
        row = self._db.execute(
            "select updated_at from settled where session = ?", (session_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def settle(self, session_id: str, updated_at: str) -> None:
        self._db.execute("insert or replace into settled values (?, ?)", (session_id, updated_at))

    def close(self) -> None:
        self._db.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
