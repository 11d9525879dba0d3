"""Turning one telemetry stream entry into counters, exactly once.

Python reads the entry (one turn attempt's batch of events), prices each model call and
works out every increment; a Lua script then, for each event, ``SADD``s its id to the
turn's seen-set and applies that event's increments only if the id was new. Dedupe and
increments share one atomic script, so whatever dies when (consumer, Redis connection), an
event is counted at most once, and since the stream entry is acknowledged only after the
script ran, at least once: a redelivered or re-sent entry changes nothing.

A batch of entries is applied by one script call (``Aggregator.apply``,
``lua/aggregate_batch.lua``): the ops of all its entries merged per key and field (the
increments of a hundred turns to the fleet, customer and version hashes summed into one
``HINCRBY`` each, the sets last-wins, max/min merged), written only if *none* of the batch's
events is in its seen-set yet and no entry's subject is erased. The script checks that
(``SMISMEMBER``) before it writes anything, and Python refuses to merge a batch holding the
same event twice (a re-sent entry). Otherwise, which is a redelivery, a claim or a re-send,
each entry goes through the per-entry script (``lua/aggregate.lua``, planned again then: per
event ops behind the dedupe), so counting stays exactly once; merging only makes the common
case (every event new) cheaper, for the consumer and for ``redis-server``. For the batch script
the entries of a batch are planned in one pass into the batch's sums, increments summed per group
of keys as the events are read (``Aggregator._sums`` into one ``_Sums``, no per-entry sums merged
afterwards; an entry is planned again only when ``apply`` gets other entries than those planned
together, or one's planning failed half-way); the per-entry script's plan (``_Plan``, per event) is the reference
both must agree with (tests/test_aggregate_batch.py). Adding a counted kind means a branch in
each. The batch script also returns each touched conversation's cost after its writes, so the
conversation cost alert reads only those over the threshold (``Touched.conversation_costs``).

The entry is read through the event contract (``turnfleet.events``): an event whose kind or
payload does not fit is a ``MalformedEntry``. What each kind adds is its entry in
:data:`PLANNERS` (increments, ``find`` facets, the ``/metrics`` families it feeds).

What is counted, and where (field names are documented in :mod:`turnfleet.telemetry.stats`):

- tokens and requests from ``llm_end`` usage only (``turn_completed.usage`` is a cross-check,
  logged as ``telemetry.usage_mismatch`` when it disagrees); cost per ``llm_end`` from the
  price table, in integer nano-dollars (``cost_nusd``), or ``cost_unknown_calls`` + 1;
- tokens of an attempt that failed (``attempt_failed`` / ``turn_failed`` in its batch) count
  like any other and are also added to ``failed_attempt_tokens`` / ``failed_attempt_cost_nusd``;
- turns, failed attempts, latency (``turn_completed`` / ``turn_failed`` duration), calls,
  tool errors (``tool_end`` events carrying an error: a tool that raised, see
  ``turnfleet.tool_errors``; a business answer such as "not eligible" is none), handoffs and
  guardrails tripped (``guardrail`` events: a tripwire is an outcome of a completed turn,
  never a failure, so it feeds no error rate).

Each counted event updates the hashes of its turn, conversation, customer, customer-day
(UTC date of the event) and the fleet (``GLOBAL_KEY``); an ``llm_end`` also its model's
hash and its model-day hash (``keys.aggregate_day("model", model, day)``), and adds its cost
and one call to the customer-day hash's per-model fields ``CUSTOMER_MODEL_COST + model`` /
``CUSTOMER_MODEL_CALLS + model`` (spend per customer and model today); a finished turn also
the error-rate window hash of its end time and the fleet's minute hash (``keys.aggregate_minute``:
``turns_completed``, ``turns_failed`` and one latency bucket field, ``latency_bucket``), read
by the console's last-hour charts.

Per version (of a workflow): an entry's own fields ``workflow`` and ``version`` (written once
per entry by the worker, beside the format version ``v``; :class:`RanBy`) name what ran the
attempt. Its counted events also add :data:`SPLIT_COUNTERS` (turns, tokens, cost, latency,
failures) to ``keys.aggregate("version", keys.version_subject(name, label))``, under the same
dedupe (counted once); the entry indexes the version (``keys.aggregate_index("version")``),
sets ``workflow`` / ``version`` on the turn's hash and, when the workflow is known, the
``version`` facet of ``find`` (its subject). A workflow's figures are the sum of its
versions', added up when read (``stats``, ``/metrics``): one hash, one index and one facet
per entry keep the consumer's cost per entry within a few percent of what it was. The batch
stays format version 1: an older consumer ignores entry fields it does not know and counts
the batch exactly as before (only without the split), so nothing has to wait for a newer
consumer. Entries without the fields count under ``unknown`` (see :class:`RanBy`).

Feedback (``feedback`` events, written by ``Producer.feedback`` in entries of batch version
``versions.BATCH_FEEDBACK``, attempt 0, event id the feedback id): each adds one to
``feedback_negative`` or ``feedback_positive`` on the turn, conversation, customer, customer-day
(the day it was given), version and fleet hashes, and to the error-rate window hash of its time
(the ``feedback_negative_rate`` alert rule reads it), under the same dedupe on the turn's
seen-set, so a re-sent or redelivered feedback counts once. It sets the feedback's item in the
turn's feedback list (``keys.turn_feedback``: what the replay shows) and the ``feedback`` facet
of ``find`` (``negative`` / ``positive``). It is not the turn's activity: an entry holding only
feedback leaves the turn's identity fields, attempts and the ``last_event`` indexes alone.

Checks (``check`` events, written by the worker's check job in one entry per turn of batch version
``versions.BATCH_CHECK``, attempt 0, event id ``events.check_event_id``): each adds one to
``checks_<outcome>`` (``passed``, ``failed``, ``not_applicable``, ``inputs_expired``) on the turn,
conversation, customer, customer-day, version and fleet hashes and on the check's own hash,
``keys.aggregate("check", "<workflow>/<check>")`` (indexed in ``keys.aggregate_index("check")``:
what ``turnfleet_checks_total`` exports); a failure also ``check_failed:<check>`` on the turn's hash
(what ``find --check-failed`` names the turns by and the ``check_failed`` alert reads) and the
``check_failed`` facet (value the check's name; other outcomes index nothing). A judged check
(passed or failed) adds to its error-rate window's ``check_runs:<workflow>/<check>`` and, failed,
``check_fails:<workflow>/<check>`` (the ``check_failure_rate`` rule). A check that called a model
(``usage``, ``model``: an LLM judge) adds ``check_tokens`` and ``check_cost_nusd`` (or
``check_cost_unknown_calls``) to the version and fleet hashes only: never the turn's tokens or
cost. Same dedupe (the turn's seen-set), so a second run of the check job or a redelivered entry
counts once; like feedback, a check entry is not the turn's activity.

Errors per model: every ``attempt_failed`` and ``turn_failed`` event that names a model adds
one to that model's ``errors`` and to ``errors:<error type>`` (e.g. ``errors:RateLimitError``,
``errors:MalformedModelResponse``), under the same dedupe: a failed turn of N attempts counts
N errors, the failures the model endpoint caused and any other (a tool's Redis going away, a
turn timeout) alike, since the attempt ran on that model. The model is indexed by the
failure's time too, so a model whose every call failed still shows in ``stats(by="model")``.

Latency breakdown, from every event (not sampled), under the same dedupe:

- a finished turn's hash gets ``duration_ms``, ``queue_wait_ms``, ``model_ms`` and
  ``tool_ms`` (sums of the finishing attempt's ``llm_end`` / ``tool_end`` durations) and
  ``other_ms`` = duration − model − tool, at least 0 (tool calls may overlap; rounded to
  the µs). These are the
  finishing attempt's; ``llm_ms_sum`` / ``tool_ms_sum`` count every attempt;
- samples (ms, newest first) are pushed onto capped lists, ``keys.latency_samples``: each
  ``llm_end`` onto ``model/<model>/call`` and ``agent/<agent>/call``, each ``tool_end`` onto
  ``tool/<tool>/call``, each finished turn onto ``turn/fleet/<metric>`` for ``TURN_METRICS``.
  A list keeps the latest ``settings.latency_samples`` pushed (in aggregation order); the
  names of each dimension are in ``keys.latency_names``. Pushes sit behind the dedupe, so a
  redelivered event adds no sample;
- finished turns go into ``keys.SLOWEST_TURNS`` (score duration ms), trimmed to the
  ``SLOWEST_TURNS_KEPT`` slowest;
- histograms for Prometheus (``telemetry/metrics.py``): each finished turn adds one to a
  bucket of ``keys.HIST_TURN_LATENCY`` (its duration) and, when known, of
  ``keys.HIST_QUEUE_WAIT`` (its queue wait), plus the value to ``sum`` and one to ``count``.
  Buckets are *not* cumulative: field ``le_<bound>`` counts values in (previous bound,
  bound] ms for the bounds of ``HISTOGRAM_BOUNDS_MS``, ``le_inf`` those above the last
  (the exposition accumulates them at scrape time). Like the samples, these increments sit
  behind the dedupe: a redelivered event observes nothing twice.

Search indexes for ``turnfleet find`` (idempotent ``ZADD GT``, applied on every delivery):
``keys.facet_conversations(facet, value)`` lists the conversations per tool called
(``tool_end``), agent run (``agent_start``) and error type (``attempt_failed`` /
``turn_failed`` error type, ``ToolError`` for a tool error) and guardrail tripped (``guardrail``
events, by guardrail name), scored by the latest such event ms; ``keys.conversation_facets`` is the reverse, per conversation. The conversation hash keeps
``first_event_ms`` / ``last_event_ms``.

Erasure (``turnfleet/erasure.py``): an entry one of whose turn, conversation or customer ids
has a tombstone in ``keys.ERASED`` scored at or after the entry's stream id time is skipped
whole by the same script — nothing written, no alert, acknowledged by the consumer, counted in
the fleet hash's ``telemetry_erased_skipped`` (``ERASED_SKIPPED``) — so telemetry still
pending when a customer is forgotten cannot rebuild it, while its later turns count.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import structlog
from pydantic import ValidationError
from pydantic_core import TzInfo
from redis.asyncio import Redis

from turnfleet.telemetry.pricing import PriceTable
from turnfleet import keys, registry
from turnfleet import tool_errors
from turnfleet.events import (
    CHECK_OUTCOMES,
    CheckDetail,
    EventKind,
    FeedbackDetail,
    GuardrailDetail,
    SpansDroppedDetail,
    TelemetryEvent,
    TurnCompletedDetail,
    TurnFailedDetail,
    TurnStartedDetail,
    parse_events,
)
from turnfleet.models import ID_PATTERN, TokenUsage
from turnfleet.scripts import load_script
from turnfleet.settings import Price, TelemetrySettings

log = structlog.get_logger(__name__)

# Keys telemetry needs beyond turnfleet/keys.py (candidates to move there).
GLOBAL_SUBJECT = keys.GLOBAL_SUBJECT
GLOBAL_KEY = keys.GLOBAL_AGGREGATE
MALFORMED_SEEN = keys.MALFORMED_SEEN
DAY_TTL_S = 40 * 86400  # customer-day hashes live 40 days after their last update
MINUTE_TTL_S = 3 * 3600  # minute hashes: the console reads the last hour
MIN_WINDOW_TTL_S = 86400  # error-rate window hashes: a day, or two windows if longer

STATUS_RETRYING = "retrying"  # the turn's latest counted attempt failed; another will run

SLOWEST_TURNS_KEPT = 1000  # members of keys.SLOWEST_TURNS
TURN_METRICS = ("queue_wait", "model", "tool", "other", "total")  # per finished turn, ms
PRICES_REFRESH_S = 10.0  # a workflow's changed prices apply to calls counted after this at most
PRICES_RETRY_S = 1.0  # an entry of a workflow the last read did not know re-reads after this
CALL_METRIC = "call"  # one model or tool call's ms (dimensions model, agent, tool)
HISTOGRAM_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       120000)  # upper bounds (ms) of the turn latency / queue wait buckets
HISTOGRAM_INF = "le_inf"  # the bucket above the last bound
TOOL_ERROR = tool_errors.TOOL_ERROR  # the error facet of a tool_end that carries an error
MODEL_ERRORS = "errors"  # model hash: failed attempts (terminal or not) of turns on the model
MODEL_ERRORS_BY_TYPE = "errors:"  # model hash field prefix: those failures by error type
CUSTOMER_MODEL_COST = "model_cost_nusd:"  # customer-day field prefix: known cost per model
CUSTOMER_MODEL_CALLS = "model_calls:"  # customer-day field prefix: model calls per model
ERASED_SKIPPED = "telemetry_erased_skipped"  # fleet hash: entries skipped, their subject erased
LATENCY_BUCKET = "lat:"  # minute hash field prefix: finished turns per latency bucket
LATENCY_BUCKETS_PER_DOUBLING = 4  # bucket k holds (2^((k-1)/4), 2^(k/4)] ms: ±19% wide


def latency_bucket(value_ms: float) -> int:
    """The minute histogram's bucket of a duration: the smallest ``k >= 0`` with
    ``value_ms <= 2 ** (k / 4)`` (bucket 0 holds everything up to 1 ms)."""
    if value_ms <= 1:
        return 0
    k = math.ceil(LATENCY_BUCKETS_PER_DOUBLING * math.log2(value_ms))
    while 2 ** ((k - 1) / LATENCY_BUCKETS_PER_DOUBLING) >= value_ms:  # float edges
        k -= 1
    while 2 ** (k / LATENCY_BUCKETS_PER_DOUBLING) < value_ms:
        k += 1
    return k


def latency_bucket_bound(k: int) -> float:
    """The upper bound (ms) of minute histogram bucket ``k``."""
    return 2 ** (k / LATENCY_BUCKETS_PER_DOUBLING)

# HINCRBY / HINCRBYFLOAT counters of every aggregate hash.
INT_COUNTERS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "llm_calls",
    "tool_calls",
    "tool_errors",
    "handoffs",
    "guardrails_tripped",
    "turns_completed",
    "turns_failed",
    "attempts_failed",
    "failed_attempt_tokens",
    "failed_attempt_cost_nusd",
    "cost_nusd",
    "cost_unknown_calls",
    "latency_count",
    "spans_dropped",
    "feedback_positive",
    "feedback_negative",
    "checks_passed",
    "checks_failed",
    "checks_not_applicable",
    "checks_inputs_expired",
    "check_tokens",
    "check_cost_nusd",
    "check_cost_unknown_calls",
)
FLOAT_COUNTERS = ("latency_ms_sum", "latency_ms_max", "llm_ms_sum", "tool_ms_sum")
# What a version hash counts (turns, tokens, cost, latency, errors): the counters an operator
# compares versions by. The rest (tool calls, handoffs, time in calls...) is not split, which
# keeps the consumer's cost per entry within a few percent of what it was before versions.
SPLIT_COUNTERS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
                  "llm_calls", "cost_nusd", "cost_unknown_calls", "turns_completed", "turns_failed",
                  "attempts_failed", "latency_count", "latency_ms_sum", "feedback_positive",
                  "feedback_negative", "checks_passed", "checks_failed", "checks_not_applicable",
                  "checks_inputs_expired", "check_tokens", "check_cost_nusd", "check_cost_unknown_calls")
CHECK_OUTCOME_COUNTERS = tuple(f"checks_{o}" for o in CHECK_OUTCOMES)  # a check hash's fields
CHECK_FAILED_FIELD = "check_failed:"  # turn hash field prefix: that check failed on the turn
CHECK_RUNS = "check_runs:"  # window hash field prefix (+ <workflow>/<check>): checks judged
CHECK_FAILS = "check_fails:"  # window hash field prefix: of those, failed
# (frozensets: ``in`` a tuple of str enum members compares each by value, ~0.2 µs a test)
_AFTER_TURN_KINDS = frozenset((EventKind.feedback, EventKind.check))  # written after the turn, attempt 0

_FAILED_KINDS = frozenset((EventKind.attempt_failed, EventKind.turn_failed))
_TERMINAL_KINDS = frozenset((EventKind.turn_completed, EventKind.turn_failed))
_USAGE_KINDS = _TERMINAL_KINDS | {EventKind.attempt_failed}  # carry the attempt's usage

# The script (telemetry/lua/aggregate.lua says what a plan holds): dedupe and increments in one.
AGGREGATE = load_script("aggregate", "turnfleet.telemetry")
# A whole batch at once when none of its events was counted before (lua/aggregate_batch.lua).
AGGREGATE_BATCH = load_script("aggregate_batch", "turnfleet.telemetry")


class MalformedEntry(ValueError):
    """A stream entry that cannot be read as a batch of telemetry events."""


MAX_VERSION_CHARS = 200  # a longer version label on an entry is counted as unknown


@dataclass(frozen=True)
class RanBy:
    """The workflow and version an entry's attempt ran, from the entry's own fields
    (``workflow``, ``version``: once per entry, beside its format version ``v``).

    An entry written before entries named them (or naming something that is no workflow
    name / a label longer than ``MAX_VERSION_CHARS``) is counted under workflow and version
    ``unknown`` (``keys.UNKNOWN_RUN``), never guessed: before issue 16 every worker ran the
    Support Desk, but since ``--app`` an older worker may run any workflow. An entry with a
    workflow and no version (an attempt ended before its workflow was found: not served,
    exhausted, undecodable) is its workflow's version ``unknown``, so a workflow's versions
    always add up to the workflow. (A workflow named ``unknown`` would share its rows with
    that old telemetry: don't name one so.)
    """

    workflow: str
    version: str

    @classmethod
    def of(cls, fields: Mapping[str, Any] | None) -> RanBy:
        fields = fields or {}
        raw = (fields.get("workflow"), fields.get("version"))
        if type(raw[0]) is str and type(raw[1]) in (str, type(None)):  # read once per pair
            got = _RAN_BY.get(raw)  # type: ignore[arg-type]
            if got is None:
                if len(_RAN_BY) >= _RAN_BY_KEPT:
                    _RAN_BY.clear()
                got = _RAN_BY[raw] = cls._read(*raw)  # type: ignore[arg-type]
            return got
        return cls._read(*raw)

    @classmethod
    def _read(cls, workflow_field: Any, version_field: Any) -> RanBy:
        workflow, version = _text_field(workflow_field), _text_field(version_field)
        if not workflow or not ID_PATTERN.fullmatch(workflow):
            return cls(keys.UNKNOWN_RUN, keys.UNKNOWN_RUN)
        if not version or len(version) > MAX_VERSION_CHARS:
            version = keys.UNKNOWN_RUN
        return cls(workflow, version)

    @property
    def known(self) -> bool:
        return self.workflow != keys.UNKNOWN_RUN

    @functools.cached_property
    def subject(self) -> str:
        """The version's aggregate subject (``keys.version_subject``)."""
        return keys.version_subject(self.workflow, self.version)


_RAN_BY: dict[tuple[str, str | None], RanBy] = {}  # (workflow, version) fields -> RanBy
_RAN_BY_KEPT = 1000


def _text_field(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class FailedTurn:
    turn_id: str
    conversation_id: str
    customer_id: str


@dataclass(frozen=True)
class FailedCheck:
    """A money-path check that failed on a turn (the ``check_failed`` rule alerts on it)."""

    turn_id: str
    conversation_id: str
    customer_id: str
    workflow: str
    check: str


@dataclass
class Touched:
    """Subjects an entry may have changed: what the alert rules look at afterwards."""

    conversations: dict[str, str] = field(default_factory=dict)  # conversation -> customer
    customer_days: set[tuple[str, str]] = field(default_factory=set)  # (customer, YYYY-MM-DD)
    failed_turns: dict[str, FailedTurn] = field(default_factory=dict)
    windows: dict[int, FailedTurn | None] = field(default_factory=dict)  # start s -> a failure
    failed_checks: dict[tuple[str, str], FailedCheck] = field(default_factory=dict)  # money path
    check_windows: set[tuple[int, str]] = field(default_factory=set)  # (start s, <workflow>/<check>)
    # conversation -> its cost_nusd as the batch script left it (read in the script, after its
    # writes): where that is under the threshold the conversation cost rule reads nothing.
    conversation_costs: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Touched) -> None:
        self.conversations.update(other.conversations)
        for cid, cost in other.conversation_costs.items():
            self.conversation_costs[cid] = max(cost, self.conversation_costs.get(cid, cost))
        self.customer_days |= other.customer_days
        self.failed_turns.update(other.failed_turns)
        self.failed_checks.update(other.failed_checks)
        self.check_windows |= other.check_windows
        for start, failed in other.windows.items():
            self.windows[start] = failed or self.windows.get(start)


@dataclass
class EntryPlan:
    """One entry planned into its batch's sums (``ops``, shared by the entries planned into it:
    what ``Aggregator.apply`` sends when it gets exactly those entries) and what it touches.
    ``replan`` plans it again into other sums (``apply`` on another set of entries, or after an
    entry's planning failed half-way). ``keys`` / ``payload``: its own call of the per-entry
    script (lua/aggregate.lua), planned only when needed (a batch holding an event counted
    before, or an erased entry)."""

    entry_id: str
    touched: Touched
    ops: _Sums
    counted: int  # events of the entry the aggregate counts on their own (and deduplicates)
    legacy: Callable[[], tuple[list[str], str]]
    replan: Callable[[_Sums], None]
    skipped: bool = False  # set by ``apply``: its subject was erased (no alerts for it)
    _call: tuple[list[str], str] | None = None

    @property
    def keys(self) -> list[str]:
        return self._legacy_call()[0]

    @property
    def payload(self) -> str:
        return self._legacy_call()[1]

    def _legacy_call(self) -> tuple[list[str], str]:
        if self._call is None:
            self._call = self.legacy()
        return self._call


def parse_batch(fields: Mapping[str, Any] | None) -> list[TelemetryEvent]:
    """The events of a stream entry; ``MalformedEntry`` says what is wrong with it."""
    if not isinstance(fields, Mapping) or "batch" not in fields:
        raise MalformedEntry("entry has no 'batch' field")
    raw = fields["batch"]
    if not isinstance(raw, (str, bytes)):
        raise MalformedEntry(f"'batch' is a {type(raw).__name__}, not JSON text")
    try:
        return parse_events(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'batch'}: {err['msg']}"
            for err in exc.errors()[:3]
        )
        raise MalformedEntry(f"{exc.error_count()} problem(s): {problems}") from None


