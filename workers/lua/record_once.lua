-- Store a tool's side effect once (a refund, an escalation): the record and, the first time
-- only, one entry of a stream (the refund ledger), together or not at all.
--! keys: record, *stream
--! args: value, *entry
-- stream: none or one key; entry: its field/value pairs. Returns {1, value} (stored now) or
-- {0, the value stored before}.
if redis.call('SET', K.record, A.value, 'NX') then
  if K.stream[1] then
    redis.call('XADD', K.stream[1], '*', unpack(A.entry))
  end
  return {1, A.value}
end
return {0, redis.call('GET', K.record)}
