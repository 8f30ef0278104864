-- lease.lua: take the ownership lease of one stream of an ordered group, under a new fencing token.
-- KEYS[1]  lease hash: owner, token, releasing (set while its owner hands the stream over); PX TTL
-- KEYS[2]  fence counter: the last token issued for the stream; no TTL, so a token is never issued twice
-- ARGV[1]  member   ARGV[2] TTL ms
-- A live lease of another member refuses (false), releasing or not: its owner may still be finishing the entry
-- in hand. The owner asking again gets its own token back and the lease renewed (its earlier reply may have
-- been lost; a releasing mark is dropped: it wants the stream after all). Otherwise the stream is free (never
-- owned, released, or its lease expired on Redis's clock): the token is one above every token issued before.
-- Returns the token.
local member, ttl = ARGV[1], ARGV[2]
local owner, token = unpack(redis.call('HMGET', KEYS[1], 'owner', 'token'))
if owner then
  if owner ~= member then
    return false
  end
  redis.call('HDEL', KEYS[1], 'releasing')
  redis.call('PEXPIRE', KEYS[1], ttl)
  return tonumber(token)
end
token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', member, 'token', token)
redis.call('PEXPIRE', KEYS[1], ttl)
return token
