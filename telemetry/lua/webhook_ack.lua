-- Acknowledge an alert entry and count its outcome together; one already acknowledged counts
-- nothing (however often it was delivered).
--! keys: stream, stats
--! args: group, entry_id, outcome
-- A.outcome: the K.stats field to add one to (delivered, rejected, malformed).
-- Returns 1 (acknowledged now) or 0.
local acked = redis.call('XACK', K.stream, A.group, A.entry_id)
if acked == 1 then redis.call('HINCRBY', K.stats, A.outcome, 1) end
return acked
