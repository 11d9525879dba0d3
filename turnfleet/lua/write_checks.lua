-- Write a finished turn's check outcomes once: the outcomes key and one telemetry entry with a
-- ``check`` event per check, both or neither (docs/ARCHITECTURE.md, "Checks").
--! keys: turn, checks, telemetry
--! args: turn_id, outcomes_json, telemetry_batch, workflow, version, batch_version
--! include: telemetry_entry
-- Returns 'written'; 'already' when the outcomes key exists (an earlier run of the check job
-- wrote them: nothing written); 'gone' when the turn's record no longer exists (erased or
-- purged: writing would bring back keys of a turn that is gone; nothing written).
-- telemetry_batch '' (this release's consumer does not read check entries yet): the key only.
if redis.call('EXISTS', K.turn) == 0 then return 'gone' end
if not redis.call('SET', K.checks, A.outcomes_json, 'NX') then return 'already' end
if A.telemetry_batch ~= '' then
  telemetry_entry(K.telemetry, A.turn_id, A.workflow, A.version, A.telemetry_batch, A.batch_version)
end
return 'written'
