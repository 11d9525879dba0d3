-- Reset the idle time of this consumer's pending entries in [first, last] (XCLAIM JUSTID keeps
-- the delivery counter) so no other sink claims them; entries another consumer took are left
-- alone.
--! keys: stream
--! args: group, consumer, first, last, count
-- Returns the ids still this consumer's.
local pending = redis.call('XPENDING', K.stream, A.group, A.first, A.last, A.count, A.consumer)
if #pending == 0 then return {} end
local claim = {'XCLAIM', K.stream, A.group, A.consumer, 0}
for _, entry in ipairs(pending) do claim[#claim + 1] = entry[1] end
claim[#claim + 1] = 'JUSTID'
return redis.call(unpack(claim))
