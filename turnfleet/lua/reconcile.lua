-- Repair one conversation's queue, active marker and head job (``queue.py``'s module doc,
-- "Reconciling"): changes nothing in a healthy conversation.
--! keys: conv_queue, conv_active, conv_state, arq_queue, isolated_queue
--! args: conversation_id, now_ms, job_prefix, job_ttl, fname, turn_key_prefix, in_progress_prefix, lease_ms, default_workflow, queue_prefix, isolated_prefix
--! returns: action, turn_id, dropped
--! include: arq_job, route
-- The head's job is looked for, and written, in the queues of the conversation's workflow
-- (route: arq_queue / isolated_queue for default_workflow).
-- dropped: finished turns dropped from the head. action is one of
--   idle     no unfinished turn, nothing to do
--   ok       the head is active and has its arq job
--   running  the head's job is gone but a worker still holds it (in-progress key)
--   cleared  no unfinished turn but an active marker was left: removed
--   woke     the active marker was missing or stale: set to the head (job written if missing)
--   rewoke   the active head had no arq job: written again
--   clamped  as ok, but its in-progress key outlived a lease and was cut down to one
local function status_of(key)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return nil end
  if kind ~= 'hash' then return 'corrupt' end  -- unfinished: its job's START quarantines it
  return redis.call('HGET', key, 'status')
end
local head = redis.call('LINDEX', K.conv_queue, 0)
local dropped = 0
while head do
  local st = status_of(A.turn_key_prefix .. head)
  if st and st ~= 'completed' and st ~= 'failed' then break end
  redis.call('LPOP', K.conv_queue)
  dropped = dropped + 1
  head = redis.call('LINDEX', K.conv_queue, 0)
end
local active = redis.call('GET', K.conv_active)
if not head then
  if active then
    redis.call('DEL', K.conv_active)
    return {'cleared', active, dropped}
  end
  return {'idle', '', dropped}
end
local action = 'ok'
if active ~= head then
  redis.call('SET', K.conv_active, head)
  action = 'woke'
end
local has_job = redis.call('EXISTS', A.job_prefix .. head) == 1
local workflow = redis.call('HGET', K.conv_state, 'workflow')
local queue = route(workflow, A.default_workflow, K.arq_queue, A.queue_prefix)
local queued = redis.call('ZSCORE', queue, head)
  or redis.call('ZSCORE', route(workflow, A.default_workflow, K.isolated_queue, A.isolated_prefix), head)
local in_progress = A.in_progress_prefix .. head
local ttl = redis.call('PTTL', in_progress)
local lease = tonumber(A.lease_ms)
if ttl ~= -2 and lease > 0 and (ttl == -1 or ttl > lease) then
  redis.call('PEXPIRE', in_progress, lease)
  if action == 'ok' then action = 'clamped' end
end
if has_job and queued then return {action, head, dropped} end
if ttl ~= -2 then return {'running', head, dropped} end
local now = tonumber(A.now_ms)
if not has_job then
  arq_job(A.job_prefix, tonumber(A.job_ttl), A.fname, head, A.conversation_id, now)
end
redis.call('ZADD', queue, 'NX', now, head)
if action == 'ok' then action = 'rewoke' end
return {action, head, dropped}
