-- lease_handover.lua: mark a held lease releasing: its owner was told to give the stream up.
-- KEYS[1]  lease hash
-- ARGV[1]  member   ARGV[2] token
-- The lease stays the owner's (acquire refuses everyone else) until the owner releases it, having finished the
-- entry in hand, or it expires; its writes stay valid meanwhile. The mark tells readers (the balancer, the CLI)
-- that the stream is on its way. Returns 1 marked, 0 not held under that token.
local owner, token = unpack(redis.call('HMGET', KEYS[1], 'owner', 'token'))
if owner == ARGV[1] and token == ARGV[2] then
  redis.call('HSET', KEYS[1], 'releasing', '1')
  return 1
end
return 0
