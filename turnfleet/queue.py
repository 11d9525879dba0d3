"""The conversation queue: how turns become arq jobs, one conversation at a time.

Each conversation has a list of unfinished turn ids (``conversation_queue``). Only the head
has an arq job; when it ends (completed or failed) the finish script pops it and, in the same
atomic step, writes the arq job of the next turn. So turns of one conversation run one at a
time and in enqueue order whatever worker takes them, different conversations run in
parallel, and no wake-up can be lost between "queue empty?" and "enqueue": both happen inside
one Lua script (DESIGN.md, ordering shape (a)).

arq jobs are written by the scripts in arq's own layout (``arq:job:<id>`` holding the JSON
job, ``arq:queue`` scored by time), with ``job id = turn id``. Jobs are JSON, never pickle.

**Attempts, leases and fencing.** ``START`` counts an attempt (``attempts`` on the turn
record) and returns its number; that number is the attempt's *fencing token*. It also takes
a lease: arq's ``arq:in-progress:<turn id>`` key (which arq sets for its largest
``job_timeout`` + 10 s when it claims a job) is set to expire in ``turn_lease_s``, and the
running attempt renews it (``renew_lease``) every third of that. A worker that dies stops
renewing, the key lapses (⅔ to 1 lease after the kill), and the job — still in
``arq:queue``, first in line by its old score — is claimed at the next read of a worker with a
free slot: ``turn_lease_s`` + ``poll_delay_s`` (10.01 s by default) while one has a free slot;
a saturated worker reads again only after working through the jobs it read last, which
adds up to a few seconds (``make bench``, section 8). The next ``START`` sees the turn still ``running``,
records the lost attempt (``WorkerLost``, no usage: nothing of it was recorded) and counts a
new one. ``FINISH`` and the attempt-failure record are fenced: they write only while the
turn is ``running`` *with the same attempt*. A stale worker — paused or cut off past its
lease while another took the turn over — gets ``Outcome.FENCED`` and writes nothing: no
second result, no second telemetry batch, no advance of the conversation. Side effects
inside a run are idempotent per turn (refund and escalation keys), so the overlap of a
stale and a current attempt does no harm. Conversation memory writes are fenced the same
way (``workers/memory.py``), and the next attempt rolls back what a failed one wrote.

**Worker losses.** A worker process that dies (SIGKILL, OOM, ``os._exit`` in a tool) takes
every attempt it was running with it, and usually one of them killed it. So a loss is not
charged to the turns alike. ``START`` learns of a loss when it finds the turn still
``running``, and the attempt's ``lane`` (kept on the turn record) says how it ran:

- *shared* (beside other turns): the turn becomes a **suspect** and its job is moved to the
  isolated lane (``keys.ISOLATED_QUEUE``) without starting an attempt; the lost attempt is
  ``spared`` (not charged to ``max_attempts``);
- *isolated* (alone on its worker, ``workers/isolation.py``): the loss is the turn's own.
  After ``isolated_losses`` of them (``TURNFLEET_ISOLATED_LOSSES``, default 1) ``START``
  answers ``poison`` and the job ends the turn ``failed`` with ``WorkerLost``; before that
  it is spared too and the turn runs isolated again;
- *plain* (a worker run by arq directly, with no isolated lane): as before, an ordinary
  attempt.

So an innocent neighbour of a poison turn is lost at most once (then runs alone) and spends
none of its attempts on it, and a poison turn takes down at most ``1 + isolated_losses``
worker processes: the one it shared, and those it ran alone on.

**Reconciling.** ``reconcile_conversation`` repairs one conversation atomically: finished
turns left at the head are dropped, a missing ``active`` marker is set to the head, a head
without its arq job (enqueue interrupted, job expired, job failed by arq) gets it back unless
a worker still holds it, and an in-progress key that would outlive a lease (a worker killed
between arq's claim and ``START``) is cut down to one. Running it anywhere, any number of
times, changes nothing in a healthy conversation (``workers/reconcile.py`` runs it).
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import keys, versions
from turnfleet.connection import RAW, as_text, eval_raw, lenient_text
from turnfleet.models import AttemptError, TurnRequest, TurnResult, TurnStatus, check_id, utcnow
from turnfleet.scripts import load_script

M = TypeVar("M", bound=BaseModel)

JOB_FUNCTION = "run_turn"
UNDECODABLE_FUNCTION = "record_undecodable"  # what an undecodable job payload runs instead
NEWER_FUNCTION = "leave_newer_job"  # what a job of a newer format version runs instead
JOB_TTL_MS = 86_400_000  # arq's expires_extra_ms: a job not started within a day expires
EVENTS_TTL_S = 7 * 86400  # default retention of per-turn event timelines

RENEW = load_script("renew")

_WAKE = """
local function wake(turn_id, conversation_id, now, job_prefix, job_ttl, fname, queue, active)
  redis.call('SET', active, turn_id)
  local payload = cjson.encode({t=1, f=fname, a={turn_id, conversation_id}, k={}, et=now, v=1})
  redis.call('PSETEX', job_prefix .. turn_id, job_ttl, payload)
  redis.call('ZADD', queue, now, turn_id)
end
"""

# Shared by the fenced writes (here and workers/memory.py): is this attempt still the turn's current, running attempt?
# Returns 'ok', 'duplicate' (the turn already ended) or 'fenced' (another attempt owns it).
FENCE_CHECK_LUA = """
local function fence_check(turn_key, fence)
  local st = redis.call('HGET', turn_key, 'status')
  if st == 'completed' or st == 'failed' then return 'duplicate' end
  if fence ~= '' then
    if st ~= 'running' or redis.call('HGET', turn_key, 'attempts') ~= fence then return 'fenced' end
  end
  return 'ok'
