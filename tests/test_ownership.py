"""Scale-out (issue 10): bridges of one BRIDGE_GROUP_ID share the sessions by shard, each
session owned by exactly one live member; ownership moves when a member stops."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import anyio
import httpx
import pytest

from bridge.config import Settings
from bridge.ownership import balanced_assignment
from bridge.shards import SHARDS, shard_of
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import (
    TOKEN,
    bridge_settings,
    read_topic,
    running_bridge,
    wait_for_delivery,
)

# -- the assignor: sticky and balanced --------------------------------------------------------


def _spread(assignment: dict[str, list[int]]) -> list[int]:
    return sorted(len(v) for v in assignment.values())


def test_every_shard_has_exactly_one_owner_and_the_spread_is_even() -> None:
    """32 shards over 1..8 members, nobody holding anything yet: every shard once, and no
    member more than one shard above another."""
    for members in range(1, 9):
        claims: dict[str, list[int]] = {f"m{i}": [] for i in range(members)}
        assignment = balanced_assignment(range(SHARDS), claims)
        owned = [s for shards in assignment.values() for s in shards]
        assert sorted(owned) == list(range(SHARDS)), members
        spread = _spread(assignment)
        assert spread[-1] - spread[0] <= 1, (members, spread)


def test_a_join_moves_only_what_the_newcomer_needs() -> None:
    """Scenario: three members own 11/11/10 shards; a fourth joins. Only 8 shards move (the
    newcomer's fair share), all of them to the newcomer; the others keep the rest. Round
    robin, aiokafka's default, moved 10-22 in the design's experiment."""
    before = balanced_assignment(range(SHARDS), {"a": [], "b": [], "c": []})
    after = balanced_assignment(range(SHARDS), {**before, "d": []})
    moved = {s for m in "abc" for s in set(before[m]) - set(after[m])}
    assert moved == set(after["d"]) and len(moved) == 8
    for m in "abc":
        assert set(after[m]) <= set(before[m])


def test_a_leaver_s_shards_go_to_the_others_and_nothing_else_moves() -> None:
    before = balanced_assignment(range(SHARDS), {"a": [], "b": [], "c": []})
    after = balanced_assignment(range(SHARDS), {"a": before["a"], "b": before["b"]})
    for m in "ab":
        assert set(before[m]) <= set(after[m])
    assert set(after["a"]) | set(after["b"]) == set(range(SHARDS))
    assert _spread(after) == [16, 16]


def test_a_shard_claimed_by_two_members_goes_to_one() -> None:
    """A zombie back from a pause still claims what it held; the shard has one owner."""
    assignment = balanced_assignment(range(SHARDS), {"zombie": [0, 1, 2], "new": [0, 1, 2, 3]})
    owners = [m for m, shards in assignment.items() for s in shards if s in (0, 1, 2)]
    assert len(owners) == 3
    owned = [s for shards in assignment.values() for s in shards]
    assert sorted(owned) == list(range(SHARDS))


def test_shards_are_kafka_s_default_partition_of_the_session_id() -> None:
    """murmur2, as the Java client places the key: stable across processes and versions
    (Python's hash() is salted per process). Values from the Java client's Utils.murmur2."""
    from aiokafka.partitioner import murmur2  # noqa: PLC0415

    for session in ("sess_a", "sess_01a22ad96e417000ab21cc3e76ebd40a", "x" * 200):
        assert shard_of(session) == (murmur2(session.encode()) & 0x7FFFFFFF) % 32
    assert shard_of("sess_a") == shard_of("sess_a")
    assert len({shard_of(f"sess_{i}") for i in range(2000)}) == SHARDS


# -- real members, real broker -------------------------------------------------------------


def _scenario() -> Scenario:
    sessions = tuple(
        SessionSpec(
            ThreadSpec(events=30, rate=6),
            (ThreadSpec(events=20, rate=6, start_after_s=1),),
            start_after_s=0.3 * i,
        )
        for i in range(12)
    )
    return Scenario(name="two-members", seed=71, heartbeat_interval_s=0.5, sessions=sessions)


async def _status(port: int | None) -> dict[str, Any]:
    if port is None:  # not listening yet
        return {"member": {"shards": None}}
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{port}/status?limit=1")
        return json.loads(answer.content)


@pytest.mark.anyio
@pytest.mark.kafka
async def test_two_members_share_the_sessions_by_shard_and_one_takes_all_when_the_other_stops(
    kafka_bootstrap, kafka_topics
):
    """Scenario: two bridges with the same configuration (only the HTTP port differs) and 12
    sessions starting over 4 s. While both run, their shards (GET /status member.shards) are
    disjoint and cover all 32, and each follows only its own shards' sessions; the first is
    stopped (SIGTERM-like drain) midway and the second takes its shards. A read_committed
    consumer finds every event once, in order, whoever published it."""
    async with running_simulator(_scenario(), token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings) as second:
            async with running_bridge(settings) as first:
                with anyio.fail_after(60):
                    while True:
                        a = (await _status(first.http_port))["member"]["shards"] or []
                        b = (await _status(second.http_port))["member"]["shards"] or []
                        if sorted(a + b) == list(range(SHARDS)) and a and b:
                            break
                        await anyio.sleep(0.3)
                assert not set(a) & set(b)
                await anyio.sleep(2.0)  # both publishing
                followed = {
                    "first": {t.session_id for t in first.status.supervisor.pumps},  # type: ignore[union-attr]
                    "second": {t.session_id for t in second.status.supervisor.pumps},  # type: ignore[union-attr]
                }
                assert all(shard_of(s) in a for s in followed["first"]), followed
                assert all(shard_of(s) in b for s in followed["second"]), followed
            # The first drained and left the group: the second owns everything.
            with anyio.fail_after(30):
                while (await _status(second.http_port))["member"]["shards"] != list(range(SHARDS)):
                    await anyio.sleep(0.3)
            _records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
    print(f"\nshards: first {a}, second {b}; {delivery.summary()}")
    assert (delivery.lost, delivery.duplicated, delivery.misordered) == (0, 0, 0), (
        delivery.summary()
    )
    assert delivery.expected == sum(len(v) for v in delivery.by_key.values())
    # Checkpoints of each session are in its shard's partition, and only there.
    checkpoints = await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
    for record in checkpoints:
        session = record.key.decode().partition("/")[0]
        assert record.partition == shard_of(session), record.key


@pytest.mark.anyio
@pytest.mark.kafka
async def test_a_bridge_the_group_refuses_owns_nothing_and_says_why_it_is_not_ready(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: the broker refuses the bridge its consumer group (no Read ACL on the group).
    Shards come only from the group, so the bridge follows nothing (it cannot know whether
    another member owns the sessions); /readyz is 503 with group_member failing, naming the
    group and the broker's refusal, and nothing reaches the topic."""
    from aiokafka import AIOKafkaConsumer  # noqa: PLC0415
    from aiokafka.errors import GroupAuthorizationFailedError  # noqa: PLC0415

    from bridge import ownership  # noqa: PLC0415

    class GroupDenied(AIOKafkaConsumer):  # type: ignore[misc]
        async def start(self) -> None:
            raise GroupAuthorizationFailedError(self._group_id)

    monkeypatch.setattr(ownership, "AIOKafkaConsumer", GroupDenied)
    async with running_simulator(_scenario(), token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(settings) as bridge:
            with anyio.fail_after(30):
                while "group_member" not in bridge.health.failing_checks():
                    await anyio.sleep(0.2)
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{bridge.http_port}/readyz")
            await anyio.sleep(3.0)  # events are being written by the simulator meanwhile
            status = await _status(bridge.http_port)
    assert ready.status_code == 503
    detail = ready.json()["detail"]["group_member"]
    assert settings.kafka.group_id in detail and "GroupAuthorizationFailed" in detail, detail
    assert status["member"]["shards"] == []
    assert await read_topic(kafka_bootstrap, kafka_topics.events) == []


def test_the_history_is_listed_once_an_interval_by_the_whole_deployment() -> None:
    """Discovery's cost does not multiply by N: a member owning a third of the shards lists
    the whole history every 3 intervals (32/11 for 11 shards), a group of one every interval;
    a member with no shard lists nothing (its discovery waits for a shard)."""
    from bridge.config import ApiSettings  # noqa: PLC0415
    from bridge.supervisor import Supervisor  # noqa: PLC0415

    settings = dataclasses.replace(Settings(), api=ApiSettings(full_scan_interval_s=120.0))
    supervisor = Supervisor(settings, None, None, None, {})  # type: ignore[arg-type]
    assert supervisor._full_scan_interval() == 120.0  # not a member: every interval
    supervisor.own_nothing()
    supervisor._owned.update(range(11))  # type: ignore[union-attr]
    members = [11, 11, 10]
    per_interval = sum(120.0 / (120.0 * SHARDS / n) for n in members)
    assert supervisor._full_scan_interval() == 120.0 * SHARDS / 11
    assert round(per_interval, 6) == 1.0  # the three members: one listing an interval
