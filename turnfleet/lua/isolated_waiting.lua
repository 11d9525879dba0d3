-- How many jobs of the isolated lane wait, and whether this worker is to serve the lane.
--! keys: isolated_queue, isolating_workers
--! args: now_ms, in_progress_prefix, worker, stale_ms, serving
--! returns: waiting, serve
-- serving: '1' when the worker serves the isolated lane now (a turn of it runs there).
-- waiting: jobs of the isolated lane due and held by no worker (of its first 100); serve: 1
-- if this worker is to serve the lane: it is if it was already, or if fewer other workers
-- serve it than jobs wait (so one waiting suspect pauses one worker, not all).
local now = tonumber(A.now_ms)
local waiting = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.isolated_queue, '-inf', now, 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', A.in_progress_prefix .. id) == 0 then waiting = waiting + 1 end
end
redis.call('ZREMRANGEBYSCORE', K.isolating_workers, '-inf', now - tonumber(A.stale_ms))
local mine = redis.call('ZSCORE', K.isolating_workers, A.worker)
if waiting == 0 and A.serving ~= '1' then
  if mine then redis.call('ZREM', K.isolating_workers, A.worker) end
  return {0, 0}
end
local others = redis.call('ZCARD', K.isolating_workers)
if mine then others = others - 1 end
if mine or A.serving == '1' or others < waiting then
  redis.call('ZADD', K.isolating_workers, now, A.worker)
  return {waiting, 1}
end
return {waiting, 0}
