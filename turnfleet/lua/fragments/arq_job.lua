-- The arq job of a turn, in arq's own layout: the one place it is written (FINISH's and
-- ENQUEUE's wake, RECONCILE's rewrite, FINISH's check job). JSON, never pickle
-- (``queue.deserialize_job`` reads it): t = tries so far, f = the function arq runs, a = its
-- arguments, k = keyword arguments, et = enqueue time (ms), v = the job's format version
-- (turnfleet/versions.py: JOB). A turn's job id is the turn id.
local function arq_payload(fname, turn_id, conversation_id, now)
  return cjson.encode({t=1, f=fname, a={turn_id, conversation_id}, k={}, et=now, v=1})
end
local function arq_job(job_prefix, job_ttl, fname, turn_id, conversation_id, now)
  redis.call('PSETEX', job_prefix .. turn_id, job_ttl, arq_payload(fname, turn_id, conversation_id, now))
end
-- A follow-up job of a turn under its own id (``checks:<turn id>``), queued in ``queue``
-- only if no job of that id exists (SET NX): written once however often it is asked for.
-- Returns true when it wrote.
local function arq_job_once(job_prefix, job_ttl, job_id, fname, turn_id, conversation_id, now, queue)
  local payload = arq_payload(fname, turn_id, conversation_id, now)
  if not redis.call('SET', job_prefix .. job_id, payload, 'PX', job_ttl, 'NX') then return false end
  redis.call('ZADD', queue, now, job_id)
  return true
end
