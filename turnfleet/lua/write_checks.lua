-- Write a finished turn's check outcomes once: the outcomes key and one telemetry entry with a
-- ``check`` event per check, both or neither (docs/ARCHITECTURE.md, "Checks").
--! keys: turn, checks, telemetry, job_queue, arq_job, arq_in_progress, arq_retry, arq_abort
--! args: turn_id, outcomes_json, telemetry_batch, workflow, version, batch_version, job_id, arq_cleanup
--! include: telemetry_entry
-- Returns 'written'; 'already' when the outcomes key exists (an earlier run of the check job
-- wrote them: nothing written); 'gone' when the turn's record no longer exists (erased or
-- purged: writing would bring back keys of a turn that is gone; nothing written).
-- telemetry_batch '' (this release's consumer does not read check entries yet): the key only.
-- arq_cleanup '1': the check job (job_id, taken from job_queue) returns once this ran,
-- whatever it answers: arq's clean-up of it (its in-progress, retry and job keys deleted, out
-- of its queue and arq's abort set) is done here, and the worker skips arq's own.
local function write()
  if redis.call('EXISTS', K.turn) == 0 then return 'gone' end
  if not redis.call('SET', K.checks, A.outcomes_json, 'NX') then return 'already' end
  if A.telemetry_batch ~= '' then
    telemetry_entry(K.telemetry, A.turn_id, A.workflow, A.version, A.telemetry_batch, A.batch_version)
  end
  return 'written'
end
local verdict = write()
if A.arq_cleanup == '1' then
  redis.call('ZREM', K.arq_abort, A.job_id)
  redis.call('ZREM', K.job_queue, A.job_id)
  redis.call('DEL', K.arq_in_progress, K.arq_retry, K.arq_job)
end
return verdict
