"""What belongs to one conversation or customer, and erasing it (``turnfleet forget``).

``purge_plan`` names every key of a conversation and its turns, and every index entry that
names them: the retention purge (``telemetry/retention.py``) and erasure share it, so a kind of
data added later is forgotten by both or neither. The financial ledger (``keys.LEDGER_PREFIX``)
is never part of it.

``forget`` erases one customer (all its conversations) or one conversation. Afterwards no key
name or value in the main Redis, nor in the trace store's Redis when it is separate, names the
customer, its conversations or turns, and none of their texts remain:

- per turn and conversation, everything ``purge_plan`` names (turn records and errors, results,
  conversation memory and session, escalation ticket, the turns' ``once`` records (which carry
  the customer id and whatever value a tool stored), traces, event timelines, dedupe sets,
  per-turn and per-conversation aggregates, the search indexes, the slowest-turns and raw-text
  indexes), and the conversation's member of the conversation aggregate index;
- per customer, its conversation index, its aggregate and its per-day aggregates (every day:
  its spend today is erased with it, so its daily budget starts again from zero), its member
  of the customer aggregate index, and the orders stored for it at run time (``keys.ORDERS``);
- alert-fired markers whose subject is the customer, a conversation or a turn;
- stream entries that name any of them: results, telemetry (acknowledged in the consumer group,
  then deleted), the telemetry dead-letter stream, alerts, and the audit log.

What is kept: the financial ledger — the refund ledger stream (``keys.REFUND_LEDGER``) and the
per-order refund records (``keys.order_refund``), which name the order, the amount and the turn
that made it: a financial record the business must keep (``purge_plan`` refuses to name one);
likewise a team's ledgers and its per-key ``once`` records (``keys.once_by_key``, under the
ledger prefix: their business key appears only as a digest).
Anonymous fleet-wide totals, model totals, per-model-day totals, latency samples, histograms
and error-rate windows stay as they were: they name no customer, conversation or turn.

Telemetry still pending for what was erased must not rebuild it: before deleting anything the
erasure writes tombstones into ``keys.ERASED`` — ``sha1(salt .. id)`` for the customer, each
conversation and each turn, scored with the erasure time (Redis ``TIME``); the salt is random,
set once per deployment (``keys.ERASED_SALT``), so the zset never holds an id. The telemetry
aggregate script skips whole (writes nothing, fires no alert) an entry with an id tombstoned at
or after the entry's own stream time, so a returning customer's new turns count again.
Tombstones older than ``seen_ttl_s`` are trimmed by the next erasure (an entry pending longer
than that could be counted twice anyway, see ``telemetry/retention.py``).

A turn of the subject queued or running blocks the erasure: ``forget`` waits up to ``wait_s``
for it to end (reading the results stream, no polling), else raises ``ErasureBusy`` and erases
nothing. The check, the tombstones and every per-turn, per-conversation and per-customer key
are one Lua call, so a turn enqueued meanwhile either lands before it (and blocks it) or after
(a new turn, kept; its stream entries go too if it reuses an erased conversation id).
Streams, per-day aggregates, alert markers and stored orders are then looked through in
chunks (``SCAN``/``XRANGE``/``HSCAN``), never in one long call.

What erasure cannot reach:

- copies already sent out: spans exported over OTLP (``TURNFLEET_OTLP_ENDPOINT``) and alerts
  delivered to the webhook (``TURNFLEET_ALERT_WEBHOOK_URL``) — they name turns, conversations,
  customers (and the redacted text of spans);
- the Redis append-only file keeps the erased writes until it is rewritten:
  ``rewrite_aof`` (``BGREWRITEAOF``) makes Redis write a fresh AOF without them; RDB snapshots
  and backups taken before the erasure keep everything until they are discarded;
- logs: workers, producer and telemetry log turn, conversation and customer ids (``turn.*``,
  ``telemetry.*``, ``alert.fired`` lines, with the alert's message), never raw text;
  whatever collects the logs keeps them for its own retention;
- a telemetry entry pending longer than ``seen_ttl_s`` when its tombstone is trimmed.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import audit, keys
from turnfleet.connection import as_text as _text
from turnfleet.models import DEFAULT_WORKFLOW, check_id
from turnfleet.scripts import load_script


def purge_plan(conversation_id: str, turns: list[str], customer_id: str | None,
               facets: list[str]) -> tuple[list[str], list[str]]:
    """What purging one conversation deletes (keys) and removes from indexes (pairs)."""
    doomed: list[str] = []
    zrem: list[str] = []
    for t in turns:
        doomed += [keys.turn(t), keys.turn_quarantine(t), keys.turn_errors(t), keys.trace(t), keys.turn_events(t),
                   keys.event_seen(t), keys.aggregate("turn", t), keys.turn_once(t), keys.turn_feedback(t),
                   keys.turn_reruns(t),
                   keys.ARQ_JOB_PREFIX + t, keys.ARQ_IN_PROGRESS_PREFIX + t, keys.ARQ_RETRY_PREFIX + t]
        zrem += [keys.aggregate_index("turn"), t, keys.SLOWEST_TURNS, t, keys.RAW_TEXT, t]
        # Its check outcomes and its check job's keys (issue 17, workers/check_job.py).
        doomed += [keys.turn_checks(t), *(prefix + keys.checks_job_id(t) for prefix in (
            keys.ARQ_JOB_PREFIX, keys.ARQ_IN_PROGRESS_PREFIX, keys.ARQ_RETRY_PREFIX))]
    sid = keys.session_id(conversation_id)
    doomed += [keys.conversation_active(conversation_id), keys.conversation_state(conversation_id),
               keys.conversation_turns(conversation_id), keys.conversation_facets(conversation_id),
               keys.aggregate("conversation", conversation_id), keys.session_messages(conversation_id),
               f"{keys.SESSION_PREFIX}:{sid}", keys.conversation_escalation(conversation_id)]
    zrem += [keys.CONVERSATIONS, conversation_id]
    if customer_id:
        zrem += [keys.customer_conversations(customer_id), conversation_id]
    for fv in facets:
        facet, _, value = fv.partition(":")
        if facet in keys.FACETS:
            zrem += [keys.facet_conversations(facet, value), conversation_id]
    ledger = [k for k in doomed if k.startswith(keys.LEDGER_PREFIX)]
    if ledger:  # an id that makes a key of the ledger: never delete a financial record
        raise ValueError(f"purge of {conversation_id!r} would delete ledger keys {ledger}")
    return doomed, zrem


# -- forget ---------------------------------------------------------------------------------

STREAM_CHUNK = 500  # stream entries read per XRANGE
SCAN_CHUNK = 1000  # SCAN / HSCAN COUNT
DEL_CHUNK = 500  # keys per DEL
MAX_ROUNDS = 20  # re-plans when the subject changed between reading and erasing it
# Streams whose entries can name a customer, conversation or turn. The ledger is not one.
ERASED_STREAMS = (keys.RESULTS_STREAM, keys.TELEMETRY_STREAM, keys.TELEMETRY_DEAD_LETTER,
                  keys.ALERTS_STREAM, keys.AUDIT)
ALERT_FIRED_PREFIX = keys.alert_fired("", "", "")[:-2]  # "tf:alert-fired:"
# The windows of alerts whose subject is a customer, conversation or turn (telemetry/alerts.py):
# a conversation's lifetime, a turn's once (once:<check> for a check that failed on it), a
# customer's day or day and budget share.
_SUBJECT_WINDOW = re.compile(r"lifetime|once(:[A-Za-z0-9._:@-]+)?|\d{4}-\d\d-\d\d(:\d+%)?")
# Runs of id characters (turnfleet.models.ID_PATTERN); ':' also separates ids in values.
_TOKEN = re.compile(r"[A-Za-z0-9._:@-]+")

ERASE = load_script("erase")  # turnfleet/lua/erase.lua: the plan it takes is described there


@dataclass
class ErasureReport:
    """What one ``forget`` removed (the CLI and the HTTP routes print it)."""

    customers: int = 0  # customer subjects erased (0 or 1)
    conversations: int = 0  # conversations erased
    turns: int = 0  # turns erased
    keys: int = 0  # Redis keys deleted (main + trace store)
    index_entries: int = 0  # members removed from indexes (zsets, hashes)
    stream_entries: int = 0  # stream entries deleted (results, telemetry, dead letter, alerts, audit)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def nothing(self) -> bool:
        """True when nothing was found to erase (an idempotent re-run)."""
        return not any(self.to_dict().values())


class ErasureBusy(Exception):
    """A turn of the subject is queued or running: nothing was erased."""

    def __init__(self, unfinished: int, waited_s: float = 0.0) -> None:
        self.unfinished = unfinished  # turns queued or running
        self.waited_s = waited_s
        super().__init__(str(self))

    def __str__(self) -> str:
        waited = f" after waiting {self.waited_s:g} s" if self.waited_s else ""
        return (f"{self.unfinished} turn(s) of this subject still queued or running{waited}: "
                "nothing was erased; wait for them to finish (or allow a wait) and run it again")


@dataclass
class _Subject:
    """What one erasure reads before erasing: the conversations and their turns."""

    customer_id: str | None
    conversations: dict[str, list[str]] = field(default_factory=dict)  # conversation -> turns
    customer_count: int | None = None  # size of the customer's conversation index when read
    found: set[str] = field(default_factory=set)  # the conversations that had anything stored

    @property
    def ids(self) -> set[str]:
        out = set(self.conversations)
        for turns in self.conversations.values():
            out.update(turns)
        if self.customer_id:
            out.add(self.customer_id)
        return out


async def forget(redis: Redis, *, customer_id: str | None = None, conversation_id: str | None = None,
                 trace_redis: Redis | None = None, wait_s: float = 0.0, who: str = "",
                 tombstone_ttl_s: int | None = None) -> ErasureReport:
    """Erase one customer or one conversation (module docstring: what goes, what stays).

    Exactly one of ``customer_id`` / ``conversation_id``. Waits up to ``wait_s`` for turns of
    the subject that are queued or running to end (reading the results stream, no polling),
    else raises ``ErasureBusy`` having erased nothing. ``who`` goes into one audit entry
    (``keys.AUDIT``, what ``forget customer`` / ``forget conversation``, subject ``(erased)``:
    never the id). ``tombstone_ttl_s`` (default ``TURNFLEET_SEEN_TTL_S``): how long the
    tombstones are kept. Idempotent: a second call finds nothing (``report.nothing``).
    """
    if (customer_id is None) == (conversation_id is None):
        raise ValueError("forget needs exactly one of customer_id and conversation_id")
    for name, value in (("customer_id", customer_id), ("conversation_id", conversation_id)):
        if value is not None:
            try:
                check_id(value)
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
    if tombstone_ttl_s is None:
        from turnfleet.settings import TelemetrySettings

        tombstone_ttl_s = TelemetrySettings().seen_ttl_s
    report = ErasureReport()
    subject = await _erase_subject(redis, customer_id, conversation_id, wait_s, tombstone_ttl_s, report)
    report.conversations = len(subject.found)
    report.turns = sum(len(subject.conversations[c]) for c in subject.found)
    if trace_redis is not None and trace_redis is not redis:
        traces = [keys.trace(t) for turns in subject.conversations.values() for t in turns]
        report.keys += await _delete(trace_redis, traces)
    ids = subject.ids
    if customer_id is not None:
        report.keys += await _delete(redis, [k async for k in _customer_days(redis, customer_id)])
        report.index_entries += await _forget_orders(redis, customer_id)
    report.keys += await _delete(redis, [k async for k in _scan(redis, ALERT_FIRED_PREFIX + "*")
                                         if alert_marker_about(k, ids)])
    for stream in ERASED_STREAMS:
        report.stream_entries += await _forget_stream_entries(redis, stream, ids)
    if customer_id is not None and (report.keys or report.index_entries or report.stream_entries):
        report.customers = 1
    await audit.record(redis, who or "unknown",
                       "forget customer" if customer_id is not None else "forget conversation",
                       "(erased)")
    return report


async def _erase_subject(redis: Redis, customer_id: str | None, conversation_id: str | None,
                         wait_s: float, tombstone_ttl_s: int, report: ErasureReport) -> _Subject:
    """Read the subject and erase its keys in one script call, once none of its turns is
    queued or running (waiting up to ``wait_s`` for the results stream to say one ended);
    read again if it changed in between. Adds what it deleted to ``report``."""
    started = time.monotonic()
    script = ERASE.bind(redis)
    for _ in range(MAX_ROUNDS):
        results_tail = await _stream_tail(redis, keys.RESULTS_STREAM)  # before the check
        subject = await _read_subject(redis, customer_id, conversation_id)
        subject_keys, plan = await _erase_plan(redis, subject, tombstone_ttl_s)
        reply = await script(keys={"tombstones": keys.ERASED, "salt": keys.ERASED_SALT, "subject": subject_keys},
                             args={"plan": json.dumps(plan, separators=(",", ":"))})
        status = int(reply[0])
        if status == -2:
            continue  # a turn or conversation was added since it was read: read it again
        if status == -1:
            left = wait_s - (time.monotonic() - started)
            if left <= 0:
                raise ErasureBusy(int(reply[1]), round(wait_s, 3))
            await redis.xread({keys.RESULTS_STREAM: results_tail}, block=max(1, int(left * 1000)),
                              count=100)
            continue
        report.keys += int(reply[1])
        report.index_entries += int(reply[2])
        return subject
    raise RuntimeError(f"the subject kept changing while it was erased ({MAX_ROUNDS} tries)")


async def rewrite_aof(redis: Redis) -> bool:
    """``BGREWRITEAOF`` if AOF is on (True), else False: the erased writes leave the AOF once
    the rewrite is done (Redis rewrites in the background)."""
    config = await redis.config_get("appendonly")
    if _text(config.get("appendonly", "no")) != "yes":
        return False
    try:
        await redis.bgrewriteaof()
    except ResponseError as exc:  # one is running: Redis schedules no second; say so
        if "already in progress" not in str(exc):
            raise
    return True


async def _read_subject(redis: Redis, customer_id: str | None, conversation_id: str | None) -> _Subject:
    subject = _Subject(customer_id)
    if customer_id is not None:
        convs = [_text(c) for c in await redis.zrange(keys.customer_conversations(customer_id), 0, -1)]
        subject.customer_count = len(convs)
    else:
        assert conversation_id is not None
        convs = [conversation_id]
    async with redis.pipeline(transaction=False) as pipe:
        for c in convs:
            pipe.lrange(keys.conversation_turns(c), 0, -1)
        turn_lists = await pipe.execute()
    for c, turns in zip(convs, turn_lists):
        subject.conversations[c] = [_text(t) for t in turns]
    return subject


async def _erase_plan(redis: Redis, subject: _Subject, tombstone_ttl_s: int) -> tuple[list[str], dict]:
    """The erase script's subject keys and plan for one subject (erase.lua)."""
    subject_keys: list[str] = []

    def ix(key: str) -> int:  # its position in the subject keys, as Lua counts
        subject_keys.append(key)
        return len(subject_keys)

    plan: dict = {"queues": [], "turns": [], "cc": [], "ids": sorted(subject.ids),
                  "salt": secrets.token_hex(16), "keep_ms": tombstone_ttl_s * 1000, "zrem": []}
    doomed: list[str] = []
    convs = list(subject.conversations.items())
    async with redis.pipeline(transaction=False) as pipe:
        for c, _ in convs:
            pipe.hget(keys.conversation_state(c), "customer_id")
            pipe.hget(keys.conversation_state(c), "workflow")
            pipe.zrange(keys.conversation_facets(c), 0, -1)
            pipe.exists(keys.conversation_state(c), keys.aggregate("conversation", c),
                        keys.session_messages(c), keys.conversation_escalation(c))
        replies = await pipe.execute()
    for n, (c, turns) in enumerate(convs):
        owner, workflow, facets, stored = replies[4 * n:4 * n + 4]
        if turns or stored:
            subject.found.add(c)
        plan["queues"].append(ix(keys.conversation_queue(c)))
        plan["turns"].append([ix(keys.conversation_turns(c)), len(turns)])
        c_doomed, pairs = purge_plan(c, turns, _text(owner) if owner else subject.customer_id,
                                     [_text(f) for f in facets])
        doomed += c_doomed
        pairs += [keys.aggregate_index("conversation"), c]
        workflow = _text(workflow) if workflow else DEFAULT_WORKFLOW
        for t in turns:  # finished turns arq did not clear from its queues (in-process runs)
            pairs += [keys.workflow_queue(workflow), t, keys.workflow_isolated_queue(workflow), t,
                      keys.workflow_checks_queue(workflow), keys.checks_job_id(t)]
        plan["zrem"] += [["ZREM", pairs[i], pairs[i + 1]] for i in range(0, len(pairs), 2)]
    if subject.customer_id is not None:
        cust = subject.customer_id
        plan["cc"] = [ix(keys.customer_conversations(cust)), subject.customer_count]
        doomed += [keys.customer_conversations(cust), keys.aggregate("customer", cust)]
        plan["zrem"].append(["ZREM", keys.aggregate_index("customer"), cust])
    plan["first"] = len(subject_keys) + 1
    subject_keys += list(dict.fromkeys(doomed))
    return subject_keys, plan


