"""Every Redis key and stream name turnfleet uses, in one place.

Per-conversation keys carry the conversation id in a hash tag (``{...}``) so that a later
move to Redis Cluster keeps one conversation's keys in one slot. arq's own keys keep arq's
names (``arq:queue``, ``arq:job:<id>``): the enqueue script writes arq jobs directly so that
recording a turn and waking its conversation is one atomic step.
"""

from __future__ import annotations

from turnfleet.models import DEFAULT_WORKFLOW

PREFIX = "tf"

# arq's names (arq.constants), written by our Lua scripts.
ARQ_QUEUE = "arq:queue"
ARQ_JOB_PREFIX = "arq:job:"
ARQ_RETRY_PREFIX = "arq:retry:"
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
# The isolated lane's arq queue: turns lost with a worker run here, alone on their worker
# (workers/isolation.py). Same job and in-progress keys as ``ARQ_QUEUE``; only the zset differs.
ISOLATED_QUEUE = "arq:queue:isolated"
# A queue per workflow (routing: a workflow's turns reach only workers that serve it). The
# built-in workflow keeps the two names above (jobs queued by older processes keep working);
# workflow W gets these prefixes + W. The Lua scripts apply the same rule (fragments/route.lua),
# given these prefixes as arguments.
WORKFLOW_QUEUE_PREFIX = "arq:queue:wf:"
WORKFLOW_ISOLATED_PREFIX = "arq:queue:isolated:wf:"
# The checks lane's arq queues (issue 17): a finished turn's follow-up job ``checks/<turn id>``
# (``run_turn_checks``), written by the finish script into its workflow's checks queue and
# served by that workflow's workers in a lane of their own (workers/isolation.py). Same
# routing rule: the built-in workflow gets ``CHECKS_QUEUE``, workflow W the prefix + W.
CHECKS_QUEUE = "arq:queue:checks"
WORKFLOW_CHECKS_PREFIX = "arq:queue:checks:wf:"
CHECKS_JOB_PREFIX = "checks/"  # a check job's id: this + the turn id ("/" is in no id, so never a turn's job id)


def workflow_queue(workflow: str) -> str:
    """The shared lane's arq queue of a workflow's turns."""
    return ARQ_QUEUE if workflow == DEFAULT_WORKFLOW else WORKFLOW_QUEUE_PREFIX + workflow


def workflow_isolated_queue(workflow: str) -> str:
    """The isolated lane's arq queue of a workflow's turns (workers/isolation.py)."""
    return ISOLATED_QUEUE if workflow == DEFAULT_WORKFLOW else WORKFLOW_ISOLATED_PREFIX + workflow


def workflow_checks_queue(workflow: str) -> str:
    """The checks lane's arq queue of a workflow's finished turns (their check jobs)."""
    return CHECKS_QUEUE if workflow == DEFAULT_WORKFLOW else WORKFLOW_CHECKS_PREFIX + workflow


def checks_job_id(turn_id: str) -> str:
    """The arq job id of a finished turn's check job: one per turn (``SET NX`` in FINISH)."""
    return CHECKS_JOB_PREFIX + turn_id


# Streams.
RESULTS_STREAM = f"{PREFIX}:results"  # one entry per terminal turn: waiters XREAD it
TELEMETRY_STREAM = f"{PREFIX}:telemetry"  # one entry per turn attempt: a JSON batch of events
TELEMETRY_GROUP = "telemetry"
TELEMETRY_DEAD_LETTER = f"{PREFIX}:telemetry:dead"  # entries that failed dead_letter_after deliveries
ALERTS_STREAM = f"{PREFIX}:alerts"  # one entry per alert fired

