-- ack.lua: acknowledge handled entries that need nothing else (no outputs, no failure record), many streams
-- at once: one XACK per stream.
-- KEYS[i]   a stream
-- ARGV[1]   group
-- ARGV[2..] per stream i in order: the number of ids n, then n entry ids
-- Returns, per stream, how many were still pending and are now acknowledged (the others had been acked by
-- a consumer that took them over: the entry was handled twice, which at-least-once delivery allows).
local group = ARGV[1]
local out = {}
local a = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  out[i] = redis.call('XACK', KEYS[i], group, unpack(ARGV, a + 1, a + n))
  a = a + n + 1
end
return out