def window_start(ts: datetime, window_s: int) -> int:
    """Start (epoch seconds) of the fixed error-rate window that contains ``ts``."""
    epoch = int(_epoch_us(ts) / 10**6)
    return epoch - epoch % window_s


# An event's time is read several times while it is planned (ms, day, window): converted
# once. Keyed by the object's id; the value holds the object, so the id stays its.
_UTC: dict[int, tuple[datetime, int, str]] = {}
_UTC_KEPT = 4096
_DAYS: dict[int, str] = {}  # days since the epoch -> YYYY-MM-DD
_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()
_ONE_US = timedelta(microseconds=1)
_FIXED_TZ_TYPES = (timezone, TzInfo)  # the same offset at any time (pydantic's from JSON)
_FIXED_OFFSET_US: dict[Any, int] = {}  # such a tzinfo -> its offset in µs


def _epoch_us(ts: datetime) -> int:
    """Microseconds since the epoch (a naive ``ts`` is UTC): ``(ts - epoch)`` in integers, as
    ``datetime.timestamp`` computes it, without its cost (~2 µs on pydantic's tzinfo). A
    fixed-offset tzinfo's offset is looked up, not asked for each time."""
    us = ((ts.toordinal() - _EPOCH_ORDINAL) * 86_400 + ts.hour * 3600 + ts.minute * 60
          + ts.second) * 1_000_000 + ts.microsecond
    tz = ts.tzinfo
    if tz is None:
        return us
    off = _FIXED_OFFSET_US.get(tz)
    if off is None:
        offset = ts.utcoffset()
        off = offset // _ONE_US if offset else 0
        if type(tz) in _FIXED_TZ_TYPES and len(_FIXED_OFFSET_US) < 100:
            _FIXED_OFFSET_US[tz] = off
    return us - off


