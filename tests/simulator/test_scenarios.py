"""Scenarios: loading from files and names, and the realism of what they generate."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from bridge.errors import ConfigError
from bridge.simulator import (
    NAMED,
    Faults,
    Scenario,
    SessionSpec,
    ThreadSpec,
    load_scenario,
    running_simulator,
)
from bridge.simulator.clock import decode_ms
from tests.simulator.helpers import client

pytestmark = pytest.mark.anyio


def test_scenario_files_json_and_toml(tmp_path: Path) -> None:
    """Scenario files: the same scenario from JSON and TOML, with count shorthands."""
    toml = tmp_path / "fanout.toml"
    toml.write_text(
        'seed = 9\nfresh_stream = "replay"\nheartbeat = "event"\n'
        "[faults]\ndrop_rate = 0.5\ndrop_after_frames = [2, 5]\n"
        "[[sessions]]\ncount = 2\nchildren = 30\n"
        "[sessions.coordinator]\nevents = 20\nrate = 0\n"
    )
    data = {
        "seed": 9,
        "fresh_stream": "replay",
        "heartbeat": "event",
        "faults": {"drop_rate": 0.5, "drop_after_frames": [2, 5]},
        "sessions": [{"count": 2, "children": 30, "coordinator": {"events": 20, "rate": 0}}],
    }
    (tmp_path / "fanout.json").write_text(json.dumps(data))
    from_toml = load_scenario(toml)
    assert from_toml == load_scenario(str(tmp_path / "fanout.json"))
    assert from_toml.name == "fanout" and len(from_toml.sessions) == 2
    assert from_toml.sessions[0].children == (ThreadSpec(),) * 30
    assert from_toml.faults == Faults(drop_rate=0.5, drop_after_frames=(2, 5))
    assert from_toml.sessions[1].coordinator == ThreadSpec(events=20, rate=0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sed": 1}, "unknown key 'sed'"),
        ({"fresh_stream": "later"}, "'later' is not one of replay, tail"),
        ({"faults": {"drop_rate": 2}}, "faults.drop_rate must be within 0..1"),
        ({"sessions": [{"children": {"count": 2, "rate": "fast"}}]}, "expected float"),
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be > 0"),
        ({"pagination": "pages"}, "'pages' is not one of next_page, after_id"),
        ({"faults": {"replay_max": 0}}, "faults.replay_max must be >= 1, got 0"),
        ({"faults": {"invalid_utf8_rate": 1.5}}, "faults.invalid_utf8_rate must be within 0..1"),
        ({"faults": {"malformed_item_rate": -1}}, "faults.malformed_item_rate must be within"),
        ({"connection_cap": -1}, "connection_cap must be >= 0 or unset, got -1"),
        ({"connection_cap": 1.5}, "connection_cap: expected int, got 1.5"),
        ({"connection_cap_answer": 500}, "500 is not one of 429, 503, reset"),
    ],
)
def test_bad_scenarios_name_the_problem(data: dict[str, Any], message: str) -> None:
    """Scenario files with mistakes: ConfigError naming the key and what it accepts."""
    with pytest.raises(ConfigError, match=message):
        Scenario.from_dict(data)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Scenario(pagination="pages"), "pagination must be one of next_page, after_id"),
        (lambda: Scenario(stream_query="forward"), "stream_query must be one of lenient, strict"),
        (lambda: Scenario(connection_cap_answer=429), "connection_cap_answer must be one of"),
    ],
)
def test_bad_knobs_built_in_python_name_the_problem(build: Any, message: str) -> None:
    """Scenarios built in Python with a value out of range: the same ConfigError as from a
    file, raised when the value is made."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_example_scenario_file_shows_every_knob() -> None:
    """deploy/simulator/example.toml: loads with Scenario.from_file, names every top-level knob
    and every fault (commented out where the default is unset, as TOML has no null), and
    holds the defaults, so it documents them: apart from its sessions it is Scenario()."""
    path = Path(__file__).parents[2] / "deploy" / "simulator" / "example.toml"
    scenario = Scenario.from_file(path)
    text = path.read_text(encoding="utf-8")
    for spec in (Scenario, Faults, SessionSpec, ThreadSpec):
        for f in dataclasses.fields(spec):
            shown = rf"^(# )?{f.name} = |^\[\[?(sessions\.)?{f.name}\]\]?"
            assert re.search(shown, text, re.MULTILINE), f"{spec.__name__}.{f.name}"
    assert dataclasses.replace(scenario, name="custom", sessions=Scenario().sessions) == Scenario()
    first, second = scenario.sessions
    assert first.coordinator == ThreadSpec() and first.title == "Refactor the config loader"
    kids = (ThreadSpec(events=15, start_after_s=0.5, final_status="archived"),)
    assert first.children == kids + (ThreadSpec(events=10, start_after_s=1.0),) * 3
    assert second.children == (ThreadSpec(),) * 2 and second.archive


