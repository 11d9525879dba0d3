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
turnfleet_turns_by_workflow_total           workflow, status    finished turns (completed / failed)
turnfleet_attempts_failed_by_workflow_total workflow            attempts that failed and were retried
turnfleet_tokens_by_workflow_total          workflow, kind      tokens by workflow
turnfleet_cost_by_workflow_usd_total        workflow            known cost in USD by workflow
turnfleet_turns_by_version_total            workflow, version,  finished turns, the latest
                                            status              ``VERSIONS_PER_WORKFLOW`` versions of
                                                                each workflow
turnfleet_attempts_failed_by_version_total  workflow, version   attempts that failed and were retried
turnfleet_tokens_by_version_total           workflow, version,  tokens by version
                                            kind
turnfleet_cost_by_version_usd_total         workflow, version   known cost in USD by version
turnfleet_checks_total                      workflow, check,    check results on finished turns;
                                            outcome             outcome passed, failed,
                                                                not_applicable, inputs_expired
turnfleet_alerts_fired_total                rule                alerts written to the alert stream
turnfleet_turn_latency_seconds              (histogram)         finished turns' duration
turnfleet_turn_queue_wait_seconds           (histogram)         finished turns' wait before starting
turnfleet_queue_depth                                           turns ready to run, not yet started
turnfleet_queue_scheduled                                       turns deferred to a later time (retries)
turnfleet_queue_isolated                                        suspects waiting for (or running in) the isolated lane
turnfleet_checks_queued                                         finished turns whose check job is queued or running
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
its full total, as a new series does. Workflows are few (the apps deployed); versions are
not (every changed prompt is one), so the by-version families carry the
``VERSIONS_PER_WORKFLOW`` versions of each workflow with the latest telemetry only (``turnfleet
stats --by version`` has every one); an older version leaves them as a customer leaves the top
set. Telemetry written before entries named what ran it is workflow and version ``unknown``.

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

from turnfleet.telemetry.aggregate import (
    CHECK_OUTCOME_COUNTERS,
    ERASED_SKIPPED,
    GLOBAL_KEY,
    HISTOGRAM_BOUNDS_MS,
    HISTOGRAM_INF,
)
from turnfleet.telemetry.alerts import RULES
from turnfleet.telemetry.lag import telemetry_lag
from turnfleet.telemetry.stats import counters, workflow_rows
from turnfleet import heartbeat, keys, registry, versions

TOP_CUSTOMERS = 50  # customers exported in the by-customer families (highest known cost)
VERSIONS_PER_WORKFLOW = 5  # versions exported per workflow in the by-version families (latest)
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
    workflows: dict[str, dict[str, Any]]  # workflow -> counters
    versions: dict[tuple[str, str], dict[str, Any]]  # (workflow, label) -> counters, the latest
    checks: dict[tuple[str, str], dict[str, int]]  # (workflow, check) -> outcome -> results
    turn_latency: dict[str, str]  # raw histogram hashes (aggregate.py)
    queue_wait: dict[str, str]
    alerts_fired: dict[str, int]  # rule -> count
    telemetry_lag: int
    workers_alive: int
    turns_in_flight: int
    queue_depth: int
    queue_scheduled: int
    queue_isolated: int
    checks_queued: int
    consumers_alive: int


async def snapshot(redis: Redis, worker_max_age_s: float) -> FleetSnapshot:
    """Read everything the exposition shows. O(models + customers + live workers + workflow
    versions) reads."""
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
        pipe.zrevrange(keys.aggregate_index("version"), 0, -1)
        pipe.zrange(keys.aggregate_index("check"), 0, -1)
        for workflow in workflows:  # each workflow's own queues (routing), summed
            pipe.zcount(keys.workflow_queue(workflow), "-inf", now)
            pipe.zcount(keys.workflow_queue(workflow), f"({now}", "+inf")
            pipe.zcard(keys.workflow_isolated_queue(workflow))  # suspects of a worker loss (workers/isolation.py)
            pipe.zcard(keys.workflow_checks_queue(workflow))  # finished turns' check jobs (workers/check_job.py)
        (enqueued, fleet, models, customers, latency, wait, alerts, in_flight, ran_versions,
         checked, *depths) = await pipe.execute()
    due, scheduled, isolated, checks_queued = (sum(int(n) for n in depths[i::4]) for i in range(4))
    live = await heartbeat.alive(redis, "worker", worker_max_age_s, now)
    consumers = len(await heartbeat.alive(redis, "telemetry", worker_max_age_s, now))
    running = sum(int(n or 0) for name, n in in_flight.items() if name in live)

    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.hgetall(keys.aggregate("model", model))
        for customer in customers:
            pipe.hget(keys.aggregate("customer", customer), "cost_nusd")
        latest = latest_versions(ran_versions)
        for subject in latest:
            pipe.hgetall(keys.aggregate("version", subject))
        for subject in checked:
            pipe.hmget(keys.aggregate("check", subject), list(CHECK_OUTCOME_COUNTERS))
        replies = await pipe.execute()
    check_rows = {keys.split_version_subject(c): {f.removeprefix("checks_"): int(n or 0)
                                                  for f, n in zip(CHECK_OUTCOME_COUNTERS, raw)}
                  for c, raw in zip(checked, replies[len(replies) - len(checked):])}
    replies = replies[:len(replies) - len(checked)]
    model_rows = {m: counters(raw) for m, raw in zip(models, replies) if raw}
    costs = replies[len(models):len(models) + len(customers)]
    version_rows = {keys.split_version_subject(v): counters(raw)
                    for v, raw in zip(latest, replies[len(models) + len(customers):]) if raw}
    ran_workflows = {row["workflow"]: row for row in await workflow_rows(redis)}
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
        workflows=ran_workflows,
        versions=version_rows,
        checks=check_rows,
        turn_latency=latency,
        queue_wait=wait,
        alerts_fired={rule: int(n) for rule, n in alerts.items()},
        telemetry_lag=lag.entries,
        workers_alive=len(live),
        turns_in_flight=running,
        queue_depth=max(0, int(due) + int(isolated) - running),
        queue_scheduled=int(scheduled),
        queue_isolated=int(isolated),
        checks_queued=int(checks_queued),
        consumers_alive=int(consumers),
    )


