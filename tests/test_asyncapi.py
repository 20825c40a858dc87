"""deploy/asyncapi.yaml: a sound AsyncAPI 3 document that says what bridge/records.py builds.

The end-to-end tests check every record they read against the document (tests/asyncapi.py);
here, without Kafka: the document's structure, its schemas and examples, records of every
kind built by the bridge's own functions (alerts and dead letters that the end-to-end runs
rarely make included), what the document must refuse, and the catalogs it repeats (topic
names, partitions, event types, alert types) against the code.
"""

from __future__ import annotations

import ast
import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

import bridge
from bridge.config import KafkaSettings
from bridge.records import (
    ALERTING_EVENT_TYPES,
    DELTA_FRAME_TYPES,
    REJECTION_MESSAGES,
    Event,
    Record,
    ThreadRef,
    alert_reason,
    alert_record,
    checkpoint_record,
    dead_letter_record,
    event_record,
)
from bridge.shards import SHARDS
from tests.asyncapi import (
    ROLES,
    ContractError,
    check_parts,
    check_record,
    document,
    resolve,
    validator,
)

ROOT = Path(__file__).resolve().parents[1]
THREAD = ThreadRef("sess_019a7c2e4d11", "sthr_019a7c2e4e07")
TOPICS = {"events": "e", "alerts": "a", "deadLetters": "d", "checkpoints": "c"}


@dataclass
class FakeRecord:
    """What tests.asyncapi reads of an aiokafka ConsumerRecord."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "t"
    partition: int = 0
    offset: int = 0


def consumed(record: Record) -> FakeRecord:
    return FakeRecord(record.key, record.value, list(record.headers), record.topic)


def qoder_event(kind: str, **fields: Any) -> Event:
    body = {"id": "evt_01", "type": kind, "processed_at": "2026-11-23T10:00:00.123456789Z"}
    body.update(fields)
    return Event("evt_01", kind, json.dumps(body).encode(), body)


def known_event_types() -> list[str]:
    (known, _) = resolve(document()["components"]["schemas"]["EventType"])["anyOf"]
    return list(known["enum"])


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in all_refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in all_refs(value)]
    return []


# -- the document -----------------------------------------------------------------------------


def test_document_is_asyncapi_3_for_this_bridge_version() -> None:
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == bridge.__version__, "bump deploy/asyncapi.yaml with the bridge"
    assert doc["defaultContentType"] == "application/json"
    assert {s["protocol"] for s in doc["servers"].values()} == {"kafka"}


def test_every_reference_resolves() -> None:
    """Every $ref of the document points at something in it."""
    for ref in all_refs(document()):
        assert ref.startswith("#/"), ref
        resolve({"$ref": ref})


def test_channels_are_the_bridge_topics_with_their_defaults() -> None:
    """The four channels are the four topics, at the defaults of the bridge's settings, with
    the partitions it creates them with; the checkpoint topic is compacted."""
    defaults = KafkaSettings()
    channels = document()["channels"]
    assert tuple(channels) == ROLES
    addresses = {
        "events": (defaults.topic, defaults.topic_partitions),
        "alerts": (defaults.alerts_topic, defaults.alerts_topic_partitions),
        "deadLetters": (defaults.dlq_topic, defaults.dlq_topic_partitions),
        "checkpoints": (defaults.checkpoint_topic, SHARDS),
    }
    for role, (topic, partitions) in addresses.items():
        binding = channels[role]["bindings"]["kafka"]
        assert channels[role]["address"] == binding["topic"] == topic, role
        assert binding["partitions"] == partitions, role
    compaction = channels["checkpoints"]["bindings"]["kafka"]["topicConfiguration"]
    assert compaction["cleanup.policy"] == ["compact"]


def test_operations_name_messages_of_their_channel() -> None:
    """Each operation's messages are messages of its own channel (AsyncAPI 3 requires it); the
    bridge sends to every channel and receives from the checkpoints."""
    doc = document()
    actions = set()
    for name, operation in doc["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
            resolve(message)
        actions.add((operation["action"], channel_ref.rsplit("/", 1)[1]))
    assert {(a, c) for a, c in actions if a == "send"} == {("send", role) for role in ROLES}
    assert ("receive", "checkpoints") in actions


def test_every_schema_is_valid_json_schema_draft_7() -> None:
    doc = document()
    schemas = list(doc["components"]["schemas"].values())
    for message in doc["components"]["messages"].values():
        schemas += [message["headers"], message["payload"], message["bindings"]["kafka"]["key"]]
    for schema in schemas:
        Draft7Validator.check_schema(schema)


def test_examples_match_their_messages() -> None:
    """The document's own examples are valid: they cannot mislead a reader."""
    doc = document()
    for role in ROLES:
        for message in doc["channels"][role]["messages"].values():
            spec = resolve(message)
            assert spec.get("examples"), f"{role}: give the message an example"
            for example in spec["examples"]:
                headers = resolve(spec["headers"])
                assert not validator_errors(headers, example.get("headers", {})), example["name"]
                assert not validator_errors(resolve(spec["payload"]), example["payload"]), example[
                    "name"
                ]