end
"""

# KEYS: turn, conv_queue, conv_active, conv_turns, conv_state, conversations, customer_convs,
#       arq_queue, counters
# ARGV: turn_id, conversation_id, customer_id, request_json, now_ms, job_prefix, job_ttl, fname
# Returns 1 (enqueued), 0 (turn id already known), -1 (conversation belongs to another customer)
_ENQUEUE_ONE = _WAKE + """
local function enqueue_one(K, A, o)
  if redis.call('EXISTS', K[o + 1]) == 1 then return 0 end
  local owner = redis.call('HGET', K[o + 5], 'customer_id')
  if owner and owner ~= A[3] then return -1 end
  if not owner then redis.call('HSET', K[o + 5], 'customer_id', A[3]) end
  local now = tonumber(A[5])
  -- The ids again, outside the request: a record whose request is corrupt still says
  -- whose turn it is and where it belongs (its failure can be recorded and read).
  redis.call('HSET', K[o + 1], 'request', A[4], 'status', 'queued', 'attempts', 0,
             'conversation_id', A[2], 'customer_id', A[3], 'v', 1)
  redis.call('HINCRBY', K[o + 9], 'turns_enqueued', 1)
  redis.call('RPUSH', K[o + 2], A[1])
  redis.call('RPUSH', K[o + 4], A[1])
  redis.call('ZADD', K[o + 6], 'NX', now, A[2])
  redis.call('ZADD', K[o + 7], 'NX', now, A[2])
  if redis.call('EXISTS', K[o + 3]) == 0 then
    wake(A[1], A[2], now, A[6], tonumber(A[7]), A[8], K[o + 8], K[o + 3])
  end
  return 1
end
"""
ENQUEUE_LUA = _ENQUEUE_ONE + """
return enqueue_one(KEYS, ARGV, 0)
"""

# Many turns in one call: KEYS are ENQUEUE's 9 keys per turn, ARGV its 8 arguments per turn,
# in the same order. Returns ENQUEUE's answer per turn. One script call instead of one per
# turn: the bulk path's cost was mostly per-command packing and dispatch.
ENQUEUE_MANY_LUA = _ENQUEUE_ONE + """
local out = {}
for i = 0, #KEYS / 9 - 1 do
  out[i + 1] = enqueue_one(KEYS, {unpack(ARGV, i * 8 + 1, i * 8 + 8)}, i * 9)
end
return out
"""
ENQUEUE_MANY_CHUNK = 200  # turns per script call: bounds how long Redis is busy with one

# KEYS: turn, conv_queue, turn_errors, in_progress, conv_state, session_messages, quarantine,
#       arq_queue, isolated_queue
# ARGV: turn_id, worker, started_at_iso, lease_ms (0 = no lease), now_iso, lane, isolated_losses
#       (after this many losses while running isolated the turn is poison), now_ms,
#       record_version (the newest turn record version this process reads)
# Returns {attempt, status}: attempt 0 means "do not run" (status says why: 'isolate' = handed
# to the isolated lane). The attempt number is the fencing token of every later write of this
# attempt. Status 'poison': the turn lost its worker while isolated; end it WorkerLost.
# Status 'newer': the record's version is newer than this process reads; nothing was changed.
START_LUA = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then
  -- Not a record at all (a string, a list... written by hand): keep it aside for whoever
  -- investigates, and start a record that can carry the turn's failure.
  redis.call('RENAME', KEYS[1], KEYS[7])
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0,
             'corrupt', 'the turn record was a Redis ' .. kind .. ', not a hash (moved to ' .. KEYS[7] .. ')')
end
if (tonumber(redis.call('HGET', KEYS[1], 'v') or '1') or 1) > tonumber(ARGV[9]) then return {0, 'newer'} end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {0, 'unknown'} end
if st == 'completed' or st == 'failed' then return {0, st} end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[1] then return {0, 'not-head'} end
local lane = ARGV[6]
local status = 'running'
if st == 'running' then
  -- The previous attempt never recorded an outcome: its worker died or lost its lease.
  local prev = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  local who = redis.call('HGET', KEYS[1], 'worker') or '?'
  local prev_lane = redis.call('HGET', KEYS[1], 'lane') or 'plain'
  local how = ''
  if prev_lane == 'isolated' then
    -- Lost while it ran alone on its worker: the likeliest cause of the loss is the turn.
    local n = redis.call('HINCRBY', KEYS[1], 'isolated_losses', 1)
    redis.call('HINCRBY', KEYS[1], 'spared', 1)
    how = ' while running isolated (' .. n .. ' of ' .. ARGV[7] .. ')'
    if n >= tonumber(ARGV[7]) then status = 'poison' end
  elseif lane ~= 'plain' then
    -- Lost with the other turns of its worker: a suspect, run alone next, not charged.
    redis.call('HSET', KEYS[1], 'suspect', 1)
    redis.call('HINCRBY', KEYS[1], 'spared', 1)
    how = ' beside other turns (runs isolated next)'
  end
  redis.call('RPUSH', KEYS[3], cjson.encode({
    attempt = prev, error_type = 'WorkerLost', at = ARGV[5],
    message = 'attempt ' .. prev .. ' on worker ' .. who ..
      ' ended without recording an outcome (worker killed, stalled past its lease,'
      .. ' or cut off from Redis)' .. how}))
end
if status == 'running' and lane == 'shared' and redis.call('HGET', KEYS[1], 'suspect') == '1' then
  -- A suspect runs only in the isolated lane: hand the job over without starting an attempt.
  -- (The caller skips arq's clean-up of the job: the job key stays, the zset changes here.)
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('ZREM', KEYS[8], ARGV[1])
  redis.call('ZADD', KEYS[9], tonumber(ARGV[8]), ARGV[1])
  redis.call('DEL', KEYS[4])
  return {0, 'isolate'}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3], 'lane', lane)
local lease = tonumber(ARGV[4])
if lease > 0 then
  redis.call('SET', KEYS[4], ARGV[2] .. '#' .. attempt, 'PX', lease)
end
-- What the attempt needs to begin, read here rather than in four more round trips: the
-- request, where the conversation stands, the memory length now and before the turn's
-- first attempt (kept on the turn record), and how many attempt errors there are.
local mem_len = redis.call('LLEN', KEYS[6])
local base = redis.call('HGET', KEYS[1], 'memory_base')
if not base then
  base = mem_len
  redis.call('HSET', KEYS[1], 'memory_base', base)
end
return {attempt, status, redis.call('HGET', KEYS[1], 'request') or '',
        redis.call('HGET', KEYS[5], 'current_agent') or '', mem_len, tonumber(base),
        redis.call('LLEN', KEYS[3]), redis.call('HGET', KEYS[5], 'customer_id') or '',
        redis.call('HGET', KEYS[1], 'corrupt') or '',
        tonumber(redis.call('HGET', KEYS[1], 'spared') or '0')}
"""

