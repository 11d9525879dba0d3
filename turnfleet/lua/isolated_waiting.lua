-- How many jobs of the isolated lanes wait, and whether this worker is to serve them.
--! keys: isolating_workers, *isolated_queues
--! args: now_ms, in_progress_prefix, worker, stale_ms, serving
--! returns: waiting, serve, queue
-- isolated_queues: the isolated queue of each workflow the worker serves.
-- serving: '1' when the worker serves an isolated lane now (a turn of it runs there).
-- waiting: jobs of those queues due and held by no worker (of the first 100 of each); serve: 1
-- if this worker is to serve the lane: it is if it was already, or if fewer other workers
-- serve it than jobs wait (so one waiting suspect pauses one worker, not all). queue: the
-- index (from 1) of the first queue with a waiting job, 0 if none: the lane to open.
local now = tonumber(A.now_ms)
local waiting, first = 0, 0
for i, queue in ipairs(K.isolated_queues) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, 100)) do
    if redis.call('EXISTS', A.in_progress_prefix .. id) == 0 then
      waiting = waiting + 1
      if first == 0 then first = i end
    end
  end
end
redis.call('ZREMRANGEBYSCORE', K.isolating_workers, '-inf', now - tonumber(A.stale_ms))
local mine = redis.call('ZSCORE', K.isolating_workers, A.worker)
if waiting == 0 and A.serving ~= '1' then
  if mine then redis.call('ZREM', K.isolating_workers, A.worker) end
  return {0, 0, 0}
end
local others = redis.call('ZCARD', K.isolating_workers)
if mine then others = others - 1 end
if mine or A.serving == '1' or others < waiting then
  redis.call('ZADD', K.isolating_workers, now, A.worker)
  return {waiting, 1, first}
end
return {waiting, 0, first}
