"""The alert webhook: every alert reaches a real HTTP receiver, at least once, in stream order.

The receiver is a Starlette app served by uvicorn in the test's event loop; it records each
request and answers from a script (a status per request, then its default). The sink reads
a real Redis and POSTs over real sockets. Tests wait on the receiver's queue of requests or on
Redis state, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import uvicorn
from redis.exceptions import ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from structlog.testing import capture_logs

from turnfleet.telemetry.alerts import alert_id
from turnfleet.telemetry.consumer import run_consumer
from turnfleet.telemetry.webhook import (
    GROUP,
    STATS,
    USER_AGENT,
    AlertWebhook,
    backoff_s,
    retry_after_s,
)
from tests.waiting import until
from tests.batches import failed_turn
from tests.processes import CLI
from tests.uvicorn_server import EventServer
from turnfleet import __version__, keys
from turnfleet.connection import connect
from turnfleet.shell.embedded import free_port
from turnfleet.models import Alert
from turnfleet.settings import TelemetrySettings

WAIT_S = 10.0


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    status: int


@dataclass
class Receiver:
    """An alert receiver on 127.0.0.1: records requests, answers ``script`` then ``default``."""

    port: int = field(default_factory=free_port)
    script: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    default: int = 200
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    server: EventServer | None = None
    task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    async def _handle(self, request: Request) -> Response:
        answer = self.script.pop(0) if self.script else self.default
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        received = Received(json.loads(await request.body()), dict(request.headers), status)
        self.requests.append(received)
        self.arrived.put_nowait(received)
        text = "ok" if status < 400 else f"refused with {status}: " + "x" * 1000
        return Response(text, status_code=status, headers=headers)

    async def start(self) -> Receiver:
        app = Starlette(routes=[Route("/alerts", self._handle, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = server = EventServer(config)
        self.task = asyncio.create_task(server.serve())
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({ready, self.task}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        assert server.started, "the receiver did not start"
        return self

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await asyncio.wait_for(self.task, WAIT_S)
        self.server = self.task = None

    async def next(self) -> Received:
        return await asyncio.wait_for(self.arrived.get(), WAIT_S)


async def sink_until(sink: AlertWebhook, condition: Callable[[], Awaitable[bool]],
                     timeout_s: float = WAIT_S) -> None:
    """Until ``condition`` (Redis state the in-process ``sink`` changes) holds: re-checked at
    each change the sink records, never on a timer."""
    async with asyncio.timeout(timeout_s):
        while True:
            seen = sink.changes
            if await condition():
                return
            await sink.wait_changed(seen)


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    """Poll Redis state until it holds, for a sink in another process (no event reaches
    this one)."""
    await until(condition, "the condition", timeout_s)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


def hook_settings(url: str, **overrides: Any) -> TelemetrySettings:
    return TelemetrySettings(**{
        "alert_webhook_url": url, "alert_webhook_max_backoff_s": 0.05,
        "alert_webhook_timeout_s": 2.0, "block_ms": 50, **overrides,
    })


def make_alert(n: int) -> Alert:
    turn = f"t-{n}"
    return Alert(
        alert_id=alert_id("turn_failed", turn, "once"), rule="turn_failed", subject_kind="turn",
        subject=turn, window="once", message=f"Turn {turn} of conversation c-1 failed",
        figures={"attempts": 3, "error_type": "ModelError"}, conversation_id="c-1",
        customer_id="cust-1", turn_id=turn,
    )


async def fire(redis: Any, alert: Alert) -> str:
    """Write an alert as telemetry/alerts.py does: one entry, field ``alert``."""
    return await redis.xadd(keys.ALERTS_STREAM, {"alert": alert.model_dump_json()})


def payload(entry_id: str, alert: Alert) -> dict[str, Any]:
    return {"id": entry_id, **alert.model_dump(mode="json")}


async def pending(redis: Any) -> int:
    return int((await redis.xpending(keys.ALERTS_STREAM, GROUP))["pending"])


async def all_acked(redis: Any) -> bool:
    return await pending(redis) == 0


async def stats(redis: Any) -> dict[str, int]:
    return {k: int(v) for k, v in (await redis.hgetall(STATS)).items()}


async def deliver_now(redis: Any, url: str, name: str = "sink-a", **overrides: Any) -> int:
    """One sink's ``run_once``: everything on the stream is handled when it returns."""
    async with AlertWebhook(redis, hook_settings(url, **overrides), consumer_name=name) as sink:
        return await sink.run_once()


