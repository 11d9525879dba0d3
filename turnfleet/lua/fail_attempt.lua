-- Keep a failed attempt's error (and its telemetry) before the turn is tried again, fenced.
--! keys: turn, turn_errors, telemetry, turn_events
--! args: fence, error_json, telemetry_batch, attempt, events_ttl_s, turn_id, workflow, version
--! include: fence_check, telemetry_entry
-- fence '' = none; telemetry_batch '' = none; workflow / version '' = not known. Returns 'written', 'duplicate' or 'fenced'.
local verdict = fence_check(K.turn, A.fence)
if verdict ~= 'ok' then return verdict end
redis.call('RPUSH', K.turn_errors, A.error_json)
redis.call('HSET', K.turn, 'status', 'queued')
if A.telemetry_batch ~= '' then
  telemetry_entry(K.telemetry, A.turn_id, A.workflow, A.version, A.telemetry_batch)
  redis.call('HSET', K.turn_events, A.attempt, A.telemetry_batch)
  redis.call('EXPIRE', K.turn_events, tonumber(A.events_ttl_s))
end
return 'written'
