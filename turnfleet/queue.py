"""The conversation queue: how turns become arq jobs, one conversation at a time.

Each conversation has a list of unfinished turn ids (``conversation_queue``). Only the head
has an arq job; when it ends (completed or failed) the finish script pops it and, in the same
atomic step, writes the arq job of the next turn. So turns of one conversation run one at a
time and in enqueue order whatever worker takes them, different conversations run in
parallel, and no wake-up can be lost between "queue empty?" and "enqueue": both happen inside
one Lua script (DESIGN.md, ordering shape (a)).

arq jobs are written by the scripts in arq's own layout (``arq:job:<id>`` holding the JSON
job, ``arq:queue`` scored by time), with ``job id = turn id``. Jobs are JSON, never pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.models import AttemptError, TurnRequest, TurnResult

JOB_FUNCTION = "run_turn"
JOB_TTL_MS = 86_400_000  # arq's expires_extra_ms: a job not started within a day expires
EVENTS_TTL_S = 7 * 86400  # default retention of per-turn event timelines

_WAKE = """
local function wake(turn_id, conversation_id, now, job_prefix, job_ttl, fname, queue, active)
  redis.call('SET', active, turn_id)
  local payload = cjson.encode({t=1, f=fname, a={turn_id, conversation_id}, k={}, et=now})
  redis.call('PSETEX', job_prefix .. turn_id, job_ttl, payload)
  redis.call('ZADD', queue, now, turn_id)
end
"""

# KEYS: turn, conv_queue, conv_active, conv_turns, conv_state, conversations, customer_convs,
#       arq_queue, counters
# ARGV: turn_id, conversation_id, customer_id, request_json, now_ms, job_prefix, job_ttl, fname
# Returns 1 (enqueued), 0 (turn id already known), -1 (conversation belongs to another customer)
ENQUEUE_LUA = _WAKE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local owner = redis.call('HGET', KEYS[5], 'customer_id')
if owner and owner ~= ARGV[3] then return -1 end
if not owner then redis.call('HSET', KEYS[5], 'customer_id', ARGV[3]) end
local now = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'request', ARGV[4], 'status', 'queued', 'attempts', 0)
redis.call('HINCRBY', KEYS[9], 'turns_enqueued', 1)
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[6], 'NX', now, ARGV[2])
redis.call('ZADD', KEYS[7], 'NX', now, ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 0 then
  wake(ARGV[1], ARGV[2], now, ARGV[6], tonumber(ARGV[7]), ARGV[8], KEYS[8], KEYS[3])
end
return 1
"""

