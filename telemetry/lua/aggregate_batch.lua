-- Apply a whole batch of telemetry entries at once, if none of its events was counted before
-- (telemetry/aggregate.py, _merge_batch): the ops of all its entries merged per key and field.
--! keys: *touched
--! args: plan
-- K.touched: every key the batch touches; the plan names them by index in that list.
-- A.plan, JSON (values travel as strings: Lua would print numbers with 14 significant digits):
--   ids : [[seen-set key, event id, ...], ...]: every counted event of the batch
--   er  : [tombstones, salt, [[entry ms, id, ...], ...]]: erasure (turnfleet/erasure.py)
--   s   : [[key, {field: value}], ...]      HSET (the last value the batch sets)
--   x/mn: [[key, {field: value}], ...]      HSET each field if value is greater / smaller
--   st  : [[key, a, status], ...] in order   HSET status; if a == '0' only when not terminal
--   i/f : [[key, {field: n}], ...]           HINCRBY / HINCRBYFLOAT (summed over the batch;
--                                             i's n a JSON number, rounded as lua/aggregate.lua)
-- A hash that does not exist yet (most of a batch's turn hashes) gets its i, x and mn fields
-- in one HSET instead (what HINCRBY and HGET + HSET from nothing would write), and is not
-- read to check its counters.
--   l   : [[key, sample, ...], ...]          LPUSH in order, then LTRIM to cap if longer
--   t   : [[key, score, member, ...], ...]   ZADD, then keep the top highest scores
--   z   : [[key, score, member, ...], ...]   ZADD GT
--   sa  : [[key, member, ...], ...]          SADD          e : [[key, seconds], ...] EXPIRE
--   rd  : [key, ...]                         hashes whose cost_nusd to return, after the writes
-- Returns {the number of events counted, then each rd hash's cost_nusd (nil if none)}, or -2
-- (a number, not a list) and writes nothing when an event of the batch
-- is already in its seen-set (a redelivery), an entry's subject was erased at or after it
-- was written, or a key it writes has another type / a counter it adds to is no number: the
-- caller then applies the entries one by one (lua/aggregate.lua), which counts each event at
-- most once, skips erased entries and fails only the entry that hits the bad key.
local p = cjson.decode(A.plan)
local T = K.touched
local CHUNK = 1000  -- unpack stops at ~8000 values

local function chunked(cmd, key, list, first, extra)
  local n = 0
  for i = first, #list, CHUNK do
    local j = math.min(i + CHUNK - 1, #list)
    if extra then
      n = redis.call(cmd, key, extra, unpack(list, i, j))
    else
      n = redis.call(cmd, key, unpack(list, i, j))
    end
  end
  return n
end

if p.er then
  local salt = redis.call('GET', T[p.er[2]])
  if salt then
    for _, e in ipairs(p.er[3]) do
      local ms = tonumber(e[1])
      for i = 2, #e do
        local at = redis.call('ZSCORE', T[p.er[1]], redis.sha1hex(salt .. e[i]))
        if at and tonumber(at) >= ms then return -2 end
      end
    end
  end
end
-- Nothing of the batch may fail half-way (a script error keeps what it wrote, and its dedupe
-- marks would then hide the rest of the batch from the retry): a key of another type, or a
-- counter that is no number, sends the batch entry by entry, where only its entry fails.
local want = {}
local function expect(list, kind)
  for _, h in ipairs(list) do want[h[1]] = kind end
end
expect(p.ids, 'set'); expect(p.sa, 'set'); expect(p.s, 'hash'); expect(p.x, 'hash')
expect(p.mn, 'hash'); expect(p.st, 'hash'); expect(p.i, 'hash'); expect(p.f, 'hash')
expect(p.l, 'list'); expect(p.t, 'zset'); expect(p.z, 'zset')
local fresh = {}  -- keys that do not exist yet
for k, kind in pairs(want) do
  local have = redis.call('TYPE', T[k])['ok']
  if have == 'none' then
    fresh[k] = true
  elseif have ~= kind then
    return -2
  end
end
local function numbers(list, pattern)
  for _, h in ipairs(list) do
    if not fresh[h[1]] then  -- (a key that does not exist holds no field)
      local fields = {}
      for f in pairs(h[2]) do fields[#fields + 1] = f end
      if #fields == 0 then fields[1] = '-' end
      for _, v in ipairs(redis.call('HMGET', T[h[1]], unpack(fields))) do
        if v and not (pattern and string.match(v, pattern) or (not pattern and tonumber(v))) then
          return false
        end
      end
    end
  end
  return true
end
if not (numbers(p.i, '^%-?%d+$') and numbers(p.f, nil)) then return -2 end
for _, s in ipairs(p.ids) do
  for i = 2, #s, CHUNK do
    local seen = redis.call('SMISMEMBER', T[s[1]], unpack(s, i, math.min(i + CHUNK - 1, #s)))
    for _, x in ipairs(seen) do
      if x == 1 then return -2 end
    end
  end
end
local new = 0
for _, s in ipairs(p.ids) do
  chunked('SADD', T[s[1]], s, 2)
  new = new + #s - 1
end
-- A hash that did not exist: its increments (i) and max/min fields (x, mn) are its values,
-- written with one HSET, as HINCRBY / HGET + HSET from nothing would write them (the plan
-- never sets and increments one field, nor adds to a field it takes the max or min of).
local written = {}
local by_key = {}
for _, list in ipairs({p.i, p.x, p.mn}) do
  for _, h in ipairs(list) do
    if fresh[h[1]] then
      local flat = by_key[h[1]]
      if not flat then
        flat = {}
        by_key[h[1]] = flat
      end
      local fmt = list == p.i
      for f, v in pairs(h[2]) do
        flat[#flat + 1] = f
        flat[#flat + 1] = fmt and string.format('%.0f', v) or v
      end
    end
  end
end
for k, flat in pairs(by_key) do
  chunked('HSET', T[k], flat, 1)
  written[k] = true
end
for _, h in ipairs(p.s) do
  local flat = {}
  for f, v in pairs(h[2]) do flat[#flat + 1] = f; flat[#flat + 1] = v end
  if #flat > 0 then chunked('HSET', T[h[1]], flat, 1) end
end
for _, h in ipairs(p.x) do
  local key = T[h[1]]
  for f, v in pairs(written[h[1]] and {} or h[2]) do
    local cur = redis.call('HGET', key, f)
    if (not cur) or tonumber(v) > tonumber(cur) then redis.call('HSET', key, f, v) end
  end
end
for _, h in ipairs(p.mn) do
  local key = T[h[1]]
  for f, v in pairs(written[h[1]] and {} or h[2]) do
    local cur = redis.call('HGET', key, f)
    if (not cur) or tonumber(v) < tonumber(cur) then redis.call('HSET', key, f, v) end
  end
end
for _, o in ipairs(p.st) do
  local key = T[o[1]]
  local cur = redis.call('HGET', key, 'status')
  if o[2] == '1' or (cur ~= 'completed' and cur ~= 'failed') then
    redis.call('HSET', key, 'status', o[3])
  end
end
for _, h in ipairs(p.i) do
  local key = T[h[1]]
  if not written[h[1]] then
    for f, n in pairs(h[2]) do redis.call('HINCRBY', key, f, string.format('%.0f', n)) end
  end
end
for _, h in ipairs(p.f) do
  local key = T[h[1]]
  for f, n in pairs(h[2]) do redis.call('HINCRBYFLOAT', key, f, n) end
end
for _, l in ipairs(p.l) do
  local len = chunked('LPUSH', T[l[1]], l, 2)
  if len > p.cap then redis.call('LTRIM', T[l[1]], 0, p.cap - 1) end
end
for _, z in ipairs(p.t) do
  chunked('ZADD', T[z[1]], z, 2)
  redis.call('ZREMRANGEBYRANK', T[z[1]], 0, -(p.top + 1))
end
for _, z in ipairs(p.z) do chunked('ZADD', T[z[1]], z, 2, 'GT') end
for _, m in ipairs(p.sa) do chunked('SADD', T[m[1]], m, 2) end
for _, e in ipairs(p.e) do redis.call('EXPIRE', T[e[1]], e[2]) end
local out = {new}
for i, k in ipairs(p.rd or {}) do out[i + 1] = redis.call('HGET', T[k], 'cost_nusd') end
return out
