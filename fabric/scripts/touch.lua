-- touch.lua: keep entries this consumer holds fresh: reset their idle time (a heartbeat).
-- KEYS[i]   a stream
-- ARGV[1]   group   ARGV[2] consumer
-- ARGV[3..] per stream i in order: the number of ids n, then n entry ids
-- Only entries still pending for this consumer are touched; the others are returned as lost, per stream.
local group, consumer = ARGV[1], ARGV[2]
local lost = {}
local a = 3
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  local mine, gone = {}, {}
  for j = a + 1, a + n do
    if #redis.call('XPENDING', KEYS[i], group, ARGV[j], ARGV[j], 1, consumer) > 0 then
      mine[#mine + 1] = ARGV[j]
    else
      gone[#gone + 1] = ARGV[j]
    end
  end
  if #mine > 0 then
    local args = {KEYS[i], group, consumer, 0}
    for _, id in ipairs(mine) do args[#args + 1] = id end
    args[#args + 1] = 'JUSTID'  -- a claim resets the idle time; JUSTID leaves the delivery count alone
    redis.call('XCLAIM', unpack(args))
  end
  lost[i] = gone
  a = a + n + 1
end
return lost
