"""The per-event shortcuts of the data path keep what they replace: the partition a key goes
to, the bytes an event is published with, a record's size, an event's lag."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner

from bridge.api import QoderApi, RateLimiter
from bridge.publisher import KeyPartitioner, _seconds_since
from bridge.records import (
    Event,
    Rejected,
    ThreadRef,
    alert_record,
    canonical_json,
    checkpoint_record,
    event_record,
)

pytestmark = pytest.mark.anyio

BASE = "http://qoder.test/api/v1/cloud"
THREAD = ThreadRef("sess_01a22a37f07f7004ab3a505789491f4a", "sthr_01a22a37f07f7002aadbb8625121f6f9")


def test_a_key_goes_to_the_partition_kafka_would_choose() -> None:
    """Scenario: consumers and other producers place a thread's key with Kafka's murmur2; the
    bridge's remembered hash must send every key to that same partition, for any count."""
    rng = random.Random(7)
    ours, kafka = KeyPartitioner(max_keys=50), DefaultPartitioner()
    keys = [
        f"sess_{rng.getrandbits(128):032x}/sthr_{rng.getrandbits(128):032x}" for _ in range(300)
    ]
    for count in (1, 3, 6, 7, 64):
        partitions = list(range(count))
        for key in keys * 2:  # the second time from the cache (cleared past 50 keys)
            assert ours(key.encode(), partitions, partitions) == kafka(
                key.encode(), partitions, partitions
            )
    assert ours(None, [0, 1, 2], [2]) == 2  # no key: an available partition, as aiokafka does


def _api(body: bytes) -> QoderApi:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return QoderApi(
        client,
        client,
        BASE,
        lambda: "token",
        RateLimiter(1000),
        stall_timeout_s=5,
        request_timeout_s=5,
        max_event_bytes=1 << 20,
    )


async def _read(body: bytes) -> list[Event | Rejected]:
    return [e async for page in _api(body).thread_events(THREAD, None) for e in page]


async def test_events_from_a_page_keep_the_bytes_the_api_sent() -> None:
    """Scenario: a page whose items are not in the compact form (spaces, escaped non-ASCII,
    a float Python would print otherwise): each event's value is its item's bytes, unchanged."""
    items = [
        b'{"id": "evt_1", "type": "agent.message", "text": "caf\\u00e9 \xf0\x9f\x98\x80"}',
        b'{"type":"agent.thinking","id":"evt_2","cost":1E+2,"x":{"y":[1, 2]}}',
    ]
    body = b'{"data": [' + b" ,\n ".join(items) + b'], "has_more": false}'
    events = await _read(body)
    assert [e.data for e in events] == items
    assert [(e.id, e.type) for e in events if isinstance(e, Event)] == [
        ("evt_1", "agent.message"),
        ("evt_2", "agent.thinking"),
    ]
    assert events[0].fields["text"] == "café 😀"  # type: ignore[union-attr]


async def test_a_page_with_a_bad_item_still_rejects_that_item_alone() -> None:
    """Scenario: one item has bytes that are not UTF-8, another has no id: the page takes the
    careful path, those two are rejected with their reasons and the others are events."""
    body = (
        b'{"data":[{"id":"evt_1","type":"a"},{"id":"evt_2","type":"a","t":"\xff"},'
        b'{"type":"a"},{"id":"evt_4","type":"a"}],"has_more":false}'
    )
    got = await _read(body)
    assert [(type(e).__name__, e.id) for e in got] == [
        ("Event", "evt_1"),
        ("Rejected", "evt_2"),
        ("Rejected", None),
        ("Event", "evt_4"),
    ]
    assert [e.reason for e in got if isinstance(e, Rejected)] == ["invalid_utf8", "missing_id"]


@pytest.mark.parametrize("stamp", ["2026-11-30T02:10:38.847112349Z", None])
def test_a_record_counts_its_size_as_kafka_sees_it(stamp: str | None) -> None:
    """Scenario: the in-flight budget and the topic limit read a record's size; the size the
    builder passes must be what key, value and headers add up to."""
    fields = {"id": "evt_1", "type": "agent.message"} | ({"processed_at": stamp} if stamp else {})
    data = json.dumps(fields).encode()
    record = event_record("t", THREAD, Event("evt_1", "agent.message", data, fields))
    counted = len(record.key) + len(record.value)
    counted += sum(len(k) + len(v) for k, v in record.headers)
    assert record.size == counted
    assert ("ce_time" in dict(record.headers)) == (stamp is not None)


