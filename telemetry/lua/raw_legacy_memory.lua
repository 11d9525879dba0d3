-- One snapshot of what a legacy turn's memory range is derived from (raw_expiry.py,
-- RawExpiry.legacy_memory): turns finished before records kept memory_end / memory_session.
--! keys: turns, memory, queue, memory_meta
--! args: turn_prefix
-- K.turns: the conversation's turns (enqueue order); K.memory / K.memory_meta: its session
-- messages and session meta; K.queue: its queue. A.turn_prefix: keys.turn('').
-- Returns {memory length, queue length, memory created_at ('' = none), then per turn of the
-- conversation in enqueue order: turn_id, memory_base ('' = none), status ('' = no record or
-- no hash), attempts}: a flat list of variable length, read by position in Python.
local out = {redis.call('LLEN', K.memory), redis.call('LLEN', K.queue),
             redis.call('HGET', K.memory_meta, 'created_at') or ''}
for _, t in ipairs(redis.call('LRANGE', K.turns, 0, -1)) do
  local k = A.turn_prefix .. t
  local v = {false, false, false}
  if redis.call('TYPE', k).ok == 'hash' then v = redis.call('HMGET', k, 'memory_base', 'status', 'attempts') end
  out[#out + 1] = t
  out[#out + 1] = v[1] or ''
  out[#out + 1] = v[2] or ''
  out[#out + 1] = v[3] or '0'
end
return out
