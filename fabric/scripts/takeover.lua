-- takeover.lua: a stream's new owner takes the entries still pending in its group (its former owners'), oldest
-- first, before it reads new ones: what the old owner had read but not finished is handled next, in order.
-- KEYS[1]  stream   KEYS[2] its lease hash   KEYS[3] its failure hash (records of deleted entries are dropped)
-- ARGV[1]  group   ARGV[2] member   ARGV[3] token   ARGV[4] start: "-" or "(ID" (after the previous page)
-- ARGV[5]  count   ARGV[6] "1" when the member takes back its own entries that a read of its own may have left
--          pending unseen (a reply lost after Redis ran it): those keep their delivery count, never handled yet
-- Refused (false) unless the lease is the member's under that token: the check and the claims are one step, so
-- no former owner can have been handed an entry back in between. Every pending entry is claimed, the member's
-- own from an earlier token too (its writes under that token are refused now): each claim is a new delivery.
-- Returns {{{id, fields, delivery count}...}, {ids pending but deleted from the stream}, last id looked at}.
local group, member, own = ARGV[1], ARGV[2], ARGV[6] == '1'
local owner, token = unpack(redis.call('HMGET', KEYS[2], 'owner', 'token'))
if owner ~= member or token ~= ARGV[3] then
  return false
end
local claimed, deleted, last = {}, {}, ''
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[4], '+', ARGV[5])) do
  local id = p[1]
  last = id
  local count = p[4] + 1
  local e
  if own and p[2] == member then
    count = p[4]
    e = redis.call('XCLAIM', KEYS[1], group, member, 0, id, 'RETRYCOUNT', count)
  else
    e = redis.call('XCLAIM', KEYS[1], group, member, 0, id)
  end
  if #e > 0 and e[1] and e[1][2] then
    claimed[#claimed + 1] = {id, e[1][2], count}
  else
    redis.call('XACK', KEYS[1], group, id)  -- deleted: Redis 7 dropped it from the pending list, 6.2 did not
    redis.call('HDEL', KEYS[3], group .. '/' .. id)
    deleted[#deleted + 1] = id
  end
end
return {claimed, deleted, last}
