"""A running bridge is a live member of its consumer group (BRIDGE_GROUP_ID), named by its
client id and host, and leaves the group when it stops: what ``checkpoints reset`` asks. Only
the members on the asker's checkpoint topic count; a membership that fails is a warning."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import GroupAuthorizationFailedError
from structlog.testing import capture_logs

from bridge import ownership
from bridge.membership import live_members, member_client_id
from bridge.ownership import ShardAssignor, keep_ownership
from bridge.simulator import running_simulator
from tests.bridge_harness import TOKEN, bridge_settings, running_bridge
from tests.kafka_broker import KafkaTopics

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def test_a_running_bridge_is_a_live_member_until_it_stops(kafka_bootstrap, kafka_topics):
    """Scenario: a bridge starts with its own group id. The group lists it (its client id
    carries BRIDGE_TRANSACTIONAL_ID, the broker adds its host) within seconds; once it has
    drained and stopped, the group has no live member at once (it left; no session timeout)."""
    group = f"{kafka_topics.transactional_id}.group"
    async with running_simulator("tiny", token=TOKEN) as sim:
        settings = bridge_settings(
            sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_GROUP_ID=group
        )
        assert settings.kafka.group_id == group
        assert await live_members(settings.kafka) == []
        async with running_bridge(settings):
            with anyio.fail_after(30):
                while not (members := await live_members(settings.kafka)):
                    await anyio.sleep(0.2)
            assert [m.client_id for m in members] == [member_client_id(settings)]
            assert settings.delivery.transactional_id in members[0].client_id
            assert members[0].client_host.strip("/") == "127.0.0.1"
        with anyio.fail_after(5):
            # Left the group on the way out: no wait for the 10 s session timeout.
            while await live_members(settings.kafka):
                await anyio.sleep(0.2)


async def test_only_members_on_this_checkpoint_topic_are_listed(kafka_bootstrap, kafka_topics):
    """Scenario: two deployments share a Kafka cluster and a group id, each with its own
    checkpoint topic. Asked for one deployment, the group lists only its members (their
    metadata names the topic they subscribed to), never the other deployment's: with only the
    other one running, nobody; once ours joins, ours alone."""
    group = f"{kafka_topics.transactional_id}.group"
    other = KafkaTopics.unique("other-deployment")
    await kafka_topics.create(kafka_bootstrap)
    await other.create(kafka_bootstrap)
    url = "http://127.0.0.1:9"  # never asked: membership needs Kafka only
    ours = bridge_settings(url, kafka_bootstrap, kafka_topics, BRIDGE_GROUP_ID=group)
    theirs = bridge_settings(url, kafka_bootstrap, other, BRIDGE_GROUP_ID=group)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_member, theirs)
            while not await live_members(theirs.kafka):
                await anyio.sleep(0.2)
            assert await live_members(ours.kafka) == []
            tg.start_soon(_member, ours)
            while not (members := await live_members(ours.kafka)):
                await anyio.sleep(0.2)
            assert [m.client_id for m in members] == [member_client_id(ours)]
            assert members[0].topics == (ours.kafka.checkpoint_topic,)
            listed = await live_members(theirs.kafka)
            assert [m.client_id for m in listed] == [member_client_id(theirs)]
            tg.cancel_scope.cancel()


async def _member(settings: Any) -> None:
    """A bridge's membership alone: shards assigned, nothing done with them."""
    await keep_ownership(settings, ShardAssignor(), lambda assignment: None)


class _GroupDenied(AIOKafkaConsumer):  # type: ignore[misc]
    """The membership consumer where the broker does not grant Read on the group."""

    tries = 0

    async def start(self) -> None:
        type(self).tries += 1
        raise GroupAuthorizationFailedError(self._group_id)


async def test_a_failed_membership_is_a_warning_that_says_what_it_costs(kafka_topics, monkeypatch):
    """Scenario: the bridge cannot join its group (no Read ACL on it). It warns
    (bridge.membership.failed, naming the group and the cause) and says what it costs: the
    shards it holds stay held, and another member may take them (a bridge that never joined
    holds none: test_ownership.py). The retries that follow within the outage are not
    warnings."""
    monkeypatch.setattr(ownership, "AIOKafkaConsumer", _GroupDenied)
    settings = bridge_settings("http://127.0.0.1:9", "127.0.0.1:9", kafka_topics)
    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_member, settings)
            while _GroupDenied.tries < 3:  # the first try, and two retries after backoff
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "bridge.membership.failed"
    assert warning["group"] == settings.kafka.group_id
    assert "GroupAuthorizationFailedError" in warning["error"]
    assert "another member may take them" in warning["consequence"]