def test_named_scenarios() -> None:
    """Named scenarios: every built-in loads by name; an unknown name lists them."""
    assert {"demo", "default", "tiny", "many-threads", "legacy", "chaos", "bench"} <= set(NAMED)
    assert "adversarial" in NAMED
    assert load_scenario("demo").repeat_every_s
    with pytest.raises(ConfigError, match="demo"):
        load_scenario("nope")


async def test_adversarial_scenario_combines_its_knobs() -> None:
    """Scenario "adversarial" (generated at once here; live its events come over about 7 s):
    two sessions of four threads and two short ones archived once done; lists answer the
    older envelope and refuse page; streams refuse any query parameter; a few events carry
    invalid UTF-8 and a few are followed by an item without an id."""
    scenario = NAMED["adversarial"]
    assert (scenario.pagination, scenario.stream_query, scenario.fresh_stream) == (
        "after_id",
        "strict",
        "tail",
    )
    faults = scenario.faults
    assert faults.replay_rate >= 0.5 and faults.replay_max == 3 and 0 < faults.drop_rate < 0.5
    assert [len(s.children) + 1 for s in scenario.sessions] == [4, 4, 2, 2]
    assert [(s.archive, s.start_after_s > 0) for s in scenario.sessions] == [
        (False, False),
        (False, False),
        (True, True),
        (True, True),
    ]
    with anyio.fail_after(20):
        instant = dataclasses.replace(scenario, instant=True)
        async with running_simulator(instant) as sim, client(sim) as c:
            listed = (await c.get("/sessions")).json()
            assert list(listed) == ["data", "first_id", "last_id", "has_more"]
            assert [s["id"] for s in listed["data"]] == sim.session_ids()[1::-1]
            assert (await c.get("/sessions", params={"page": "x"})).status_code == 400
            session, thread = sim.all_threads()[0]
            r = await c.get(f"/sessions/{session}/threads/{thread}/stream?after_id=")
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
            threads = sim.all_threads()
            events = [e for s, t in threads for e in sim.thread_log(s, t)]
            items = [i for s, t in threads for i in sim.thread_items(s, t)]
    assert 300 <= len(events) <= 400
    assert 0 < len(items) - len(events) < len(events) // 10
    not_utf8 = [e for e in events if e.decode("utf-8", "replace").encode() != e]
    assert 0 < len(not_utf8) < len(events) // 10


def _check_thread(raw: list[bytes], thread_id: str) -> list[dict[str, Any]]:
    """What every thread log must satisfy, whatever the scenario."""
    events = [json.loads(e) for e in raw]
    seen: dict[str, dict[str, Any]] = {}
    for e, b in zip(events, raw, strict=True):
        assert json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() == b
        assert e["id"].startswith("evt_") and len(e["id"]) == 36
        assert e["id"][16] == "7" and e["id"][20] in "89ab"  # UUIDv7 version and variant
        assert e["session_thread_id"] == thread_id
        ms = decode_ms(e["id"])
        assert e["processed_at"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
        )
        assert e["processed_at"][20:23] == f"{ms % 1000:03d}" and len(e["processed_at"]) == 30
        if e["type"] == "agent.tool_result" and e["tool_use_id"] in seen:
            assert seen[e["tool_use_id"]]["type"] == "agent.tool_use"
        elif e["type"] == "agent.tool_result":
            assert e["content"]  # a delegation's result: its tool use is in the coordinator's log
        if e["type"] == "span.model_request_end":
            assert seen[e["model_request_start_id"]]["type"] == "span.model_request_start"
        if e.get("stop_reason", {}).get("type") == "requires_action":
            (pending,) = e["stop_reason"]["event_ids"]
            assert seen[pending]["evaluated_permission"] == "ask"
        seen[e["id"]] = e
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)  # time-ordered
    return events


