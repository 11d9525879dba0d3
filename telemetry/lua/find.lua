-- One page of the conversation index intersected with every filter zset (turnfleet find).
--! keys: index, scratch, *filters
--! args: max_ms, min_ms, offset, count
-- K.index: the conversations by last event ms; K.filters: at least one zset whose members
-- must also be there; K.scratch: where the intersection lives, only inside this call.
-- The intersection keeps only the index's score (the filters weigh 0), so the range
-- [A.min_ms, A.max_ms] and the order (highest first) are by last event.
-- Returns member, score, member, score, ...
local args = {'ZINTERSTORE', K.scratch, #K.filters + 1}
for _, f in ipairs(K.filters) do args[#args + 1] = f end
args[#args + 1] = K.index
args[#args + 1] = 'WEIGHTS'
for _ = 1, #K.filters do args[#args + 1] = 0 end
args[#args + 1] = 1
redis.call(unpack(args))
local page = redis.call('ZREVRANGEBYSCORE', K.scratch, A.max_ms, A.min_ms, 'WITHSCORES',
                        'LIMIT', A.offset, A.count)
redis.call('DEL', K.scratch)
return page
