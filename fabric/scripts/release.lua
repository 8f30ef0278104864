-- release.lua: hand entries this consumer holds back to the group at once (a worker stopping).
-- KEYS[1]  stream
-- ARGV[1]  group   ARGV[2] consumer   ARGV[3] idle ms to set (past every reclaim threshold)
-- ARGV[4..] pairs: entry id, delivery count to leave (-1: leave it as it is)
-- An entry that was read ahead but never started gets its count lowered by one, so that the takeover's
-- delivery does not count against max_deliveries: restarts alone never dead-letter an entry.
-- Entries no longer pending for this consumer are skipped. Returns how many were released.
local group, consumer, idle = ARGV[1], ARGV[2], ARGV[3]
local released = 0
for i = 4, #ARGV, 2 do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) > 0 then
    if count >= 0 then
      redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'IDLE', idle, 'RETRYCOUNT', count, 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'IDLE', idle, 'JUSTID')
    end
    released = released + 1
  end
end
return released
