-- Write finished turns' check outcomes once: per turn, the outcomes key and one telemetry entry
-- with a ``check`` event per check, both or neither (docs/ARCHITECTURE.md, "Checks"). One call
-- writes a whole batch of check jobs (workers/check_job.py), each turn on its own terms.
--! keys: telemetry, job_queue, arq_abort, *turns
--! args: batch_version, arq_cleanup, *jobs
--! include: telemetry_entry
-- turns: per turn five keys: its record, its outcomes key, its check job's arq job, in-progress
-- and retry keys. jobs: per turn six arguments: turn_id, job_id, outcomes_json, telemetry_batch,
-- workflow and version ('' = not known).
-- Per turn: 'written'; 'already' when the outcomes key exists (an earlier run of the check job
-- wrote them: nothing written); 'gone' when the turn's record no longer exists (erased or
-- purged: writing would bring back keys of a turn that is gone; nothing written); 'skipped'
-- when outcomes_json is '' (the job ends without outcomes: dead-lettered, no checks here).
-- telemetry_batch '' (a consumer that does not read check entries yet): the key only.
-- arq_cleanup '1': each check job (job_id, taken from job_queue) returns once this ran,
-- whatever it answers: arq's clean-up of it (its in-progress, retry and job keys deleted, out
-- of its queue and arq's abort set) is done here, and the worker skips arq's own.
-- Returns the verdicts, one per turn, in order.
local verdicts = {}
for t = 0, #K.turns / 5 - 1 do
  local turn, checks = K.turns[t * 5 + 1], K.turns[t * 5 + 2]
  local turn_id, job_id = A.jobs[t * 6 + 1], A.jobs[t * 6 + 2]
  local outcomes, batch = A.jobs[t * 6 + 3], A.jobs[t * 6 + 4]
  local verdict
  if outcomes == '' then
    verdict = 'skipped'
  elseif redis.call('EXISTS', turn) == 0 then
    verdict = 'gone'
  elseif not redis.call('SET', checks, outcomes, 'NX') then
    verdict = 'already'
  else
    if batch ~= '' then
      telemetry_entry(K.telemetry, turn_id, A.jobs[t * 6 + 5], A.jobs[t * 6 + 6], batch, A.batch_version)
    end
    verdict = 'written'
  end
  if A.arq_cleanup == '1' then
    redis.call('ZREM', K.arq_abort, job_id)
    redis.call('ZREM', K.job_queue, job_id)
    redis.call('DEL', K.turns[t * 5 + 3], K.turns[t * 5 + 4], K.turns[t * 5 + 5])
  end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
