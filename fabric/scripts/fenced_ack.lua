-- fenced_ack.lua: commit handled entries of one stream of an ordered group (append their outputs, ack them) only
-- while the writer's fencing token is the stream's current one, checked in the same atomic step. A paused or
-- partitioned former owner, resumed after its lease moved on, writes nothing: no duplicate, no reordered output.
-- KEYS[1]  stream   KEYS[2] its lease hash   KEYS[3..] output streams (one cluster slot with KEYS[1])
-- ARGV[1]  group   ARGV[2] consumer   ARGV[3] token   ARGV[4] wire format version
-- then, per entry: entry id, number of outputs n, then n times: output KEYS index (3 and up), type, enc, data
-- Returns, per entry in order: 1 committed, 0 refused (no longer pending for this consumer), -1 fenced out.
--
-- The fence, for every script that writes for an owned stream (commit, ack, dead letter), before any write:
--   if redis.call('HGET', LEASE, 'token') ~= TOKEN then <refuse: write nothing> end
-- An expired or released lease has no token (HGET gives false), and a newer owner has a higher one.
local group, consumer, version = ARGV[1], ARGV[2], ARGV[4]
local fenced = redis.call('HGET', KEYS[2], 'token') ~= ARGV[3]
local out = {}
local a = 5
while a <= #ARGV do
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local status = -1
  if not fenced then
    status = #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) > 0 and 1 or 0
  end
  if status == 1 then
    for j = 0, n - 1 do
      local b = a + 4 * j
      redis.call('XADD', KEYS[tonumber(ARGV[b])], '*',
        'type', ARGV[b + 1], 'v', version, 'enc', ARGV[b + 2], 'data', ARGV[b + 3])
    end
    redis.call('XACK', KEYS[1], group, id)
  end
  out[#out + 1] = status
  a = a + 4 * n
end
return out