def validator_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    pointer = next(
        f"/components/schemas/{name}"
        for name, s in document()["components"]["schemas"].items()
        if s is schema
    )
    return [e.message for e in validator(pointer).iter_errors(instance)]


# -- records the bridge builds ----------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(qoder_event("agent.message", content=[{"type": "text", "text": "é"}]),
                     id="api"),
        pytest.param(qoder_event("x.future_type", x_new={"nested": [1, None]}), id="unknown-type"),
        pytest.param(Event("evt_02", "agent.message", b'{"content":"old"}', {"content": "old"}),
                     id="sse-id-only"),
        pytest.param(Event("event_start:" + "0" * 32, "event_start",
                           b'{"event":{"id":"evt_03","type":"agent.message"},"type":"event_start"}',
                           {"event": {"id": "evt_03", "type": "agent.message"},
                            "type": "event_start"}), id="delta-frame"),
    ],
)  # fmt: skip
def test_event_records_match(event: Event) -> None:
    """Events as the API sends them (unknown types and fields too), an old SSE frame whose id
    is only on its id: line, and a delta frame published with BRIDGE_PUBLISH_DELTAS."""
    check_record("events", consumed(event_record("e", THREAD, event)))


def alert_cases() -> list[Any]:
    reasons = sorted(REJECTION_MESSAGES)
    cases = [
        ("bridge.token_rejected", "authentication_error", None, {"error": "HTTP 401"}),
        ("bridge.session_not_found", "not_found", None, {"session_id": THREAD.session_id,
                                                         "error": "HTTP 404"}),
        ("bridge.thread_unreachable", "not_found", THREAD, None),
        ("bridge.cursor_lost", "cursor_unknown_to_api", THREAD, {"cursor": "evt_01"}),
        ("bridge.list_stuck", "cursor_not_advancing", THREAD, {"error": "page 3 again"}),
        ("bridge.pump_crashed", "internal_error", THREAD, None),
        ("bridge.streams_capped", "max_streams", THREAD, {"stream_limit": 8, "max_streams": 8}),
        ("bridge.streams_capped", "connection_cap", THREAD, {"stream_limit": 4, "max_streams": 8}),
        *(("bridge.dead_letter", r, THREAD, {"event_id": None, "size_bytes": 9}) for r in reasons),
        ("qoder.session.error", "overloaded_error", THREAD,
         {"event_id": "evt_01", "event_omitted": "too_large"}),
    ]  # fmt: skip
    return [pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in cases]


@pytest.mark.parametrize(("alert_type", "reason", "thread", "detail"), alert_cases())
def test_bridge_alert_records_match(
    alert_type: str, reason: str, thread: ThreadRef | None, detail: dict[str, Any] | None
) -> None:
    """Every alert the bridge raises itself, as alert_record builds it (the last: the copy of a
    Qoder event too large to copy, named in `detail`)."""
    check_record("alerts", consumed(alert_record("a", thread, alert_type, reason, detail=detail)))


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("session.error", {"error": {"type": "overloaded_error", "message": "busy"}}),
        ("session.error", {"error": "legacy string"}),
        ("session.status_terminated", {}),
        ("session.thread_status_terminated", {"session_thread_id": THREAD.thread_id}),
        ("session.deleted", {}),
        ("terminated", {"reason": "timeout"}),
        ("session.status_idle", {"stop_reason": {"type": "requires_action", "event_ids": ["e"]}}),
        ("session.thread_status_idle", {"stop_reason": {"type": "requires_action"}}),
    ],
)
def test_qoder_alert_records_match(kind: str, fields: dict[str, Any]) -> None:
    """Every Qoder event that is worth an alert, copied as the pump copies it."""
    event = qoder_event(kind, **fields)
    reason = alert_reason(event)
    assert reason is not None
    check_record(
        "alerts", consumed(alert_record("a", THREAD, "qoder." + kind, reason, event=event))
    )


@pytest.mark.parametrize(
    ("reason", "data", "limit"),
    [
        ("not_json", b'{"type":"agent.message",', 1_000_000),
        ("not_object", b"[1,2,3]", 1_000_000),
        ("missing_id", b'{"type":"agent.message"}', 1_000_000),
        ("invalid_utf8", b'{"text":"\xff\xfe"}', 1_000_000),
        ("too_large", ("é" * 300_000).encode(), 100_000),
    ],
)
def test_dead_letter_records_match(reason: str, data: bytes, limit: int) -> None:
    """Every reason, UTF-8 data as text and other bytes as base64, and an excerpt."""
    record = dead_letter_record(
        "d", THREAD, reason, data, event_id=None if reason == "missing_id" else "evt_01",
        event_type="agent.message", limit_bytes=limit,
    )  # fmt: skip
    check_record("deadLetters", consumed(record))
    value = json.loads(record.value)
    if "data_base64" in value:
        assert (
            base64.b64decode(value["data_base64"])
            == data[: len(base64.b64decode(value["data_base64"]))]
        )


