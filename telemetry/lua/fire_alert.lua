-- Fire an alert once: SET its marker NX and, only if set, XADD it to the alert stream and
-- count it, so an alert is written exactly once however often its condition is seen.
--! keys: fired, stream, counts
--! args: alert_id, alert, ttl_s, maxlen, rule
-- K.fired: the (rule, subject, window) marker, living A.ttl_s seconds (0: for ever).
-- K.counts: alerts written per rule (keys.ALERTS_COUNT, what /metrics exposes); it moves
-- with the XADD, so it equals the alerts written even after the stream is trimmed.
-- Returns the stream entry id, or nil if the alert had already fired.
local set
if tonumber(A.ttl_s) > 0 then
  set = redis.call('SET', K.fired, A.alert_id, 'NX', 'EX', A.ttl_s)
else
  set = redis.call('SET', K.fired, A.alert_id, 'NX')
end
if not set then return false end
redis.call('HINCRBY', K.counts, A.rule, 1)
return redis.call('XADD', K.stream, 'MAXLEN', '~', A.maxlen, '*', 'alert', A.alert)
