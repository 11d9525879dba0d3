-- Count a stream's entries from a start id, a page at a time, so only a page of entries is
-- ever held (telemetry lag: Redis 6.2 has no XINFO lag).
--! keys: stream
--! args: start, cap
-- A.start: inclusive form ('(' .. id for exclusive). Counting stops at A.cap.
-- Returns the count.
local n, start, cap = 0, A.start, tonumber(A.cap)
while n < cap do
  local page = redis.call('XRANGE', K.stream, start, '+', 'COUNT', math.min(500, cap - n))
  if #page == 0 then break end
  n = n + #page
  start = '(' .. page[#page][1]
end
return n
