-- Move a telemetry entry to the dead-letter stream and acknowledge it, if it is still pending
-- and was delivered at least A.after times.
--! keys: stream, dead_letter, fleet
--! args: group, entry_id, after, maxlen, counter, *record
-- K.fleet: the hash whose A.counter field counts dead-lettered entries. A.maxlen: the
-- dead-letter stream's approximate length. A.record: the dead-letter entry's field/value pairs
-- (after 'deliveries' and 'consumer', which come from XPENDING).
-- Returns {status, deliveries, dead-letter id}: status 1 after XADD + XACK + HINCRBY; 0 below
-- the limit (it stays pending; no id); -1 not pending (already acknowledged, e.g. by a consumer
-- that raced us to it; deliveries 0).
--! returns: status, deliveries, dead_letter_id
local p = redis.call('XPENDING', K.stream, A.group, A.entry_id, A.entry_id, 1)
if #p == 0 then return {-1, 0, false} end
local deliveries = p[1][4]
if deliveries < tonumber(A.after) then return {0, deliveries, false} end
local add = {'XADD', K.dead_letter, 'MAXLEN', '~', A.maxlen, '*',
             'deliveries', tostring(deliveries), 'consumer', p[1][2]}
for _, v in ipairs(A.record) do add[#add + 1] = v end
local id = redis.call(unpack(add))
redis.call('XACK', K.stream, A.group, A.entry_id)
redis.call('HINCRBY', K.fleet, A.counter, 1)
return {1, deliveries, id}