async def _stream_tail(redis: Redis, stream: str) -> str:
    """The id of the stream's last entry ("0-0" when empty): read from here for new ones."""
    last = await redis.xrevrange(stream, count=1)
    return _text(last[0][0]) if last else "0-0"


async def _scan(redis: Redis, match: str):
    async for k in redis.scan_iter(match=match, count=SCAN_CHUNK):
        yield _text(k)


async def _customer_days(redis: Redis, customer_id: str):
    """The customer's per-day aggregate hashes, every day (its spend today among them)."""
    async for k in _scan(redis, keys.aggregate_day("customer", customer_id, "*")):
        # ids may hold ':' but days do not: the pattern's '*' must be exactly one day
        if k == keys.aggregate_day("customer", customer_id, k.split(":")[3]):
            yield k


async def _delete(redis: Redis, names: list[str]) -> int:
    names = [n for n in names if not n.startswith(keys.LEDGER_PREFIX)]
    deleted = 0
    for i in range(0, len(names), DEL_CHUNK):
        deleted += int(await redis.delete(*names[i:i + DEL_CHUNK]))
    return deleted


def names_any(value: str, ids: set[str]) -> bool:
    """Whether ``value`` names one of ``ids``: as a whole run of id characters, or as a run of
    its ``:``-separated parts (``t_1:3:7`` names ``t_1``; ``C-100`` does not name ``C-1``).
    So an entry naming another id that starts with an erased one and ``:`` goes too: stream
    entries err on the side of erasing."""
    for token in _TOKEN.findall(value):
        if token in ids:
            return True
        if ":" in token:
            parts = token.split(":")
            for i in range(len(parts)):
                for j in range(i + 1, len(parts) + 1):
                    if ":".join(parts[i:j]) in ids:
                        return True
    return False


