-- Renew the running attempt's lease (arq's in-progress key) while it is still the turn's.
--! keys: turn, in_progress
--! args: attempt, lease_ms, token
-- Returns 1 (lease renewed), 0 (this attempt is no longer the turn's running attempt).
if redis.call('HGET', K.turn, 'status') ~= 'running'
   or redis.call('HGET', K.turn, 'attempts') ~= A.attempt then
  return 0
end
redis.call('SET', K.in_progress, A.token, 'PX', tonumber(A.lease_ms))
return 1
