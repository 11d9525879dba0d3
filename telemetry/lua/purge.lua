-- Purge one idle conversation (telemetry/retention.py): delete its keys and take it out of
-- every index, unless it changed since it was read.
--! keys: index, queue, turns, *doomed
--! args: conversation_id, cutoff_ms, turns_read, *unindex
-- K.index: the conversation index (score: last event ms); K.queue / K.turns: the
-- conversation's queue and turn list; K.doomed: every key to delete (erasure.purge_plan).
-- A.turns_read: how many turns K.turns held when read; A.unindex: (index key, member) pairs
-- to ZREM.
-- Returns 1 (purged) or 0 (left: a turn is queued or running, or the conversation changed
-- since it was read — a newer event or a new turn).
local score = redis.call('ZSCORE', K.index, A.conversation_id)
if score and tonumber(score) > tonumber(A.cutoff_ms) then return 0 end
if redis.call('LLEN', K.queue) > 0 then return 0 end
if redis.call('LLEN', K.turns) ~= tonumber(A.turns_read) then return 0 end
for i = 1, #K.doomed, 500 do
  redis.call('DEL', unpack(K.doomed, i, math.min(i + 499, #K.doomed)))
end
for i = 1, #A.unindex, 2 do
  redis.call('ZREM', A.unindex[i], A.unindex[i + 1])
end
redis.call('ZREM', K.index, A.conversation_id)
return 1
