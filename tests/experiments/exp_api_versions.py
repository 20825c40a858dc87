"""Which protocol versions aiokafka speaks to this broker for the group and transaction APIs.

    .venv/bin/python -m tests.experiments.exp_api_versions

Prints, per API: the broker's range and the version aiokafka's request class picks from it (the
highest it knows inside the range). Answers: can aiokafka 0.14 do static membership (JoinGroup
v5+ carries group.instance.id; LeaveGroup v3+ is needed for a static member to leave), and does
the broker offer KIP-848's ConsumerGroupHeartbeat (API 68), which aiokafka has no class for.
"""

from __future__ import annotations

import anyio
from aiokafka import AIOKafkaClient
from aiokafka.protocol import group, produce, transaction

from tests.experiments.exp_common import bootstrap, show

NAMES = {
    0: "Produce",
    11: "JoinGroup",
    12: "Heartbeat",
    13: "LeaveGroup",
    14: "SyncGroup",
    22: "InitProducerId",
    24: "AddPartitionsToTxn",
    25: "AddOffsetsToTxn",
    26: "EndTxn",
    28: "TxnOffsetCommit",
    68: "ConsumerGroupHeartbeat (KIP-848)",
}
CLASSES = {
    0: produce.ProduceRequest,
    11: group.JoinGroupRequest,
    12: group.HeartbeatRequest,
    13: group.LeaveGroupRequest,
    14: group.SyncGroupRequest,
    22: transaction.InitProducerIdRequest,
    24: transaction.AddPartitionsToTxnRequest,
    25: transaction.AddOffsetsToTxnRequest,
    26: transaction.EndTxnRequest,
    28: transaction.TxnOffsetCommitRequest,
}


async def main() -> None:
    with bootstrap() as servers:
        client = AIOKafkaClient(bootstrap_servers=servers)
        await client.bootstrap()
        try:
            node = next(iter(client.cluster.brokers())).nodeId
            conn = await client._get_conn(node)  # private: the negotiated versions
            versions = conn._versions
            for key, name in NAMES.items():
                broker = versions.get(key)
                known = [c.API_VERSION for c in CLASSES[key]._CLASSES] if key in CLASSES else []
                picked = None
                if broker is not None:
                    inside = [v for v in known if broker[0] <= v <= broker[1]]
                    picked = max(inside) if inside else None
                show(
                    "api_version",
                    api=name,
                    key=key,
                    broker_range=broker,
                    aiokafka_knows=known,
                    aiokafka_uses=picked,
                )
        finally:
            await client.close()


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
