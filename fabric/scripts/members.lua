-- members.lua: an ordered group's member registry on Redis's clock: record a heartbeat, list the live members.
-- KEYS[1]  registry zset: member -> last heartbeat (ms, Redis's clock)
-- ARGV[1]  TTL ms: a member not heard from for this long is dead   ARGV[2] member ("": only list)
-- A heartbeat also drops the dead, so the registry does not grow with every restarted process.
-- Returns the live members (heard from within the TTL).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = now - tonumber(ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. oldest)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], oldest, '+inf')
