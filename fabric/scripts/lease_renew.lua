-- lease_renew.lua: extend the leases a member holds, many streams in one call (all keys in one cluster slot).
-- KEYS[i]   lease hash of stream i
-- ARGV[1]   member   ARGV[2] TTL ms   ARGV[2 + i] the token the member holds for stream i
-- A lease is extended only while it is the member's under that same token; a releasing one too (its owner is
-- finishing the entry in hand). Returns, per stream in order: 1 renewed, 0 lost (expired, released, or
-- taken by another under a newer token: the member must stop handling it and writing for it).
local member, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS do
  local owner, token = unpack(redis.call('HMGET', KEYS[i], 'owner', 'token'))
  if owner == member and token == ARGV[2 + i] then
    redis.call('PEXPIRE', KEYS[i], ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
