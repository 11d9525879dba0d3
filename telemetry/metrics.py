"""Prometheus exposition of the fleet, read from Redis at every scrape.

Nothing here keeps a count of its own: each scrape reads the telemetry aggregates (the hashes
the consumer's idempotent script writes), the producer's counter, the heartbeats and the
queue, so every counter equals what ``turnfleet stats`` reports, by construction, whichever
HTTP replica answers the scrape and however often processes restart. The read is async (one
:func:`snapshot`, a handful of pipelined round trips); :class:`FleetCollector`, a
``prometheus_client`` custom collector, turns that snapshot into metric families, and
:func:`exposition` renders them in the text format.

Metrics (counters end in ``_total``):

==========================================  ==================  ========================================
name                                        labels              meaning
==========================================  ==================  ========================================
turnfleet_turns_enqueued_total                                  turns accepted by the producer
turnfleet_turns_completed_total                                 turns that ended completed
turnfleet_turns_failed_total                                    turns that ended failed (terminal)
turnfleet_attempts_failed_total                                 attempts that failed and were retried
turnfleet_tool_calls_total                                      tool calls
turnfleet_tool_errors_total                                     tool calls whose tool raised (turnfleet.tool_errors)
turnfleet_guardrails_tripped_total                              guardrail tripwires (turns completed with the safe reply)
turnfleet_spans_dropped_total                                   trace spans a worker could not keep
turnfleet_telemetry_malformed_total                             telemetry entries that could not be read
turnfleet_telemetry_dead_lettered_total                         entries moved to the dead-letter stream
turnfleet_telemetry_erased_skipped_total                        entries skipped: their subject was erased
turnfleet_telemetry_backlog_over_limit_total                    trim passes that found the unacked backlog over the limit
turnfleet_newer_format_left_total           kind                times a process left an item of a newer
                                                                format version for a newer process; kind
                                                                job, turn (record) or batch
turnfleet_tokens_total                      model, kind         tokens by model; kind input (cached
                                                                included), output (reasoning included),
                                                                cached, reasoning
turnfleet_llm_calls_total                   model               model calls
turnfleet_llm_calls_unpriced_total          model               model calls of a model without a price
turnfleet_cost_usd_total                    model               known cost in USD (absent if unknown)
turnfleet_tokens_by_customer_total          customer, kind      tokens, top customers by cost
turnfleet_cost_by_customer_usd_total        customer            known cost, top customers by cost
turnfleet_turns_by_customer_total           customer, status    finished turns (completed / failed)
turnfleet_alerts_fired_total                rule                alerts written to the alert stream
turnfleet_turn_latency_seconds              (histogram)         finished turns' duration
turnfleet_turn_queue_wait_seconds           (histogram)         finished turns' wait before starting
turnfleet_queue_depth                                           turns ready to run, not yet started
turnfleet_queue_scheduled                                       turns deferred to a later time (retries)
turnfleet_queue_isolated                                        suspects waiting for (or running in) the isolated lane
turnfleet_turns_in_flight                                       turns running on live workers
turnfleet_workers_alive                                         workers with a recent heartbeat
turnfleet_telemetry_consumers_alive                             telemetry consumers with a recent beat
turnfleet_telemetry_lag_entries                                 telemetry entries not yet aggregated
turnfleet_customers                                             customers with telemetry
==========================================  ==================  ========================================

Bounded scrapes: the per-customer families carry the ``TOP_CUSTOMERS`` customers of highest
known cost only (``turnfleet_customers`` says how many there are in all; ``turnfleet stats
--by customer`` has every one). Models and alert rules are few by nature. A customer that
leaves the top set stops being exported (its series goes stale); one that enters starts at
its full total, as a new series does.

"Live" means a heartbeat at most ``worker_max_age_s`` old (``ready_worker_max_age_s``).
The queue depth counts arq jobs due now minus turns in flight (arq keeps a running job in its
queue); only the head turn of each conversation has a job, turns waiting behind it in their
conversation are not in it. The lag saturates at ``LAG_CAP``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import ERASED_SKIPPED, GLOBAL_KEY, HISTOGRAM_BOUNDS_MS, HISTOGRAM_INF
from turnfleet.telemetry.alerts import RULES
from turnfleet.telemetry.lag import telemetry_lag
from turnfleet.telemetry.stats import counters
from turnfleet import heartbeat, keys, registry, versions

TOP_CUSTOMERS = 50  # customers exported in the by-customer families (highest known cost)
LAG_CAP = 100_000  # the telemetry lag is counted up to this many entries
TOKEN_KINDS = {"input": "input_tokens", "output": "output_tokens", "cached": "cached_tokens",
               "reasoning": "reasoning_tokens"}


@dataclass
class FleetSnapshot:
    """What one scrape read from Redis."""

    turns_enqueued: int
    fleet: dict[str, Any]  # stats.counters of the fleet hash
    telemetry_malformed: int
    telemetry_dead_lettered: int
    telemetry_erased_skipped: int
    telemetry_backlog_over_limit: int
    newer_format_left: dict[str, int]  # kind -> times an item of a newer format was left
    models: dict[str, dict[str, Any]]  # model -> counters
    customers: dict[str, dict[str, Any]]  # the top customers by cost -> counters
    customers_total: int
    turn_latency: dict[str, str]  # raw histogram hashes (aggregate.py)
    queue_wait: dict[str, str]
    alerts_fired: dict[str, int]  # rule -> count
    telemetry_lag: int
    workers_alive: int
    turns_in_flight: int
    queue_depth: int
    queue_scheduled: int
    queue_isolated: int
    consumers_alive: int


async def snapshot(redis: Redis, worker_max_age_s: float) -> FleetSnapshot:
    """Read everything the exposition shows. O(models + customers + live workers) reads."""
    now = int(time.time() * 1000)
    workflows = sorted(await registry.workflows(redis))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.COUNTERS, "turns_enqueued")
        pipe.hgetall(GLOBAL_KEY)
        pipe.zrange(keys.aggregate_index("model"), 0, -1)
        pipe.zrange(keys.aggregate_index("customer"), 0, -1)
        pipe.hgetall(keys.HIST_TURN_LATENCY)
        pipe.hgetall(keys.HIST_QUEUE_WAIT)
        pipe.hgetall(keys.ALERTS_COUNT)
        pipe.hgetall(keys.WORKER_INFLIGHT)
        for workflow in workflows:  # each workflow's own queues (routing), summed
            pipe.zcount(keys.workflow_queue(workflow), "-inf", now)
            pipe.zcount(keys.workflow_queue(workflow), f"({now}", "+inf")
            pipe.zcard(keys.workflow_isolated_queue(workflow))  # suspects of a worker loss (workers/isolation.py)
        (enqueued, fleet, models, customers, latency, wait, alerts, in_flight, *depths) = await pipe.execute()
    due, scheduled, isolated = (sum(int(n) for n in depths[i::3]) for i in range(3))
    live = await heartbeat.alive(redis, "worker", worker_max_age_s, now)
    consumers = len(await heartbeat.alive(redis, "telemetry", worker_max_age_s, now))
    running = sum(int(n or 0) for name, n in in_flight.items() if name in live)

    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.hgetall(keys.aggregate("model", model))
        for customer in customers:
            pipe.hget(keys.aggregate("customer", customer), "cost_nusd")
        replies = await pipe.execute()
    model_rows = {m: counters(raw) for m, raw in zip(models, replies) if raw}
    costs = replies[len(models):]
    top = sorted(zip(customers, costs), key=lambda c: (-int(c[1] or 0), c[0]))[:TOP_CUSTOMERS]
    async with redis.pipeline(transaction=False) as pipe:
        for customer, _ in top:
            pipe.hgetall(keys.aggregate("customer", customer))
        customer_hashes = await pipe.execute() if top else []
    lag = await telemetry_lag(redis, LAG_CAP)
    return FleetSnapshot(
        turns_enqueued=int(enqueued or 0),
        fleet=counters(fleet),
        telemetry_malformed=int(fleet.get("telemetry_malformed") or 0),
        telemetry_dead_lettered=int(fleet.get("telemetry_dead_lettered") or 0),
        telemetry_erased_skipped=int(fleet.get(ERASED_SKIPPED) or 0),
        telemetry_backlog_over_limit=int(fleet.get("telemetry_backlog_over_limit") or 0),
        newer_format_left={k.value: x.count for k, x in versions.left_from(fleet).items()},
        models=model_rows,
        customers={c: counters(raw) for (c, _), raw in zip(top, customer_hashes) if raw},
        customers_total=len(customers),
        turn_latency=latency,
        queue_wait=wait,
        alerts_fired={rule: int(n) for rule, n in alerts.items()},
        telemetry_lag=lag.entries,
        workers_alive=len(live),
        turns_in_flight=running,
        queue_depth=max(0, int(due) + int(isolated) - running),
        queue_scheduled=int(scheduled),
        queue_isolated=int(isolated),
        consumers_alive=int(consumers),
    )


def histogram_buckets(raw: Mapping[str, str]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le in seconds, count)`` buckets ending in ``+Inf``, and the sum in
    seconds, from a histogram hash of non-cumulative ms buckets (see aggregate.py)."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound in HISTOGRAM_BOUNDS_MS:
        running += int(raw.get(f"le_{bound}") or 0)
        buckets.append((_seconds(bound), running))
    running += int(raw.get(HISTOGRAM_INF) or 0)
    buckets.append(("+Inf", running))
    return buckets, float(raw.get("sum") or 0.0) / 1000


def _seconds(ms: int) -> str:
    return repr(ms / 1000)


class FleetCollector(Collector):
    """A ``prometheus_client`` collector over one :class:`FleetSnapshot`."""

    def __init__(self, snap: FleetSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        yield _counter("turnfleet_turns_enqueued", "Turns accepted by the producer.",
                       s.turns_enqueued)
        for name, key, text in (
            ("turns_completed", "turns_completed", "Turns that ended completed."),
            ("turns_failed", "turns_failed", "Turns that ended failed (terminal)."),
            ("attempts_failed", "attempts_failed", "Attempts that failed and were retried."),
            ("tool_calls", "tool_calls", "Tool calls."),
            ("tool_errors", "tool_errors", "Tool calls whose tool raised an exception."),
            ("guardrails_tripped", "guardrails_tripped",
             "Guardrail tripwires (the turn completed with the workflow's safe reply)."),
            ("spans_dropped", "spans_dropped", "Trace spans a worker could not keep."),
        ):
            yield _counter(f"turnfleet_{name}", text, s.fleet[key])
        yield _counter("turnfleet_telemetry_malformed",
                       "Telemetry stream entries that could not be read.", s.telemetry_malformed)
        yield _counter("turnfleet_telemetry_dead_lettered",
                       "Telemetry entries moved to the dead-letter stream (tf:telemetry:dead).",
                       s.telemetry_dead_lettered)
        yield _counter("turnfleet_telemetry_erased_skipped",
                       "Telemetry entries skipped because their customer, conversation or turn was erased.",
                       s.telemetry_erased_skipped)
        yield _counter("turnfleet_telemetry_backlog_over_limit",
                       "Trim passes that found more unacknowledged entries than the limit.",
                       s.telemetry_backlog_over_limit)
        left = CounterMetricFamily("turnfleet_newer_format_left",
                                   "Times a process left an item of a newer format version (a rolling "
                                   "deploy) for a newer process, by kind: job, turn (record), batch.",
                                   labels=["kind"])
        for kind, n in sorted(s.newer_format_left.items()):
            left.add_metric([kind], n)
        yield left

        tokens = CounterMetricFamily("turnfleet_tokens", "Tokens by model; input includes "
                                     "cached, output includes reasoning.", labels=["model", "kind"])
        calls = CounterMetricFamily("turnfleet_llm_calls", "Model calls.", labels=["model"])
        unpriced = CounterMetricFamily("turnfleet_llm_calls_unpriced",
                                       "Model calls of a model without a price (not in cost).",
                                       labels=["model"])
        cost = CounterMetricFamily("turnfleet_cost_usd", "Known cost in USD by model.",
                                   labels=["model"])
        for model, row in sorted(s.models.items()):
            for kind, f in TOKEN_KINDS.items():
                tokens.add_metric([model, kind], row[f])
            calls.add_metric([model], row["llm_calls"])
            unpriced.add_metric([model], row["cost_unknown_calls"])
            if row["cost_usd"] is not None:
                cost.add_metric([model], row["cost_usd"])
        yield from (tokens, calls, unpriced, cost)

        note = f" (the {TOP_CUSTOMERS} customers of highest cost)"
        c_tokens = CounterMetricFamily("turnfleet_tokens_by_customer", "Tokens by customer" + note,
                                       labels=["customer", "kind"])
        c_cost = CounterMetricFamily("turnfleet_cost_by_customer_usd",
                                     "Known cost in USD by customer" + note, labels=["customer"])
        c_turns = CounterMetricFamily("turnfleet_turns_by_customer",
                                      "Finished turns by customer" + note,
                                      labels=["customer", "status"])
        for customer, row in sorted(s.customers.items()):
            for kind, f in TOKEN_KINDS.items():
                c_tokens.add_metric([customer, kind], row[f])
            if row["cost_usd"] is not None:
                c_cost.add_metric([customer], row["cost_usd"])
            c_turns.add_metric([customer, "completed"], row["turns_completed"])
            c_turns.add_metric([customer, "failed"], row["turns_failed"])
        yield from (c_tokens, c_cost, c_turns)

        alerts = CounterMetricFamily("turnfleet_alerts_fired", "Alerts written to the alert "
                                     "stream, by rule.", labels=["rule"])
        for rule in sorted({*RULES, *s.alerts_fired}):
            alerts.add_metric([rule], s.alerts_fired.get(rule, 0))
        yield alerts

        for name, raw, text in (
            ("turnfleet_turn_latency_seconds", s.turn_latency, "Finished turns' duration."),
            ("turnfleet_turn_queue_wait_seconds", s.queue_wait,
             "Finished turns' wait between enqueue and start."),
        ):
            buckets, total = histogram_buckets(raw)
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)

        for name, value, text in (
            ("turnfleet_queue_depth", s.queue_depth, "Turns ready to run and not yet started."),
            ("turnfleet_queue_scheduled", s.queue_scheduled,
             "Turns deferred to a later time (retry delay)."),
            ("turnfleet_queue_isolated", s.queue_isolated,
             "Turns lost with a worker, waiting for or running in the isolated lane."),
            ("turnfleet_turns_in_flight", s.turns_in_flight, "Turns running on live workers."),
            ("turnfleet_workers_alive", s.workers_alive, "Workers with a recent heartbeat."),
            ("turnfleet_telemetry_consumers_alive", s.consumers_alive,
             "Telemetry consumers with a recent heartbeat."),
            ("turnfleet_telemetry_lag_entries", s.telemetry_lag,
             f"Telemetry entries not yet aggregated (undelivered + pending; at most {LAG_CAP})."),
            ("turnfleet_customers", s.customers_total, "Customers with telemetry."),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


async def exposition(redis: Redis, worker_max_age_s: float) -> bytes:
    """The Prometheus text format of a fresh :func:`snapshot`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(await snapshot(redis, worker_max_age_s)))
    return generate_latest(registry)