def alert_marker_about(key: str, ids: set[str]) -> bool:
    """Whether an alert-fired marker (``tf:alert-fired:<rule>:<subject>:<window>``) is about
    one of ``ids`` (a subject may hold ':', so each split is tried against the windows)."""
    rest = key[len(ALERT_FIRED_PREFIX):]
    _, _, tail = rest.partition(":")
    for m in re.finditer(":", tail):
        if tail[:m.start()] in ids and _SUBJECT_WINDOW.fullmatch(tail[m.end():]):
            return True
    return False


async def _forget_orders(redis: Redis, customer_id: str) -> int:
    """Remove the customer's orders stored at run time (``keys.ORDERS``)."""
    mine = []
    async for order_id, raw in redis.hscan_iter(keys.ORDERS, count=SCAN_CHUNK):
        try:
            owner = json.loads(raw).get("customer_id")
        except (ValueError, AttributeError):
            owner = None
        if owner == customer_id:
            mine.append(_text(order_id))
    return int(await redis.hdel(keys.ORDERS, *mine)) if mine else 0


async def _forget_stream_entries(redis: Redis, stream: str, ids: set[str]) -> int:
    """Delete the entries of ``stream`` that name any of ``ids``, read in chunks; telemetry
    entries are acknowledged in the consumer group first (they leave its pending list)."""
    if not ids:
        return 0
    doomed: list[str] = []
    start = "-"
    while True:
        page = await redis.xrange(stream, min=start, max="+", count=STREAM_CHUNK)
        for entry_id, fields in page:
            if any(names_any(_text(v), ids) for pair in fields.items() for v in pair):
                doomed.append(_text(entry_id))
        if len(page) < STREAM_CHUNK:
            break
        start = "(" + _text(page[-1][0])
    deleted = 0
    for i in range(0, len(doomed), STREAM_CHUNK):
        chunk = doomed[i:i + STREAM_CHUNK]
        if stream == keys.TELEMETRY_STREAM:
            try:
                await redis.xack(stream, keys.TELEMETRY_GROUP, *chunk)
            except ResponseError as exc:  # no group yet: nothing is pending
                if "NOGROUP" not in str(exc):
                    raise
        deleted += int(await redis.xdel(stream, *chunk))
    return deleted


__all__ = ["ErasureBusy", "ErasureReport", "forget", "purge_plan", "rewrite_aof"]
