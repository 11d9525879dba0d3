-- Apply one telemetry entry's plan (telemetry/aggregate.py, _Plan): each event's increments
-- only if its id was new to the turn's seen-set, so a redelivered entry changes nothing.
--! keys: *touched
--! args: plan, erased_skipped
-- K.touched: every key the entry touches; the plan names them by index in that list.
-- A.plan, JSON:
--   g    : groups of key indexes an op applies to
--   e    : events, each [seen-set key index, event id, ops]; ops run only if SADD added the id
--   post : ops run whatever was new (idempotent ones: same-value HSET, max, min, ZADD GT,
--          SADD, EXPIRE)
--   cap  : samples kept per list          top : members kept in a 't' zset
--   er   : [tombstones, salt, fleet hash (key indexes), entry ms, ids]: erasure
--          (turnfleet/erasure.py); absent for an entry with no ids (malformed)
-- An op is [kind, group, a, b]:
--   i / f : HINCRBY / HINCRBYFLOAT field a by b (summed per key and field, applied at the end)
--   s     : HSET field a = b             x / mn : HSET field a = b if b is greater / smaller
--   st    : HSET status = b; if a == '0' only when status is not already terminal
--   l     : LPUSH sample b (collected per key, one LPUSH each, then LTRIM to cap if longer)
--   t     : ZADD score b member a, then (once per key) keep the top highest scores
--   z     : ZADD GT b, a flat list score, member, ...
--   sa    : SADD the members in list b   e : EXPIRE b seconds
-- Values travel as strings: Lua would print numbers with 14 significant digits.
-- A.erased_skipped: the fleet hash field counting entries skipped for an erased subject.
-- Returns the number of events that were new, or -1: an id of the entry (turn, conversation,
-- customer) was erased at or after the entry was written; the entry is skipped whole, nothing
-- is written but A.erased_skipped + 1 on the fleet hash. No salt: nothing was ever erased.
local p = cjson.decode(A.plan)
local touched = K.touched
if p.er then
  local salt = redis.call('GET', touched[p.er[2]])
  if salt then
    for _, id in ipairs(p.er[5]) do
      local at = redis.call('ZSCORE', touched[p.er[1]], redis.sha1hex(salt .. id))
      if at and tonumber(at) >= tonumber(p.er[4]) then
        redis.call('HINCRBY', touched[p.er[3]], A.erased_skipped, 1)
        return -1
      end
    end
  end
end
local incr, incrf, lists, tops = {}, {}, {}, {}
local function add(acc, k, f, v)
  local h = acc[k]
  if not h then h = {}; acc[k] = h end
  h[f] = (h[f] or 0) + tonumber(v)
end
local function run(op)
  local kind, a, b = op[1], op[3], op[4]
  for _, k in ipairs(p.g[op[2]]) do
    local key = touched[k]
    if kind == 'i' then add(incr, k, a, b)
    elseif kind == 'f' then add(incrf, k, a, b)
    elseif kind == 's' then redis.call('HSET', key, a, b)
    elseif kind == 'x' then
      local cur = redis.call('HGET', key, a)
      if (not cur) or tonumber(b) > tonumber(cur) then redis.call('HSET', key, a, b) end
    elseif kind == 'mn' then
      local cur = redis.call('HGET', key, a)
      if (not cur) or tonumber(b) < tonumber(cur) then redis.call('HSET', key, a, b) end
    elseif kind == 'l' then
      local l = lists[k]
      if not l then l = {}; lists[k] = l end
      l[#l + 1] = b
    elseif kind == 't' then redis.call('ZADD', key, b, a); tops[k] = true
    elseif kind == 'st' then
      local cur = redis.call('HGET', key, 'status')
      if a == '1' or (cur ~= 'completed' and cur ~= 'failed') then
        redis.call('HSET', key, 'status', b)
      end
    elseif kind == 'z' then redis.call('ZADD', key, 'GT', unpack(b))
    elseif kind == 'sa' then redis.call('SADD', key, unpack(b))
    elseif kind == 'e' then redis.call('EXPIRE', key, b)
    end
  end
end
local new = 0
for _, ev in ipairs(p.e) do
  if redis.call('SADD', touched[ev[1]], ev[2]) == 1 then
    new = new + 1
    for _, op in ipairs(ev[3]) do run(op) end
  end
end
for k, h in pairs(incr) do
  for f, v in pairs(h) do redis.call('HINCRBY', touched[k], f, string.format('%.0f', v)) end
end
for k, h in pairs(incrf) do
  for f, v in pairs(h) do redis.call('HINCRBYFLOAT', touched[k], f, string.format('%.17g', v)) end
end
for k, l in pairs(lists) do
  local len = 0
  for i = 1, #l, 1000 do
    len = redis.call('LPUSH', touched[k], unpack(l, i, math.min(i + 999, #l)))
  end
  if len > p.cap then redis.call('LTRIM', touched[k], 0, p.cap - 1) end
end
for k in pairs(tops) do redis.call('ZREMRANGEBYRANK', touched[k], 0, -(p.top + 1)) end
for _, op in ipairs(p.post) do run(op) end
return new
