-- Record turns and wake each one's conversation if it is idle: one turn (``enqueue``) or up
-- to a chunk of them in one call (``enqueue_many``: the bulk path's cost was mostly
-- per-command packing and dispatch). Each turn is 6 keys and 5 arguments of the lists below.
--! keys: conversations, arq_queue, counters, *turns
--! args: now_ms, job_prefix, job_ttl, fname, default_workflow, queue_prefix, *turns
--! include: arq_job, wake, route
-- K.turns, per turn: turn, conv_queue, conv_active, conv_turns, conv_state, customer_convs.
-- A.turns, per turn: turn_id, conversation_id, customer_id, request_json, workflow.
-- Returns, per turn: 1 (enqueued), 0 (turn id already known), -1 (the conversation belongs
-- to another customer), -2 (the conversation belongs to another workflow: a conversation keeps
-- its first turn's; one recorded before workflows existed ran default_workflow). A woken
-- turn's job goes to its workflow's queue (route: arq_queue for default_workflow).
local now = tonumber(A.now_ms)
local job_ttl = tonumber(A.job_ttl)

local function enqueue_one(turn, queue, active, turns, state, customer_convs,
                           turn_id, conversation_id, customer_id, request, workflow)
  if redis.call('EXISTS', turn) == 1 then return 0 end
  local owner = redis.call('HGET', state, 'customer_id')
  if owner and owner ~= customer_id then return -1 end
  local belongs = redis.call('HGET', state, 'workflow') or (owner and A.default_workflow)
  if belongs and belongs ~= workflow then return -2 end
  if not owner then redis.call('HSET', state, 'customer_id', customer_id) end
  if not belongs then redis.call('HSET', state, 'workflow', workflow) end
  -- The ids again, outside the request: a record whose request is corrupt still says
  -- whose turn it is and where it belongs (its failure can be recorded and read).
  redis.call('HSET', turn, 'v', 1, 'request', request, 'status', 'queued', 'attempts', 0,
             'conversation_id', conversation_id, 'customer_id', customer_id)
  redis.call('HINCRBY', K.counters, 'turns_enqueued', 1)
  redis.call('RPUSH', queue, turn_id)
  redis.call('RPUSH', turns, turn_id)
  redis.call('ZADD', K.conversations, 'NX', now, conversation_id)
  redis.call('ZADD', customer_convs, 'NX', now, conversation_id)
  if redis.call('EXISTS', active) == 0 then
    wake(turn_id, conversation_id, now, A.job_prefix, job_ttl, A.fname,
         route(workflow, A.default_workflow, K.arq_queue, A.queue_prefix), active)
  end
  return 1
end

local out = {}
for i = 0, #A.turns / 5 - 1 do
  local k, a = i * 6, i * 5
  out[i + 1] = enqueue_one(K.turns[k + 1], K.turns[k + 2], K.turns[k + 3], K.turns[k + 4],
                           K.turns[k + 5], K.turns[k + 6],
                           A.turns[a + 1], A.turns[a + 2], A.turns[a + 3], A.turns[a + 4],
                           A.turns[a + 5])
end
return out
