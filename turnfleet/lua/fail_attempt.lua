-- Keep a failed attempt's error (and its telemetry) before the turn is tried again, fenced.
--! keys: turn, turn_errors, telemetry, turn_events
--! args: fence, error_json, telemetry_batch, attempt, events_ttl_s, turn_id
--! include: fence_check
-- fence '' = none; telemetry_batch '' = none. Returns 'written', 'duplicate' or 'fenced'.
local verdict = fence_check(K.turn, A.fence)
if verdict ~= 'ok' then return verdict end
redis.call('RPUSH', K.turn_errors, A.error_json)
redis.call('HSET', K.turn, 'status', 'queued')
if A.telemetry_batch ~= '' then
  redis.call('XADD', K.telemetry, '*', 'turn_id', A.turn_id, 'v', '1', 'batch', A.telemetry_batch)
  redis.call('HSET', K.turn_events, A.attempt, A.telemetry_batch)
  redis.call('EXPIRE', K.turn_events, tonumber(A.events_ttl_s))
end
return 'written'
