-- Claim due arq jobs for this lane and start them as arq would: one round trip a poll.
--! keys: queue, abort
--! args: now_ms, offset, read_limit, free, timeout_ms, in_progress_prefix, job_prefix, retry_prefix, retry_ttl_s, check_abort, *job_ids
-- arq 0.28 reads the queue (ZRANGEBYSCORE), then per job claims it (WATCH, EXISTS, ZSCORE,
-- MULTI, PSETEX, EXEC) and starts it (MULTI, GET job, INCR try, EXPIRE try, [ZREM abort],
-- EXEC): 1 + 2 round trips a job at best. Same rules here, in one step:
-- * the jobs looked at: job_ids, or else the due ones (score <= now_ms) in score order, from
--   ``offset``, at most ``read_limit`` (arq's queue_read_limit);
-- * a job is skipped when another worker (or this lane) runs it (its in-progress key exists),
--   it left the queue (no score: finished) or it is due later (re-queued with a delay);
-- * else it is claimed (in-progress key set for ``timeout_ms``) and started: its payload read,
--   its try counter incremented (kept ``retry_ttl_s``), and with check_abort '1' taken out
--   of arq's abort set (``aborted``: it was asked to abort before it started);
-- * at most ``free`` jobs are claimed (the lane's free slots): the rest stay queued.
-- Returns one {job_id, score, payload (nil: the job key expired), try, aborted} per claim.
local ids = A.job_ids
if #ids == 0 then
  ids = redis.call('ZRANGEBYSCORE', K.queue, '-inf', A.now_ms, 'LIMIT', A.offset, A.read_limit)
end
local free, now = tonumber(A.free), tonumber(A.now_ms)
local out = {}
for _, id in ipairs(ids) do
  if #out >= free then break end
  local in_progress = A.in_progress_prefix .. id
  if redis.call('EXISTS', in_progress) == 0 then
    local score = redis.call('ZSCORE', K.queue, id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', in_progress, A.timeout_ms, '1')
      local retry = A.retry_prefix .. id
      local try = redis.call('INCR', retry)
      redis.call('EXPIRE', retry, A.retry_ttl_s)
      local aborted = 0
      if A.check_abort == '1' then aborted = redis.call('ZREM', K.abort, id) end
      out[#out + 1] = {id, score, redis.call('GET', A.job_prefix .. id), try, aborted}
    end
  end
end
return out