# KEYS: turn, turn_errors, telemetry, turn_events
# ARGV: fence ('' = none), error_json, telemetry_batch ('' = none), attempt, events_ttl_s, turn_id
# Returns 'written', 'duplicate' or 'fenced'.
FAIL_ATTEMPT_LUA = FENCE_CHECK_LUA + """
local verdict = fence_check(KEYS[1], ARGV[1])
if verdict ~= 'ok' then return verdict end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'queued')
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'turn_id', ARGV[6], 'v', '1', 'batch', ARGV[3])
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[5]))
end
return 'written'
"""

# KEYS: turn, conv_queue, conv_active, conv_state, arq_queue, results, telemetry, turn_events,
#       raw_text, session_messages, session_meta, turn_errors
# ARGV: turn_id, conversation_id, status, result_json (without ``errors``), telemetry_batch
#       ('' = none), now_ms, job_prefix, job_ttl, fname, current_agent ('' = keep), attempt,
#       events_ttl_s, fence ('' = none), final_error_json ('' = none)
# Returns 'written' (finished now), 'duplicate' (already finished) or 'fenced' (another
# attempt owns the turn); nothing is written unless 'written'. With the result, the turn
# enters the raw-text index (finish time) and its record keeps where its memory ends
# (``memory_end``, with ``memory_session``: the memory's creation time, so the raw-text
# expiry can tell that [memory_base, memory_end) still are this turn's items). The result's
# ``errors`` are written here, from what is stored: the attempt errors (``turn_errors``, as
# ``TurnQueue.errors`` reads them: one that cannot be decoded is shown as such), then the
# final error the turn fails with (kept in the result only: no attempt follows it). The script
# checks an entry's shape (UTF-8, JSON, field types), not all that pydantic checks: an entry
# written by hand that passes it and still is no ``AttemptError`` (a 13th month) makes the
# stored result read as ``CorruptTurnRecord``, as any corrupt result does.
FINISH_LUA = _WAKE + FENCE_CHECK_LUA + """
local verdict = fence_check(KEYS[1], ARGV[13])
if verdict ~= 'ok' then return verdict end
local function utf8_valid(s)  -- RFC 3629, as pydantic reads it (Lua 5.1 has no utf8 library)
  if not string.find(s, '[\\128-\\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c, len, lo, hi = string.byte(s, i), 1, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    elseif c >= 0x80 then return false end
    for j = 1, len - 1 do
      local d = string.byte(s, i + j)
      if not d or d < lo or d > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end
local function attempt_error(item, i)
  local ok, e = false, nil
  if utf8_valid(item) then ok, e = pcall(cjson.decode, item) end
  if ok and type(e) == 'table' and type(e.attempt) == 'number' and e.attempt % 1 == 0
     and type(e.error_type) == 'string' and type(e.message) == 'string'
     and (e.at == nil or (type(e.at) == 'string' and string.find(e.at, '^%d%d%d%d%-%d%d%-%d%d')))
     and (e.usage == nil or e.usage == cjson.null or type(e.usage) == 'table') then
    return item
  end
  return cjson.encode({attempt = 0, error_type = 'CorruptTurnRecord',
                       message = 'attempt error ' .. i .. ' cannot be decoded'})
end
local errors = {}
local stored = redis.pcall('LRANGE', KEYS[12], 0, -1)
if stored.err then stored = {'unreadable'} end  -- WRONGTYPE: one unreadable error, not a stuck turn
for i, item in ipairs(stored) do errors[i] = attempt_error(item, i) end
if ARGV[14] ~= '' then errors[#errors + 1] = ARGV[14] end
local result = string.sub(ARGV[4], 1, -2) .. ',"errors":[' .. table.concat(errors, ',') .. ']}'
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'result', result,
           'memory_end', redis.call('LLEN', KEYS[10]),
           'memory_session', redis.call('HGET', KEYS[11], 'created_at') or '')
redis.call('ZADD', KEYS[9], tonumber(ARGV[6]), ARGV[1])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[4], 'current_agent', ARGV[10]) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*',
  'turn_id', ARGV[1], 'status', ARGV[3], 'conversation_id', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[7], '*', 'turn_id', ARGV[1], 'v', '1', 'batch', ARGV[5])
  redis.call('HSET', KEYS[8], ARGV[11], ARGV[5])
  redis.call('EXPIRE', KEYS[8], tonumber(ARGV[12]))
end
if redis.call('LINDEX', KEYS[2], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[2])
else
  redis.call('LREM', KEYS[2], 1, ARGV[1])
end
local nxt = redis.call('LINDEX', KEYS[2], 0)
if nxt then
  wake(nxt, ARGV[2], tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), ARGV[9], KEYS[5], KEYS[3])
else
  redis.call('DEL', KEYS[3])
end
return 'written'
"""

