"""Second review of the keep-alive JSON pool (84086ec, 4fd1de5): what it still got wrong, as
failing tests marked ``xfail(strict=True)`` until fixed (the markers are gone). What is
asserted is what a user would check: the page a caller gets, which connection the server saw
each request on, and what the README points an operator at."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import anyio
import pytest

from bridge.api import RateLimiter
from bridge.app import _json_client
from bridge.errors import ApiUnavailable
from tests.test_keepalive_transport import api_over, keep_alive_server
from tests.test_review_issue11d import resets_the_second
from tests.test_stream_transport import nothing_left_behind

pytestmark = pytest.mark.anyio
__all__ = ["nothing_left_behind"]  # autouse: no socket, task or future left behind

REPO = Path(__file__).resolve().parents[1]


class RetryWaitsItsTurn(RateLimiter):
    """The bridge's limiter, except that its third request waits until let go: as a request
    sent again waits behind the other page requests for its slot while they finish."""

    def __init__(self) -> None:
        super().__init__(1000)
        self.calls = 0
        self.waiting = anyio.Event()
        self.go = anyio.Event()

    async def acquire(self) -> None:
        self.calls += 1
        if self.calls == 3:
            self.waiting.set()
            await self.go.wait()
        await super().acquire()


async def test_a_request_sent_again_goes_on_a_new_connection_even_while_others_finish() -> None:
    """The gateway answers the first request of each connection and resets the next one
    (burst suppression, as in tests/test_review_issue11d.py). A page request on a kept
    connection is reset; while it waits for its slot to go again, another page request
    finishes on a new connection, which is kept. The request sent again must go "anew"
    (what the code promises): the caller gets its page, and the server saw it as the first
    request of a connection of its own."""

    limiter = RetryWaitsItsTurn()
    outcome: dict[str, object] = {}
    async with (
        keep_alive_server(resets_the_second) as server,
        _json_client(8, ssl.create_default_context()) as client,
    ):
        api = api_over(client, server.url, limiter)
        assert await api.get_session("sess_a") == {"id": "sess_a"}  # its connection is kept

        async def page_x() -> None:
            try:
                outcome["x"] = await api.get_session("sess_x")
            except ApiUnavailable as exc:
                outcome["x"] = f"ApiUnavailable: {exc}"

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(page_x)  # on the kept connection: reset, then waits its turn
                await limiter.waiting.wait()
                assert await api.get_session("sess_y") == {"id": "sess_y"}  # a new one, kept
                limiter.go.set()
    assert outcome["x"] == {"id": "sess_x"}
    assert server.connections == [
        ["/sessions/sess_a", "/sessions/sess_x"],
        ["/sessions/sess_y"],
        ["/sessions/sess_x"],
    ]


def test_every_module_the_readme_points_at_exists() -> None:
    """An operator following the README to a file of the bridge finds it."""
    readme = (REPO / "README.md").read_text()
    named = sorted(set(re.findall(r"\b(bridge/[A-Za-z0-9_/]+\.py)\b", readme)))
    assert named  # the README does point at modules
    assert [path for path in named if not (REPO / path).is_file()] == []
