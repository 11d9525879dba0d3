-- Drop a conversation memory's items past the first ``keep`` (a failed attempt's), fenced.
--! keys: messages, turn
--! args: attempt, keep
--! include: fence_check
-- attempt '' = unfenced. Returns how many items were popped, or -1 when fenced.
if A.attempt ~= '' and fence_check(K.turn, A.attempt) ~= 'ok' then return -1 end
local keep = tonumber(A.keep)
local n = redis.call('LLEN', K.messages)
if n <= keep then return 0 end
if keep == 0 then redis.call('DEL', K.messages) else redis.call('LTRIM', K.messages, 0, keep - 1) end
return n - keep