# KEYS: conv_queue, conv_active, arq_queue, isolated_queue
# ARGV: conversation_id, now_ms, job_prefix, job_ttl, fname, turn_key_prefix,
#       in_progress_prefix, lease_ms
# Returns {action, turn_id, finished_turns_dropped}; action is one of
#   idle     no unfinished turn, nothing to do
#   ok       the head is active and has its arq job
#   running  the head's job is gone but a worker still holds it (in-progress key)
#   cleared  no unfinished turn but an active marker was left: removed
#   woke     the active marker was missing or stale: set to the head (job written if missing)
#   rewoke   the active head had no arq job: written again
#   clamped  as ok, but its in-progress key outlived a lease and was cut down to one
RECONCILE_LUA = """
local function status_of(key)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return nil end
  if kind ~= 'hash' then return 'corrupt' end  -- unfinished: its job's START quarantines it
  return redis.call('HGET', key, 'status')
end
local head = redis.call('LINDEX', KEYS[1], 0)
local dropped = 0
while head do
  local st = status_of(ARGV[6] .. head)
  if st and st ~= 'completed' and st ~= 'failed' then break end
  redis.call('LPOP', KEYS[1])
  dropped = dropped + 1
  head = redis.call('LINDEX', KEYS[1], 0)
end
local active = redis.call('GET', KEYS[2])
if not head then
  if active then
    redis.call('DEL', KEYS[2])
    return {'cleared', active, dropped}
  end
  return {'idle', '', dropped}
end
local action = 'ok'
if active ~= head then
  redis.call('SET', KEYS[2], head)
  action = 'woke'
end
local job_key = ARGV[3] .. head
local has_job = redis.call('EXISTS', job_key) == 1
local queued = redis.call('ZSCORE', KEYS[3], head) or redis.call('ZSCORE', KEYS[4], head)
local in_progress = ARGV[7] .. head
local ttl = redis.call('PTTL', in_progress)
local lease = tonumber(ARGV[8])
if ttl ~= -2 and lease > 0 and (ttl == -1 or ttl > lease) then
  redis.call('PEXPIRE', in_progress, lease)
  if action == 'ok' then action = 'clamped' end
end
if has_job and queued then return {action, head, dropped} end
if ttl ~= -2 then return {'running', head, dropped} end
local now = tonumber(ARGV[2])
if not has_job then
  local payload = cjson.encode({t=1, f=ARGV[5], a={head, ARGV[1]}, k={}, et=now, v=1})
  redis.call('PSETEX', job_key, tonumber(ARGV[4]), payload)
end
redis.call('ZADD', KEYS[3], 'NX', now, head)
if action == 'ok' then action = 'rewoke' end
return {action, head, dropped}
"""


# KEYS: isolated_queue, isolating_workers
# ARGV: now_ms, in_progress_prefix, worker, stale_ms, serving ('1': the worker serves the
#       isolated lane now: a turn of it runs there)
# Returns {waiting, serve}: jobs of the isolated lane due and held by no worker (of its first
# 100), and whether this worker is to serve the lane: it is if it was already, or if fewer
# other workers serve it than jobs wait (so one waiting suspect pauses one worker, not all).
ISOLATED_WAITING_LUA = """
local now = tonumber(ARGV[1])
local waiting = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then waiting = waiting + 1 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
local mine = redis.call('ZSCORE', KEYS[2], ARGV[3])
if waiting == 0 and ARGV[5] ~= '1' then
  if mine then redis.call('ZREM', KEYS[2], ARGV[3]) end
  return {0, 0}
end
local others = redis.call('ZCARD', KEYS[2])
if mine then others = others - 1 end
if mine or ARGV[5] == '1' or others < waiting then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  return {waiting, 1}
end
return {waiting, 0}
"""


class Outcome(enum.Enum):
    """What a fenced write did. Truthy only when it wrote."""

    WRITTEN = "written"
    DUPLICATE = "duplicate"  # the turn had already ended: nothing written
    FENCED = "fenced"  # another attempt owns the turn (this one is stale): nothing written

    def __bool__(self) -> bool:
        return self is Outcome.WRITTEN


@dataclass(frozen=True)
class Reconciled:
    """What ``reconcile_conversation`` found (and did) for one conversation."""

    conversation_id: str
    action: str  # one of RECONCILE_LUA's actions, or "error" (the script failed: ``error``)
    turn_id: str
    dropped: int = 0
    error: str | None = None

    @property
    def changed(self) -> bool:
        """A repair of a conversation that could not have moved on by itself. (A ``clamped``
        lease is not counted: it is also what a healthy claim looks like in the instant
        between arq's claim and ``START``.)"""
        return self.action not in ("idle", "ok", "running", "clamped", "error") or self.dropped > 0


class ConversationOwnershipError(ValueError):
    """The conversation id is already used by another customer."""


@dataclass(frozen=True)
class StartDecision:
    attempt: int  # 0: do not run this job
    status: str
    # Read by START for a running attempt (what it needs to begin, in the same round trip):
    request: TurnRequest | None = None
    current_agent: str | None = None  # where the conversation's next turn starts
    memory_length: int = 0  # conversation memory items now
    memory_base: int = 0  # ... and before this turn's first attempt (a retry trims back to it)
    errors: int = 0  # attempt errors recorded so far
    # Set when the stored request could not be decoded (why): ``request`` is then a
    # stand-in (``stand_in_request``) and the attempt must end the turn failed at once.
    corrupt: str | None = None
    # Attempts lost with a worker and not charged to the turn's ordinary attempts.
    spared: int = 0


