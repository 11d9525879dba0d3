-- Drop the entries every consumer group on a stream has acknowledged, never one some group
-- still needs (telemetry/trim.py says the policy); one script, so no group moves between the
-- look and the cut.
--! keys: stream, counter_hash
--! args: max_entries, counter
--! returns: trimmed, length, min_id, over_limit
-- Returns {entries trimmed, length after, MINID used ('' if none), 1 if the tail is still
-- longer than A.max_entries (then A.counter + 1 on K.counter_hash) else 0}.
-- Ids are compared and incremented as decimal strings: sequence numbers may exceed 2^53.
if redis.call('EXISTS', K.stream) == 0 then return {0, 0, '', 0} end
local function split(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function num_less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return num_less(am, bm) end
  return num_less(as, bs)
end
local function incr(s)
  local i = #s
  while i > 0 and string.sub(s, i, i) == '9' do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #s) end
  return string.sub(s, 1, i - 1) .. string.char(string.byte(s, i) + 1) .. string.rep('0', #s - i)
end
local function after(id)
  local ms, seq = split(id)
  if seq == '18446744073709551615' then return incr(ms) .. '-0' end
  return ms .. '-' .. incr(seq)
end
local groups = redis.call('XINFO', 'GROUPS', K.stream)
local minid = nil
local function consider(id)
  if id and (minid == nil or id_less(id, minid)) then minid = id end
end
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  consider(after(info['last-delivered-id']))
  if tonumber(info['pending']) > 0 then
    consider(redis.call('XPENDING', K.stream, info['name'])[2])
  end
end
local trimmed = 0
if minid then trimmed = redis.call('XTRIM', K.stream, 'MINID', minid) end
local len = redis.call('XLEN', K.stream)
local over = 0
if len > tonumber(A.max_entries) then
  over = 1
  redis.call('HINCRBY', K.counter_hash, A.counter, 1)
end
return {trimmed, len, minid or '', over}
