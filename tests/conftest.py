import pytest

pytest_plugins = ["tests.kafka_broker"]


@pytest.fixture
def anyio_backend() -> str:
    # aiokafka is asyncio-only, so the whole suite runs on asyncio.
    return "asyncio"
