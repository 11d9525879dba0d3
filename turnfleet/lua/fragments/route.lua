-- The arq queue of a workflow's turns (keys.workflow_queue / workflow_isolated_queue): the
-- built-in workflow, and a conversation recorded before workflows (no ``workflow``), keep
-- ``builtin_queue``; workflow W gets ``prefix .. W``. Callers pass the rule as arguments.
local function route(workflow, default_workflow, builtin_queue, prefix)
  if not workflow or workflow == default_workflow then return builtin_queue end
  return prefix .. workflow
end
