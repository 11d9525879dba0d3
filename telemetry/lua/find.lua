-- One page of the conversation index intersected with every filter zset (turnfleet find).
--! keys: index, scratch, union, *filters
--! args: max_ms, min_ms, offset, count, any
-- K.index: the conversations by last event ms; K.filters: at least one zset whose members
-- must also be there. The first A.any filters are alternatives (a member of any one matches:
-- the versions of one workflow): they are unioned into K.union first, which then counts as
-- one filter. K.scratch and K.union live only inside this call.
-- The intersection keeps only the index's score (the filters weigh 0), so the range
-- [A.min_ms, A.max_ms] and the order (highest first) are by last event.
-- Returns member, score, member, score, ...
local any = tonumber(A.any)
local filters = {}
if any > 0 then
  local union = {'ZUNIONSTORE', K.union, any}
  for i = 1, any do union[#union + 1] = K.filters[i] end
  redis.call(unpack(union))
  filters[1] = K.union
end
for i = any + 1, #K.filters do filters[#filters + 1] = K.filters[i] end
local args = {'ZINTERSTORE', K.scratch, #filters + 1}
for _, f in ipairs(filters) do args[#args + 1] = f end
args[#args + 1] = K.index
args[#args + 1] = 'WEIGHTS'
for _ = 1, #filters do args[#args + 1] = 0 end
args[#args + 1] = 1
redis.call(unpack(args))
local page = redis.call('ZREVRANGEBYSCORE', K.scratch, A.max_ms, A.min_ms, 'WITHSCORES',
                        'LIMIT', A.offset, A.count)
redis.call('DEL', K.scratch, K.union)
return page
