-- lease_release.lua: give a stream's lease up, so that its next owner may take it at once.
-- KEYS[1]  lease hash
-- ARGV[1]  member   ARGV[2] token
-- Only the owner, under its current token, can release (a late release of a lease lost meanwhile must not free
-- another member's). The fence counter stays: the next owner's token is higher. Returns 1 released, 0 not held.
local owner, token = unpack(redis.call('HMGET', KEYS[1], 'owner', 'token'))
if owner == ARGV[1] and token == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