def _utc_of(ts: datetime) -> tuple[datetime, int, str]:
    """``(ts, its epoch ms, its UTC day)``, converted once per object (a naive ``ts`` is UTC).
    The ms are ``int(ts.timestamp() * 1000)``, to the last bit."""
    hit = _UTC.get(id(ts))
    if hit is not None and hit[0] is ts:
        return hit
    us = _epoch_us(ts)
    day = _DAYS.get(us // 86_400_000_000)
    if day is None:
        day = _DAYS[us // 86_400_000_000] = datetime.fromtimestamp(
            us // 1_000_000, timezone.utc).date().isoformat()
    if len(_UTC) >= _UTC_KEPT:
        _UTC.clear()
    hit = _UTC[id(ts)] = (ts, int(us / 10**6 * 1000), day)
    return hit


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _ms(ts: datetime) -> int:
    return _utc_of(ts)[1]


def _day(ts: datetime) -> str:
    """The UTC date of ``ts``, ``YYYY-MM-DD``."""
    return _utc_of(ts)[2]


def histogram_bucket(value_ms: float) -> str:
    """The (non-cumulative) bucket field a value falls in: ``le_<smallest bound ≥ value>``."""
    return _HISTOGRAM_FIELDS[bisect.bisect_left(HISTOGRAM_BOUNDS_MS, value_ms)]


_HISTOGRAM_FIELDS = (*(f"le_{bound}" for bound in HISTOGRAM_BOUNDS_MS), HISTOGRAM_INF)


_JSON_LISTS: dict[tuple[str, ...], str] = {}  # a finished turn's agents / models -> json.dumps
_JSON_LISTS_KEPT = 10_000


def _json_list(names: list[str]) -> str:
    """``json.dumps(names)``, once per distinct list (a fleet's agent paths are few)."""
    key = tuple(names)
    text = _JSON_LISTS.get(key)
    if text is None:
        if len(_JSON_LISTS) >= _JSON_LISTS_KEPT:
            _JSON_LISTS.clear()
        text = _JSON_LISTS[key] = json.dumps(names)
    return text


def _num(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


@dataclass
class _Attempt:
    """What the whole batch says about one attempt, needed while planning each event."""

    conversation_id: str
    customer_id: str
    first_ts_ms: int | None = None
    last_ts_ms: int = 0
    failed: bool = False
    llm_ms: float = 0.0  # sum of this attempt's llm_end durations
    tool_ms: float = 0.0  # sum of this attempt's tool_end durations
    agents: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    # Sums of the llm_end usage (requests, input, output, cached, reasoning tokens): plain ints
    # (``Aggregator._check_usage`` compares them with a terminal event's usage).
    llm_usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    queue_wait_ms: float | None = None
    after_turn_only: bool = True  # only feedback / check events: no attempt ran in this entry

    def note(self, ev: TelemetryEvent, kind: EventKind, ts_ms: int) -> None:
        """One event of the attempt (not one given after the turn), at ``ts_ms``: its times,
        model calls, tool time, agents, failure and queue wait."""
        self.after_turn_only = False
        if ts_ms > self.last_ts_ms:
            self.last_ts_ms = ts_ms
        if self.first_ts_ms is None or ts_ms < self.first_ts_ms:
            self.first_ts_ms = ts_ms
        if kind is _LLM_END:
            model = ev.model
            if model and model not in self.models:
                self.models.append(model)
            u = ev.usage
            if u is not None:
                s = self.llm_usage
                self.llm_usage = [s[0] + u.requests, s[1] + u.input_tokens, s[2] + u.output_tokens,
                                  s[3] + u.cached_tokens, s[4] + u.reasoning_tokens]
            if ev.duration_ms is not None:
                self.llm_ms += ev.duration_ms
            return
        if kind is _TOOL_END:
            if ev.duration_ms is not None:
                self.tool_ms += ev.duration_ms
            return
        if kind in _FAILED_KINDS:
            self.failed = True
        elif kind is _AGENT_START and ev.agent:
            self.agents.append(ev.agent)  # as the hooks record it; a terminal event's list wins
        detail = ev.detail
        if isinstance(detail, _QUEUE_WAIT_DETAILS) and detail.queue_wait_ms is not None:
            self.queue_wait_ms = detail.queue_wait_ms
        if isinstance(detail, _AGENTS_DETAILS) and detail.agents is not None:
            self.agents = list(detail.agents)


_LLM_END, _TOOL_END, _AGENT_START = EventKind.llm_end, EventKind.tool_end, EventKind.agent_start
_HANDOFF, _GUARDRAIL, _SPANS_DROPPED = EventKind.handoff, EventKind.guardrail, EventKind.spans_dropped
_FEEDBACK, _CHECK, _ATTEMPT_FAILED = EventKind.feedback, EventKind.check, EventKind.attempt_failed
_TURN_FAILED = EventKind.turn_failed
_NO_USAGE = TokenUsage()
# Key names built once (planning reads them per event).
_TURN_SAMPLE_KEYS = tuple((m, (keys.latency_samples("turn", GLOBAL_SUBJECT, m),)) for m in TURN_METRICS)
_NAMES_KEYS = {d: keys.latency_names(d) for d in ("model", "agent", "tool")}
_INDEX_KEYS = {k: keys.aggregate_index(k)
               for k in ("turn", "conversation", "customer", "version", "model", "check")}
_SAMPLE_KEYS: dict[tuple[str, str], str] = {}  # (dimension, name) -> its call samples' list
_SAMPLE_KEYS_KEPT = 10_000


def _sample_key(dimension: str, name: str) -> str:
    key = _SAMPLE_KEYS.get((dimension, name))
    if key is None:
        if len(_SAMPLE_KEYS) >= _SAMPLE_KEYS_KEPT:
            _SAMPLE_KEYS.clear()
        key = _SAMPLE_KEYS[(dimension, name)] = keys.latency_samples(dimension, name, CALL_METRIC)
    return key
_QUEUE_WAIT_DETAILS = (TurnStartedDetail, TurnCompletedDetail)
_AGENTS_DETAILS = (TurnCompletedDetail, TurnFailedDetail)


def _attempts(events: Iterable[TelemetryEvent]) -> dict[tuple[str, int], _Attempt]:
    out: dict[tuple[str, int], _Attempt] = {}
    for ev in events:
        kind = ev.kind
        a = out.get((ev.turn_id, ev.attempt))
        if a is None:
            a = out[(ev.turn_id, ev.attempt)] = _Attempt(ev.conversation_id, ev.customer_id)
        if kind in _AFTER_TURN_KINDS:
            continue  # given after the turn: not part of any attempt's figures
        a.note(ev, kind, _ms(ev.ts))
    return out


_USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
# Model calls' sums the version hash gets too, in the order ``Aggregator._sums`` keeps them.
_LLM_SPLIT_FIELDS = (*_USAGE_FIELDS, "llm_calls", "cost_nusd", "cost_unknown_calls")


class _Plan:
    """Builds the script's keys (``K.touched``) and JSON plan for one entry."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._key_ix: dict[str, int] = {}
        self.groups: list[list[int]] = []
        self._group_ix: dict[tuple[int, ...], int] = {}
        self._group_of_names: dict[tuple[str, ...], int] = {}
        self.events: list[list[Any]] = []
        self._ops: list[list[str | int]] = []  # of the event being planned
        self._always: dict[tuple[str, int, str], str] = {}
        self._zmax: dict[str, dict[str, int]] = {}  # zset -> member -> latest event ms
        self._members: dict[str, set[str]] = {}  # set -> members to SADD
        self._expire: dict[str, int] = {}
        self._seen: set[str] = set()
        self._erased: list[Any] | None = None

    def key(self, name: str) -> int:
        ix = self._key_ix.get(name)
        if ix is None:
            self.keys.append(name)
            ix = self._key_ix[name] = len(self.keys)  # Lua: 1-based
        return ix

    def group(self, names: Sequence[str]) -> int:
        names = tuple(names)
        ix = self._group_of_names.get(names)
        if ix is None:
            members = tuple(dict.fromkeys(self.key(n) for n in names))
            ix = self._group_ix.get(members)
            if ix is None:
                self.groups.append(list(members))
                ix = self._group_ix[members] = len(self.groups)
            self._group_of_names[names] = ix
        return ix

    def op(self, kind: str, targets: Sequence[str] | int, a: str, b: str | int | float) -> None:
        """One op on ``targets``: key names, or a group :meth:`group` already returned (what
        the per-event counters pass: an event's ops share a few groups)."""
        if kind in ("i", "f") and not b:
            return
        if not isinstance(targets, int):
            if not targets:
                return
            targets = self.group(targets)
        value = b if isinstance(b, str) else _num(b)
        self._ops.append([kind, targets, a, value])

    def end_event(self, seen_key: str, event_id: str) -> None:
        """Close the ops written since the last call into one deduplicated event."""
        if self._ops:
            self.events.append([self.key(seen_key), event_id, self._ops])
            self._seen.add(seen_key)
        self._ops = []

    def always(self, kind: str, target: str, a: str, b: str | int) -> None:
        """An idempotent op ('s', 'x' or 'mn') applied even when every event was already counted."""
        k = (kind, self.group([target]), a)
        value = b if isinstance(b, str) else _num(b)
        if kind in ("x", "mn") and k in self._always:
            value = (max if kind == "x" else min)(value, self._always[k], key=float)
        self._always[k] = value

    def zmax(self, key: str, member: str, ts_ms: int) -> None:
        """``ZADD GT`` member at the latest ms seen in the entry (one ZADD per key)."""
        members = self._zmax.get(key)
        if members is None:
            self._zmax[key] = {member: max(ts_ms, 0)}
        elif ts_ms > members.get(member, 0):
            members[member] = ts_ms

    def index(self, kind: str, subject: str, ts_ms: int) -> None:
        self.zmax(_INDEX_KEYS.get(kind) or keys.aggregate_index(kind), subject, ts_ms)

    def member(self, key: str, name: str) -> None:
        """``SADD`` name to a set (one SADD per key), whatever was new."""
        self._members.setdefault(key, set()).add(name)

    def expire(self, key: str, ttl_s: int) -> None:
        self._expire[key] = max(ttl_s, self._expire.get(key, 0))

    def payload(self, seen_ttl_s: int, samples_cap: int = 1) -> str:
        post: list[list[Any]] = [[k, g, a, v] for (k, g, a), v in self._always.items()]
        for key, members in self._zmax.items():
            flat = [x for m, ts_ms in members.items() for x in (str(ts_ms), m)]
            post.append(["z", self.group([key]), "", flat])
        for key, names in self._members.items():
            post.append(["sa", self.group([key]), "", sorted(names)])
        for key in self._seen:
            self.expire(key, seen_ttl_s)
        for key, ttl in self._expire.items():
            post.append(["e", self.group([key]), "", str(ttl)])
        body = {"g": self.groups, "e": self.events, "post": post,
                "cap": max(samples_cap, 1), "top": SLOWEST_TURNS_KEPT}
        if self._erased is not None:
            body["er"] = self._erased
        return json.dumps(body, separators=(",", ":"))

    def erased_check(self, entry_id: str, ids: Iterable[str]) -> None:
        """Skip the entry if one of ``ids`` was erased at or after its stream time (an id
        that is no stream id, as in hand-fed tests, counts as written at time 0)."""
        ms = entry_id.partition("-")[0]
        self._erased = [self.key(keys.ERASED), self.key(keys.ERASED_SALT), self.key(GLOBAL_KEY),
                        ms if ms.isdigit() else "0", sorted(ids)]


# -- the batch path: an entry's writes summed in one pass, a batch's merged per key -----------
#
# What the batch script (lua/aggregate_batch.lua) applies when every event of a batch is new:
# the same writes the per-entry script (``_Plan``, the reference, still what a redelivery or
# an erased subject goes through) makes entry by entry, computed with less work per event: an
# batch's increments summed per group of keys (turn, conversation, customer, customer-day,
# fleet, version...) and field as its entries' events are read, with no op list per event and
# no per-entry sums, then split into keys (:func:`_merge_batch`). tests/test_aggregate_batch.py
# checks that both paths write the same.


class _Sums:
    """A batch's writes for the batch script, summed as its entries are planned (one pass, no
    per-entry sums merged afterwards): increments per group of keys and field (ints and floats
    apart), HSETs last-wins per key, max/min merged, statuses, samples and slowest turns in
    order, ``ZADD GT`` members at their latest ms, set members, TTLs, the counted events' ids
    per seen-set and what the erasure check needs, per entry. ``entries``: the ids of the
    entries planned into it, in order. ``unmergeable``: an entry holds a NaN or infinite figure
    (Redis refuses it half-way through a script); ``twice``: an event id was counted twice (a
    re-sent entry); ``broken``: planning an entry failed half-way (its writes may be in here):
    then ``Aggregator.apply`` plans its entries again, or sends them one by one."""

    __slots__ = ("gi", "gf", "sets", "x", "mn", "status", "samples", "tops", "zmax", "members",
                 "expire", "ids", "seen_ids", "n_counted", "erased", "entries", "unmergeable",
                 "twice", "broken")

    def __init__(self) -> None:
        self.gi: dict[tuple[str, ...], dict[str, int]] = {}
        self.gf: dict[tuple[str, ...], dict[str, float]] = {}
        self.sets: dict[str, dict[str, str]] = {}
        self.x: dict[str, dict[str, str]] = {}
        self.mn: dict[str, dict[str, str]] = {}
        self.status: list[tuple[str, str, str]] = []
        self.samples: dict[str, list[str]] = {}
        self.tops: dict[str, list[str]] = {}
        self.zmax: dict[str, dict[str, int]] = {}
        self.members: dict[str, set[str]] = {}
        self.expire: dict[str, int] = {}
        self.ids: dict[str, list[str]] = {}  # seen-set -> event ids counted
        self.seen_ids: set[tuple[str, str]] = set()
        self.n_counted = 0
        self.erased: list[list[str]] = []
        self.entries: list[str] = []
        self.unmergeable = False
        self.twice = False
        self.broken = False

    def i(self, g: tuple[str, ...], name: str, n: int) -> None:
        if n:
            h = self.gi.get(g)
            if h is None:
                self.gi[g] = {name: n}
            else:
                h[name] = h.get(name, 0) + n

    def f(self, g: tuple[str, ...], name: str, v: float) -> None:
        if v:
            h = self.gf.get(g)
            if h is None:
                self.gf[g] = {name: v}
            else:
                h[name] = h.get(name, 0.0) + v

    def s(self, key: str, name: str, value: str) -> None:
        h = self.sets.get(key)
        if h is None:
            self.sets[key] = {name: value}
        else:
            h[name] = value

    def extreme(self, acc: dict[str, dict[str, str]], key: str, name: str, value: str, top: bool) -> None:
        h = acc.get(key)
        if h is None:
            acc[key] = {name: value}
            return
        old = h.get(name)
        if old is None or (float(value) > float(old) if top else float(value) < float(old)):
            h[name] = value

    def sample(self, key: str, value: str) -> None:
        got = self.samples.get(key)
        if got is None:
            self.samples[key] = [value]
        else:
            got.append(value)

    def zadd(self, key: str, member: str, ts_ms: int) -> None:
        members = self.zmax.get(key)
        if members is None:
            self.zmax[key] = {member: max(ts_ms, 0)}
            return
        old = members.get(member)
        if old is None:
            members[member] = max(ts_ms, 0)
        elif ts_ms > old:
            members[member] = ts_ms

    def ttl(self, key: str, ttl_s: int) -> None:
        if self.expire.get(key, 0) < ttl_s:
            self.expire[key] = ttl_s

    def counted(self, seen: str, event_id: str) -> None:
        self.n_counted += 1
        pair = (seen, event_id)
        if pair in self.seen_ids:
            self.twice = True
            return
        self.seen_ids.add(pair)
        got = self.ids.get(seen)
        if got is None:
            self.ids[seen] = [event_id]
        else:
            got.append(event_id)


def _merge_batch(S: _Sums, seen_ttl_s: int, samples_cap: int,
                 reads: Sequence[str] = ()) -> tuple[list[str], bytes] | None:
    """The batch script's keys and plan (lua/aggregate_batch.lua) for a batch's summed writes,
    as if each entry's script ran in turn with every event new; ``None`` when an event id is in
    the batch twice (a re-sent entry) or an entry holds a NaN or infinite figure: the entries
    then go one by one. ``S`` is left as it was.

    Increments of a group holding an entry's own keys (turn, conversation) are added per key;
    the rest of the group (fleet, customer, day, version, model: shared by the batch) is summed
    per group first and added per key once. Key names get their indexes at the end.
    ``reads``: hashes whose ``cost_nusd`` the script returns after its writes."""
    if S.unmergeable or S.twice:
        return None
    incr: dict[str, dict[str, Any]] = {}
    incrf: dict[str, dict[str, Any]] = {}
    if len(_SPLITS) >= _SPLITS_KEPT:
        _SPLITS.clear()
    splits = _SPLITS
    for groups, acc in ((S.gi, incr), (S.gf, incrf)):
        shared: dict[tuple[str, ...], dict[str, Any]] = {}
        for g, fields in groups.items():
            _, own, rest = splits.get(g) or _group_split(g, splits)
            for k in own:
                h = acc.get(k)
                if h is None:
                    acc[k] = dict(fields)
                else:
                    for name, v in fields.items():
                        h[name] = h.get(name, 0) + v
            if rest:
                h = shared.get(rest)
                if h is None:
                    shared[rest] = dict(fields)
                else:
                    for name, v in fields.items():
                        h[name] = h.get(name, 0) + v
        for rest, fields in shared.items():
            for k in rest:
                h = acc.get(k)
                if h is None:
                    acc[k] = fields if len(rest) == 1 else dict(fields)
                else:
                    for name, v in fields.items():
                        h[name] = h.get(name, 0) + v
    expire = dict(S.expire)
    for name in S.ids:
        if expire.get(name, 0) < seen_ttl_s:
            expire[name] = seen_ttl_s
    names: list[str] = []
    ix: dict[str, int] = {}

    def key(name: str) -> int:
        i = ix.get(name)
        if i is None:
            names.append(name)
            i = ix[name] = len(names)
        return i

    body: dict[str, Any] = {
        "ids": [[key(k), *v] for k, v in S.ids.items()],
        "s": [[key(k), h] for k, h in S.sets.items()],
        "x": [[key(k), h] for k, h in S.x.items()],
        "mn": [[key(k), h] for k, h in S.mn.items()],
        "st": [[key(k), a, value] for k, a, value in S.status],
        "i": [[key(k), h] for k, h in incr.items()],
        "f": [[key(k), {f: repr(v) for f, v in h.items()}] for k, h in incrf.items()],
        "l": [[key(k), *v] for k, v in S.samples.items()],
        "t": [[key(k), *v] for k, v in S.tops.items()],
        "z": [[key(k), *(x for m, ts in z.items() for x in (str(ts), m))] for k, z in S.zmax.items()],
        "sa": [[key(k), *sorted(m)] for k, m in S.members.items()],
        "e": [[key(k), str(ttl)] for k, ttl in expire.items()],
        "cap": max(samples_cap, 1), "top": SLOWEST_TURNS_KEPT,
    }
    if S.erased:
        body["er"] = [key(keys.ERASED), key(keys.ERASED_SALT), S.erased]
    if reads:
        body["rd"] = [key(k) for k in reads]
    return names, orjson.dumps(body)


_OWN_PREFIXES = (keys.aggregate("turn", ""), keys.aggregate("conversation", ""))
_Split = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
# Groups seen by recent merges, split: the shared ones (fleet, a window, a histogram...) recur
# in every batch. Cleared when it holds _SPLITS_KEPT (each entry adds its own few).
_SPLITS: dict[tuple[str, ...], _Split] = {}
_SPLITS_KEPT = 20_000


def _group_split(names: tuple[str, ...], cache: dict[tuple[str, ...], _Split]) -> _Split:
    """A group's distinct key names; of them the turn's and conversation's (the entry's own),
    and the others (fleet, customer, day, version, model: shared by the batch, summed per
    group first)."""
    unique = tuple(dict.fromkeys(names)) if len(names) > 1 else names
    own = tuple(n for n in unique if n.startswith(_OWN_PREFIXES))
    split = cache[names] = (unique, own, tuple(n for n in unique if n not in own) if own else unique)
    return split


class Aggregator:
    """Plans and applies the aggregate script for stream entries."""

    def __init__(
        self, redis: Redis, settings: TelemetrySettings, prices: PriceTable | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.prices = prices or PriceTable.from_settings(settings)
        self.window_s = settings.alert_error_rate_window_s
        self._script = AGGREGATE.bind(redis)
        self._batch = AGGREGATE_BATCH.bind(redis)
        # Workflows' own prices (``Workflow.prices``, from the registry) over ``self.prices``:
        # a call in a turn of workflow W is priced by W's table when W declares one.
        self.workflow_prices: dict[str, PriceTable] = {}
        self._registered: set[str] = set()  # workflow names the last registry read saw
        self._prices_read_at = float("-inf")

    async def refresh_prices(self, workflows: Iterable[str] = ()) -> None:
        """Re-read the workflows' own prices from the registry when the last read is
        ``PRICES_REFRESH_S`` old, or sooner (at most every ``PRICES_RETRY_S``) when an entry
        names a workflow that read did not see (its first worker registered it since)."""
        age = time.monotonic() - self._prices_read_at
        new = any(w not in self._registered for w in workflows if w != keys.UNKNOWN_RUN)
        if age < PRICES_REFRESH_S and not (new and age >= PRICES_RETRY_S):
            return
        declared = await registry.workflow_prices(self.redis)
        self._registered = set(await registry.workflows(self.redis))
        tables = {}
        for name, prices in declared.items():
            try:
                tables[name] = PriceTable({**self.prices.prices,
                                           **{m: Price.model_validate(p) for m, p in prices.items()}})
            except (ValidationError, AttributeError, TypeError) as exc:  # a registration edited by hand
                log.warning("pricing.workflow_prices_unreadable", workflow=name, error=str(exc)[:200])
        self.workflow_prices = tables
        self._prices_read_at = time.monotonic()

    # -- planning (pure) -------------------------------------------------------------

    @staticmethod
    def sums() -> _Sums:
        """Empty sums, for the entries of one batch to be planned ``into``."""
        return _Sums()

    def plan(self, entry_id: str, fields: Mapping[str, Any] | None,
             into: _Sums | None = None) -> EntryPlan:
        """The writes of one entry, summed into its batch's ``into`` (new sums if ``None``) for
        the batch script; the per-entry script's plan is made only if needed
        (``EntryPlan.legacy``). Raises ``MalformedEntry``."""
        events = parse_batch(fields)
        ran = RanBy.of(fields)
        prices = self.workflow_prices.get(ran.workflow, self.prices)
        S = _Sums() if into is None else into
        n = S.n_counted
        try:
            touched = self._sums(S, entry_id, events, ran, prices)
        except BaseException:
            S.broken = True  # some of its writes may be in S
            raise
        S.entries.append(entry_id)

        def legacy() -> tuple[list[str], str]:  # read again: the events are not kept meanwhile
            plan = _Plan()
            self._build(plan, entry_id, parse_batch(fields), ran, prices)
            return plan.keys, plan.payload(self.settings.seen_ttl_s, self.settings.latency_samples)

        def replan(other: _Sums) -> None:
            self._sums(other, entry_id, parse_batch(fields), ran, prices)
            other.entries.append(entry_id)

        return EntryPlan(entry_id, touched, S, S.n_counted - n, legacy, replan)

    def _build(self, plan: _Plan, entry_id: str, events: list[TelemetryEvent], ran: RanBy,
               prices: PriceTable) -> tuple[Touched, dict[tuple[str, int], _Attempt]]:
        """Plan one entry's events into ``plan``; what it touches, and its attempts."""
        attempts = _attempts(events)
        touched = Touched()
        split = [keys.aggregate("version", ran.subject)]
        countings: dict[tuple[str, int], _Counting] = {}  # one per attempt, shared by its events
        for ev in events:
            spec = PLANNERS[ev.kind]
            if spec.count is not None:
                at = countings.get((ev.turn_id, ev.attempt))
                if at is None:
                    at = countings[(ev.turn_id, ev.attempt)] = _Counting(
                        attempts[(ev.turn_id, ev.attempt)], touched, split=split, prices=prices,
                        ran=ran)
                self._plan_event(plan, ev, at, spec.count)
            if spec.facets is not None:
                _plan_facets(plan, ev, spec.facets(ev))
        for (turn_id, number), a in attempts.items():
            if a.after_turn_only:
                continue  # feedback and checks are indexed by their own facets, not as activity
            # Identity and listing: the same values whatever is redelivered, so always applied.
            turn = keys.aggregate("turn", turn_id)
            plan.always("s", turn, "conversation_id", a.conversation_id)
            plan.always("s", turn, "customer_id", a.customer_id)
            conv = keys.aggregate("conversation", a.conversation_id)
            plan.always("s", conv, "customer_id", a.customer_id)
            plan.always("x", turn, "attempts", number)
            plan.always("mn", conv, "first_event_ms", a.last_ts_ms if a.first_ts_ms is None
                        else a.first_ts_ms)
            plan.always("x", conv, "last_event_ms", a.last_ts_ms)
            for kind, subject in (("turn", turn_id), ("conversation", a.conversation_id),
                                  ("customer", a.customer_id), ("version", ran.subject)):
                plan.index(kind, subject, a.last_ts_ms)
            plan.always("s", turn, "workflow", ran.workflow)
            plan.always("s", turn, "version", ran.version)
            if ran.known:
                _plan_facets_at(plan, a.conversation_id, a.last_ts_ms, [("version", ran.subject)])
            touched.conversations[a.conversation_id] = a.customer_id
        plan.erased_check(entry_id, {x for (t, _), a in attempts.items()
                                     for x in (t, a.conversation_id, a.customer_id)})
        return touched, attempts

    # -- planning for the batch script: one pass per entry -----------------------------------

    def _sums(self, S: _Sums, entry_id: str, events: list[TelemetryEvent], ran: RanBy,
              prices: PriceTable) -> Touched:
        """One entry's writes for the batch script (the same as ``_build`` plans for the
        per-entry script, every event new), summed into its batch's ``S``; what it touched."""
        touched = Touched()
        attempts: dict[tuple[str, int], _Attempt] = {}
        us_of: list[int] = []
        for ev in events:  # the attempts' figures, and each event's time, once
            ts = ev.ts
            us = _epoch_us(ts)
            us_of.append(us)
            kind = ev.kind
            a = attempts.get((ev.turn_id, ev.attempt))
            if a is None:
                a = attempts[(ev.turn_id, ev.attempt)] = _Attempt(ev.conversation_id,
                                                                        ev.customer_id)
            if kind in _AFTER_TURN_KINDS:
                continue
            a.note(ev, kind, int(us / 10**6 * 1000))
        version_key = keys.aggregate("version", ran.subject)
        samples_on = self.settings.latency_samples > 0
        contexts: dict[tuple[str, int], list[Any]] = {}
        calls: list[list[Any]] = []  # the model call groups of every attempt (and day)
        for ev, us in zip(events, us_of):
            kind = ev.kind
            duration = ev.duration_ms
            if duration is not None and not math.isfinite(duration):
                S.unmergeable = True
            if kind in _FAST_COUNTED:
                turn_id, conv, cust = ev.turn_id, ev.conversation_id, ev.customer_id
                day = _DAYS.get(us // 86_400_000_000)
                if day is None:
                    day = _DAYS[us // 86_400_000_000] = datetime.fromtimestamp(
                        us // 1_000_000, timezone.utc).date().isoformat()
                c = contexts.get((turn_id, ev.attempt))
                if c is None or c[0] != (day, conv, cust):  # the attempt's first, or a new day
                    turn = keys.aggregate("turn", turn_id)
                    cust_day = keys.aggregate_day("customer", cust, day)
                    every = (turn, keys.aggregate("conversation", conv),
                             keys.aggregate("customer", cust), cust_day, GLOBAL_KEY)
                    c = contexts[(turn_id, ev.attempt)] = [
                        (day, conv, cust), every, (*every, version_key), (turn,),
                        keys.event_seen(turn_id), {}]
                    S.ttl(cust_day, DAY_TTL_S)
                _, every, split, g_turn, seen, llm_groups = c
                a = attempts[(turn_id, ev.attempt)]
                if kind is _LLM_END:
                    model = ev.model
                    groups = llm_groups.get(model)
                    if groups is None:  # the attempt's first call on this model (this day)
                        targets = every
                        if model:
                            model_day = keys.aggregate_day("model", model, day)
                            targets = (*every, keys.aggregate("model", model), model_day)
                            S.ttl(model_day, DAY_TTL_S)
                        # split group, targets, customer-day, model, [requests, input, output,
                        # cached, reasoning, calls, cost, unknown-cost calls, failed tokens,
                        # failed cost], llm ms
                        groups = llm_groups[model] = [(*targets, version_key), targets, (every[3],),
                                                      model, [0] * 10, 0.0]
                        calls.append(groups)
                        touched.customer_days.add((cust, day))
                    # Summed per model group here, added to the plan once (below).
                    totals = groups[4]
                    usage = ev.usage or _NO_USAGE
                    totals[0] += usage.requests
                    totals[1] += usage.input_tokens
                    totals[2] += usage.output_tokens
                    totals[3] += usage.cached_tokens
                    totals[4] += usage.reasoning_tokens
                    totals[5] += 1
                    cost = prices.cost_nusd(model, usage)  # type: ignore[arg-type]
                    if cost is None:
                        totals[7] += 1
                    else:
                        totals[6] += cost
                    if a.failed:
                        totals[8] += usage.total_tokens
                        totals[9] += cost or 0
                    if duration is not None:
                        groups[5] += duration
                        if samples_on:
                            self._call_samples(S, _num(duration), (("model", model), ("agent", ev.agent)))
                    if model:
                        S.zadd(_INDEX_KEYS["model"], model, int(us / 10**6 * 1000))
                elif kind is _TOOL_END:
                    S.i(every, "tool_calls", 1)
                    if ev.error is not None:
                        S.i(every, "tool_errors", 1)
                    if duration is not None:
                        S.f(every, "tool_ms_sum", duration)
                        if samples_on:
                            self._call_samples(S, _num(duration), (("tool", ev.tool),))
                elif kind is _HANDOFF:
                    S.i(every, "handoffs", 1)
                elif kind is _GUARDRAIL:
                    S.i(every, "guardrails_tripped", 1)
                    S.s(g_turn[0], "guardrail", ev.detail.guardrail or "guardrail")
                elif kind is _SPANS_DROPPED:
                    if not ev.detail.count:
                        continue  # nothing counted: the event is not deduplicated either
                    S.i(every, "spans_dropped", ev.detail.count)
                elif kind is _FEEDBACK:
                    self._sum_feedback(S, ev, us, split, day, touched)
                elif kind is _CHECK:
                    self._sum_check(S, ev, us, split, g_turn, ran, prices, touched)
                elif kind is _ATTEMPT_FAILED:
                    S.i(split, "attempts_failed", 1)
                    S.status.append((g_turn[0], "0", STATUS_RETRYING))
                    self._sum_failure(S, ev, us, g_turn[0])
                elif kind in _TERMINAL_KINDS:
                    self._sum_terminal(S, ev, us, a, every, split, g_turn[0], touched)
                else:  # a kind PLANNERS counts needs its branch here too
                    raise NotImplementedError(f"no batch planning for {kind}")
                S.counted(seen, ev.event_id)
            facets = _FAST_FACETS.get(kind)
            if facets is not None:
                for facet, value in facets(ev):
                    ms = int(us / 10**6 * 1000)
                    S.zadd(keys.facet_conversations(facet, value), ev.conversation_id, ms)
                    S.zadd(keys.conversation_facets(ev.conversation_id), f"{facet}:{value}", ms)
        for g_split, g_targets, g_cust_day, model, totals, llm_ms in calls:
            for name, n in zip(_LLM_SPLIT_FIELDS, totals):
                S.i(g_split, name, n)
            if model:
                S.i(g_cust_day, CUSTOMER_MODEL_CALLS + model, totals[5])
                S.i(g_cust_day, CUSTOMER_MODEL_COST + model, totals[6])
            S.i(g_targets, "failed_attempt_tokens", totals[8])
            S.i(g_targets, "failed_attempt_cost_nusd", totals[9])
            S.f(g_targets, "llm_ms_sum", llm_ms)
        ids: set[str] = set()
        for (turn_id, number), a in attempts.items():
            ids.update((turn_id, a.conversation_id, a.customer_id))
            if a.after_turn_only:
                continue  # feedback and checks are indexed by their own facets, not as activity
            # Identity and listing: the same values whatever is redelivered.
            turn = keys.aggregate("turn", turn_id)
            conv = keys.aggregate("conversation", a.conversation_id)
            S.s(turn, "conversation_id", a.conversation_id)
            S.s(turn, "customer_id", a.customer_id)
            S.s(conv, "customer_id", a.customer_id)
            S.extreme(S.x, turn, "attempts", str(number), True)
            S.extreme(S.mn, conv, "first_event_ms",
                      str(a.last_ts_ms if a.first_ts_ms is None else a.first_ts_ms), False)
            S.extreme(S.x, conv, "last_event_ms", str(a.last_ts_ms), True)
            last = a.last_ts_ms
            S.zadd(_INDEX_KEYS["turn"], turn_id, last)
            S.zadd(_INDEX_KEYS["conversation"], a.conversation_id, last)
            S.zadd(_INDEX_KEYS["customer"], a.customer_id, last)
            S.zadd(_INDEX_KEYS["version"], ran.subject, last)
            S.s(turn, "workflow", ran.workflow)
            S.s(turn, "version", ran.version)
            if ran.known:
                S.zadd(keys.facet_conversations("version", ran.subject), a.conversation_id, last)
                S.zadd(keys.conversation_facets(a.conversation_id), f"version:{ran.subject}", last)
            touched.conversations[a.conversation_id] = a.customer_id
        ms = entry_id.partition("-")[0]
        S.erased.append([ms if ms.isdigit() else "0", *sorted(ids)])
        self._check_usage(events, attempts)
        return touched

    def _call_samples(self, S: _Sums, value: str, names: tuple[tuple[str, str | None], ...]) -> None:
        """One model or tool call's duration onto the lists of each (dimension, name) it names."""
        for dimension, name in names:
            if name:
                S.sample(_sample_key(dimension, name), value)
                got = S.members.get(_NAMES_KEYS[dimension])
                if got is None:
                    S.members[_NAMES_KEYS[dimension]] = {name}
                else:
                    got.add(name)

    def _sum_failure(self, S: _Sums, ev: TelemetryEvent, us: int, turn: str) -> None:
        """A failed attempt: its error on the turn, and counted against its model."""
        error = ev.error
        if error is not None:
            S.s(turn, "error_type", error.type)
            S.s(turn, "error_message", error.message)
        model = ev.model
        if model:
            g_model = (keys.aggregate("model", model),)
            S.i(g_model, MODEL_ERRORS, 1)
            if error is not None:
                S.i(g_model, MODEL_ERRORS_BY_TYPE + error.type, 1)
            S.zadd(_INDEX_KEYS["model"], model, int(us / 10**6 * 1000))

    def _sum_terminal(self, S: _Sums, ev: TelemetryEvent, us: int, attempt: _Attempt,
                      every: tuple[str, ...], split: tuple[str, ...], turn: str,
                      touched: Touched) -> None:
        """A finished turn (as ``_plan_terminal``)."""
        failed = ev.kind is _TURN_FAILED
        status = "failed" if failed else "completed"
        duration = ev.duration_ms
        S.i(split, f"turns_{status}", 1)
        d = None
        if duration is not None:
            d = _num(duration)
            S.i(split, "latency_count", 1)
            S.f(split, "latency_ms_sum", duration)
            for k in every:
                S.extreme(S.x, k, "latency_ms_max", d, True)
            S.s(turn, "duration_ms", d)
        S.status.append((turn, "1", status))
        S.s(turn, "finished_at", _utc(ev.ts).isoformat())
        S.s(turn, "agents", _json_list(attempt.agents))
        S.s(turn, "models", _json_list(attempt.models or ([ev.model] if ev.model else [])))
        if ev.model:
            S.s(turn, "model", ev.model)
        queue_wait = attempt.queue_wait_ms
        q = None
        if queue_wait is not None:
            if not math.isfinite(queue_wait):
                S.unmergeable = True
            q = _num(queue_wait)
            S.s(turn, "queue_wait_ms", q)
        # The latency breakdown, its samples and the turn's place among the slowest (each
        # figure's text made once).
        llm, tool = _num(attempt.llm_ms), _num(attempt.tool_ms)
        S.s(turn, "model_ms", llm)
        S.s(turn, "tool_ms", tool)
        o = None
        if d is not None:
            o = _num(round(max(0.0, duration - attempt.llm_ms - attempt.tool_ms), 3))  # type: ignore[operator]
            S.s(turn, "other_ms", o)
            tops = S.tops.get(keys.SLOWEST_TURNS)
            if tops is None:
                tops = S.tops[keys.SLOWEST_TURNS] = []
            tops += (d, ev.turn_id)
        if self.settings.latency_samples > 0:
            for (_, sample), text in zip(_TURN_SAMPLE_KEYS, (q, llm, tool, o, d)):
                if text is not None:
                    S.sample(sample[0], text)
        for key, value in ((keys.HIST_TURN_LATENCY, duration), (keys.HIST_QUEUE_WAIT, queue_wait)):
            if value is not None:
                g = (key,)
                S.i(g, histogram_bucket(value), 1)
                S.i(g, "count", 1)
                S.f(g, "sum", value)
        if failed:
            self._sum_failure(S, ev, us, turn)
        epoch = int(us / 10**6)
        start = epoch - epoch % self.window_s
        window = keys.aggregate_window(start)
        S.i((window,), f"turns_{status}", 1)
        S.ttl(window, max(MIN_WINDOW_TTL_S, 2 * self.window_s))
        minute = keys.aggregate_minute(epoch - epoch % 60)
        S.i((minute,), f"turns_{status}", 1)
        if duration is not None:
            S.i((minute,), f"{LATENCY_BUCKET}{latency_bucket(duration)}", 1)
        S.ttl(minute, MINUTE_TTL_S)
        pointer = FailedTurn(ev.turn_id, ev.conversation_id, ev.customer_id) if failed else None
        touched.windows[start] = pointer or touched.windows.get(start)
        if pointer:
            touched.failed_turns[ev.turn_id] = pointer

    def _sum_feedback(self, S: _Sums, ev: TelemetryEvent, us: int, split: tuple[str, ...],
                      day: str, touched: Touched) -> None:
        """A score on a turn (as ``_count_feedback``)."""
        d = ev.detail
        polarity = feedback_polarity(d.score)
        S.i(split, f"feedback_{polarity}", 1)
        kept = {"feedback_id": d.feedback_id or ev.event_id, "score": d.score, "source": d.source,
                "comment": d.comment, "at": _utc(ev.ts).isoformat()}
        S.s(keys.turn_feedback(ev.turn_id), kept["feedback_id"], json.dumps(kept, separators=(",", ":")))
        epoch = int(us / 10**6)
        start = epoch - epoch % self.window_s
        window = keys.aggregate_window(start)
        S.i((window,), f"feedback_{polarity}", 1)
        S.ttl(window, max(MIN_WINDOW_TTL_S, 2 * self.window_s))
        touched.windows.setdefault(start, None)
        touched.customer_days.add((ev.customer_id, day))

    def _sum_check(self, S: _Sums, ev: TelemetryEvent, us: int, split: tuple[str, ...],
                   g_turn: tuple[str], ran: RanBy, prices: PriceTable, touched: Touched) -> None:
        """One check's outcome on a finished turn (as ``_count_check``)."""
        d = ev.detail
        subject = keys.version_subject(ran.workflow, d.check)
        counter = f"checks_{d.outcome}"
        S.i(split, counter, 1)
        S.i((keys.aggregate("check", subject),), counter, 1)
        S.zadd(_INDEX_KEYS["check"], subject, int(us / 10**6 * 1000))
        if d.outcome == "failed":
            S.i(g_turn, CHECK_FAILED_FIELD + d.check, 1)
            if d.money_path:
                touched.failed_checks[(ev.turn_id, d.check)] = FailedCheck(
                    ev.turn_id, ev.conversation_id, ev.customer_id, ran.workflow, d.check)
        if d.outcome in ("passed", "failed"):
            epoch = int(us / 10**6)
            start = epoch - epoch % self.window_s
            window = (keys.aggregate_window(start),)
            S.i(window, CHECK_RUNS + subject, 1)
            if d.outcome == "failed":
                S.i(window, CHECK_FAILS + subject, 1)
            S.ttl(window[0], max(MIN_WINDOW_TTL_S, 2 * self.window_s))
            touched.check_windows.add((start, subject))
        usage = ev.usage
        if usage is not None:  # an LLM judge: its own spend, never the turn's
            judge = (split[-1], GLOBAL_KEY)
            S.i(judge, "check_tokens", usage.total_tokens)
            cost = prices.cost_nusd(ev.model, usage)  # type: ignore[arg-type]
            if cost is None:
                S.i(judge, "check_cost_unknown_calls", 1)
            else:
                S.i(judge, "check_cost_nusd", cost)

    @staticmethod
    def _check_usage(events: list[TelemetryEvent], attempts: dict[tuple[str, int], _Attempt]) -> None:
        """``turn_completed``/``turn_failed`` usage must equal the attempt's ``llm_end`` sum."""
        for ev in events:
            u = ev.usage
            if u is None or ev.kind not in _USAGE_KINDS:
                continue
            counted_sums = attempts[(ev.turn_id, ev.attempt)].llm_usage
            if [u.requests, u.input_tokens, u.output_tokens, u.cached_tokens,
                    u.reasoning_tokens] != counted_sums:
                log.warning(
                    "telemetry.usage_mismatch", turn_id=ev.turn_id, attempt=ev.attempt,
                    event_id=ev.event_id, reported=u.model_dump(),
                    counted_from_llm_end=dict(zip(_USAGE_FIELDS, counted_sums)),
                )

    def plan_malformed(self, entry_id: str, into: _Sums | None = None) -> EntryPlan:
        """Count a malformed entry in ``telemetry_malformed``, once per stream entry id."""

        def build(plan: _Plan) -> _Plan:
            plan.op("i", [GLOBAL_KEY], "telemetry_malformed", 1)
            plan.end_event(MALFORMED_SEEN, entry_id)
            return plan

        def legacy() -> tuple[list[str], str]:
            plan = build(_Plan())
            return plan.keys, plan.payload(self.settings.seen_ttl_s)

        def replan(S: _Sums) -> None:
            S.i((GLOBAL_KEY,), "telemetry_malformed", 1)
            S.counted(MALFORMED_SEEN, entry_id)
            S.entries.append(entry_id)

        ops = _Sums() if into is None else into
        replan(ops)
        return EntryPlan(entry_id, Touched(), ops, 1, legacy, replan)

    def _plan_event(self, plan: _Plan, ev: TelemetryEvent, at: _Counting, count: _Count) -> None:
        """One counted event: its kind's increments, deduplicated on its id."""
        day = _day(ev.ts)
        if (day, ev.conversation_id, ev.customer_id) != at.of:  # the attempt's first, or a new day
            at.of = (day, ev.conversation_id, ev.customer_id)
            at.day = day
            turn = keys.aggregate("turn", ev.turn_id)
            cust_day = keys.aggregate_day("customer", ev.customer_id, day)
            at.every = [turn, keys.aggregate("conversation", ev.conversation_id),
                        keys.aggregate("customer", ev.customer_id), cust_day, GLOBAL_KEY]
            at.g_every = plan.group(at.every)
            at.g_split = plan.group([*at.every, *at.split])
            at.g_turn = plan.group([turn])
            at.seen = keys.event_seen(ev.turn_id)
            at.llm_groups = {}
            plan.expire(cust_day, DAY_TTL_S)
        count(self, plan, ev, at)
        plan.end_event(at.seen, ev.event_id)

    def _count_llm_end(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        model, day = ev.model, at.day
        groups = at.llm_groups.get(model)
        if groups is None:  # the attempt's first call on this model (this day)
            targets = list(at.every)
            if model:
                model_day = keys.aggregate_day("model", model, day)
                targets += [keys.aggregate("model", model), model_day]
                plan.expire(model_day, DAY_TTL_S)
            # (tokens and cost also per version, the rest not; the customer-day hash alone)
            groups = at.llm_groups[model] = (plan.group([*targets, *at.split]), plan.group(targets),
                                             plan.group([at.every[3]]))
        split, g_targets, g_cust_day = groups
        usage = ev.usage or _NO_USAGE
        plan.op("i", split, "requests", usage.requests)
        plan.op("i", split, "input_tokens", usage.input_tokens)
        plan.op("i", split, "output_tokens", usage.output_tokens)
        plan.op("i", split, "cached_tokens", usage.cached_tokens)
        plan.op("i", split, "reasoning_tokens", usage.reasoning_tokens)
        plan.op("i", split, "llm_calls", 1)
        cost = at.prices.cost_nusd(model, usage)
        if cost is None:
            plan.op("i", split, "cost_unknown_calls", 1)
        else:
            plan.op("i", split, "cost_nusd", cost)
        if model:
            plan.op("i", g_cust_day, CUSTOMER_MODEL_CALLS + model, 1)
            plan.op("i", g_cust_day, CUSTOMER_MODEL_COST + model, cost or 0)
        if at.attempt.failed:
            plan.op("i", g_targets, "failed_attempt_tokens", usage.total_tokens)
            plan.op("i", g_targets, "failed_attempt_cost_nusd", cost or 0)
        if ev.duration_ms is not None:
            plan.op("f", g_targets, "llm_ms_sum", ev.duration_ms)
            self._plan_call_sample(plan, ev.duration_ms, (("model", model), ("agent", ev.agent)))
        if model:
            plan.index("model", model, _ms(ev.ts))
        at.touched.customer_days.add((ev.customer_id, day))

    def _count_tool_end(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        plan.op("i", at.g_every, "tool_calls", 1)
        if ev.error is not None:
            plan.op("i", at.g_every, "tool_errors", 1)
        if ev.duration_ms is not None:
            plan.op("f", at.g_every, "tool_ms_sum", ev.duration_ms)
            self._plan_call_sample(plan, ev.duration_ms, (("tool", ev.tool),))

    def _count_handoff(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        plan.op("i", at.g_every, "handoffs", 1)

    def _count_guardrail(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        plan.op("i", at.g_every, "guardrails_tripped", 1)
        plan.op("s", at.g_turn, "guardrail", _guardrail_name(ev))

    def _count_spans_dropped(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        assert isinstance(ev.detail, SpansDroppedDetail)
        plan.op("i", at.g_every, "spans_dropped", ev.detail.count)

    def _count_feedback(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        """A score on a turn: counted per turn, conversation, customer, customer-day, fleet and
        version; kept on the turn's feedback list (the replay); counted in its error-rate
        window, which the negative-feedback alert rule reads."""
        assert isinstance(ev.detail, FeedbackDetail)
        d = ev.detail
        polarity = feedback_polarity(d.score)
        plan.op("i", at.g_split, f"feedback_{polarity}", 1)
        kept = {"feedback_id": d.feedback_id or ev.event_id, "score": d.score, "source": d.source,
                "comment": d.comment, "at": _utc(ev.ts).isoformat()}
        plan.op("s", [keys.turn_feedback(ev.turn_id)], kept["feedback_id"],
                json.dumps(kept, separators=(",", ":")))
        start = window_start(ev.ts, self.window_s)
        window = keys.aggregate_window(start)
        plan.op("i", [window], f"feedback_{polarity}", 1)
        plan.expire(window, max(MIN_WINDOW_TTL_S, 2 * self.window_s))
        at.touched.windows.setdefault(start, None)
        at.touched.customer_days.add((ev.customer_id, at.day))

    def _count_check(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        """One check's outcome on a finished turn: counted per turn, conversation, customer,
        customer-day, fleet, version and check (of its workflow); a failure marked on the
        turn (find, the ``check_failed`` alert) and, judged, in its error-rate window (the
        failure-rate rule); an LLM judge's tokens and cost apart from the turn's."""
        assert isinstance(ev.detail, CheckDetail)
        d = ev.detail
        ran = at.ran or RanBy(keys.UNKNOWN_RUN, keys.UNKNOWN_RUN)
        subject = keys.version_subject(ran.workflow, d.check)
        counter = f"checks_{d.outcome}"
        plan.op("i", at.g_split, counter, 1)
        plan.op("i", [keys.aggregate("check", subject)], counter, 1)
        plan.index("check", subject, _ms(ev.ts))
        if d.outcome == "failed":
            plan.op("i", at.g_turn, CHECK_FAILED_FIELD + d.check, 1)
            if d.money_path:
                at.touched.failed_checks[(ev.turn_id, d.check)] = FailedCheck(
                    ev.turn_id, ev.conversation_id, ev.customer_id, ran.workflow, d.check)
        if d.outcome in ("passed", "failed"):
            start = window_start(ev.ts, self.window_s)
            window = keys.aggregate_window(start)
            plan.op("i", [window], CHECK_RUNS + subject, 1)
            if d.outcome == "failed":
                plan.op("i", [window], CHECK_FAILS + subject, 1)
            plan.expire(window, max(MIN_WINDOW_TTL_S, 2 * self.window_s))
            at.touched.check_windows.add((start, subject))
        if ev.usage is not None:  # an LLM judge: its own spend, never the turn's
            judge = [*at.split, GLOBAL_KEY]
            plan.op("i", judge, "check_tokens", ev.usage.total_tokens)
            cost = at.prices.cost_nusd(ev.model, ev.usage) if at.prices else None
            if cost is None:
                plan.op("i", judge, "check_cost_unknown_calls", 1)
            else:
                plan.op("i", judge, "check_cost_nusd", cost)

    def _count_attempt_failed(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        turn = at.every[0]
        plan.op("i", at.g_split, "attempts_failed", 1)
        plan.op("st", at.g_turn, "0", STATUS_RETRYING)
        self._plan_error(plan, turn, ev)
        self._plan_model_error(plan, ev)

    def _count_terminal(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        self._plan_terminal(plan, ev, at)

    def _plan_terminal(self, plan: _Plan, ev: TelemetryEvent, at: _Counting) -> None:
        attempt, touched, g_turn = at.attempt, at.touched, at.g_turn
        turn = at.every[0]
        failed = ev.kind == EventKind.turn_failed
        status = "failed" if failed else "completed"
        plan.op("i", at.g_split, f"turns_{status}", 1)
        if ev.duration_ms is not None:
            plan.op("i", at.g_split, "latency_count", 1)
            plan.op("f", at.g_split, "latency_ms_sum", ev.duration_ms)
            plan.op("x", at.g_every, "latency_ms_max", ev.duration_ms)
            plan.op("s", g_turn, "duration_ms", ev.duration_ms)
        plan.op("st", g_turn, "1", status)
        plan.op("s", g_turn, "finished_at", _utc(ev.ts).isoformat())
        plan.op("s", g_turn, "agents", json.dumps(attempt.agents))
        plan.op("s", g_turn, "models", json.dumps(attempt.models or ([ev.model] if ev.model else [])))
        if ev.model:
            plan.op("s", g_turn, "model", ev.model)
        if attempt.queue_wait_ms is not None:
            plan.op("s", g_turn, "queue_wait_ms", attempt.queue_wait_ms)
        self._plan_breakdown(plan, ev, attempt)
        self._plan_histogram(plan, keys.HIST_TURN_LATENCY, ev.duration_ms)
        self._plan_histogram(plan, keys.HIST_QUEUE_WAIT, attempt.queue_wait_ms)
        if failed:
            self._plan_error(plan, turn, ev)
            self._plan_model_error(plan, ev)
        start = window_start(ev.ts, self.window_s)
        window = keys.aggregate_window(start)
        plan.op("i", [window], f"turns_{status}", 1)
        plan.expire(window, max(MIN_WINDOW_TTL_S, 2 * self.window_s))
        minute = keys.aggregate_minute(window_start(ev.ts, 60))
        plan.op("i", [minute], f"turns_{status}", 1)
        if ev.duration_ms is not None:
            plan.op("i", [minute], f"{LATENCY_BUCKET}{latency_bucket(ev.duration_ms)}", 1)
        plan.expire(minute, MINUTE_TTL_S)
        pointer = FailedTurn(ev.turn_id, ev.conversation_id, ev.customer_id) if failed else None
        touched.windows[start] = pointer or touched.windows.get(start)
        if pointer:
            touched.failed_turns[ev.turn_id] = pointer

    def _plan_breakdown(self, plan: _Plan, ev: TelemetryEvent, attempt: _Attempt) -> None:
        """A finished turn's latency breakdown, its samples and its place among the slowest."""
        turn = keys.aggregate("turn", ev.turn_id)
        figures: dict[str, float | None] = {
            "queue_wait": attempt.queue_wait_ms,
            "model": attempt.llm_ms,
            "tool": attempt.tool_ms,
            "other": None,
            "total": ev.duration_ms,
        }
        plan.op("s", [turn], "model_ms", attempt.llm_ms)
        plan.op("s", [turn], "tool_ms", attempt.tool_ms)
        if ev.duration_ms is not None:
            other = round(max(0.0, ev.duration_ms - attempt.llm_ms - attempt.tool_ms), 3)
            figures["other"] = other
            plan.op("s", [turn], "other_ms", other)
            plan.op("t", [keys.SLOWEST_TURNS], ev.turn_id, ev.duration_ms)
        if self.settings.latency_samples > 0:
            for metric, sample in _TURN_SAMPLE_KEYS:
                value = figures[metric]
                if value is not None:
                    plan.op("l", sample, "", value)

    @staticmethod
    def _plan_histogram(plan: _Plan, key: str, value_ms: float | None) -> None:
        """One observation: its bucket, ``sum`` and ``count`` (in the deduplicated event)."""
        if value_ms is None:
            return
        group = (key,)
        plan.op("i", group, histogram_bucket(value_ms), 1)
        plan.op("i", group, "count", 1)
        plan.op("f", group, "sum", value_ms)

    def _plan_call_sample(self, plan: _Plan, duration_ms: float,
                          names: tuple[tuple[str, str | None], ...]) -> None:
        """One model or tool call's duration onto the lists of each (dimension, name) it names."""
        if self.settings.latency_samples <= 0:
            return
        targets = []
        for dimension, name in names:
            if name:
                targets.append(_sample_key(dimension, name))
                plan.member(_NAMES_KEYS[dimension], name)
        plan.op("l", targets, "", duration_ms)

    @staticmethod
    def _plan_model_error(plan: _Plan, ev: TelemetryEvent) -> None:
        """A failed attempt counted against its model: ``errors`` and ``errors:<type>``."""
        if not ev.model:
            return
        model = keys.aggregate("model", ev.model)
        plan.op("i", [model], MODEL_ERRORS, 1)
        if ev.error is not None:
            plan.op("i", [model], MODEL_ERRORS_BY_TYPE + ev.error.type, 1)
        plan.index("model", ev.model, _ms(ev.ts))

    @staticmethod
    def _plan_error(plan: _Plan, turn: str, ev: TelemetryEvent) -> None:
        if ev.error is not None:
            plan.op("s", [turn], "error_type", ev.error.type)
            plan.op("s", [turn], "error_message", ev.error.message)

    # -- applying ----------------------------------------------------------------------

    async def apply(self, plans: Sequence[EntryPlan]) -> list[int]:
        """Apply the plans; new events per plan (-1: skipped, its subject erased).

        One batch script call for all of them (lua/aggregate_batch.lua: their ops merged per
        key and field) when none of their events was counted before and none is erased; else
        (a redelivered or re-sent entry, an erased subject) the per-entry script for each, in
        one pipelined round trip, which counts each event at most once.

        Raises the first Redis error (nothing may be acknowledged then; the entries stay
        pending and are handled again, which the dedupe makes harmless).
        """
        if not plans:
            return []
        conversations = list(dict.fromkeys(c for p in plans for c in p.touched.conversations))
        sums = plans[0].ops
        if (sums.broken or len(sums.entries) != len(plans)
                or any(p.ops is not sums or p.entry_id != e for p, e in zip(plans, sums.entries))):
            sums = _Sums()  # not the entries planned together (a retry of some alone): again
            for p in plans:
                p.replan(sums)
        merged = _merge_batch(sums, self.settings.seen_ttl_s,
                              self.settings.latency_samples,
                              [keys.aggregate("conversation", c) for c in conversations])
        if merged is not None:
            names, payload = merged
            reply = await self._batch(keys={"touched": names}, args={"plan": payload})
            if isinstance(reply, list):  # applied: the events counted, then the costs read
                costs = {c: int(v or 0) for c, v in zip(conversations, reply[1:])}
                for p in plans:
                    p.skipped = False
                    for c in p.touched.conversations:
                        p.touched.conversation_costs[c] = costs[c]
                return [p.counted for p in plans]
        log.debug("telemetry.batch_one_by_one", entries=len(plans),
                  reason="an event of the batch was counted before, is in it twice, or erased")
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in plans:
                await self._script(keys={"touched": p.keys},
                                   args={"plan": p.payload, "erased_skipped": ERASED_SKIPPED}, client=pipe)
            new = [int(n) for n in await pipe.execute()]
        for p, n in zip(plans, new):
            p.skipped = n < 0
        if any(p.skipped for p in plans):
            log.info("telemetry.erased_skipped", entries=sum(p.skipped for p in plans))
        return new

    async def aggregate(self, entry_id: str, fields: Mapping[str, Any] | None) -> EntryPlan:
        """Plan and apply one entry (no acknowledgement: that is the consumer's job)."""
        plan = self.plan(entry_id, fields)
        await self.apply([plan])
        return plan


# -- what aggregation does per event kind -----------------------------------------------------


@dataclass
class _Counting:
    """What planning a counted event needs besides the event, one per attempt of the entry:
    its attempt, what the entry touched, the entry's version hash, and (set by
    ``Aggregator._plan_event`` for the attempt's first event, again when the day changes) the
    event's UTC day, the hashes every counted event updates (turn, conversation, customer,
    customer-day, fleet), their groups in the plan and the turn's seen-set."""

    attempt: _Attempt
    touched: Touched
    day: str = ""
    every: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # the entry's version hash
    prices: PriceTable | None = None  # the entry's workflow's prices (Aggregator.workflow_prices)
    ran: RanBy | None = None  # the entry's workflow and version
    # The plan's groups of ``every``, of ``every`` + ``split`` (the SPLIT_COUNTERS' targets)
    # and of the turn's hash alone, shared by the attempt's events' ops.
    g_every: int = 0
    g_split: int = 0
    g_turn: int = 0
    seen: str = ""  # keys.event_seen of the turn
    # Per model of the attempt's calls: the groups of its llm_end ops (``_count_llm_end``).
    llm_groups: dict[str | None, tuple[Any, Any, Any]] = field(default_factory=dict)
    of: tuple[str, str, str] = ("", "", "")  # (day, conversation, customer) the above are for


_Count = Callable[[Aggregator, _Plan, TelemetryEvent, _Counting], None]
_Facets = Callable[[TelemetryEvent], list[tuple[str, str]]]


@dataclass(frozen=True)
class KindPlan:
    """What aggregation does with one kind of event.

    ``count``: its deduplicated increments (``None``: it is not counted on its own; its
    attempt's figures still read it, e.g. ``turn_started``'s queue wait). ``facets``: what
    ``turnfleet find`` indexes it by. ``metrics``: the ``/metrics`` families its increments
    feed (a test checks each one moves).
    """

    count: _Count | None = None
    facets: _Facets | None = None
    metrics: tuple[str, ...] = ()


def _guardrail_name(ev: TelemetryEvent) -> str:
    detail = ev.detail
    return (detail.guardrail if isinstance(detail, GuardrailDetail) else None) or "guardrail"


def _agent_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    return [("agent", ev.agent)] if ev.agent else []


def _tool_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    facets = [("tool", ev.tool)] if ev.tool else []
    if ev.error is not None:
        facets.append(("error", TOOL_ERROR))
    return facets


def _error_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    return [("error", ev.error.type)] if ev.error is not None else []


def feedback_polarity(score: int) -> str:
    """``negative`` for -1, ``positive`` for 1: the counter suffix and the ``find`` facet value."""
    return "negative" if score < 0 else "positive"


def _feedback_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    assert isinstance(ev.detail, FeedbackDetail)
    return [("feedback", feedback_polarity(ev.detail.score))]


def _check_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    """A failed check indexes its name (``find --check-failed``); other outcomes nothing."""
    assert isinstance(ev.detail, CheckDetail)
    return [("check_failed", ev.detail.check)] if ev.detail.outcome == "failed" else []


def _guardrail_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    return [("guardrail", _guardrail_name(ev))]


def _plan_facets(plan: _Plan, ev: TelemetryEvent, facets: list[tuple[str, str]]) -> None:
    """What ``turnfleet find`` searches by (tools called, agents run, error types, guardrails
    tripped), scored by the event's time, both ways (facet → conversations, conversation →
    facets)."""
    _plan_facets_at(plan, ev.conversation_id, _ms(ev.ts), facets)


def _plan_facets_at(plan: _Plan, conversation_id: str, ts_ms: int, facets: list[tuple[str, str]]) -> None:
    for facet, value in facets:
        plan.zmax(keys.facet_conversations(facet, value), conversation_id, ts_ms)
        plan.zmax(keys.conversation_facets(conversation_id), f"{facet}:{value}", ts_ms)


_LLM_METRICS = ("turnfleet_tokens_total", "turnfleet_llm_calls_total", "turnfleet_cost_usd_total",
                "turnfleet_tokens_by_customer_total", "turnfleet_cost_by_customer_usd_total")

PLANNERS: dict[EventKind, KindPlan] = {
    EventKind.turn_started: KindPlan(),  # its queue wait is read with the attempt's figures
    EventKind.agent_start: KindPlan(facets=_agent_facets),
    EventKind.agent_end: KindPlan(),
    EventKind.llm_start: KindPlan(),
    EventKind.llm_end: KindPlan(Aggregator._count_llm_end, metrics=_LLM_METRICS),
    EventKind.tool_start: KindPlan(),
    EventKind.tool_end: KindPlan(Aggregator._count_tool_end, _tool_facets,
                                 ("turnfleet_tool_calls_total", "turnfleet_tool_errors_total")),
    EventKind.handoff: KindPlan(Aggregator._count_handoff),  # in stats, not in /metrics
    EventKind.guardrail: KindPlan(Aggregator._count_guardrail, _guardrail_facets,
                                  ("turnfleet_guardrails_tripped_total",)),
    EventKind.turn_completed: KindPlan(
        Aggregator._count_terminal,
        metrics=("turnfleet_turns_completed_total", "turnfleet_turn_latency_seconds_count",
                 "turnfleet_turn_queue_wait_seconds_count")),
    EventKind.attempt_failed: KindPlan(Aggregator._count_attempt_failed, _error_facets,
                                       ("turnfleet_attempts_failed_total",)),
    EventKind.turn_failed: KindPlan(Aggregator._count_terminal, _error_facets,
                                    ("turnfleet_turns_failed_total",)),
    EventKind.spans_dropped: KindPlan(Aggregator._count_spans_dropped,
                                      metrics=("turnfleet_spans_dropped_total",)),
    EventKind.feedback: KindPlan(Aggregator._count_feedback, _feedback_facets),  # in stats
    EventKind.check: KindPlan(Aggregator._count_check, _check_facets, ("turnfleet_checks_total",)),
}
"""The registry: aggregation's plan for each event kind (see the module docstring for what
each counter means)."""


# The batch path's view of the registry (``Aggregator._sums``): kinds counted on their own, and
# the ``find`` facets of each kind, read from an event as a plain dict.
_FAST_COUNTED = frozenset(kind for kind, spec in PLANNERS.items() if spec.count is not None)


def _fast_tool_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    facets = [("tool", ev.tool)] if ev.tool else []
    if ev.error is not None:
        facets.append(("error", TOOL_ERROR))
    return facets


def _fast_error_facets(ev: TelemetryEvent) -> list[tuple[str, str]]:
    return [("error", ev.error.type)] if ev.error is not None else []


_FAST_FACETS: dict[EventKind, Callable[[TelemetryEvent], list[tuple[str, str]]]] = {
    EventKind.agent_start: lambda ev: [("agent", ev.agent)] if ev.agent else [],
    EventKind.tool_end: _fast_tool_facets,
    EventKind.attempt_failed: _fast_error_facets,
    EventKind.turn_failed: _fast_error_facets,
    EventKind.feedback: lambda ev: [("feedback", feedback_polarity(ev.detail.score))],
    EventKind.check: lambda ev: ([("check_failed", ev.detail.check)]
                                 if ev.detail.outcome == "failed" else []),
    EventKind.guardrail: lambda ev: [("guardrail", ev.detail.guardrail or "guardrail")],
}
