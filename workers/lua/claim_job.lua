-- Claim a queued arq job for this worker: arq's own check-and-set, in one atomic step.
--! keys: in_progress, queue
--! args: job_id, now_ms, timeout_ms
-- arq 0.28 does it as WATCH in_progress, EXISTS, ZSCORE, MULTI, PSETEX, EXEC: four round trips
-- a job. Same rule here: skip the job (nil) when another worker runs it (its in-progress key
-- exists), it left the queue (no score: finished) or it is due later (re-queued with a delay);
-- else set the in-progress key for ``timeout_ms`` and return the job's score.
if redis.call('EXISTS', K.in_progress) == 1 then return false end
local score = redis.call('ZSCORE', K.queue, A.job_id)
if not score or tonumber(score) > tonumber(A.now_ms) then return false end
redis.call('PSETEX', K.in_progress, A.timeout_ms, '1')
return score
