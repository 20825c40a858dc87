"""Adversarial review of issue 11's per-core changes on the data path: the remembered murmur2
partition (57287aa), page items kept as the API's bytes with msgspec.Raw (76fbc67), the
per-event bookkeeping (90541f1: record sizes, metric children, the lag's timestamp parse, acks
awaited in turn), zstd by default and ``KAFKA_LINGER_MS=0`` (25a4d23).

Each test plays one server behaviour through the simulator (its events' bytes rewritten to
what a real server may send: valid JSON, only unusual), a whole bridge and a real broker, and
checks what a user checks: what is in the topics, byte for byte. Each failed on the code the
review read, for the reason its marker names.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from bridge.simulator import state as sim_state
from tests.bridge_harness import (
    TOKEN,
    bridge_settings,
    compare,
    read_json,
    running_bridge,
    simulator_logs,
    wait_for_delivery,
)
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

README = Path(__file__).resolve().parents[1] / "README.md"

#: (event object, its position among its thread's events) -> other bytes for it, or None.
Change = Callable[[dict[str, Any], int], bytes | None]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _with_field(obj: dict[str, Any], name: str, raw_value: bytes) -> bytes:
    """The event's bytes with one more field, its value written exactly as ``raw_value``."""
    return _canonical(obj)[:-1] + b',"' + name.encode() + b'":' + raw_value + b"}"


def _serve_as(monkeypatch: pytest.MonkeyPatch, change: Change) -> list[bytes]:
    """The simulator serves the bytes ``change`` returns for an event (on its pages and on its
    stream alike) instead of its canonical JSON. Returns the bytes it served that way."""
    original = sim_state.Event.make
    positions: Counter[str] = Counter()
    served: list[bytes] = []

    def make(obj: dict[str, Any], raw: bytes | None = None) -> sim_state.Event:
        thread = str(obj.get("session_thread_id", ""))
        position = positions[thread]
        positions[thread] += 1
        if raw is None:
            new = change(obj, position)
            if new is not None:
                raw = new
                served.append(new)
        return original(obj, raw)

    monkeypatch.setattr(sim_state.Event, "make", staticmethod(make))
    return served


def _once(change: Change) -> Change:
    """``change`` for the first agent event at position 3 or later of a thread, and no other."""
    done: list[bool] = []

    def pick(obj: dict[str, Any], position: int) -> bytes | None:
        if done or position < 3 or not str(obj.get("type", "")).startswith("agent."):
            return None
        done.append(True)
        return change(obj, position)

    return pick


def _scenario(seed: int, *, instant: bool = True, **faults: float) -> Scenario:
    """Two threads of 30 events; ``instant``: all history (read through the JSON list)."""
    thread = ThreadSpec(events=30, rate=0 if instant else 40)
    return Scenario(
        name="review-11",
        seed=seed,
        instant=instant,
        heartbeat_interval_s=0.5,
        sessions=(SessionSpec(thread, (thread,)),),
        faults=Faults(**faults),  # type: ignore[arg-type]
    )


# -- finding 1: the lag's fast timestamp parse -----------------------------------------------


async def test_an_event_with_an_odd_processed_at_fraction_does_not_stop_the_bridge(
    monkeypatch, kafka_bootstrap, kafka_topics
):
    """Scenario: one event's ``processed_at`` is ``2026-11-30T02:10:38.²Z`` (a superscript
    two where the fraction's digit goes: a string the bridge only reads for ``ce_time`` and the
    lag histogram). Before 90541f1 an unparseable time just had no lag (None); now
    ``_seconds_since`` sees ``"²".isdigit()`` true and ``float("0.²")`` raises in the
    publisher's bookkeeping after the batch committed: the publisher task dies and the bridge
    with it.

    Expected: the event is published with that ``ce_time`` (the value as the API sent it),
    every other event too, once, and the bridge drains cleanly (exit 0)."""
    odd = "2026-11-30T02:10:38.\u00b2Z"
    served = _serve_as(monkeypatch, _once(lambda obj, _n: _canonical({**obj, "processed_at": odd})))
    scenario = _scenario(1101)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):  # asserts a clean drain (exit 0)
            with anyio.fail_after(60):
                await sim.wait_idle()
            records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
    assert len(served) == 1
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    times = [dict(r.headers).get("ce_time") for r in records if r.value == served[0]]
    assert times == [odd.encode()]


# -- finding 2: deep nesting ------------------------------------------------------------------


async def test_a_deeply_nested_event_does_not_stop_its_thread(
    monkeypatch, kafka_bootstrap, kafka_topics
):
    """Scenario: one tool event carries a valid JSON value nested 1,500 arrays deep (a model's
    tool input can be anything; RFC 8259 sets no depth). The fast path's msgspec decode raises
    RecursionError (not a DecodeError), so does the general path's ``json.loads`` (not a
    ValueError) and the stream's: nothing turns it into a dead letter, the pump crashes, waits
    ``BRIDGE_BACKOFF_MAX_S`` and reads the same page again, for ever. The whole page fails,
    so the events before it on that page are lost with it (all 33 of the thread here).

    Expected: the thread goes on. That event is either published (its bytes unchanged) or
    dead-lettered once; every other event of both threads is in the topic once, in order."""
    deep = b"[" * 1500 + b"]" * 1500
    served = _serve_as(monkeypatch, _once(lambda obj, _n: _with_field(obj, "x_deep", deep)))
    scenario = _scenario(1102)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            assert len(served) == 1
            others = {
                key: [raw for raw in raws if raw != served[0]]
                for key, raws in simulator_logs(sim).items()
            }
            with anyio.move_on_after(30):
                while True:
                    records = await read_topic(kafka_bootstrap, kafka_topics.events)
                    delivery = compare([r for r in records if r.value != served[0]], others)
                    if delivery.lost == 0:
                        break
                    await anyio.sleep(0.5)
            dead = await read_json(kafka_bootstrap, kafka_topics.dlq)
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    published = sum(r.value == served[0] for r in records)
    assert published + len(dead) == 1, (published, dead)


