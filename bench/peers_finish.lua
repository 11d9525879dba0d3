-- bench/peers.py's result write (Variant.finish): the result; in (e)/(f) also the kept trace
-- record and the telemetry batch, as the worker's finish script adds them.
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if ARGV[5] ~= '' then redis.call('XADD', KEYS[3], '*', 'batch', ARGV[5]) end
