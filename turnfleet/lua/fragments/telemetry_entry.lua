-- Append one attempt's telemetry batch to the stream: its turn, its format version ('v', batch
-- version 1: turnfleet/versions.py) and, when known, the workflow and version that ran it
-- (``workflow``, ``version``: once per entry, not on every event; consumers that do not know
-- these fields ignore them, so the batch stays version 1). '' = not known: left out.
-- ``v``: the batch version when not 1 (a check entry's, versions.BATCH_CHECK).
local function telemetry_entry(stream, turn_id, workflow, version, batch, v)
  local fields = {'XADD', stream, '*', 'turn_id', turn_id, 'v', v or '1'}
  if workflow ~= '' then
    fields[#fields + 1] = 'workflow'
    fields[#fields + 1] = workflow
  end
  if version ~= '' then
    fields[#fields + 1] = 'version'
    fields[#fields + 1] = version
  end
  fields[#fields + 1] = 'batch'
  fields[#fields + 1] = batch
  redis.call(unpack(fields))
end