# Indexes.
CONVERSATIONS = f"{PREFIX}:conversations"  # zset conversation_id -> first enqueue ms
LEDGER_PREFIX = f"{PREFIX}:ledger:"  # the financial ledger: never expired, purged or erased
REFUND_LEDGER = f"{LEDGER_PREFIX}refunds"  # stream: one entry per refund actually made
ORDERS = f"{PREFIX}:orders"  # hash order_id -> order JSON: orders added to the order book at run time
ORDER_COPIES = f"{PREFIX}:orders:copies"  # counter: runs of copied orders (workers.orderbook.copy_orders)
WORKERS = f"{PREFIX}:workers"  # zset worker name -> last heartbeat ms
WORKFLOWS = f"{PREFIX}:workflows"  # hash workflow name -> latest registration JSON (turnfleet/registry.py)
WORKER_INFLIGHT = f"{PREFIX}:workers:inflight"  # hash worker name -> turns in flight
WORKER_WORKFLOWS = f"{PREFIX}:workers:workflows"  # hash worker name -> JSON list of the workflows it serves
# zset worker name -> ms of its last look while it serves the isolated lane (workers/isolation.py)
WORKERS_ISOLATING = f"{PREFIX}:workers:isolating"
TELEMETRY_CONSUMERS = f"{PREFIX}:telemetry:consumers"  # zset consumer name -> last heartbeat ms
AUDIT = f"{PREFIX}:audit"  # stream: one entry per unredacted read (who, what, id, when); no customer text
COUNTERS = f"{PREFIX}:counters"  # hash of fleet counters the producer keeps (turns_enqueued)
# zset turn_id -> ms the turn finished, while its record still holds raw customer text: what the
# raw-text expiry (TURNFLEET_RAW_RETENTION_S) walks; a turn leaves it once redacted or erased.
RAW_TEXT = f"{PREFIX}:raw-text"
# string: the SCAN cursor of the raw-text backfill (turns finished before RAW_TEXT existed), "done"
# once it walked the keyspace: new turns enter RAW_TEXT in the finish script, so once is enough.
RAW_TEXT_BACKFILL = f"{PREFIX}:raw-text:backfill"
# zset digest -> ms erased: salted SHA-256 digests of erased customer, conversation and turn ids
# (never the ids), so that telemetry still pending for them cannot rebuild what was erased.
ERASED = f"{PREFIX}:erased"
ERASED_SALT = f"{PREFIX}:erased:salt"  # string: the deployment's random salt of those digests


def turn(turn_id: str) -> str:
    """Hash: request (JSON), status, attempts, result (JSON), worker, started_at. No expiry."""
    return f"{PREFIX}:turn:{turn_id}"


def turn_quarantine(turn_id: str) -> str:
    """Whatever held ``turn(turn_id)`` when it was no hash, moved aside by ``START``."""
    return f"{PREFIX}:turn:{turn_id}:corrupt"


def turn_errors(turn_id: str) -> str:
    """List of JSON ``AttemptError`` for every failed attempt of a turn."""
    return f"{PREFIX}:turn:{turn_id}:errors"


def conversation_queue(conversation_id: str) -> str:
    """List of turn ids not yet finished, in enqueue order; the head is the running turn."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:queue"


def conversation_active(conversation_id: str) -> str:
    """String: the turn id whose arq job is queued or running. Exists iff the queue is non-empty."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:active"


def conversation_turns(conversation_id: str) -> str:
    """List of every turn id ever enqueued for the conversation, in enqueue order."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:turns"


def conversation_state(conversation_id: str) -> str:
    """Hash: customer_id, current_agent (where the next turn starts)."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:state"


def customer_conversations(customer_id: str) -> str:
    """Zset conversation_id -> first enqueue ms, for one customer."""
    return f"{PREFIX}:customer:{customer_id}:conversations"


SESSION_PREFIX = f"{PREFIX}:session"


def session_id(conversation_id: str) -> str:
    """The id handed to the SDK's RedisSession; it builds ``{SESSION_PREFIX}:{session_id}``."""
    return f"{{{conversation_id}}}"


def session_messages(conversation_id: str) -> str:
    """The list RedisSession keeps the items in (its ``_messages_key``: SDK 0.24's layout)."""
    return f"{SESSION_PREFIX}:{session_id(conversation_id)}:messages"


