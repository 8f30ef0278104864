-- outputs.lua: on a Redis Cluster, append handled entries' outputs whose streams are in another slot than their
-- input (commit.lua, which acks the input, cannot write them), each at most once: an output is written only if
-- its mark (named after the input entry, the group and the output's place among the entry's outputs) was not
-- set yet. The worker calls this before committing the input; a crash between leaves the marks, so the
-- redelivery's outputs are recognised and not written twice.
-- KEYS        every output stream and mark of the call (one slot), referenced by index from ARGV
-- ARGV[1]     wire format version   ARGV[2] mark TTL, ms
-- then per output: stream index, mark index, type, enc, data
-- Returns, per output in order: 1 written, 0 already written (its mark was set).
local version, ttl = ARGV[1], ARGV[2]
local out = {}
for a = 3, #ARGV, 5 do
  local written = redis.call('SET', KEYS[tonumber(ARGV[a + 1])], '1', 'NX', 'PX', ttl)
  if written then
    redis.call('XADD', KEYS[tonumber(ARGV[a])], '*', 'type', ARGV[a + 2], 'v', version, 'enc', ARGV[a + 3],
      'data', ARGV[a + 4])
  end
  out[#out + 1] = written and 1 or 0
end
return out
