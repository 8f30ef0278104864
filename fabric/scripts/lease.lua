-- lease.lua: take the ownership leases of streams of an ordered group, each under a new fencing token; many
-- streams in one call (all keys in one cluster slot).
-- KEYS[2i-1]  lease hash of stream i: owner, token, releasing (set while its owner hands it over); PX TTL
-- KEYS[2i]    fence counter of stream i: the last token issued for it; no TTL, so a token is never issued twice
-- ARGV[1]  member   ARGV[2] TTL ms
-- A live lease of another member refuses (0), releasing or not: its owner may still be finishing the entry in
-- hand. The owner asking again gets its own token back and the lease renewed (its earlier reply may have been
-- lost; a releasing mark is dropped: it wants the stream after all). Otherwise the stream is free (never owned,
-- released, or its lease expired on Redis's clock): the token is one above every token issued before (so >= 1).
-- Returns, per stream in order, its token, or 0 when refused.
local member, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS / 2 do
  local lease, fence = KEYS[2 * i - 1], KEYS[2 * i]
  local owner, token = unpack(redis.call('HMGET', lease, 'owner', 'token'))
  if owner then
    if owner == member then
      redis.call('HDEL', lease, 'releasing')
      redis.call('PEXPIRE', lease, ttl)
      out[i] = tonumber(token)
    else
      out[i] = 0
    end
  else
    token = redis.call('INCR', fence)
    redis.call('HSET', lease, 'owner', member, 'token', token)
    redis.call('PEXPIRE', lease, ttl)
    out[i] = token
  end
end
return out
