"""The on-disk checkpoint index: what the bridge knows of its history, out of memory."""

from __future__ import annotations

import json
import os
import tracemalloc

from bridge.checkpoint_index import CheckpointIndex
from bridge.checkpoints import Checkpoint


def _value(last: str, drained: str | None = None, recent: int = 32) -> bytes:
    doc = {
        "last_event_id": last,
        "drained_updated_at": drained,
        "recent_ids": [f"evt_{n:032d}" for n in range(recent)],
        "idless_after": 2,
    }
    return json.dumps(doc).encode()


def test_records_in_topic_order_a_later_one_wins_and_a_tombstone_deletes() -> None:
    index = CheckpointIndex()
    try:
        index.load([("s1/t1", _value("evt_1")), ("s1/t2", _value("evt_2"))])
        index.load([("s1/t1", _value("evt_3", "2026-11-23T10:00:00.000Z")), ("s1/t2", None)])
        assert set(index) == {"s1/t1"}
        checkpoint = index["s1/t1"]
        assert checkpoint.last_event_id == "evt_3" and checkpoint.idless_after == 2
        assert len(checkpoint.recent_ids) == 32
        assert index.get("s1/t2") is None
        index["s2/t9"] = Checkpoint("evt_9", "2026-11-23T11:00:00.000Z", ("evt_8",), 1)
        assert index["s2/t9"] == Checkpoint("evt_9", "2026-11-23T11:00:00.000Z", ("evt_8",), 1)
        assert index.settled_at("s1") is None
        index.settle("s1", "2026-11-23T12:00:00.000Z")
        assert index.settled_at("s1") == "2026-11-23T12:00:00.000Z"
    finally:
        index.close()
    assert not index.directory.exists()


def test_the_history_of_checkpoints_does_not_stay_in_memory() -> None:
    """Scenario (9.2, 9.5): 20,000 threads of history (the benchmark does 100,000), each
    checkpoint ~1.5 KB with its 32 recent ids (30 MB as Python objects). Loading them in
    batches as they are read keeps the Python heap within a few MB (it does not grow with the
    history); they are on disk, found again by key."""
    index = CheckpointIndex()
    try:
        tracemalloc.start()
        for batch in range(20):
            index.load(
                [(f"sess_{batch}/sthr_{n}", _value(f"evt_{batch}_{n}")) for n in range(1000)]
            )
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(index) == 20_000
        assert index["sess_12/sthr_7"].last_event_id == "evt_12_7"
        size = os.path.getsize(index.directory / "checkpoints.sqlite")
        print(
            f"\n20,000 checkpoints: heap peak {peak / 2**20:.1f} MiB, file {size / 2**20:.0f} MiB"
        )
        assert peak < 8 * 2**20, peak
    finally:
        index.close()


def test_settled_marks_load_beside_the_checkpoints_and_a_tombstone_forgets_one() -> None:
    """The checkpoint topic's session records (key without ``/``) are settled marks, not
    thread checkpoints: loaded as such, in topic order, a tombstone forgetting one."""
    index = CheckpointIndex()
    try:
        mark = json.dumps({"session_id": "sess_a", "settled_updated_at": "2026-11-30T01:00:00Z"})
        later = json.dumps({"session_id": "sess_a", "settled_updated_at": "2026-11-30T02:00:00Z"})
        other = json.dumps({"session_id": "sess_b", "settled_updated_at": "2026-11-30T03:00:00Z"})
        thread = json.dumps({"last_event_id": "evt_1", "drained_updated_at": None})
        index.load(
            [
                ("sess_a", mark.encode()),
                ("sess_a/sthr_1", thread.encode()),
                ("sess_b", other.encode()),
                ("sess_a", later.encode()),
                ("sess_b", None),
            ]
        )
        assert index.settled_at("sess_a") == "2026-11-30T02:00:00Z"
        assert index.settled_at("sess_b") is None
        assert list(index) == ["sess_a/sthr_1"]  # a mark is no thread
        assert index["sess_a/sthr_1"].last_event_id == "evt_1"
    finally:
        index.close()