def latest_versions(subjects_newest_first: list[str], per_workflow: int = VERSIONS_PER_WORKFLOW) -> list[str]:
    """The version subjects (``keys.version_subject``) exported: the first ``per_workflow`` of
    each workflow in the index read newest first."""
    kept: list[str] = []
    seen: dict[str, int] = {}
    for subject in subjects_newest_first:
        workflow, _ = keys.split_version_subject(subject)
        if seen.get(workflow, 0) < per_workflow:
            seen[workflow] = seen.get(workflow, 0) + 1
            kept.append(subject)
    return kept


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

        yield from _ran_by_families("workflow", ["workflow"],
                                    {(w,): row for w, row in s.workflows.items()})
        yield from _ran_by_families("version", ["workflow", "version"], s.versions,
                                    f" (the latest {VERSIONS_PER_WORKFLOW} versions of each workflow)")

        checks = CounterMetricFamily("turnfleet_checks", "Check results on finished turns, by "
                                     "workflow, check and outcome.", labels=["workflow", "check", "outcome"])
        for (workflow, check), outcomes in sorted(s.checks.items()):
            for outcome, n in outcomes.items():
                checks.add_metric([workflow, check, outcome], n)
        yield checks

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
            ("turnfleet_checks_queued", s.checks_queued,
             "Finished turns whose check job is queued or running (the checks lane)."),
            ("turnfleet_turns_in_flight", s.turns_in_flight, "Turns running on live workers."),
            ("turnfleet_workers_alive", s.workers_alive, "Workers with a recent heartbeat."),
            ("turnfleet_telemetry_consumers_alive", s.consumers_alive,
             "Telemetry consumers with a recent heartbeat."),
            ("turnfleet_telemetry_lag_entries", s.telemetry_lag,
             f"Telemetry entries not yet aggregated (undelivered + pending; at most {LAG_CAP})."),
            ("turnfleet_customers", s.customers_total, "Customers with telemetry."),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _ran_by_families(by: str, labels: list[str], rows: Mapping[tuple[str, ...], dict[str, Any]],
                     note: str = "") -> Iterator[Metric]:
    """Turns, failed attempts, tokens and cost of each workflow (``by="workflow"``) or version."""
    turns = CounterMetricFamily(f"turnfleet_turns_by_{by}", f"Finished turns by {by}{note}.",
                                labels=[*labels, "status"])
    failed = CounterMetricFamily(f"turnfleet_attempts_failed_by_{by}",
                                 f"Attempts that failed and were retried, by {by}{note}.", labels=labels)
    tokens = CounterMetricFamily(f"turnfleet_tokens_by_{by}", f"Tokens by {by}{note}.",
                                 labels=[*labels, "kind"])
    cost = CounterMetricFamily(f"turnfleet_cost_by_{by}_usd", f"Known cost in USD by {by}{note}.",
                               labels=labels)
    for names, row in sorted(rows.items()):
        turns.add_metric([*names, "completed"], row["turns_completed"])
        turns.add_metric([*names, "failed"], row["turns_failed"])
        failed.add_metric(list(names), row["attempts_failed"])
        for kind, f in TOKEN_KINDS.items():
            tokens.add_metric([*names, kind], row[f])
        if row["cost_usd"] is not None:
            cost.add_metric(list(names), row["cost_usd"])
    yield from (turns, failed, tokens, cost)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


async def exposition(redis: Redis, worker_max_age_s: float) -> bytes:
    """The Prometheus text format of a fresh :func:`snapshot`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(await snapshot(redis, worker_max_age_s)))
    return generate_latest(registry)
