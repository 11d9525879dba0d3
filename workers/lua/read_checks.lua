-- Read what a batch of check jobs needs, in one step (workers/check_job.py): per turn, its
-- record's fields and its conversation's memory before the turn (``memory[0:memory_base]``).
--! keys: *turns
-- turns: per turn three keys: its record (``tf:turn:<id>``), its conversation's memory list
-- and that memory's meta hash (``created_at``).
-- Returns per turn a list: exists (1/0), result, raw_expired_at, memory_base, memory_session,
-- the memory's created_at, then the memory items before the turn (none when its raw text
-- expired). A record that is not a hash answers exists 2 and nothing else (a corrupt record:
-- one turn's, never the batch's error). Fields that are absent are false (nil replies).
local out = {}
for i = 1, #K.turns, 3 do
  local turn, messages, meta = K.turns[i], K.turns[i + 1], K.turns[i + 2]
  local fields = redis.pcall('HMGET', turn, 'result', 'raw_expired_at', 'memory_base', 'memory_session')
  if fields.err then
    out[#out + 1] = {2}
  elseif redis.call('EXISTS', turn) == 0 then
    out[#out + 1] = {0}
  else
    local one = {1, fields[1], fields[2], fields[3], fields[4], false}
    local base = tonumber(fields[3]) or 0
    if not fields[2] and base > 0 then
      local created = redis.pcall('HGET', meta, 'created_at')
      if type(created) == 'string' then one[6] = created end
      local items = redis.pcall('LRANGE', messages, 0, base - 1)
      if not items.err then
        for _, item in ipairs(items) do one[#one + 1] = item end
      end
    end
    out[#out + 1] = one
  end
end
return out