# KEYS: turn, conv_queue
# ARGV: turn_id, worker, started_at_iso
# Returns {attempt, status}: attempt 0 means "do not run" (status says why).
START_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {0, 'unknown'} end
if st == 'completed' or st == 'failed' then return {0, st} end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[1] then return {0, 'not-head'} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
return {attempt, 'running'}
"""

# KEYS: turn, conv_queue, conv_active, conv_state, arq_queue, results, telemetry, turn_events
# ARGV: turn_id, conversation_id, status, result_json, telemetry_batch ('' = none), now_ms,
#       job_prefix, job_ttl, fname, current_agent ('' = keep), attempt, events_ttl_s
# Returns 1 (finished now), 0 (was already finished: nothing written)
FINISH_LUA = _WAKE + """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'completed' or st == 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'result', ARGV[4])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[4], 'current_agent', ARGV[10]) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*',
  'turn_id', ARGV[1], 'status', ARGV[3], 'conversation_id', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[7], '*', 'turn_id', ARGV[1], 'batch', ARGV[5])
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
return 1
"""


class ConversationOwnershipError(ValueError):
    """The conversation id is already used by another customer."""


@dataclass(frozen=True)
class StartDecision:
    attempt: int  # 0: do not run this job
    status: str


def now_ms() -> int:
    return int(time.time() * 1000)


class TurnQueue:
    """Enqueue, start, finish and read turns. Shared by producer, workers and the CLI."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._enqueue = redis.register_script(ENQUEUE_LUA)
        self._start = redis.register_script(START_LUA)
        self._finish = redis.register_script(FINISH_LUA)

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
        """One pipelined round trip for many turns; per request 1, 0 or -1 as the script says."""
        if not reqs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for req in reqs:
                k, a = self._enqueue_args(req)
                await self._enqueue(keys=k, args=a, client=pipe)
            return [int(x) for x in await pipe.execute()]

    # -- worker side -----------------------------------------------------------------

    async def start(self, turn_id: str, conversation_id: str, worker: str, started_at: str) -> StartDecision:
        attempt, status = await self._start(
            keys=[keys.turn(turn_id), keys.conversation_queue(conversation_id)],
            args=[turn_id, worker, started_at],
        )
        return StartDecision(int(attempt), str(status))

    async def record_attempt_failure(
        self,
        turn_id: str,
        error: AttemptError,
        telemetry_batch: str | None,
        events_ttl_s: int = EVENTS_TTL_S,
    ) -> None:
        """Keep a failed attempt's error (and its telemetry) before the turn is tried again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(keys.turn_errors(turn_id), error.model_dump_json())
            pipe.hset(keys.turn(turn_id), "status", "queued")
            if telemetry_batch:
                pipe.xadd(keys.TELEMETRY_STREAM, {"turn_id": turn_id, "batch": telemetry_batch})
                pipe.hset(keys.turn_events(turn_id), str(error.attempt), telemetry_batch)
                pipe.expire(keys.turn_events(turn_id), events_ttl_s)
            await pipe.execute()

    async def finish(
        self,
        result: TurnResult,
        telemetry_batch: str | None,
        current_agent: str | None = None,
        events_ttl_s: int = EVENTS_TTL_S,
    ) -> bool:
        """Write the terminal result and telemetry, then wake the conversation's next turn.

        The telemetry batch is also kept per attempt (``keys.turn_events``) for
        ``events_ttl_s``: the timeline replay shows for turns whose spans were not sampled.
        """
        cid = result.conversation_id
        done = await self._finish(
            keys=[
                keys.turn(result.turn_id),
                keys.conversation_queue(cid),
                keys.conversation_active(cid),
                keys.conversation_state(cid),
                keys.ARQ_QUEUE,
                keys.RESULTS_STREAM,
                keys.TELEMETRY_STREAM,
                keys.turn_events(result.turn_id),
            ],
            args=[
                result.turn_id,
                cid,
                result.status,
                result.model_dump_json(),
                telemetry_batch or "",
                now_ms(),
                keys.ARQ_JOB_PREFIX,
                JOB_TTL_MS,
                JOB_FUNCTION,
                current_agent or "",
                max(result.attempts, 1),
                events_ttl_s,
            ],
        )
        return int(done) == 1

    # -- read side -------------------------------------------------------------------

    async def get(self, turn_id: str) -> TurnResult | None:
        """The turn's result if it ended, else its request with the current status."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.turn(turn_id))
            pipe.lrange(keys.turn_errors(turn_id), 0, -1)
            record, errors = await pipe.execute()
        if not record:
            return None
        if record.get("result"):
            return TurnResult.model_validate_json(record["result"])
        req = TurnRequest.model_validate_json(record["request"])
        return TurnResult(
            turn_id=req.turn_id,
            conversation_id=req.conversation_id,
            customer_id=req.customer_id,
            status=record.get("status", "queued"),  # type: ignore[arg-type]
            text=req.text,
            attempts=int(record.get("attempts", 0)),
            errors=[AttemptError.model_validate_json(e) for e in errors],
            enqueued_at=req.enqueued_at,
            worker=record.get("worker"),
        )

    async def get_request(self, turn_id: str) -> TurnRequest | None:
        raw = await self.redis.hget(keys.turn(turn_id), "request")
        return TurnRequest.model_validate_json(raw) if raw else None

    async def errors(self, turn_id: str) -> list[AttemptError]:
        return [
            AttemptError.model_validate_json(e)
            for e in await self.redis.lrange(keys.turn_errors(turn_id), 0, -1)
        ]

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
        {"t": 1, "f": JOB_FUNCTION, "a": [turn_id, conversation_id], "k": {}, "et": enqueued_ms}
    )


def serialize_job(data: dict[str, object]) -> bytes:
    """arq ``job_serializer``: JSON, never pickle (writing to Redis must not run code here).

    Anything JSON cannot represent (an exception in a failure record) is stored as text.
    """
    return json.dumps(data, default=repr, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, object]:
    """arq ``job_deserializer``."""
    return json.loads(raw)
