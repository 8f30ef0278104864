-- lease_handover.lua: mark held leases releasing: their owner was told to give the streams up; many streams in
-- one call (all keys in one cluster slot).
-- KEYS[i]  lease hash of stream i
-- ARGV[1]  member   ARGV[1 + i] the token the member holds for stream i
-- A lease stays the owner's (acquire refuses everyone else) until the owner releases it, having finished the
-- entry in hand, or it expires; its writes stay valid meanwhile. The mark tells readers (the balancer, the CLI)
-- that the stream is on its way. Returns, per stream in order: 1 marked, 0 not held under that token.
local out = {}
for i = 1, #KEYS do
  local owner, token = unpack(redis.call('HMGET', KEYS[i], 'owner', 'token'))
  if owner == ARGV[1] and token == ARGV[1 + i] then
    redis.call('HSET', KEYS[i], 'releasing', '1')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
