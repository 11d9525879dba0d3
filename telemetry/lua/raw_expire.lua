-- Redact one turn's raw text, only if everything the plan rewrites is as it was read.
--! keys: index, turn, errors, escalation, memory, memory_meta, quarantine
--! args: plan
-- K.index: keys.RAW_TEXT; K.memory / K.memory_meta: the conversation's session messages and
-- session meta; K.quarantine: the turn's quarantined record.
-- A.plan (JSON): turn_id, at, request / result ({sha, new}), error_shas, errors_new,
-- ticket ({sha, new} or null), memory_session, memory ([{i, sha, new}, ...]).
-- A sha is the SHA-1 of the value as read ('' = absent); nothing is written unless every value
-- the plan rewrites still has it. Returns 'done', 'changed' (left for the next pass) or 'gone'
-- (no longer in the index, or no record: taken out of the index).
local p = cjson.decode(A.plan)
if not redis.call('ZSCORE', K.index, p.turn_id) then return 'gone' end
if redis.call('EXISTS', K.turn) == 0 then
  redis.call('ZREM', K.index, p.turn_id)
  return 'gone'
end
local function sha(v)
  if not v then return '' end
  return redis.sha1hex(v)
end
for _, f in ipairs({'request', 'result'}) do
  if sha(redis.call('HGET', K.turn, f)) ~= p[f].sha then return 'changed' end
end
local errs = redis.call('LRANGE', K.errors, 0, -1)
if #errs ~= #p.error_shas then return 'changed' end
for i, e in ipairs(errs) do
  if redis.sha1hex(e) ~= p.error_shas[i] then return 'changed' end
end
local ticket = type(p.ticket) == 'table'
if ticket and sha(redis.call('GET', K.escalation)) ~= p.ticket.sha then return 'changed' end
if #p.memory > 0 then
  if (redis.call('HGET', K.memory_meta, 'created_at') or '') ~= p.memory_session then return 'changed' end
  for _, m in ipairs(p.memory) do
    if sha(redis.call('LINDEX', K.memory, m.i)) ~= m.sha then return 'changed' end
  end
end
for _, f in ipairs({'request', 'result'}) do
  if type(p[f].new) == 'string' then redis.call('HSET', K.turn, f, p[f].new) end
end
redis.call('HSET', K.turn, 'raw_expired_at', p.at)
for i, e in ipairs(p.errors_new) do redis.call('LSET', K.errors, i - 1, e) end
if ticket then redis.call('SET', K.escalation, p.ticket.new, 'KEEPTTL') end
for _, m in ipairs(p.memory) do redis.call('LSET', K.memory, m.i, m.new) end
redis.call('DEL', K.quarantine)
redis.call('ZREM', K.index, p.turn_id)
return 'done'
