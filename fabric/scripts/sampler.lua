-- sampler.lua: the metrics sampler's lease (one sampler per group, and one per namespace, fleet-wide).
-- KEYS[1]   the lease (string: the holder's name), with a TTL on Redis's clock
-- ARGV[1]   "hold": take the lease if free, or renew it if ARGV[2] holds it; "drop": delete it if ARGV[2] holds it
-- ARGV[2]   the would-be holder (a consumer name)
-- ARGV[3]   hold: the lease's time to live, ms
-- Returns 1 if ARGV[2] holds the lease now (hold) or held it until now (drop), else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'drop' then
  if holder == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if holder == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
