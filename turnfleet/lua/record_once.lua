-- Store a side effect once (turnfleet.side_effects: a refund, an escalation, a team tool's
-- `once`): the record and, the first time only, one entry of a stream (a ledger, an outbox),
-- together or not at all.
--! keys: record, *stream
--! args: value, field, *entry
-- field: '' stores the record as the string at `record`; otherwise as that field of the hash
-- at `record` (a turn's once records, one hash per turn). stream: none or one key; entry: its
-- field/value pairs. Returns {1, value} (stored now) or {0, the value stored before}.
local created
if A.field == '' then
  created = redis.call('SET', K.record, A.value, 'NX')
else
  created = redis.call('HSETNX', K.record, A.field, A.value) == 1
end
if created then
  if K.stream[1] then
    redis.call('XADD', K.stream[1], '*', unpack(A.entry))
  end
  return {1, A.value}
end
if A.field == '' then
  return {0, redis.call('GET', K.record)}
end
return {0, redis.call('HGET', K.record, A.field)}
