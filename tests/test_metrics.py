"""/metrics: the Prometheus exposition equals the telemetry aggregates, by construction.

A real scenario (completed, refunded and failing turns) runs through burst ``turnfleet
worker`` and ``turnfleet telemetry`` subprocesses; the exposition is fetched over HTTP from
the app under uvicorn and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from turnfleet.telemetry.aggregate import HISTOGRAM_BOUNDS_MS
from turnfleet.telemetry.metrics import TOKEN_KINDS
from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.lag import TelemetryLag, telemetry_lag
from turnfleet.telemetry.stats import stats, totals, turn_stats
from tests.processes import run_burst
from tests.test_http_read import C100, OPERATOR, auth, eventually, serve
from tests.batches import support_turn
from tests.consuming import drain
from turnfleet import keys, registry
from turnfleet.shell.fleet import FleetProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample: (sample name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """A histogram's (le, cumulative count) pairs in bound order."""
    found = [(float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
             if n == f"{name}_bucket"]
    return sorted(found)


async def scrape(http: Any) -> Samples:
    r = await http.get("/metrics", headers=auth(OPERATOR))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def test_metrics_equal_the_telemetry_aggregates_after_a_real_scenario(
    redis, redis_url, fleet_env, tmp_path
):
    from turnfleet.producer import Producer

    async with Producer(redis=redis) as producer:
        ok = [
            await producer.enqueue_turn(conversation_id="conv-dana", customer_id="C-100", text=t)
            for t in ("Hi, I'm Dana Whitfield, customer C-100.", "Where is order 1042?")
        ]
        ok.append(await producer.enqueue_turn(
            conversation_id="conv-priya", customer_id="C-102",
            text="I'd like a refund for order 1047, the headphones stopped working."))
        run_burst("worker", fleet_env, tmp_path)
        # With one model call allowed per run, a routed question fails deterministically.
        failing = await producer.enqueue_turn(conversation_id="conv-f", customer_id="C-104",
                                              text="Where is order 1043?")
        run_burst("worker", {**fleet_env, "TURNFLEET_MAX_AGENT_TURNS": "1"}, tmp_path,
                  name="worker-failing")
        assert (await producer.result(failing)).status == "failed"
    run_burst("telemetry", {**fleet_env, "TURNFLEET_ALERT_CONVERSATION_COST_USD": "0.0005"}, tmp_path)

    fleet = await totals(redis)
    assert fleet["turns_completed"] == 3 and fleet["turns_failed"] == 1
    async with serve(redis_url) as http:
        m = await scrape(http)
        assert (await http.get("/metrics")).status_code == 401
        forbidden = await http.get("/metrics", headers=auth(C100))
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"

    assert value(m, "turnfleet_turns_enqueued_total") == 4
    for name in ("turns_completed", "turns_failed", "attempts_failed", "tool_calls",
                 "tool_errors", "spans_dropped"):
        assert value(m, f"turnfleet_{name}_total") == fleet[name], name
    assert value(m, "turnfleet_telemetry_malformed_total") == 0

    models = await stats(redis, "model")
    assert [row["model"] for row in models] == ["turnfleet-offline"]
    for row in models:
        for kind, field in TOKEN_KINDS.items():
            assert value(m, "turnfleet_tokens_total", model=row["model"], kind=kind) == row[field]
        assert value(m, "turnfleet_llm_calls_total", model=row["model"]) == row["llm_calls"]
        assert value(m, "turnfleet_cost_usd_total", model=row["model"]) == row["cost_usd"]
        assert value(m, "turnfleet_llm_calls_unpriced_total", model=row["model"]) == 0
    assert sum(value(m, "turnfleet_tokens_total", model=r["model"], kind="input")
               for r in models) == fleet["input_tokens"]

    customers = await stats(redis, "customer")
    assert {row["customer_id"] for row in customers} == {"C-100", "C-102", "C-104"}
    for row in customers:
        c = row["customer_id"]
        for kind, field in TOKEN_KINDS.items():
            assert value(m, "turnfleet_tokens_by_customer_total", customer=c, kind=kind) == row[field]
        assert value(m, "turnfleet_cost_by_customer_usd_total", customer=c) == row["cost_usd"]
        assert value(m, "turnfleet_turns_by_customer_total", customer=c,
                     status="failed") == row["turns_failed"]
    assert value(m, "turnfleet_customers") == 3

    # Histograms: one observation per finished turn, in the bucket of its own duration.
    finished = [await turn_stats(redis, t) for t in [*ok, failing]]
    for name, field in (("turnfleet_turn_latency_seconds", "duration_ms"),
                        ("turnfleet_turn_queue_wait_seconds", "queue_wait_ms")):
        observed = [t[field] for t in finished if t[field] is not None]
        assert len(observed) == 4, name
        got = buckets(m, name)
        assert got == [(b / 1000, sum(1 for v in observed if v <= b)) for b in HISTOGRAM_BOUNDS_MS] + [
            (float("inf"), 4)], name
        assert [n for _, n in got] == sorted(n for _, n in got)  # cumulative: never decreasing
        assert value(m, f"{name}_count") == 4
        assert value(m, f"{name}_sum") == pytest.approx(sum(observed) / 1000)
    assert value(m, "turnfleet_turn_latency_seconds_sum") == pytest.approx(fleet["latency_ms_sum"] / 1000)

    fired = Counter(a.rule for _, a in await read_alerts(redis, count=1000))
    assert fired["turn_failed"] == 1 and fired["conversation_cost"] >= 1
    for rule in ("conversation_cost", "customer_daily_cost", "turn_failed", "error_rate"):
        assert value(m, "turnfleet_alerts_fired_total", rule=rule) == fired[rule], rule

    # Burst processes have exited and taken their heartbeats with them; nothing is queued.
    for name in ("turnfleet_workers_alive", "turnfleet_turns_in_flight", "turnfleet_queue_depth",
                 "turnfleet_queue_scheduled", "turnfleet_queue_isolated", "turnfleet_telemetry_lag_entries",
                 "turnfleet_telemetry_consumers_alive", "turnfleet_checks_queued"):
        assert value(m, name) == 0, name


async def test_histograms_observe_each_finished_turn_once_through_redelivery(redis, redis_url):
    durations = {"t-1": 3.0, "t-2": 70.0, "t-3": 1000.0, "t-4": 200_000.0}
    for turn_id, ms in durations.items():
        await support_turn(turn_id, duration_ms=ms).send(redis)
    await support_turn("t-2", duration_ms=70.0).send(redis)  # re-sent: counted once
    await drain(redis)
    assert await redis.hgetall(keys.HIST_TURN_LATENCY) == {
        "le_5": "1", "le_100": "1", "le_1000": "1", "le_inf": "1", "count": "4", "sum": "201073"}
    assert await redis.hgetall(keys.HIST_QUEUE_WAIT) == {"le_25": "4", "count": "4", "sum": "48"}
    async with serve(redis_url) as http:
        m = await scrape(http)
    assert buckets(m, "turnfleet_turn_latency_seconds") == [
        (0.005, 1), (0.01, 1), (0.025, 1), (0.05, 1), (0.1, 2), (0.25, 2), (0.5, 2), (1.0, 3),
        (2.5, 3), (5.0, 3), (10.0, 3), (30.0, 3), (60.0, 3), (120.0, 3), (float("inf"), 4)]
    assert value(m, "turnfleet_turn_latency_seconds_sum") == 201.073
    assert value(m, "turnfleet_turn_queue_wait_seconds_count") == 4


async def test_live_consumer_heartbeat_shows_in_metrics_and_leaves_with_it(
    redis, redis_url, fleet_env, tmp_path
):
    env = {**fleet_env, "TURNFLEET_CONSUMER_NAME": "t-live"}
    consumer = FleetProcess("telemetry", ["telemetry"], env, tmp_path / "telemetry.log").start()
    try:
        async def beating() -> bool:
            return await redis.zscore(keys.TELEMETRY_CONSUMERS, "t-live") is not None
        await eventually(beating, what="the consumer's heartbeat")
        async with serve(redis_url) as http:
            assert value(await scrape(http), "turnfleet_telemetry_consumers_alive") == 1
    finally:
        assert consumer.stop() == 0, consumer.output()[-3000:]
    assert await redis.zscore(keys.TELEMETRY_CONSUMERS, "t-live") is None


async def test_telemetry_lag_counts_undelivered_and_pending_entries(redis, redis_url):
    assert (await telemetry_lag(redis)).entries == 0  # no stream yet
    for n in range(3):
        await support_turn(f"t-{n}").send(redis)
    assert await telemetry_lag(redis) == TelemetryLag(undelivered=3, pending=0)  # no group yet
    await drain(redis)
    assert await telemetry_lag(redis) == TelemetryLag(0, 0)
    for n in range(3, 8):
        await support_turn(f"t-{n}").send(redis)
    # One entry delivered to a consumer that has not acknowledged it: pending, not undelivered.
    await redis.xreadgroup(keys.TELEMETRY_GROUP, "slow", {keys.TELEMETRY_STREAM: ">"}, count=1)
    assert await telemetry_lag(redis) == TelemetryLag(undelivered=4, pending=1)
    assert await telemetry_lag(redis, cap=2) == TelemetryLag(undelivered=2, pending=1, capped=True)
    async with serve(redis_url) as http:
        assert value(await scrape(http), "turnfleet_telemetry_lag_entries") == 5


async def test_suspects_in_the_isolated_lane_count_in_the_queue_metrics(redis, redis_url):
    """A turn handed to the isolated lane after a worker loss is still queued work: it shows in
    ``turnfleet_queue_depth`` and, on its own, in ``turnfleet_queue_isolated``."""
    now_ms = await redis.time()
    await redis.zadd(keys.ISOLATED_QUEUE, {"t-suspect-1": now_ms[0] * 1000, "t-suspect-2": now_ms[0] * 1000})
    await redis.zadd(keys.ARQ_QUEUE, {"t-plain": now_ms[0] * 1000})
    async with serve(redis_url) as http:
        m = await scrape(http)
    assert value(m, "turnfleet_queue_isolated") == 2
    assert value(m, "turnfleet_queue_depth") == 3


async def test_queued_check_jobs_show_apart_from_the_turns(redis, redis_url):
    """Finished turns' check jobs wait in the checks lane's queues: ``turnfleet_checks_queued``
    counts them (the built-in workflow's and another's), ``turnfleet_queue_depth`` does not."""
    now_ms = (await redis.time())[0] * 1000
    await redis.zadd(keys.CHECKS_QUEUE, {keys.checks_job_id("t-1"): now_ms, keys.checks_job_id("t-2"): now_ms})
    await registry.register(redis, [registry.Registration("it-helpdesk", "f" * 16)], "w-1")
    await redis.zadd(keys.workflow_checks_queue("it-helpdesk"), {keys.checks_job_id("t-3"): now_ms})
    async with serve(redis_url) as http:
        m = await scrape(http)
    assert value(m, "turnfleet_checks_queued") == 3
    assert value(m, "turnfleet_queue_depth") == 0