_SECOND = datetime(2026, 11, 30, 2, 10, 38, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("stamp", "epoch"),
    [
        ("2026-11-30T02:10:38.847112349Z", _SECOND + 0.847112349),
        ("2026-11-30T02:10:38.5Z", _SECOND + 0.5),
        ("2026-11-30T02:10:38Z", _SECOND),
        ("2026-11-30T03:10:38.25+01:00", _SECOND + 0.25),
    ],
)
def test_the_lag_of_an_event_is_read_from_its_timestamp(stamp: str, epoch: float) -> None:
    """Scenario: the end-to-end lag histogram reads processed_at; the fast path for the API's
    form agrees with the timestamp to the microsecond."""
    now = time.time()
    assert _seconds_since(stamp, now) == pytest.approx(now - epoch, abs=1e-6)
    assert _seconds_since("not a time", now) is None


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-30T02:10:38.\u00b2Z",  # a superscript two: str.isdigit() says yes
        "2026-11-30T02:10:38.\u0661\u0662\u0663\u0664\u0665\u0666\u0667Z",  # Arabic-Indic digits
        "2026-11-30T02:10:38.\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2+00:00",
        "2026-13-30T02:10:38.1Z",
        "\x00" * 25,
    ],
)
def test_a_timestamp_the_bridge_cannot_read_has_no_lag(stamp: str) -> None:
    """Scenario: processed_at is any string the API may send: the lag is None, never an
    exception (it is read after the batch committed)."""
    assert _seconds_since(stamp, time.time()) is None


async def test_an_item_nested_past_the_decoders_depth_is_rejected_alone() -> None:
    """Scenario: one item holds a value 1,500 arrays deep (valid JSON, past every decoder's
    depth) between two good ones: it alone is a dead letter (``too_deep``), the others are
    events with their bytes, and the page's cursor is read."""
    deep = b"[" * 1500 + b"]" * 1500
    items = [b'{"id":"evt_1","type":"a","n":1.0E-5}', b'{"id":"evt_2","d":' + deep + b"}"]
    items.append(b'{"id":"evt_3","type":"a","s":"a,]}\\"["}')
    body = b'{"data":[' + b",".join(items) + b'],"has_more":false}'
    got = await _read(body)
    assert [(type(e).__name__, e.id) for e in got] == [
        ("Event", "evt_1"),
        ("Rejected", None),
        ("Event", "evt_3"),
    ]
    assert [e.data for e in got] == items
    assert [e.reason for e in got if isinstance(e, Rejected)] == ["too_deep"]


async def test_events_keep_their_bytes_beside_an_item_without_an_id() -> None:
    """Scenario: an item without an id sends the page down the careful path: the events
    beside it keep the API's bytes (1.0E-5, a 20-digit decimal), not a re-serialisation."""
    good = b'{"id":"evt_1","type":"a","u":{"c":1.0E-5,"x":12345678901234567890.123}}'
    body = b'{"data":[' + good + b',{"type":"a"}],"has_more":false}'
    got = await _read(body)
    assert [e.data for e in got] == [good, b'{"type":"a"}']
    assert [e.reason for e in got if isinstance(e, Rejected)] == ["missing_id"]


async def test_a_number_past_a_float_is_published_as_the_api_wrote_it() -> None:
    """Scenario: an item carries 1E400 (valid JSON, past a float): the fast decoder refuses it,
    the general one reads inf; the event's value is still the API's bytes, never Infinity."""
    big = b'{"id":"evt_1","type":"a","x_big":1E400}'
    body = b'{"data":[{"id":"evt_0","type":"a"},' + big + b'],"has_more":false}'
    got = await _read(body)
    assert [(type(e).__name__, e.data) for e in got] == [
        ("Event", b'{"id":"evt_0","type":"a"}'),
        ("Event", big),
    ]


async def test_a_lone_surrogate_escape_is_an_event_on_a_page_and_in_its_alert() -> None:
    """Scenario: a JavaScript server writes half an emoji as the ASCII escape ``\\ud83d`` in a
    session.error event (valid UTF-8 bytes): it is an event with its bytes, as from a stream,
    and its alert copies it without failing; the alert is JSON with the same value."""
    item = b'{"id":"evt_1","type":"session.error","processed_at":"t\\ud83d","m":"\\ud83d"}'
    got = await _read(b'{"data":[' + item + b'],"has_more":false}')
    assert [(type(e).__name__, e.data) for e in got] == [("Event", item)]
    event = got[0]
    assert isinstance(event, Event)
    record = alert_record("alerts", THREAD, "qoder.session.error", "error", event=event)
    doc = json.loads(record.value.decode("utf-8"))
    assert doc["event"] == json.loads(item)
    assert doc["time"] == "t\ud83d"


def test_a_checkpoint_is_canonical_json_and_a_lone_surrogate_is_escaped() -> None:
    """Checkpoints are encoded by msgspec (eight times faster than json at a checkpoint an
    event): the same bytes as canonical_json, and an id with a lone surrogate (the API's
    ``\\ud83d`` decoded) is written escaped, not refused."""
    thread = ThreadRef("sess_é", "sthr_✓")
    record = checkpoint_record(
        "ckpt", thread, "evt_\u2028", None, ["evt_1", "evt_\u2028"], 2, written_at="T"
    )
    doc = {
        "last_event_id": "evt_\u2028",
        "session_id": "sess_é",
        "thread_id": "sthr_✓",
        "drained_updated_at": None,
        "recent_ids": ["evt_1", "evt_\u2028"],
        "idless_after": 2,
        "written_at": "T",
    }
    assert record.value == canonical_json(doc)
    odd = checkpoint_record("ckpt", thread, "evt_\ud83d", None, [], 0, written_at="T")
    assert json.loads(odd.value)["last_event_id"] == "evt_\ud83d"
    assert b"\\ud83d" in odd.value