def order_refund(order_id: str) -> str:
    """String: the one refund ever made for this order (JSON, with the turn that made it).

    Part of the financial ledger, like ``REFUND_LEDGER``: set once, in the same script that
    appends the ledger entry, and never expired, purged or erased.
    """
    return f"{LEDGER_PREFIX}refund:{order_id}"


def conversation_escalation(conversation_id: str) -> str:
    """String: the escalation ticket of this conversation (JSON): one per conversation."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:escalation"


# Telemetry aggregates.
AGG_KINDS = ("turn", "conversation", "customer", "model", "version")  # a workflow's: its versions'
UNKNOWN_RUN = "unknown"  # the workflow / version of telemetry written before entries named them


def version_subject(workflow: str, label: str) -> str:
    """A workflow version's aggregate subject, ``<workflow>/<label>``: the same label in two
    workflows is two versions. Workflow names never hold ``/`` (the id grammar), so the
    first ``/`` splits it back (:func:`split_version_subject`)."""
    return f"{workflow}/{label}"


def split_version_subject(subject: str) -> tuple[str, str]:
    """``(workflow, label)`` of a :func:`version_subject`."""
    workflow, _, label = subject.partition("/")
    return workflow, label


def aggregate(kind: str, subject: str) -> str:
    """Hash of counters for one subject (kind in AGG_KINDS, or 'global')."""
    return f"{PREFIX}:agg:{kind}:{subject}"


GLOBAL_SUBJECT = "fleet"
GLOBAL_AGGREGATE = f"{PREFIX}:agg:global:{GLOBAL_SUBJECT}"  # fleet-wide counters
MALFORMED_SEEN = f"{PREFIX}:seen-malformed"  # telemetry stream entry ids counted as malformed


def aggregate_index(kind: str) -> str:
    """Zset subject -> last update ms, to list the subjects of one kind."""
    return f"{PREFIX}:agg:index:{kind}"


def aggregate_day(kind: str, subject: str, day: str) -> str:
    """Hash of counters for one subject on one UTC day (YYYY-MM-DD)."""
    return f"{PREFIX}:agg:{kind}-day:{day}:{subject}"


def aggregate_window(window_start_s: int) -> str:
    """Hash of fleet-wide counters for one error-rate window."""
    return f"{PREFIX}:agg:window:{window_start_s}"


def aggregate_minute(minute_start_s: int) -> str:
    """Hash of fleet-wide figures of the turns that finished in one UTC minute (expires)."""
    return f"{PREFIX}:agg:minute:{minute_start_s}"


def event_seen(turn_id: str) -> str:
    """Set of event ids of a turn already aggregated: makes aggregation idempotent."""
    return f"{PREFIX}:seen:{turn_id}"


def turn_feedback(turn_id: str) -> str:
    """Hash feedback id -> the feedback as telemetry counted it (JSON: score, source, comment
    redacted and clipped, at), written by the telemetry aggregate: the turn's feedback list."""
    return f"{PREFIX}:feedback:{turn_id}"


def turn_checks(turn_id: str) -> str:
    """String: the turn's check outcomes (JSON list of ``CheckOutcome.as_dict`` plus
    ``outcome``), written once (``SET NX``) by the check job with the turn's ``check`` events,
    no expiry, erased with the turn: what the replay and the console show, and what tells a
    second run of the check job that the checks were written."""
    return f"{PREFIX}:checks:{turn_id}"


def turn_reruns(turn_id: str) -> str:
    """Hash rerun id -> one ``turnfleet rerun`` of the turn (JSON: candidate, changed,
    differences, check changes, usage; workers/rerun.py). It holds customer text: it expires
    with the raw-text lifetime (``TURNFLEET_RAW_RETENTION_S``) and is erased with its turn."""
    return f"{PREFIX}:reruns:{turn_id}"


def alert_fired(rule: str, subject: str, window: str) -> str:
    """String set once when a rule fires for a subject and window."""
    return f"{PREFIX}:alert-fired:{rule}:{subject}:{window}"


# Trace store and per-turn event timelines (redacted telemetry, with retention).


