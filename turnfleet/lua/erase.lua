-- Erase one subject (``erasure.forget``): check that none of its turns is queued or running,
-- tombstone its ids, delete its keys and index entries, in one step.
--! keys: tombstones, salt, *subject
--! args: plan
-- K.subject: the keys the plan refers to by position (1-based), then the keys to delete
-- (from p.first on). The plan (JSON):
--   queues : [ix]               conversation queues: any turn in them blocks the erasure
--   turns  : [[ix, n]]          conversation turn lists and their length when read
--   cc     : [ix, n] or []      the customer's conversation index and its size when read
--   ids    : [id]               ids to tombstone       salt : a salt to use if none is set yet
--   keep_ms: tombstones older than this are trimmed
--   zrem   : [[cmd, key, member]]  (ZREM / HDEL)       first : position of the first key to delete
-- Returns {-1, unfinished} (busy: nothing written), {-2} (changed since read: nothing written)
-- or {1, keys deleted, index entries removed}.
local p = cjson.decode(A.plan)
local subject = K.subject
local busy = 0
for _, ix in ipairs(p.queues) do busy = busy + redis.call('LLEN', subject[ix]) end
if busy > 0 then return {-1, busy} end
for _, t in ipairs(p.turns) do
  if redis.call('LLEN', subject[t[1]]) ~= t[2] then return {-2} end
end
if #p.cc > 0 and redis.call('ZCARD', subject[p.cc[1]]) ~= p.cc[2] then return {-2} end
redis.call('SET', K.salt, p.salt, 'NX')
local salt = redis.call('GET', K.salt)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(p.ids) do redis.call('ZADD', K.tombstones, now, redis.sha1hex(salt .. id)) end
redis.call('ZREMRANGEBYSCORE', K.tombstones, '-inf', '(' .. string.format('%.0f', now - p.keep_ms))
local deleted = 0
for i = p.first, #subject, 500 do
  deleted = deleted + redis.call('DEL', unpack(subject, i, math.min(i + 499, #subject)))
end
local removed = 0
for _, z in ipairs(p.zrem) do removed = removed + redis.call(z[1], z[2], z[3]) end
return {1, deleted, removed}
