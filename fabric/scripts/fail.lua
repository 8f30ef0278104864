-- fail.lua: record a handler failure for an entry this consumer owns (it stays pending for a retry).
-- KEYS[1]  stream
-- KEYS[2]  failure hash of the stream (ns:f:TOPIC:PRIORITY:TAG), field GROUP/ENTRY_ID
-- ARGV[1]  group    ARGV[2] consumer    ARGV[3] entry id
-- ARGV[4]  handler  ARGV[5] error type  ARGV[6] error message
-- KEYS[3]  (ordered groups) the stream's lease hash   ARGV[7] the writer's fencing token: refused unless current
-- The record is "first_ms|last_ms|handler|error type|message" with server times; the first time is kept.
-- Returns 1 when recorded, 0 when the entry is no longer pending for this consumer, -1 when fenced out.
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
if KEYS[3] and redis.call('HGET', KEYS[3], 'token') ~= ARGV[7] then
  return -1
end
if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
local field = group .. '/' .. id
local first = now
local prev = redis.call('HGET', KEYS[2], field)
if prev then
  first = string.match(prev, '^(%d+)|') or now
end
redis.call('HSET', KEYS[2], field, first .. '|' .. now .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6])
return 1
