-- Count an attempt and mark the turn running, if it may run now (its conversation's head,
-- not ended). The attempt number is the fencing token of every later write of the attempt.
--! keys: turn, conv_queue, turn_errors, in_progress, conv_state, session_messages, quarantine, arq_queue, isolated_queue, source_queue, arq_retry
--! args: turn_id, worker, started_at, lease_ms, now_iso, lane, isolated_losses, now_ms, record_version, default_workflow, queue_prefix, isolated_prefix, served
--! returns: attempt, status, request, current_agent, memory_length, memory_base, customer_id, corrupt, spared, memory
--! include: route
-- lease_ms: 0 = no lease. isolated_losses: after this many losses while running isolated the
-- turn is poison. attempt 0 means "do not run" (status says why: 'isolate' = handed to the
-- isolated lane; the rest of the reply is then empty). Status 'poison': the turn lost its
-- worker while isolated; end it WorkerLost. Status 'newer': the record's format version ('v',
-- none = 1) is newer than record_version, what this process reads: nothing is changed, the
-- job is left for a newer worker (turnfleet/versions.py). A suspect moves to the isolated queue
-- of its conversation's workflow (route: isolated_queue for default_workflow). Status
-- 'rerouted': the worker does not serve the conversation's workflow (served: a JSON list of
-- the names it serves; '' = no check) and the job sat in source_queue, the queue the worker
-- took it from (an older process queued it in arq:queue): the job moves to its workflow's
-- queue of the same lane with its due time, arq's claim is undone (in-progress key deleted,
-- try count decremented), no attempt is counted.
local function skip(why) return {0, why, '', '', 0, 0, '', '', 0, {}} end
local kind = redis.call('TYPE', K.turn).ok
if kind ~= 'hash' and kind ~= 'none' then
  -- Not a record at all (a string, a list... written by hand): keep it aside for whoever
  -- investigates, and start a record that can carry the turn's failure.
  redis.call('RENAME', K.turn, K.quarantine)
  redis.call('HSET', K.turn, 'status', 'queued', 'attempts', 0,
             'corrupt', 'the turn record was a Redis ' .. kind .. ', not a hash (moved to ' .. K.quarantine .. ')')
end
if (tonumber(redis.call('HGET', K.turn, 'v') or '1') or 1) > tonumber(A.record_version) then return skip('newer') end
local st = redis.call('HGET', K.turn, 'status')
if not st then return skip('unknown') end
if st == 'completed' or st == 'failed' then return skip(st) end
if redis.call('LINDEX', K.conv_queue, 0) ~= A.turn_id then return skip('not-head') end
local lane = A.lane
if A.served ~= '' then
  local workflow = redis.call('HGET', K.conv_state, 'workflow')
  local wanted = workflow or A.default_workflow
  local serves = false
  for _, name in ipairs(cjson.decode(A.served)) do
    if name == wanted then serves = true end
  end
  if not serves then
    local target
    if lane == 'isolated' then
      target = route(workflow, A.default_workflow, K.isolated_queue, A.isolated_prefix)
    else
      target = route(workflow, A.default_workflow, K.arq_queue, A.queue_prefix)
    end
    if target ~= K.source_queue then
      local due = redis.call('ZSCORE', K.source_queue, A.turn_id) or A.now_ms
      redis.call('ZREM', K.source_queue, A.turn_id)
      redis.call('ZADD', target, due, A.turn_id)
      redis.call('DEL', K.in_progress)
      if tonumber(redis.call('GET', K.arq_retry) or '0') > 0 then redis.call('DECR', K.arq_retry) end
      return skip('rerouted')
    end
  end
end
local status = 'running'
if st == 'running' then
  -- The previous attempt never recorded an outcome: its worker died or lost its lease.
  local prev = tonumber(redis.call('HGET', K.turn, 'attempts') or '0')
  local who = redis.call('HGET', K.turn, 'worker') or '?'
  local prev_lane = redis.call('HGET', K.turn, 'lane') or 'plain'
  local how = ''
  if prev_lane == 'isolated' then
    -- Lost while it ran alone on its worker: the likeliest cause of the loss is the turn.
    local n = redis.call('HINCRBY', K.turn, 'isolated_losses', 1)
    redis.call('HINCRBY', K.turn, 'spared', 1)
    how = ' while running isolated (' .. n .. ' of ' .. A.isolated_losses .. ')'
    if n >= tonumber(A.isolated_losses) then status = 'poison' end
  elseif lane ~= 'plain' then
    -- Lost with the other turns of its worker: a suspect, run alone next, not charged.
    redis.call('HSET', K.turn, 'suspect', 1)
    redis.call('HINCRBY', K.turn, 'spared', 1)
    how = ' beside other turns (runs isolated next)'
  end
  redis.call('RPUSH', K.turn_errors, cjson.encode({
    attempt = prev, error_type = 'WorkerLost', at = A.now_iso,
    message = 'attempt ' .. prev .. ' on worker ' .. who ..
      ' ended without recording an outcome (worker killed, stalled past its lease,'
      .. ' or cut off from Redis)' .. how}))
end
if status == 'running' and lane == 'shared' and redis.call('HGET', K.turn, 'suspect') == '1' then
  -- A suspect runs only in the isolated lane: hand the job over without starting an attempt.
  -- (The caller skips arq's clean-up of the job: the job key stays, the zset changes here.)
  redis.call('HSET', K.turn, 'status', 'queued')
  local workflow = redis.call('HGET', K.conv_state, 'workflow')
  redis.call('ZREM', route(workflow, A.default_workflow, K.arq_queue, A.queue_prefix), A.turn_id)
  redis.call('ZADD', route(workflow, A.default_workflow, K.isolated_queue, A.isolated_prefix),
             tonumber(A.now_ms), A.turn_id)
  redis.call('DEL', K.in_progress)
  return skip('isolate')
end
local attempt = redis.call('HINCRBY', K.turn, 'attempts', 1)
redis.call('HSET', K.turn, 'status', 'running', 'worker', A.worker, 'started_at', A.started_at, 'lane', lane)
local lease = tonumber(A.lease_ms)
if lease > 0 then
  redis.call('SET', K.in_progress, A.worker .. '#' .. attempt, 'PX', lease)
end
-- What the attempt needs to begin, read here rather than in more round trips: the request,
-- where the conversation stands, the memory length now and before the turn's first attempt
-- (kept on the turn record), and the memory's items (the run's first read of its session).
local mem_len = redis.call('LLEN', K.session_messages)
local base = redis.call('HGET', K.turn, 'memory_base')
if not base then
  base = mem_len
  redis.call('HSET', K.turn, 'memory_base', base)
end
return {attempt, status, redis.call('HGET', K.turn, 'request') or '',
        redis.call('HGET', K.conv_state, 'current_agent') or '', mem_len, tonumber(base),
        redis.call('HGET', K.conv_state, 'customer_id') or '',
        redis.call('HGET', K.turn, 'corrupt') or '',
        tonumber(redis.call('HGET', K.turn, 'spared') or '0'),
        redis.call('LRANGE', K.session_messages, 0, -1)}