async def crash_after_reading(redis: Any, name: str) -> None:
    """What a sink that died between POST and XACK leaves: the entries pending under its name."""
    with contextlib.suppress(ResponseError):  # BUSYGROUP
        await redis.xgroup_create(keys.ALERTS_STREAM, GROUP, id="0", mkstream=True)
    await redis.xreadgroup(GROUP, name, {keys.ALERTS_STREAM: ">"})


@contextlib.asynccontextmanager
async def running(sink: AlertWebhook) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        sink.stop()
        await asyncio.wait_for(task, WAIT_S)
        await sink.aclose()


# -- delivery ---------------------------------------------------------------------------------


async def test_alert_is_posted_with_its_body_and_headers_then_acknowledged(
        redis: Any, receiver: Receiver) -> None:
    before = make_alert(1)
    before_id = await fire(redis, before)  # fired before the sink (and its group) existed
    sink = AlertWebhook(redis, hook_settings(receiver.url), consumer_name="sink-a")
    async with running(sink):
        first = await receiver.next()
        after = make_alert(2)
        after_id = await fire(redis, after)
        second = await receiver.next()
    assert first.body == payload(before_id, before)
    assert second.body == payload(after_id, after)
    assert datetime.fromisoformat(first.body["fired_at"]) == before.fired_at  # ISO 8601, UTC
    assert first.headers["idempotency-key"] == before.alert_id
    assert second.headers["idempotency-key"] == after.alert_id
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"] == USER_AGENT == f"turnfleet-alerts/{__version__}"
    assert await pending(redis) == 0
    assert await stats(redis) == {"delivered": 2}
    assert len(receiver.requests) == 2


async def test_server_errors_are_retried_until_the_receiver_accepts(
        redis: Any, receiver: Receiver) -> None:
    receiver.script = [500, 500]
    alert = make_alert(1)
    entry_id = await fire(redis, alert)
    assert await deliver_now(redis, receiver.url) == 1
    assert [r.status for r in receiver.requests] == [500, 500, 200]
    assert all(r.body == payload(entry_id, alert) for r in receiver.requests)
    assert {r.headers["idempotency-key"] for r in receiver.requests} == {alert.alert_id}
    assert await pending(redis) == 0
    assert await stats(redis) == {"delivered": 1, "retries": 2}


async def test_408_and_429_are_retried_and_retry_after_is_honoured(
        redis: Any, receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "0"}), 408]
    await fire(redis, make_alert(1))
    with capture_logs() as logs:
        assert await deliver_now(redis, receiver.url, alert_webhook_max_backoff_s=30.0) == 1
    retries = [e for e in logs if e["event"] == "webhook.retry"]
    assert [(e["status"], e["attempt"]) for e in retries] == [(429, 1), (408, 2)]
    assert retries[0]["retry_in_s"] == 0  # Retry-After: 0, not the 0.1-0.2 s backoff
    assert 0.2 <= retries[1]["retry_in_s"] <= 0.4  # second attempt: 0.4 s with equal jitter
    assert [r.status for r in receiver.requests] == [429, 408, 200]


def test_backoff_doubles_from_0_2_s_with_jitter_up_to_the_cap() -> None:
    for attempt, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]:
        for _ in range(50):
            assert base / 2 <= backoff_s(attempt, 60.0) <= base
    assert all(backoff_s(30, 5.0) <= 5.0 for _ in range(50))
    assert backoff_s(1, 60.0, retry_after_s=7.0) == 7.0
    assert backoff_s(1, 5.0, retry_after_s=120.0) == 5.0  # the cap bounds Retry-After too
    assert retry_after_s("7") == 7.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


