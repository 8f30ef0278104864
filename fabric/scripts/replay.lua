-- replay.lua: put a dead letter's original fields back on its origin stream and delete the dead letter.
-- The new entry carries "for_group" = the dead letter's group: other groups on the stream, which handled the
-- original already, acknowledge it without handling it again.
-- KEYS[1]  dead-letter stream   KEYS[2] origin stream (same slot: both carry the origin's hash tag)
-- ARGV[1]  dead letter id
-- Returns the new entry id; false when the dead letter is gone (already replayed or purged); 0 when it holds no
-- original fields (the entry was trimmed before it was dead-lettered), which leaves it in place.
-- Idempotent: the XADD and the XDEL happen in this one atomic call, so a second replay of the same dead letter
-- (run twice, two replays racing, or a retry after a lost reply) finds it gone and writes nothing.
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local fields, original, group = e[1][2], {}, nil
for i = 1, #fields, 2 do
  local name = fields[i]
  if name == 'group' then
    group = fields[i + 1]
  -- a dead letter of a replayed entry already holds f:for_group; the fresh one below replaces it
  elseif string.sub(name, 1, 2) == 'f:' and name ~= 'f:for_group' then
    original[#original + 1] = string.sub(name, 3)
    original[#original + 1] = fields[i + 1]
  end
end
if #original == 0 then return 0 end
if group then
  original[#original + 1] = 'for_group'
  original[#original + 1] = group
end
local id = redis.call('XADD', KEYS[2], '*', unpack(original))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
