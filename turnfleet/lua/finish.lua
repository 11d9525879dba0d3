-- Write a turn's terminal result and telemetry, then wake its conversation's next turn.
--! keys: turn, conv_queue, conv_active, conv_state, arq_queue, results, telemetry, turn_events, raw_text, session_messages, session_meta, turn_errors, checks_queue, trace, job_queue, arq_job, arq_in_progress, arq_retry, arq_abort
--! args: turn_id, conversation_id, status, result_json, telemetry_batch, now_ms, job_prefix, job_ttl, fname, current_agent, attempt, events_ttl_s, fence, final_error_json, default_workflow, queue_prefix, workflow, version, checks, checks_job, checks_fname, checks_prefix, trace_json, trace_ttl_s, arq_cleanup, memory_session_id, memory_ttl_s, *memory_items
--! include: arq_job, wake, route, fence_check, telemetry_entry
-- result_json: without ``errors``. '' means none for telemetry_batch, fence and
-- final_error_json, and "keep" for current_agent. The next turn's job goes to the queue of the
-- conversation's own workflow (conv_state ``workflow``; absent: default_workflow, arq_queue),
-- never to one the finishing worker names: an older worker cannot misroute it.
-- workflow / version: what ran the turn, on its telemetry entry ('' = not known).
-- checks: '1' when the finishing worker's workflow declares checks: with the result, the
-- turn's check job (``checks_job``, function ``checks_fname``) goes into the checks queue of
-- the conversation's workflow (routed as the next turn's job: ``checks_queue`` for the
-- built-in one, else ``checks_prefix`` .. name), once (SET NX on the job id): outcome and
-- follow-up exist together or not at all (docs/ARCHITECTURE.md, "Checks").
-- arq_cleanup: '1' = the turn's arq job (id turn_id, taken from job_queue) returns once this
-- is written: arq's clean-up of it (Worker.finish_job with keep_result 0: its in-progress,
-- retry and job keys deleted, out of its queue and arq's abort set) is done here, and the
-- worker skips arq's own (one round trip fewer).
-- memory_items: the conversation memory items the run added (JSON, none: nothing to add),
-- appended to ``session_messages`` first, as workers/lua/memory_append.lua does (the SDK's
-- layout: ``session_meta`` gets session_id ``memory_session_id``, updated_at, created_at once;
-- both kept ``memory_ttl_s``, '' = no expiry): the run's memory and its result are written
-- together or not at all, in one round trip.
-- trace_json: the attempt's kept trace record ('' = none kept), appended to ``trace`` (kept
-- ``trace_ttl_s``) with the result: the trace store's write without a round trip of its own.
-- Returns 'written' (finished now), 'duplicate' (already finished) or 'fenced' (another
-- attempt owns the turn); nothing is written unless 'written'. With the result, the turn
-- enters the raw-text index (finish time) and its record keeps where its memory ends
-- (``memory_end``, with ``memory_session``: the memory's creation time, so the raw-text
-- expiry can tell that [memory_base, memory_end) still are this turn's items). The result's
-- ``errors`` are written here, from what is stored: the attempt errors (``turn_errors``, as
-- ``TurnQueue.errors`` reads them: one that cannot be decoded is shown as such), then the
-- final error the turn fails with (kept in the result only: no attempt follows it). The
-- script checks an entry's shape (UTF-8, JSON, field types), not all that pydantic checks:
-- an entry written by hand that passes it and still is no ``AttemptError`` (a 13th month)
-- makes the stored result read as ``CorruptTurnRecord``, as any corrupt result does.
local verdict = fence_check(K.turn, A.fence)
if verdict ~= 'ok' then return verdict end
local function utf8_valid(s)  -- RFC 3629, as pydantic reads it (Lua 5.1 has no utf8 library)
  if not string.find(s, '[\128-\255]') then return true end
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
local stored = redis.pcall('LRANGE', K.turn_errors, 0, -1)
if stored.err then stored = {'unreadable'} end  -- WRONGTYPE: one unreadable error, not a stuck turn
for i, item in ipairs(stored) do errors[i] = attempt_error(item, i) end
if A.final_error_json ~= '' then errors[#errors + 1] = A.final_error_json end
if #A.memory_items > 0 then
  local now_s = math.floor(tonumber(A.now_ms) / 1000)
  for i = 1, #A.memory_items, 1000 do  -- unpack takes a few thousand values at most
    redis.call('RPUSH', K.session_messages, unpack(A.memory_items, i, math.min(i + 999, #A.memory_items)))
  end
  redis.call('HSET', K.session_meta, 'session_id', A.memory_session_id, 'updated_at', now_s)
  redis.call('HSETNX', K.session_meta, 'created_at', now_s)
  if A.memory_ttl_s ~= '' then
    redis.call('EXPIRE', K.session_messages, A.memory_ttl_s)
    redis.call('EXPIRE', K.session_meta, A.memory_ttl_s)
  end
end
local result = string.sub(A.result_json, 1, -2) .. ',"errors":[' .. table.concat(errors, ',') .. ']}'
redis.call('HSET', K.turn, 'status', A.status, 'result', result,
           'memory_end', redis.call('LLEN', K.session_messages),
           'memory_session', redis.call('HGET', K.session_meta, 'created_at') or '')
redis.call('ZADD', K.raw_text, tonumber(A.now_ms), A.turn_id)
if A.current_agent ~= '' then redis.call('HSET', K.conv_state, 'current_agent', A.current_agent) end
redis.call('XADD', K.results, 'MAXLEN', '~', 100000, '*',
  'turn_id', A.turn_id, 'status', A.status, 'conversation_id', A.conversation_id,
  'workflow', A.workflow, 'version', A.version)
if A.telemetry_batch ~= '' then
  telemetry_entry(K.telemetry, A.turn_id, A.workflow, A.version, A.telemetry_batch)
  redis.call('HSET', K.turn_events, A.attempt, A.telemetry_batch)
  redis.call('EXPIRE', K.turn_events, tonumber(A.events_ttl_s))
end
if A.trace_json ~= '' then
  redis.call('RPUSH', K.trace, A.trace_json)
  redis.call('EXPIRE', K.trace, tonumber(A.trace_ttl_s))
end
if A.checks == '1' then
  arq_job_once(A.job_prefix, tonumber(A.job_ttl), A.checks_job, A.checks_fname, A.turn_id, A.conversation_id,
               tonumber(A.now_ms),
               route(redis.call('HGET', K.conv_state, 'workflow'), A.default_workflow, K.checks_queue,
                     A.checks_prefix))
end
if A.arq_cleanup == '1' then
  redis.call('ZREM', K.arq_abort, A.turn_id)
  redis.call('ZREM', K.job_queue, A.turn_id)
  redis.call('DEL', K.arq_in_progress, K.arq_retry, K.arq_job)
end
if redis.call('LINDEX', K.conv_queue, 0) == A.turn_id then
  redis.call('LPOP', K.conv_queue)
else
  redis.call('LREM', K.conv_queue, 1, A.turn_id)
end
local nxt = redis.call('LINDEX', K.conv_queue, 0)
if nxt then
  local queue = route(redis.call('HGET', K.conv_state, 'workflow'), A.default_workflow, K.arq_queue,
                      A.queue_prefix)
  wake(nxt, A.conversation_id, tonumber(A.now_ms), A.job_prefix, tonumber(A.job_ttl), A.fname,
       queue, K.conv_active)
else
  redis.call('DEL', K.conv_active)
end
return 'written'