async def test_alert_fired_while_the_receiver_is_down_arrives_after_it_restarts(
        redis: Any, receiver: Receiver) -> None:
    sink = AlertWebhook(redis, hook_settings(receiver.url), consumer_name="sink-a")
    async with running(sink):
        first = make_alert(1)
        await fire(redis, first)
        assert (await receiver.next()).body["alert_id"] == first.alert_id
        await sink_until(sink, lambda: all_acked(redis))  # acknowledged
        await receiver.stop()

        second = make_alert(2)
        second_id = await fire(redis, second)
        # The sink keeps retrying the connection-refused POST.
        await sink_until(sink, lambda: _stats_at_least(redis, "retries", 3))
        assert await pending(redis) == 1

        restarted = await Receiver(port=receiver.port).start()  # a new server, same port
        try:
            got = await restarted.next()
            await sink_until(sink, lambda: _stats_at_least(redis, "delivered", 2))
        finally:
            await restarted.stop()
    assert got.body == payload(second_id, second)
    assert got.headers["idempotency-key"] == second.alert_id
    assert await pending(redis) == 0


async def _stats_at_least(redis: Any, name: str, n: int) -> bool:
    return (await stats(redis)).get(name, 0) >= n


async def test_permanent_rejection_is_counted_acknowledged_and_later_alerts_flow(
        redis: Any, receiver: Receiver) -> None:
    receiver.script = [400]
    rejected, accepted = make_alert(1), make_alert(2)
    rejected_id = await fire(redis, rejected)
    await fire(redis, accepted)
    with capture_logs() as logs:
        assert await deliver_now(redis, receiver.url) == 2
    assert [(r.body["alert_id"], r.status) for r in receiver.requests] == [
        (rejected.alert_id, 400), (accepted.alert_id, 200)]
    assert await stats(redis) == {"rejected": 1, "delivered": 1}
    assert await pending(redis) == 0
    [error] = [e for e in logs if e["event"] == "webhook.rejected"]
    assert error["log_level"] == "error" and error["status"] == 400
    assert error["entry_id"] == rejected_id and error["alert_id"] == rejected.alert_id
    assert error["body"].startswith("refused with 400: xxx") and len(error["body"]) == 300


async def test_delivery_follows_the_stream_and_never_skips_a_failing_alert(
        redis: Any, receiver: Receiver) -> None:
    receiver.script = [200, 503, 500]  # the second alert fails twice
    alerts = [make_alert(i) for i in range(1, 6)]
    ids = [await fire(redis, a) for a in alerts]
    assert await deliver_now(redis, receiver.url, batch_size=2) == 5
    assert [r.body["id"] for r in receiver.requests] == [
        ids[0], ids[1], ids[1], ids[1], ids[2], ids[3], ids[4]]
    assert [r.status for r in receiver.requests] == [200, 503, 500, 200, 200, 200, 200]
    assert await stats(redis) == {"delivered": 5, "retries": 2}


async def test_malformed_entry_is_counted_and_acknowledged(redis: Any, receiver: Receiver) -> None:
    await redis.xadd(keys.ALERTS_STREAM, {"alert": "{not json"})
    good = make_alert(1)
    await fire(redis, good)
    assert await deliver_now(redis, receiver.url) == 2
    assert [r.body["alert_id"] for r in receiver.requests] == [good.alert_id]
    assert await stats(redis) == {"malformed": 1, "delivered": 1}
    assert await pending(redis) == 0


# -- crashes and other sinks ------------------------------------------------------------------


@pytest.mark.parametrize("crashed, successor, overrides", [
    ("sink-a", "sink-a", {}),  # restarted under its name: its own pending list, read at id 0
    ("dead", "alive", {"claim_idle_ms": 0}),  # never back: another sink's XAUTOCLAIM
], ids=["own-pending-on-restart", "claimed-from-a-dead-sink"])
async def test_alert_read_but_not_acknowledged_by_a_crashed_sink_is_sent_again(
        redis: Any, receiver: Receiver, crashed: str, successor: str,
        overrides: dict[str, Any]) -> None:
    alert = make_alert(1)
    entry_id = await fire(redis, alert)
    await crash_after_reading(redis, crashed)
    assert await pending(redis) == 1
    assert await deliver_now(redis, receiver.url, name=successor, **overrides) == 1
    assert [r.body for r in receiver.requests] == [payload(entry_id, alert)]
    assert await pending(redis) == 0


