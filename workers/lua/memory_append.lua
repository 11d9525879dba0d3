-- Append items to a conversation's memory (the SDK's layout), fenced by attempt.
--! keys: messages, meta, turn
--! args: attempt, ttl_s, now, session_id, *items
--! include: fence_check
-- attempt '' = unfenced; ttl_s '' = none.
-- Returns the new length, or -1 when the attempt no longer owns the turn (nothing written).
if A.attempt ~= '' and fence_check(K.turn, A.attempt) ~= 'ok' then return -1 end
local n = redis.call('RPUSH', K.messages, unpack(A.items))
redis.call('HSET', K.meta, 'session_id', A.session_id, 'updated_at', A.now)
redis.call('HSETNX', K.meta, 'created_at', A.now)
if A.ttl_s ~= '' then
  redis.call('EXPIRE', K.messages, A.ttl_s)
  redis.call('EXPIRE', K.meta, A.ttl_s)
end
return n
