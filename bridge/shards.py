"""Sessions in shards: the unit of ownership between the members of ``BRIDGE_GROUP_ID``.

A session belongs to one of :data:`SHARDS` shards, by Kafka's own default-partitioner hash of
its id (murmur2, as the Java client and aiokafka place a key; never Python's ``hash()``, which
is salted per process). Shard *k* is partition *k* of the checkpoint topic: the group's
assignment of that topic's partitions says which member owns which shard, every checkpoint and
settled mark of a session is written to its shard's partition, and the transactional producer
that writes them is ``<BRIDGE_GROUP_ID>-<k>``, so that a new owner fences the previous one.

Why 32, and for good: the count can never change without moving every session's checkpoints
(the hash decides the partition), so it is fixed in the code. 32 gives an even spread up to 8
members (4 shards each, at most 1 more) and still 1 shard each at 32; more members than shards
would idle. A shard is only a key range: an idle one costs one paused partition and nothing
else, and an owned one one transactional producer.
"""

from __future__ import annotations

import functools

from aiokafka.partitioner import murmur2

__all__ = ["SHARDS", "shard_of", "transactional_id"]

#: The checkpoint topic's partition count; a topic with another count is refused at start.
SHARDS = 32


@functools.lru_cache(maxsize=65536)
def shard_of(session_id: str) -> int:
    """The session's shard: ``murmur2(id) & 0x7fffffff % 32``, Kafka's default partitioner."""
    hashed: int = murmur2(session_id.encode())
    return (hashed & 0x7FFFFFFF) % SHARDS


def transactional_id(group_id: str, shard: int) -> str:
    """The transactional.id of the producer that writes the shard: one writer per shard."""
    return f"{group_id}-{shard}"
