-- Claim a batch of due check jobs for the checks lane (workers/checks_lane.py), in one step:
-- arq's poll (ZRANGEBYSCORE), its claim (in-progress key) and the start of its run_job (the
-- job's payload, its try counter) for up to ``limit`` jobs at once.
--! keys: queue
--! args: now_ms, lease_ms, limit, scan, job_prefix, in_progress_prefix, retry_prefix
-- Looks at the ``scan`` first due ids (score <= now_ms, oldest first): one another worker holds
-- (its in-progress key exists) is skipped; each other one, until ``limit`` are taken, gets its
-- in-progress key for ``lease_ms`` (one lease: the lane renews it while the job runs), its try
-- counter (arq's retry key, kept 88400 s as arq does) incremented, and is returned.
-- Returns a flat list: job_id, tries, payload ('' when the job key is gone), ... per job taken.
local ids = redis.call('ZRANGEBYSCORE', K.queue, '-inf', A.now_ms, 'LIMIT', 0, tonumber(A.scan))
local out, limit, taken = {}, tonumber(A.limit), 0
for _, id in ipairs(ids) do
  if taken >= limit then break end
  local held = A.in_progress_prefix .. id
  if redis.call('EXISTS', held) == 0 then
    redis.call('SET', held, '1', 'PX', A.lease_ms)
    local retry = A.retry_prefix .. id
    local tries = redis.call('INCR', retry)
    redis.call('EXPIRE', retry, 88400)
    out[#out + 1] = id
    out[#out + 1] = tries
    out[#out + 1] = redis.call('GET', A.job_prefix .. id) or ''
    taken = taken + 1
  end
end
return out