def trace(turn_id: str) -> str:
    """String: the turn's stored trace record(s), JSON ``[{"trace": .., "spans": [..]}, ...]``."""
    return f"{PREFIX}:trace:{turn_id}"


def turn_events(turn_id: str) -> str:
    """Hash attempt -> the attempt's telemetry batch (JSON), for timelines of unsampled turns."""
    return f"{PREFIX}:events:{turn_id}"


# Latency samples and the conversation search indexes (written by the telemetry aggregate).

LATENCY_DIMENSIONS = ("turn", "model", "agent", "tool")
SLOWEST_TURNS = f"{PREFIX}:lat-slowest"  # zset turn_id -> duration ms, the slowest 1000 kept


def latency_samples(dimension: str, name: str, metric: str) -> str:
    """List of the latest samples in ms (newest first, capped) of one metric of one subject.

    ``dimension`` is one of ``LATENCY_DIMENSIONS``; for ``turn`` the name is ``fleet``.
    """
    return f"{PREFIX}:lat:{dimension}:{name}:{metric}"


def latency_names(dimension: str) -> str:
    """Set of the names that have latency samples in one dimension (model, agent, tool)."""
    return f"{PREFIX}:lat-names:{dimension}"


FACETS = ("tool", "agent", "error", "guardrail", "version", "feedback", "check_failed")  # version:
# <workflow>/<label>; feedback: negative / positive; check_failed: the check's name


def facet_conversations(facet: str, value: str) -> str:
    """Zset conversation_id -> latest event ms with that tool, agent, error type or guardrail
    tripped, or run by that workflow version (``version_subject``)."""
    return f"{PREFIX}:agg:{facet}-conversations:{value}"


def conversation_facets(conversation_id: str) -> str:
    """Zset ``facet:value`` (``tool:lookup_order``, ``agent:Billing``, ``error:ToolError``)
    -> latest event ms, for one conversation: what ``turnfleet find`` lists per row."""
    return f"{PREFIX}:agg:conversation-facets:{conversation_id}"


def find_scratch(token: str) -> str:
    """Zset a search intersects into and deletes within one script call."""
    return f"{PREFIX}:tmp:find:{token}"


# Prometheus exposition (telemetry/metrics.py reads these at scrape time).

HIST_TURN_LATENCY = f"{PREFIX}:hist:turn_latency_ms"  # hash: bucket fields, sum, count (aggregate)
HIST_QUEUE_WAIT = f"{PREFIX}:hist:queue_wait_ms"  # the same for finished turns' queue wait
ALERTS_COUNT = f"{PREFIX}:alerts:count"  # hash rule -> alerts fired (the fire script counts)


def workflow_versions(name: str) -> str:
    """hash fingerprint -> registration JSON: every version of a workflow workers served."""
    return f"{PREFIX}:workflow:versions:{name}"


# Side effects once (turnfleet/side_effects.py).


def turn_once(turn_id: str) -> str:
    """Hash name -> JSON record: what ``once(ctx, name, ...)`` stored for this turn (no key).

    Per-turn data, like the turn's record: purged with it (``TURNFLEET_RETENTION_S``) and erased
    with it (``turnfleet forget``; ``erasure.purge_plan``)."""
    return f"{PREFIX}:once:turn:{turn_id}"


def once_by_key(workflow: str, name: str, key_digest: str) -> str:
    """String: the one record ``once(ctx, name, ..., key=...)`` ever stored for a business key
    (JSON, with the turn that made it). The key appears only as a digest (a key may be personal:
    an e-mail address). Part of the ledger: never expired, purged or erased."""
    return f"{LEDGER_PREFIX}once:{workflow}:{name}:{key_digest}"


def once_ledger(name: str) -> str:
    """Stream: a team's ledger (outbox) named in ``once(..., ledger=name)``; one entry per record
    made. ``once_ledger("refunds")`` is ``REFUND_LEDGER``. Never expired, purged or erased."""
    return f"{LEDGER_PREFIX}{name}"
