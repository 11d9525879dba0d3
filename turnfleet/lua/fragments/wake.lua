-- Make the turn its conversation's active one and queue its arq job (include arq_job first).
local function wake(turn_id, conversation_id, now, job_prefix, job_ttl, fname, queue, active)
  redis.call('SET', active, turn_id)
  arq_job(job_prefix, job_ttl, fname, turn_id, conversation_id, now)
  redis.call('ZADD', queue, now, turn_id)
end
