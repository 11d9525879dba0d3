"""Fixtures: a real redis-server per test (free port, own data dir), real processes.

Nothing here mocks Redis, arq or the Agents SDK. A test that needs to crash or restart the
server uses ``redis_server.kill()`` / ``.restart()``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from turnfleet.connection import connect
from turnfleet.producer import Producer
from turnfleet.shell.embedded import RedisServer
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import SupportDesk, build_support_desk
from tests.processes import CLI
from tests.tracing import Collector, traces_to


@contextmanager
def running_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A redis-server on a free port with its data in ``data_dir``, killed afterwards."""
    server = RedisServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Redis]:
    """A client of the Redis at ``url`` (turnfleet's ``connect``), closed afterwards."""
    client = connect(url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    async with redis_client(redis_url) as client:
        yield client


@pytest.fixture
async def producer(redis: Redis) -> AsyncIterator[Producer]:
    """The producer on this test's Redis, closed afterwards."""
    async with Producer(redis=redis) as p:
        yield p


@pytest.fixture
def desk() -> SupportDesk:
    """The Support Desk on the offline model (deterministic answers and token usage)."""
    return build_support_desk(OfflineModel())


@pytest.fixture
def fleet_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for turnfleet subprocesses: this test's Redis, nothing inherited that leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNFLEET_")}
    env.pop("REDIS_URL", None)
    env["REDIS_URL"] = redis_url
    env["TURNFLEET_STATE_DIR"] = str(tmp_path / "state")
    env["TURNFLEET_LOG_FORMAT"] = "json"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def turnfleet_cmd() -> list[str]:
    """How to run the CLI as a subprocess with this interpreter."""
    return list(CLI)


@pytest.fixture
def collector() -> Iterator[Collector]:
    """Route this process's traces to a Collector for the test, then restore the provider."""
    collecting = Collector()
    with traces_to(collecting):
        yield collecting


@pytest.fixture
async def endpoint_clients_closed() -> AsyncIterator[None]:
    """After the test (every test using ``llm_server``): the endpoint models' HTTP clients it
    made are closed, as a worker's shutdown closes them (an aiohttp session left open warns
    when it is collected)."""
    yield
    from turnfleet.workers.llm import close_models

    await close_models()