# -- finding 3: a page that falls back rewrites its good events -------------------------------


async def test_events_keep_their_bytes_on_a_page_with_a_malformed_neighbour(
    monkeypatch, kafka_bootstrap, kafka_topics
):
    """Scenario: the API writes numbers as a Java or Go server does (``1.0E-5``) and tool data
    carries a 20-digit decimal; some threads' pages also hold an item without an id (dead-
    lettered, as before). The fast path refuses the whole page for that one item, and the
    general path writes every other event of the page again: ``1.0E-5`` becomes ``1e-05`` and
    ``12345678901234567890.123`` becomes ``1.2345678901234567e+19`` (another value). The same
    event read through a page without a bad neighbour, or the stream, keeps its bytes, so what
    a consumer gets depends on where page boundaries fell.

    Expected (CONTRACT: the value is the event JSON object as the API sent it): every event's
    value is the API's bytes, whatever its neighbours on the page."""
    usage = b'{"total_credits":1.0E-5,"exact":12345678901234567890.123}'

    def with_usage(obj: dict[str, Any], _n: int) -> bytes | None:
        return _with_field(obj, "x_usage", usage) if obj["type"].startswith("agent.") else None

    served = _serve_as(monkeypatch, with_usage)
    scenario = _scenario(1103, malformed_item_rate=0.15)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
            dead = await read_json(kafka_bootstrap, kafka_topics.dlq)
    assert served and dead  # the scenario did what it says: odd numbers, bad neighbours
    rewritten = [r.value for r in records if b"1e-05" in r.value]
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        f"{delivery.summary()}; {len(rewritten)} events rewritten, e.g. {rewritten[:1]}"
    )


async def test_a_number_past_the_float_range_is_published_as_sent(
    monkeypatch, kafka_bootstrap, kafka_topics
):
    """Scenario: one event carries ``"x_big":1E400`` (valid JSON: RFC 8259 sets no range; a
    stream frame with it passes through unchanged). On a page msgspec refuses it ("Number out
    of range"), the page takes the general path, ``json.loads`` reads ``inf`` and
    ``canonical_json`` writes ``Infinity``: the record (content-type application/json) is not
    JSON any more, and a strict consumer cannot parse it.

    Expected: the value is the API's bytes, ``1E400`` included."""
    served = _serve_as(monkeypatch, _once(lambda obj, _n: _with_field(obj, "x_big", b"1E400")))
    scenario = _scenario(1104)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
    assert len(served) == 1
    not_json = [r.value for r in records if b"Infinity" in r.value]
    assert not not_json, not_json
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


# -- finding 4: a lone surrogate escape: an event on the stream, a dead letter on a page ------


async def test_a_lone_surrogate_escape_is_an_event_on_a_page_as_on_the_stream(
    monkeypatch, kafka_bootstrap, kafka_topics
):
    """Scenario: a JavaScript server cuts a text in the middle of an emoji and
    ``JSON.stringify`` writes the lone half as the escape ``\\ud83d`` (pure ASCII, valid UTF-8
    bytes, valid JSON by RFC 8259's grammar). From a stream frame the bridge publishes the
    event as it is (``json.loads`` accepts the escape). From a page msgspec refuses it, the
    general path decodes it, cannot encode the surrogate again and dead-letters the event as
    ``invalid_utf8`` ("the event is not valid UTF-8", which its bytes are): the same event is in
    the events topic or in the DLQ depending on how it was read.

    Expected: the event is published with its bytes, as from the stream; nothing in the DLQ."""
    cut = b'"half an emoji \\ud83d"'
    served = _serve_as(monkeypatch, _once(lambda obj, _n: _with_field(obj, "x_note", cut)))
    scenario = _scenario(1105)
    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings):
            with anyio.fail_after(60):
                await sim.wait_idle()
            records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=30
            )
            dead = await read_json(kafka_bootstrap, kafka_topics.dlq)
    assert len(served) == 1
    assert [(d["reason"], d["event_id"]) for d in dead] == []
    assert sum(r.value == served[0] for r in records) == 1
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )


# -- finding 5: zstd by default, and the consumers ------------------------------------------


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_the_readme_tells_consumers_the_records_are_zstd_compressed() -> None:
    """Scenario: a team upgrades the bridge; its records were gzip, they are zstd now (KAFKA_
    COMPRESSION's default changed with issue 11). A consumer whose client cannot read zstd
    (Kafka clients before 2.1, kafka-python or aiokafka without a zstd library, a librdkafka
    built without it) fails on the first batch, and a broker before 2.1 refuses the produce.
    README's consumer-facing sections say consumers may be "any".

    Expected: the sections a consumer reads (Kafka records, Delivery guarantees) name the
    codec and how to choose another (``KAFKA_COMPRESSION=gzip`` or ``none``)."""
    consumer_facing = _section("Kafka records") + _section("Delivery guarantees")
    assert re.search(r"zstd", consumer_facing), "no word of the codec where consumers read"
    assert "KAFKA_COMPRESSION" in consumer_facing