@pytest.mark.parametrize(
    ("last", "drained", "recent"),
    [(None, None, None), ("evt_09", "2026-11-23T10:00:00.000Z", ["evt_08", "sha256:" + "a" * 32])],
)
def test_checkpoint_records_match(last: str | None, drained: str | None, recent: Any) -> None:
    check_record("checkpoints", consumed(checkpoint_record("c", THREAD, last, drained, recent)))


# -- what the document refuses ------------------------------------------------------------------


def good_event() -> FakeRecord:
    return consumed(event_record("e", THREAD, qoder_event("agent.message")))


def without_header(record: FakeRecord, name: str) -> FakeRecord:
    record.headers = [(k, v) for k, v in record.headers if k != name]
    return record


@pytest.mark.parametrize(
    ("role", "record", "named"),
    [
        ("events", without_header(good_event(), "ce_id"), "'ce_id' is a required property"),
        ("events", FakeRecord(b"sess_1", good_event().value, good_event().headers), "key"),
        ("events", FakeRecord(good_event().key, b"not json", good_event().headers), "JSON"),
        ("events", FakeRecord(good_event().key, b"[1]", good_event().headers), "value"),
        ("events", FakeRecord(good_event().key, good_event().value,
                              [*good_event().headers, ("ce_id", b"evt_x")]), "repeats"),
        ("events", FakeRecord(good_event().key, None, good_event().headers), "tombstone"),
        ("checkpoints", FakeRecord(b"sess_1/sthr_1", b"{}", [("x", b"y")]), "header"),
        ("events", good_event(), None),
    ],
)  # fmt: skip
def test_the_document_refuses_what_it_must(
    role: str, record: FakeRecord, named: str | None
) -> None:
    """A missing CloudEvents header, a key that is not session/thread, a value that is not a
    JSON object, a repeated header, a tombstone, headers on a checkpoint: each refused, named."""
    if named is None:
        check_record(role, record)
        return
    with pytest.raises(ContractError, match=named):
        check_record(role, record)


@pytest.mark.parametrize(
    ("role", "change"),
    [
        ("alerts", {"surprise": 1}),
        ("alerts", {"source": "qoder"}),
        ("deadLetters", {"data_base64": "AAAA"}),
        ("deadLetters", {"reason": "too_big"}),
        ("checkpoints", {"recent_ids": "evt_01"}),
        ("checkpoints", {"written_at": "yesterday"}),
    ],
)
def test_the_bridges_own_documents_are_closed(role: str, change: dict[str, Any]) -> None:
    """An unknown field, a `qoder` alert without its event, both `data` and `data_base64`, an
    unknown reason, a malformed field: the bridge's documents change only with the document."""
    built = {
        "alerts": alert_record("a", THREAD, "bridge.pump_crashed", "internal_error"),
        "deadLetters": dead_letter_record(
            "d", THREAD, "not_json", b"{", event_id="evt_01", event_type=None, limit_bytes=10_000
        ),
        "checkpoints": checkpoint_record("c", THREAD, "evt_01", None),
    }[role]
    value = {**json.loads(built.value), **change}
    headers = {k: v.decode() for k, v in built.headers}
    with pytest.raises(ContractError):
        check_parts(role, built.key.decode(), headers, value)


# -- the catalogs the document repeats ----------------------------------------------------------


def bridge_alert_types() -> set[str]:
    """Every `bridge.*` alert type the code raises: the first argument of an alerts `send(...)`,
    the third of an `alert_record(...)`."""
    found = set()
    for path in (ROOT / "bridge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            position = {"send": 0, "alert_record": 2}.get(name)
            if position is None or len(node.args) <= position:
                continue
            arg = node.args[position]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("bridge."):
                found.add(str(arg.value))
    return found


def test_alert_types_are_the_ones_the_bridge_raises() -> None:
    """The document's alert types are exactly: `qoder.` + each catalog type that alert_reason
    turns into an alert, and every `bridge.*` type the code raises."""
    documented = set(document()["components"]["schemas"]["AlertType"]["enum"])
    from_events = set()
    for kind in known_event_types():
        paused = {"stop_reason": {"type": "requires_action"}}
        if alert_reason(qoder_event(kind, **paused)) is not None:
            from_events.add("qoder." + kind)
    assert from_events >= {"qoder." + kind for kind in ALERTING_EVENT_TYPES}
    assert documented == from_events | bridge_alert_types()


def simulator_event_types() -> set[str]:
    """The event types the simulator emits: the first argument of its `step(...)`/`Step(...)`."""
    found = set()
    for path in (ROOT / "bridge" / "simulator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                arg = node.args[0]
                if name in {"step", "Step"} and isinstance(arg, ast.Constant):
                    found.add(str(arg.value))
    return found


def test_event_types_the_code_knows_are_in_the_catalog() -> None:
    """What the simulator emits, what raises alerts and the delta frames are all among the
    document's known event types."""
    known = set(known_event_types())
    emitted = simulator_event_types()
    assert len(emitted) > 10, emitted
    assert emitted <= known, emitted - known
    assert set(ALERTING_EVENT_TYPES) | set(DELTA_FRAME_TYPES) <= known
