-- Move the raw-text backfill's SCAN cursor, only from where this pass read it: two consumers
-- walking at once never move it back (nor past "done").
--! keys: cursor
--! args: read, new
-- A.read: the cursor as read ('' = absent). Returns 1 (moved) or 0 (another pass moved it).
if (redis.call('GET', K.cursor) or '') ~= A.read then return 0 end
redis.call('SET', K.cursor, A.new)
return 1
