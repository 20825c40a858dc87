import os

import pytest

pytest_plugins = ["tests.kafka_broker"]


@pytest.fixture
def anyio_backend() -> str:
    # aiokafka is asyncio-only, so the whole suite runs on asyncio.
    return "asyncio"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failed one: nothing here may quietly not run."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == 0:
        print(f"\nCI: {skipped} test(s) were skipped; in CI that is a failure.")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
