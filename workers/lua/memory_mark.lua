-- Replace a corrupt memory item by a marker, only if it still holds what was read (LSET: the
-- list keeps its length, so memory_length/memory_base and roll-backs keep their meaning).
--! keys: messages, turn
--! args: attempt, index, item, marker
--! include: fence_check
-- attempt '' = unfenced; item: the corrupt item as read.
-- Returns 1 (marked), 0 (the item changed meanwhile) or -1 (fenced: nothing written).
if A.attempt ~= '' and fence_check(K.turn, A.attempt) ~= 'ok' then return -1 end
if redis.call('LINDEX', K.messages, A.index) ~= A.item then return 0 end
redis.call('LSET', K.messages, A.index, A.marker)
return 1
