-- Is this attempt still the turn's current, running attempt? Shared by every fenced write.
-- Returns 'ok', 'duplicate' (the turn already ended) or 'fenced' (another attempt owns it).
local function fence_check(turn_key, fence)
  local st = redis.call('HGET', turn_key, 'status')
  if st == 'completed' or st == 'failed' then return 'duplicate' end
  if fence ~= '' then
    if st ~= 'running' or redis.call('HGET', turn_key, 'attempts') ~= fence then return 'fenced' end
  end
  return 'ok'
end