async def test_a_sink_retrying_an_alert_keeps_it_from_other_sinks(
        redis: Any, receiver: Receiver) -> None:
    receiver.default = 503
    await fire(redis, make_alert(1))
    settings = hook_settings(receiver.url, claim_idle_ms=300)
    retrying = AlertWebhook(redis, settings, consumer_name="sink-a")
    async with running(retrying):
        first = time.monotonic()
        while time.monotonic() - first < 0.9:  # three times claim_idle_ms of failures
            assert (await receiver.next()).status == 503
        [held] = await redis.xpending_range(keys.ALERTS_STREAM, GROUP, "-", "+", 10)
        assert held["consumer"] == "sink-a" and held["time_since_delivered"] < 300
        assert held["times_delivered"] == 1  # refreshing the idle time is not a redelivery
        async with AlertWebhook(redis, settings, consumer_name="sink-b") as other:
            assert await asyncio.wait_for(other.run_once(), WAIT_S) == 0  # nothing to claim
        receiver.default = 200
        while (await receiver.next()).status != 200:
            pass
        await sink_until(retrying, lambda: all_acked(redis))
    assert (await stats(redis))["delivered"] == 1


async def test_sink_survives_a_redis_restart(redis_server: Any, receiver: Receiver) -> None:
    client = connect(redis_server.url)
    sink = AlertWebhook(client, hook_settings(receiver.url), consumer_name="sink-a")
    fresh = None
    try:
        with capture_logs() as logs:
            async with running(sink):
                await fire(client, make_alert(1))
                await receiver.next()
                await sink_until(sink, lambda: _stats_at_least(client, "delivered", 1))
                redis_server.restart()  # graceful: the AOF keeps the stream and the group

                fresh = connect(redis_server.url)
                after = make_alert(2)
                after_id = await fire(fresh, after)
                got = await receiver.next()
                await sink_until(sink, lambda: _stats_at_least(fresh, "delivered", 2))
        assert await pending(fresh) == 0
    finally:
        await client.aclose()
        if fresh is not None:
            await fresh.aclose()
    assert got.body == payload(after_id, after)
    events = [e["event"] for e in logs]
    assert "webhook.redis_error" in events  # noticed and logged, then reconnected
    assert events.index("webhook.redis_recovered") > events.index("webhook.redis_error")


# -- in the telemetry process -----------------------------------------------------------------


async def test_run_consumer_in_burst_delivers_the_alert_it_fired(
        redis: Any, redis_url: str, receiver: Receiver) -> None:
    await failed_turn("t-9").send(redis)
    settings = hook_settings(receiver.url)
    assert await run_consumer(settings, redis_url, burst=True) == 1
    [request] = receiver.requests
    [(entry_id, fields)] = await redis.xrange(keys.ALERTS_STREAM)
    alert = Alert.model_validate_json(fields["alert"])
    assert request.body == payload(entry_id, alert)
    assert (alert.rule, alert.turn_id) == ("turn_failed", "t-9")
    assert request.headers["idempotency-key"] == alert_id("turn_failed", "t-9", "once")
    assert await pending(redis) == 0


async def test_telemetry_process_posts_alerts_until_sigterm(
        redis: Any, fleet_env: dict[str, str], receiver: Receiver) -> None:
    env = {**fleet_env, "TURNFLEET_ALERT_WEBHOOK_URL": receiver.url,
           "TURNFLEET_ALERT_WEBHOOK_MAX_BACKOFF_S": "0.05", "TURNFLEET_BLOCK_MS": "50"}
    proc = await asyncio.create_subprocess_exec(
        *CLI, "telemetry", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await failed_turn("t-7").send(redis)
        got = await asyncio.wait_for(receiver.arrived.get(), 60)  # includes the process start
        assert (got.body["rule"], got.body["turn_id"]) == ("turn_failed", "t-7")
        await wait_until(lambda: all_acked(redis))
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "webhook.stopped" in stderr.decode()
    assert await stats(redis) == {"delivered": 1}


async def test_a_url_that_is_not_http_is_refused_at_start(redis: Any) -> None:
    with pytest.raises(ValueError, match="must be an http"):
        AlertWebhook(redis, hook_settings("localhost:8080/alerts"))
