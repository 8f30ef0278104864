-- claim.lua: take back entries this consumer parked for a retry; each counts as a new delivery.
-- KEYS[1]  stream   KEYS[2] (ordered groups) its lease hash
-- ARGV[1]  group   ARGV[2] consumer   ARGV[3] the fencing token ("" without KEYS[2])   ARGV[4..] entry ids
-- Entries no longer pending for this consumer (taken over by another) are skipped, never stolen back.
-- Returns {{id, fields, delivery count}...} for the entries claimed; false when fenced out (claims nothing).
local group, consumer = ARGV[1], ARGV[2]
if KEYS[2] and redis.call('HGET', KEYS[2], 'token') ~= ARGV[3] then
  return false
end
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) > 0 then
    local e = redis.call('XCLAIM', KEYS[1], group, consumer, 0, id)
    if #e > 0 and e[1] and e[1][2] then
      local p = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
      out[#out + 1] = {id, e[1][2], p[1][4]}
    end
  end
end
return out