async def test_generated_events_are_realistic() -> None:
    """Scenario "default" (live, two sessions, reruns, an archived child): ids UUIDv7-shaped
    and time-ordered with matching processed_at; tool results, span ends and
    requires_action point at their events; children framed by lifecycle events and
    spawned by the coordinator's tool use; statuses final once idle."""
    with anyio.fail_after(30):
        async with running_simulator("default") as sim:
            await sim.wait_idle()
            types: Counter[str] = Counter()
            for session in sim.session_ids():
                threads = [t for s, t in sim.all_threads() if s == session]
                coordinator = _check_thread(sim.thread_log(session, threads[0]), threads[0])
                types.update(e["type"] for e in coordinator)
                assert coordinator[0]["type"] == "user.message"
                statuses = [
                    e["type"] for e in coordinator if e["type"].startswith("session.status")
                ]
                assert statuses[-1] == "session.status_idle"  # a rerun child may report later
                delegations = {e["id"]: e for e in coordinator if e.get("name") == "delegate"}
                for thread in threads[1:]:
                    child = _check_thread(sim.thread_log(session, thread), thread)
                    types.update(e["type"] for e in child)
                    assert [e["type"] for e in child[:3]] == [
                        "session.thread_created",
                        "session.thread_status_running",
                        "agent.thread_message_received",
                    ]
                    assert child[0]["created_by_tool_use_id"] in delegations
                    assert child[0]["parent_thread_id"] == threads[0]
                    assert child[-1]["type"] == "session.thread_status_idle"
                    runs = sum(e["type"] == "session.thread_status_running" for e in child)
                    status = sim.thread_status(session, thread)
                    assert status in ("idle", "archived") and runs in (1, 2)
                results = {
                    e["tool_use_id"] for e in coordinator if e["type"] == "agent.tool_result"
                }
                assert set(delegations) <= results
    for kind in (
        "span.model_request_start",
        "agent.thinking",
        "agent.tool_use",
        "agent.message",
        "agent.thread_message_sent",
        "session.status_running",
    ):
        assert types[kind], kind


async def test_unicode_extra_fields_and_terminated_sessions() -> None:
    """Scenario: every text unicode or carrying line separators, every event with unknown
    extra fields; a terminated session ends with session.status_terminated."""
    scenario = Scenario(
        seed=12,
        instant=True,
        unicode_rate=1.0,
        line_separator_rate=0.3,
        extra_field_rate=1.0,
        sessions=(SessionSpec(ThreadSpec(events=30, rate=0), terminate=True),),
    )
    with anyio.fail_after(20):
        async with running_simulator(scenario) as sim:
            session, thread = sim.all_threads()[0]
            raw = sim.thread_log(session, thread)
            events = _check_thread(raw, thread)
            assert all("x_trace" in e for e in events)
            assert any("\u2028".encode() in e for e in raw)
            assert any(ord(ch) > 0xFFFF for e in raw for ch in e.decode())  # emoji
            assert events[-1]["type"] == "session.status_terminated"
            assert sim.thread_status(session, thread) == "terminated"


async def test_thousands_of_threads_and_reruns() -> None:
    """Scenario: 2,000 threads over 40 sessions (49 children each), generated instantly."""
    scenario = Scenario(
        seed=13,
        instant=True,
        sessions=(SessionSpec(ThreadSpec(events=6, rate=0), (ThreadSpec(events=6, rate=0),) * 49),)
        * 40,
    )
    with anyio.fail_after(30):
        started = time.monotonic()
        async with running_simulator(scenario) as sim:
            assert len(sim.all_threads()) == 2000 and len(sim.session_ids()) == 40
            await sim.wait_idle()
        assert time.monotonic() - started < 10


async def test_live_timing_start_delays_and_repeat() -> None:
    """Scenario: a child appearing 0.3 s after its session, and the whole set repeated
    every 0.5 s with new ids; wait_idle waits for the last event of a finite scenario."""
    late = SessionSpec(
        ThreadSpec(events=6, rate=100), (ThreadSpec(events=6, rate=100, start_after_s=0.3),)
    )
    with anyio.fail_after(20):
        async with running_simulator(Scenario(seed=14, sessions=(late,))) as sim:
            assert len(sim.all_threads()) == 1
            started = time.monotonic()
            await sim.wait_idle()
            assert time.monotonic() - started >= 0.25 and len(sim.all_threads()) == 2
            assert {sim.thread_status(s, t) for s, t in sim.all_threads()} == {"idle"}
        repeated = Scenario(seed=15, sessions=(late,), repeat_every_s=0.5)
        async with running_simulator(repeated) as sim:
            await sim.wait_until(lambda: len(sim.session_ids()) >= 3)
            first, second, third = sim.session_ids()[:3]
            assert len({first, second, third}) == 3


async def test_same_seed_same_content() -> None:
    """Scenario "tiny" twice: the same types and texts in the same order (ids and times
    differ: they come from the clock)."""

    def strip(raw: list[bytes]) -> list[bytes]:
        clock = rb'(evt|sthr|sess|agent)_[0-9a-f]{32}|"processed_at":"[^"]+"'
        return [re.sub(clock, b"~", e) for e in raw]

    runs = []
    for _ in range(2):
        async with running_simulator("tiny") as sim:
            runs.append([strip(sim.thread_log(s, t)) for s, t in sim.all_threads()])
    assert runs[0] == runs[1]
