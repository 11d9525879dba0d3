"""The telemetry consumer: one member of the ``telemetry`` consumer group on the stream.

Delivery is at-least-once and counting exactly-once. Each batch of stream entries is
aggregated (one idempotent script per entry, pipelined), then the alert rules run for the
subjects it touched, then the entries are acknowledged. A consumer that dies anywhere in
between leaves its entries pending; it reads them again when it restarts under the same name
(own pending list, id ``0``), or another consumer takes them with ``XAUTOCLAIM`` once they
have been idle ``claim_idle_ms``. Either way the dedupe in the script makes the second pass
count nothing, and the alert rules, being idempotent, run again safely.

A malformed entry is logged, counted in the fleet's ``telemetry_malformed`` and acknowledged;
it never stops the loop. Redis errors (connection lost, server restarting) are logged and
retried with backoff; the entries in hand stay pending and are handled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from telemetry.aggregate import Aggregator, EntryPlan, MalformedEntry, Touched
from telemetry.alerts import AlertRules
from telemetry.stream_group import Entry, StreamGroupMember, _text, default_consumer_name
from turnfleet import keys
from turnfleet.connection import connect
from turnfleet.settings import TelemetrySettings

log = structlog.get_logger(__name__)

STREAM = keys.TELEMETRY_STREAM
GROUP = keys.TELEMETRY_GROUP
MAX_BACKOFF_S = 5.0
HEARTBEAT_S = 2.0  # consumer heartbeats (keys.TELEMETRY_CONSUMERS), like the workers'


async def caught_up(redis: Redis) -> bool:
    """True when every entry written to the stream has been aggregated and acknowledged.

    That is: the group has delivered the stream's last entry and has nothing pending
    (Redis 6.2 has no ``lag`` in ``XINFO GROUPS``). No stream yet: nothing to catch up on.
    """
    try:
        info = await redis.xinfo_stream(STREAM)
    except ResponseError:
        return True  # no such key: nothing was ever written
    for group in await redis.xinfo_groups(STREAM):
        if _text(group["name"]) == GROUP:
            return (
                _text(group["last-delivered-id"]) == _text(info["last-generated-id"])
                and int(group["pending"]) == 0
            )
    return int(info["length"]) == 0


class TelemetryConsumer(StreamGroupMember):
    """Reads, aggregates, alerts and acknowledges; ``run`` until ``stop``."""

    stream = STREAM
    group = GROUP
    event_prefix = "telemetry"

    def __init__(self, redis: Redis, settings: TelemetrySettings, name: str | None = None) -> None:
        super().__init__(
            redis,
            name=name or settings.consumer_name or default_consumer_name(),
            batch_size=settings.batch_size,
            claim_idle_ms=settings.claim_idle_ms,
        )
        self.settings = settings
        self.aggregator = Aggregator(redis, settings)
        self.alerts = AlertRules(redis, settings)

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand (at most ``block_ms`` later)."""
        super().stop()

    async def run(self, burst: bool = False) -> int:
        """Consume until ``stop()``; with ``burst``, until nothing is left. Entries handled.

        In burst mode a Redis error is raised to the caller; otherwise it is logged and the
        loop retries with backoff.
        """
        handled = 0
        failures = 0
        while not self._stop.is_set():
            try:
                n = await self.step(block=None if burst else self.settings.block_ms, claim_now=burst)
            except RedisError as exc:
                self.lost_redis(exc)
                if not self._group_ready:
                    continue
                if burst:
                    raise
                failures += 1
                delay = min(MAX_BACKOFF_S, 0.1 * 2**failures)
                log.error("telemetry.redis_error", consumer=self.name, error=repr(exc),
                          retry_in_s=delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                continue
            failures = 0
            handled += n
            if burst and n == 0 and not self._own_pending:
                break
        log.info("telemetry.consumer_stopped", consumer=self.name, handled=handled)
        return handled

    async def process(self, entries: Sequence[Entry]) -> int:
        return await self.handle(entries)

    async def handle(self, entries: Sequence[Entry]) -> int:
        """Aggregate, evaluate alerts, acknowledge. Returns the number of entries acknowledged.

        An entry whose fields are gone (trimmed from the stream while pending) cannot be
        counted: it is logged and acknowledged.
        """
        plans: list[EntryPlan] = []
        ack: list[str] = []
        for entry_id, fields in entries:
            if entry_id is None:
                continue
            ack.append(entry_id)
            if not fields:
                log.warning("telemetry.entry_gone", entry_id=entry_id,
                            hint="trimmed from the stream before it was aggregated")
                continue
            try:
                plans.append(self.aggregator.plan(entry_id, fields))
            except MalformedEntry as exc:
                log.error("telemetry.malformed", entry_id=entry_id, turn_id=fields.get("turn_id"),
                          fields=sorted(fields), error=str(exc))
                plans.append(self.aggregator.plan_malformed(entry_id))
        if not ack:
            return 0
        new_events = await self.aggregator.apply(plans)
        touched = Touched()
        for plan in plans:
            touched.merge(plan.touched)
        await self.alerts.evaluate(touched)
        await self.redis.xack(STREAM, GROUP, *ack)
        log.debug("telemetry.handled", consumer=self.name, entries=len(ack),
                  new_events=sum(new_events))
        return len(ack)


async def run_consumer(settings: TelemetrySettings, redis_url: str, burst: bool = False) -> int:
    """Run one consumer process until SIGINT/SIGTERM (or, with ``burst``, until drained).

    With ``alert_webhook_url`` set, the alert webhook sink (``telemetry/webhook.py``) runs
    beside the consumer and stops with it; in burst mode it runs after the consumer has
    drained, so the alerts just fired are delivered before this returns. A sink that dies
    of an unexpected error stops the consumer, and the error is raised here.

    While it runs, the consumer beats every ``HEARTBEAT_S`` into ``keys.TELEMETRY_CONSUMERS``
    (its name -> ms), and removes itself on the way out: what ``turnfleet health --role
    telemetry`` and ``turnfleet_telemetry_consumers_alive`` read.
    """
    from telemetry.webhook import AlertWebhook  # imported here: webhook.py imports this module

    redis = connect(redis_url)
    consumer = TelemetryConsumer(redis, settings)
    webhook = (AlertWebhook(redis, settings, consumer_name=consumer.name)
               if settings.alert_webhook_url else None)

    def stop() -> None:
        consumer.stop()
        if webhook is not None:
            webhook.stop()

    def webhook_ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("telemetry.webhook_failed", error=repr(task.exception()))
            consumer.stop()

    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / not Unix
            pass
    log.info("telemetry.consumer_started", consumer=consumer.name, burst=burst,
             batch_size=settings.batch_size, claim_idle_ms=settings.claim_idle_ms,
             webhook=webhook is not None)
    webhook_task: asyncio.Task[None] | None = None
    beat = asyncio.create_task(_heartbeat(redis, consumer.name), name="telemetry-heartbeat")
    try:
        if webhook is not None and not burst:
            webhook_task = asyncio.create_task(webhook.run(), name="alert-webhook")
            webhook_task.add_done_callback(webhook_ended)
        handled = await consumer.run(burst=burst)
        if webhook is not None and burst:
            delivered = await webhook.run_once()
            log.info("telemetry.webhook_burst_done", entries=delivered)
        return handled
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat  # no beat may land after the ZREM
        with contextlib.suppress(RedisError, OSError):
            await redis.zrem(keys.TELEMETRY_CONSUMERS, consumer.name)
        if webhook is not None:
            webhook.stop()
            try:
                if webhook_task is not None:
                    await webhook_task  # raises what killed the sink, if anything did
            finally:
                await webhook.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await redis.aclose()


async def _heartbeat(redis: Redis, name: str) -> None:
    """Record this consumer as alive (``keys.TELEMETRY_CONSUMERS``: name -> last beat ms)."""
    while True:
        try:
            await redis.zadd(keys.TELEMETRY_CONSUMERS, {name: int(time.time() * 1000)})
        except RedisError as exc:
            log.warning("telemetry.heartbeat_failed", consumer=name, error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)
