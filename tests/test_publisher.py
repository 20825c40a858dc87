"""The publisher's bookkeeping, with Kafka stubbed: budgets must come back, whatever fails."""

from __future__ import annotations

import anyio
import pytest

from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import TransactionAborted
from bridge.health import HealthState
from bridge.publisher import ByteBudget, Outgoing, Publisher
from bridge.records import Record, ThreadRef

pytestmark = pytest.mark.anyio


async def test_budget_serves_waiters_in_order_and_survives_cancellation():
    """Scenario: a full budget with three waiters, the middle one cancelled: a release wakes
    the first and then the third, in that order, and nothing is counted twice."""
    budget = ByteBudget(100)
    await budget.acquire(100)
    order: list[str] = []

    async def wait(name: str, size: int) -> None:
        await budget.acquire(size)
        order.append(name)

    cancelled = anyio.CancelScope()

    async def doomed() -> None:
        with cancelled:
            await budget.acquire(50)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "first", 60)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(doomed)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(wait, "third", 40)
        await anyio.wait_all_tasks_blocked()
        cancelled.cancel()
        await anyio.wait_all_tasks_blocked()
        budget.release(100)
    assert order == ["first", "third"]
    assert budget.used == 100


async def test_a_failed_batch_gives_its_bytes_back():
    """Scenario: a transaction fails once (the events are rewound to be read again), then the
    retry succeeds: afterwards the in-flight budget is empty, not short by the failed batch."""
    publisher = Publisher(Settings(), HealthState())
    cursor = ThreadCursor(ThreadRef("sess_1", "sthr_1"))
    items = [
        Outgoing(cursor, cursor.epoch, [Record("t", b"k", b"v" * 1000, [])], event_id=f"evt_{n}")
        for n in range(5)
    ]
    for item in items:
        await publisher._budget.acquire(item.size)
    failures = iter([TransactionAborted("broker restarted")])

    async def publish(batch: list[Outgoing], *, alone: bool = False) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure

    async def nothing() -> None:
        pass

    publisher._publish = publish  # type: ignore[method-assign]
    publisher._connect = nothing  # type: ignore[method-assign]
    publisher._stop_producer = nothing  # type: ignore[method-assign]
    await publisher._publish_until_done(items)
    assert cursor.epoch == 1, "the failed events were rewound to be read again"
    assert publisher._budget.used == 0
