"""A running bridge is a live member of its consumer group (BRIDGE_GROUP_ID), named by its
client id and host, and leaves the group when it stops: what ``checkpoints reset`` asks."""

from __future__ import annotations

import anyio
import pytest

from bridge.membership import live_members, member_client_id
from bridge.simulator import running_simulator
from tests.bridge_harness import TOKEN, bridge_settings, running_bridge

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
