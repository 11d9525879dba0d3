-- Index a turn that finished before the raw-text index existed (an upgraded deployment).
--! keys: index, turn
--! args: turn_id, finished_ms
-- Only a finished record (a hash, status completed/failed) not yet redacted, never over an
-- entry (NX). Atomic with those checks, so an erased or running turn is never indexed.
-- Returns 1 (indexed) or 0.
if redis.call('TYPE', K.turn).ok ~= 'hash' then return 0 end
local st = redis.call('HGET', K.turn, 'status')
if st ~= 'completed' and st ~= 'failed' then return 0 end
if redis.call('HEXISTS', K.turn, 'raw_expired_at') == 1 then return 0 end
return redis.call('ZADD', K.index, 'NX', tonumber(A.finished_ms), A.turn_id)
