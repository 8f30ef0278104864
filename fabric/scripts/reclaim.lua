-- reclaim.lua: take over entries idle longer than min_idle (their consumer is dead or stalled).
-- KEYS[1]  stream
-- ARGV[1]  group   ARGV[2] consumer   ARGV[3] min idle ms   ARGV[4] count   ARGV[5] cursor
-- KEYS[2]  failure hash of the stream: records of entries found deleted are dropped with them
-- Returns {next cursor, {{id, fields, delivery count}...}, {ids pending but trimmed from the stream}}.
local group, consumer = ARGV[1], ARGV[2]
local r = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[3], ARGV[5], 'COUNT', ARGV[4])
local claimed = {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], group, e[1], e[1], 1, consumer)
  local count = 1
  if #p > 0 then count = p[1][4] end
  claimed[#claimed + 1] = {e[1], e[2], count}
end
local deleted = r[3] or {}
for _, id in ipairs(deleted) do
  redis.call('HDEL', KEYS[2], group .. '/' .. id)
end
return {r[1], claimed, deleted}
