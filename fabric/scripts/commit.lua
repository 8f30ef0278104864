-- commit.lua: for each handled entry this consumer still owns, append its outputs and ack it, atomically.
-- An entry no longer pending for this consumer (reclaimed by another, or already committed by a commit whose
-- reply was lost) is refused whole: no outputs, no ack. That is what keeps late writers from duplicating.
-- KEYS        every stream and failure hash involved, referenced by index from ARGV
-- ARGV[1]     group
-- ARGV[2]     consumer
-- ARGV[3]     wire format version
-- then, per input:  stream index, failure hash index (0: none), entry id, number of outputs n,
--                   then n times: output stream index, type, enc, data
-- Returns, per input in order: 1 committed, 0 refused.
local group, consumer, version = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local a = 4
while a <= #ARGV do
  local stream, failures, id, n = KEYS[tonumber(ARGV[a])], tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  local owned = #redis.call('XPENDING', stream, group, id, id, 1, consumer) > 0
  if owned then
    for j = 0, n - 1 do
      local b = a + 4 * j
      redis.call('XADD', KEYS[tonumber(ARGV[b])], '*',
        'type', ARGV[b + 1], 'v', version, 'enc', ARGV[b + 2], 'data', ARGV[b + 3])
    end
    redis.call('XACK', stream, group, id)
    if failures > 0 then
      redis.call('HDEL', KEYS[failures], group .. '/' .. id)
    end
  end
  out[#out + 1] = owned and 1 or 0
  a = a + 4 * n
end
return out