NEWER = "newer"  # START's status for a record of a newer format version (nothing changed)


class Lane(enum.Enum):
    """Where a job runs (``START``'s ``lane``): see "Worker losses" in the module doc."""

    SHARED = "shared"  # beside other turns, on a worker that has an isolated lane
    ISOLATED = "isolated"  # alone on its worker (the isolated lane)
    PLAIN = "plain"  # a worker without an isolated lane: a loss is an ordinary attempt


def now_ms() -> int:
    return int(time.time() * 1000)


def session_meta(conversation_id: str) -> str:
    """The hash beside the conversation memory (the SDK's ``{prefix}:{session_id}``: session_id,
    created_at, updated_at), as ``workers/memory.py`` writes it."""
    return f"{keys.SESSION_PREFIX}:{keys.session_id(conversation_id)}"


class TurnQueue:
    """Enqueue, start, finish and read turns. Shared by producer, workers and the CLI."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._enqueue = redis.register_script(ENQUEUE_LUA)
        self._enqueue_many = redis.register_script(ENQUEUE_MANY_LUA)
        self._start = redis.register_script(START_LUA)
        self._renew = RENEW.bind(redis)
        self._fail_attempt = redis.register_script(FAIL_ATTEMPT_LUA)
        self._finish = redis.register_script(FINISH_LUA)
        self._reconcile = redis.register_script(RECONCILE_LUA)
        self._isolated_waiting = redis.register_script(ISOLATED_WAITING_LUA)

    # -- producer side ---------------------------------------------------------------

    def _enqueue_args(self, req: TurnRequest) -> tuple[list[str], list[object]]:
        cid = req.conversation_id
        return (
            [
                keys.turn(req.turn_id),
                keys.conversation_queue(cid),
                keys.conversation_active(cid),
                keys.conversation_turns(cid),
                keys.conversation_state(cid),
                keys.CONVERSATIONS,
                keys.customer_conversations(req.customer_id),
                keys.ARQ_QUEUE,
                keys.COUNTERS,
            ],
            [
                req.turn_id,
                cid,
                req.customer_id,
                req.model_dump_json(),
                now_ms(),
                keys.ARQ_JOB_PREFIX,
                JOB_TTL_MS,
                JOB_FUNCTION,
            ],
        )

    async def enqueue(self, req: TurnRequest) -> bool:
        """Record the turn and wake its conversation if idle. False: turn id already known."""
        k, a = self._enqueue_args(req)
        outcome = int(await self._enqueue(keys=k, args=a))
        if outcome < 0:
            raise ConversationOwnershipError(
                f"conversation_id {req.conversation_id!r} belongs to another customer"
            )
        return outcome == 1

    async def enqueue_many(self, reqs: list[TurnRequest]) -> list[int]:
        """One pipelined round trip for many turns (one script call per 200); per request 1,
        0 or -1 as the script says."""
        if not reqs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(reqs), ENQUEUE_MANY_CHUNK):
                all_keys: list[str] = []
                all_args: list[object] = []
                for req in reqs[i:i + ENQUEUE_MANY_CHUNK]:
                    k, a = self._enqueue_args(req)
                    all_keys += k
                    all_args += a
                await self._enqueue_many(keys=all_keys, args=all_args, client=pipe)
            return [int(x) for chunk in await pipe.execute() for x in chunk]

    # -- worker side -----------------------------------------------------------------

    async def start(
        self,
        turn_id: str,
        conversation_id: str,
        worker: str,
        started_at: str,
        lease_s: float = 0.0,
        lane: Lane = Lane.PLAIN,
        isolated_losses: int = 1,
    ) -> StartDecision:
        """Count an attempt and mark the turn running, if it may run now (it is its
        conversation's head and has not ended). ``attempt`` is the attempt's fencing token.

        With ``lease_s`` the turn's arq in-progress key is set to expire in that long: the
        caller renews it with ``renew_lease`` while the attempt runs. ``lane`` says where
        the job runs (see "Worker losses" in the module doc): a suspect met in the shared
        lane is handed to the isolated lane (``status`` ``isolate``, attempt 0), and a turn
        lost ``isolated_losses`` times while isolated comes back with ``status`` ``poison``.
        """
        out = await eval_raw(
            self.redis, self._start,  # raw: the stored request may be anything, UTF-8 or not
            keys=[
                keys.turn(turn_id),
                keys.conversation_queue(conversation_id),
                keys.turn_errors(turn_id),
                keys.ARQ_IN_PROGRESS_PREFIX + turn_id,
                keys.conversation_state(conversation_id),
                keys.session_messages(conversation_id),
                keys.turn_quarantine(turn_id),
                keys.ARQ_QUEUE,
                keys.ISOLATED_QUEUE,
            ],
            args=[turn_id, worker, started_at, int(lease_s * 1000), utcnow().isoformat(),
                  lane.value, isolated_losses, now_ms(), versions.TURN_RECORD],
        )
        if int(out[0]) == 0:
            return StartDecision(0, as_text(out[1]))
        _, status, raw, agent, mem_len, base, errors, customer, quarantined, spared = out
        corrupt = None
        try:
            request = decode_request(raw)
        except CorruptRecord as exc:
            corrupt = lenient_text(quarantined) or str(exc)
            request = stand_in_request(turn_id, conversation_id, lenient_text(customer) or "")
        return StartDecision(
            int(out[0]), as_text(status), request=request,
            current_agent=lenient_text(agent) or None, memory_length=int(mem_len),
            memory_base=int(base), errors=int(errors), corrupt=corrupt, spared=int(spared),
        )

    async def isolated_turn(self, worker: str, serving: bool, stale_ms: int = 2000) -> tuple[int, bool]:
        """How many jobs of the isolated lane wait (due, held by no worker; up to 100), and
        whether ``worker`` is to serve the lane now (see ``ISOLATED_WAITING_LUA``). A worker
        that serves it is listed in ``keys.WORKERS_ISOLATING`` while it looks at least every
        ``stale_ms``; one that stops looking (dead) drops out after that long."""
        waiting, serve = await self._isolated_waiting(
            keys=[keys.ISOLATED_QUEUE, keys.WORKERS_ISOLATING],
            args=[now_ms(), keys.ARQ_IN_PROGRESS_PREFIX, worker, stale_ms, int(serving)])
        return int(waiting), bool(serve)

    async def leave_isolated_lane(self, worker: str) -> None:
        await self.redis.zrem(keys.WORKERS_ISOLATING, worker)

    async def renew_lease(self, turn_id: str, attempt: int, worker: str, lease_s: float) -> bool:
        """Extend the attempt's lease; False once the attempt no longer owns the turn."""
        held = await self._renew(
            keys={"turn": keys.turn(turn_id), "in_progress": keys.ARQ_IN_PROGRESS_PREFIX + turn_id},
            args={"attempt": attempt, "lease_ms": int(lease_s * 1000), "token": f"{worker}#{attempt}"},
        )
        return int(held) == 1

    async def record_attempt_failure(
        self,
        turn_id: str,
        error: AttemptError,
        telemetry_batch: str | None,
        events_ttl_s: int = EVENTS_TTL_S,
        fence: int | None = None,
    ) -> Outcome:
        """Keep a failed attempt's error (and its telemetry) before the turn is tried again.

        With ``fence`` (the attempt number ``start`` returned) nothing is written unless that
        attempt is still the turn's running attempt.
        """
        verdict = await self._fail_attempt(
            keys=[
                keys.turn(turn_id),
                keys.turn_errors(turn_id),
                keys.TELEMETRY_STREAM,
                keys.turn_events(turn_id),
            ],
            args=[
                "" if fence is None else fence,
                error.model_dump_json(),
                telemetry_batch or "",
                error.attempt,
                events_ttl_s,
                turn_id,
            ],
        )
        return Outcome(verdict)

    async def finish(
        self,
        result: TurnResult,
        telemetry_batch: str | None,
        current_agent: str | None = None,
        events_ttl_s: int = EVENTS_TTL_S,
        fence: int | None = None,
        final_error: AttemptError | None = None,
    ) -> Outcome:
        """Write the terminal result and telemetry, then wake the conversation's next turn.

        The result's ``errors`` are not the caller's (``result.errors`` is ignored): the script
        writes the attempt errors stored for the turn, then ``final_error`` (what a failed turn
        fails with; kept in the result only), in the same atomic step as the result.

        The telemetry batch is also kept per attempt (``keys.turn_events``) for
        ``events_ttl_s``: the timeline replay shows for turns whose spans were not sampled.
        The turn enters ``keys.RAW_TEXT`` (its finish time) in the same step: what the
        raw-text expiry (``telemetry/raw_expiry.py``) walks.
        With ``fence`` (the attempt number ``start`` returned) nothing is written unless that
        attempt is still the turn's running attempt. Truthy only if this call wrote.
        """
        cid = result.conversation_id
        verdict = await self._finish(
            keys=[
                keys.turn(result.turn_id),
                keys.conversation_queue(cid),
                keys.conversation_active(cid),
                keys.conversation_state(cid),
                keys.ARQ_QUEUE,
                keys.RESULTS_STREAM,
                keys.TELEMETRY_STREAM,
                keys.turn_events(result.turn_id),
                keys.RAW_TEXT,
                keys.session_messages(cid),
                session_meta(cid),
                keys.turn_errors(result.turn_id),
            ],
            args=[
                result.turn_id,
                cid,
                result.status,
                result.model_dump_json(exclude={"errors"}),
                telemetry_batch or "",
                now_ms(),
                keys.ARQ_JOB_PREFIX,
                JOB_TTL_MS,
                JOB_FUNCTION,
                current_agent or "",
                max(result.attempts, 1),
                events_ttl_s,
                "" if fence is None else fence,
                "" if final_error is None else final_error.model_dump_json(),
            ],
        )
        return Outcome(verdict)

    def _reconcile_call(self, conversation_id: str, lease_s: float, client: Any = None) -> Any:
        return self._reconcile(
            keys=[
                keys.conversation_queue(conversation_id),
                keys.conversation_active(conversation_id),
                keys.ARQ_QUEUE,
                keys.ISOLATED_QUEUE,
            ],
            args=[
                conversation_id,
                now_ms(),
                keys.ARQ_JOB_PREFIX,
                JOB_TTL_MS,
                JOB_FUNCTION,
                keys.turn(""),
                keys.ARQ_IN_PROGRESS_PREFIX,
                int(lease_s * 1000),
            ],
            client=client,
        )

    async def reconcile_conversation(self, conversation_id: str, lease_s: float = 0.0) -> Reconciled:
        """Repair one conversation's queue, active marker and head job (see the module doc)."""
        action, turn_id, dropped = await self._reconcile_call(conversation_id, lease_s)
        return Reconciled(conversation_id, str(action), str(turn_id), int(dropped))

    async def reconcile_many(self, conversation_ids: list[str], lease_s: float = 0.0) -> list[Reconciled]:
        """``reconcile_conversation`` for many, in one pipelined round trip (each atomic)."""
        if not conversation_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in conversation_ids:
                await self._reconcile_call(cid, lease_s, client=pipe)
            # One conversation's script error (a key of the wrong type, written by hand) must
            # not hide the others' answers: it is reported as that conversation's ``error``.
            replies = await pipe.execute(raise_on_error=False)
        return [
            Reconciled(cid, "error", "", 0, error=f"{type(reply).__name__}: {reply}")
            if isinstance(reply, Exception) else Reconciled(cid, str(reply[0]), str(reply[1]), int(reply[2]))
            for cid, reply in zip(conversation_ids, replies)
        ]

    # -- read side -------------------------------------------------------------------

    async def get(self, turn_id: str) -> TurnResult | None:
        """The turn's result if it ended, else its request with the current status.

        Never raises on what is stored: a record that cannot be decoded is answered as a
        ``CorruptTurnRecord`` failure (with the ids the record still holds), so every
        reader (CLI, HTTP, replay) shows it instead of failing.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("HGETALL", keys.turn(turn_id), **RAW)
            pipe.execute_command("LRANGE", keys.turn_errors(turn_id), 0, -1, **RAW)
            raw_record, errors = await pipe.execute(raise_on_error=False)
        if isinstance(errors, ResponseError):  # WRONGTYPE: not a list
            errors = [b"unreadable"]
        if isinstance(raw_record, ResponseError):  # WRONGTYPE: not a hash (START quarantines it)
            return corrupt_result(turn_id, {}, f"the turn record is not a hash ({raw_record})",
                                  _decode_errors(errors))
        if isinstance(raw_record, Exception):
            raise raw_record
        if not raw_record:
            return None
        # JSON fields stay bytes (pydantic checks their UTF-8); the others are plain text.
        record: dict[str, Any] = {
            lenient_text(k): v if k in (b"request", b"result") else lenient_text(v) for k, v in raw_record.items()
        }
        try:
            if record.get("result"):
                return _decode(TurnResult, record["result"], "stored result")
            req = decode_request(record.get("request"))
        except CorruptRecord as exc:
            reason = str(exc)
            version = versions.version_of(record.get(versions.FIELD))
            if version is not None and version > versions.TURN_RECORD:  # not corrupt: newer
                reason = (f"it was written by a newer turnfleet (turn record format {version}; this "
                          f"process reads up to {versions.TURN_RECORD}) and a newer process reads it: {reason}")
            return corrupt_result(turn_id, record, reason, _decode_errors(errors))
        return TurnResult(
            turn_id=req.turn_id,
            conversation_id=req.conversation_id,
            customer_id=req.customer_id,
            status=_status(record.get("status")),
            text=req.text,
            attempts=_int(record.get("attempts")),
            errors=_decode_errors(errors),
            enqueued_at=req.enqueued_at,
            worker=record.get("worker"),
        )

    async def get_request(self, turn_id: str) -> TurnRequest | None:
        """The stored request, None if the turn is unknown; ``CorruptRecord`` if unreadable."""
        raw = await self.redis.execute_command("HGET", keys.turn(turn_id), "request", **RAW)
        return decode_request(raw) if raw else None

    async def conversation_of(self, turn_id: str) -> str | None:
        """The conversation the turn record names (kept beside the request since enqueue);
        None if it names none or is no record at all."""
        try:
            return lenient_text(await self.redis.execute_command(
                "HGET", keys.turn(turn_id), "conversation_id", **RAW))
        except ResponseError:  # WRONGTYPE
            return None

    async def errors(self, turn_id: str) -> list[AttemptError]:
        try:
            raw = await self.redis.execute_command("LRANGE", keys.turn_errors(turn_id), 0, -1, **RAW)
        except ResponseError:  # WRONGTYPE: shown as one unreadable error, not raised
            raw = [b"unreadable"]
        return _decode_errors(raw)

    async def wait(self, turn_id: str, timeout_s: float) -> TurnResult | None:
        """Wait for the turn to end, on the results stream (no polling); None if unknown."""
        tail = await self.redis.xrevrange(keys.RESULTS_STREAM, count=1)
        last_id = tail[0][0] if tail else "0-0"
        result = await self.get(turn_id)
        deadline = time.monotonic() + timeout_s
        while result is not None and not result.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return result
            entries = await self.redis.xread(
                {keys.RESULTS_STREAM: last_id}, block=max(1, int(remaining * 1000)), count=1000
            )
            for _stream, items in entries or []:
                for entry_id, fields in items:
                    last_id = entry_id
                    if fields.get("turn_id") == turn_id:
                        return await self.get(turn_id)
            if not entries:
                result = await self.get(turn_id)
        return result

    async def conversation_turn_ids(self, conversation_id: str) -> list[str]:
        return list(await self.redis.lrange(keys.conversation_turns(conversation_id), 0, -1))


def job_payload_json(turn_id: str, conversation_id: str, enqueued_ms: int) -> str:
    """The arq job as the scripts write it (for tests and tools that inspect jobs)."""
    return json.dumps(
        {"t": 1, "f": JOB_FUNCTION, "a": [turn_id, conversation_id], "k": {}, "et": enqueued_ms,
         versions.FIELD: versions.JOB}
    )


def serialize_job(data: dict[str, object]) -> bytes:
    """arq ``job_serializer``: JSON, never pickle (writing to Redis must not run code here).

    Anything JSON cannot represent (an exception in a failure record) is stored as text.
    """
    return json.dumps(data, default=repr, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, object]:
    """arq ``job_deserializer``. Never raises: a payload that is not a well-formed turn job
    becomes a job for ``record_undecodable`` (``UNDECODABLE_FUNCTION``) with the reason.

    arq's own handling of a payload it cannot decode fails the *arq job* (deletes it) and
    leaves the turn ``queued`` with no job, its conversation stalled. Decoding it into a job
    that records the failure instead lets the worker end the turn ``failed``
    (``UndecodableJob``) for the job id (= the turn id) and wake the conversation's next turn.

    Anything may be in Redis: bytes that are not UTF-8, nesting deep enough that the JSON
    parser gives up with ``RecursionError`` (not a ``ValueError``), numbers too long to
    convert, ids no producer would accept, counters arq would choke on. Each is a reason.

    A job whose format version (``"v"``, :mod:`turnfleet.versions`) is newer than this
    process reads becomes a job for ``leave_newer_job`` (``NEWER_FUNCTION``): it is put
    back for a newer worker, never failed.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, digits
        return undecodable_job(f"not JSON ({type(exc).__name__}: {str(exc)[:200]})")
    version = versions.version_of(data.get(versions.FIELD)) if isinstance(data, dict) else 1
    if version is None:
        return undecodable_job(f"field {versions.FIELD!r} is not a format version")
    if version > versions.JOB:
        # Written by a newer process: its shape is not ours to judge. Leave it for one.
        return {"t": 1, "f": NEWER_FUNCTION, "a": [version], "k": {}, "et": now_ms()}
    try:
        problem = _job_problem(data)
    except RecursionError:  # a str()/repr() of something absurd; never propagate
        problem = "not a turn job (unprintable)"
    if problem is not None:
        return undecodable_job(problem)
    return data  # type: ignore[no-any-return]


def undecodable_job(reason: str) -> dict[str, object]:
    """The job ``deserialize_job`` hands arq for a payload it could not decode."""
    return {"t": 1, "f": UNDECODABLE_FUNCTION, "a": [reason[:500]], "k": {}, "et": now_ms()}


MAX_JOB_TRY = 1000  # arq copies a payload's try count above its own into its retry key
MAX_JOB_TIME_MS = 2**53  # enqueue times are milliseconds; arq turns them into datetimes


def _job_problem(data: object) -> str | None:
    """Why a decoded payload is not a turn job as the scripts write it (None: it is)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if data.get("f") != JOB_FUNCTION:
        f = data.get("f")
        return f"function {f[:80]!r} is not {JOB_FUNCTION!r}" if isinstance(f, str) else \
            f"function is a JSON {type(f).__name__}, not {JOB_FUNCTION!r}"
    args = data.get("a")
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(x, str) for x in args)):
        return "arguments are not [turn_id, conversation_id]"
    for name, value in zip(("turn_id", "conversation_id"), args):
        try:
            check_id(value)
        except ValueError:
            return f"argument {name} is not a valid id"
    if not isinstance(data.get("k"), dict) or data["k"]:
        return "keyword arguments are not an empty object"
    for field, top in (("t", MAX_JOB_TRY), ("et", MAX_JOB_TIME_MS)):
        value = data.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"field {field!r} is not an integer"
        if not 0 <= value <= top:
            return f"field {field!r} is out of range"
    return None


# -- decoding what is stored -------------------------------------------------------------

CORRUPT_TURN_RECORD = "CorruptTurnRecord"  # error type of a turn whose stored record is unreadable


class CorruptRecord(ValueError):
    """A stored value (turn request, result, attempt error) that cannot be decoded. The
    message says which and why, without the stored text (it may hold customer data)."""


def _decode(model: type[M], raw: str | bytes | None, what: str) -> M:
    """``model`` from stored JSON, or ``CorruptRecord``. pydantic parses nesting of any depth
    without recursing in Python, so deep JSON is a ``ValidationError`` here too."""
    if not raw:
        raise CorruptRecord(f"{what} is missing")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        raise CorruptRecord(f"{what} cannot be decoded ({exc.error_count()} errors; "
                            f"{where}: {first.get('msg', '?')})") from None


def decode_request(raw: str | bytes | None) -> TurnRequest:
    """The stored ``TurnRequest``, or ``CorruptRecord`` saying why not."""
    return _decode(TurnRequest, raw, "stored request")


def stand_in_request(turn_id: str, conversation_id: str, customer_id: str) -> TurnRequest:
    """What is still known of a turn whose request is unreadable: enough to record its
    failure (ids; no text), built without validation since nothing here came from a client."""
    return TurnRequest.model_construct(
        turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id, text="",
        metadata={}, agent="support-desk", trace=False, enqueued_at=None,
    )


def corrupt_result(turn_id: str, record: dict[str, Any], reason: str,
                   errors: list[AttemptError]) -> TurnResult:
    """How ``get`` answers for a record it cannot decode: the failure, with the ids the
    record still holds (``""`` for a record written before it held them)."""
    return TurnResult(
        turn_id=turn_id,
        conversation_id=record.get("conversation_id") or "",
        customer_id=record.get("customer_id") or "",
        status=_status(record.get("status")),
        attempts=_int(record.get("attempts")),
        errors=errors,
        error_type=CORRUPT_TURN_RECORD,
        error_message=f"the turn's record in Redis is corrupt: {reason}",
        worker=record.get("worker"),
    )


def _decode_errors(raw: list[bytes]) -> list[AttemptError]:
    """Attempt errors as stored; one that cannot be decoded is shown as such, not raised."""
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(_decode(AttemptError, item, f"attempt error {i + 1}"))
        except CorruptRecord as exc:
            out.append(AttemptError(attempt=0, error_type=CORRUPT_TURN_RECORD, message=str(exc)))
    return out


def _status(value: str | None) -> TurnStatus:
    return value if value in ("queued", "running", "completed", "failed") else "queued"  # type: ignore[return-value]


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
