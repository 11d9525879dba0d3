-- The arq job of a turn, in arq's own layout: the one place it is written (FINISH's and
-- ENQUEUE's wake, RECONCILE's rewrite). JSON, never pickle (``queue.deserialize_job`` reads it):
-- t = tries so far, f = the function arq runs, a = its arguments, k = keyword arguments,
-- et = enqueue time (ms), v = the job's format version (turnfleet/versions.py: JOB). The job id
-- is the turn id.
local function arq_job(job_prefix, job_ttl, fname, turn_id, conversation_id, now)
  local payload = cjson.encode({t=1, f=fname, a={turn_id, conversation_id}, k={}, et=now, v=1})
  redis.call('PSETEX', job_prefix .. turn_id, job_ttl, payload)
end
