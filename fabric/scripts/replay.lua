-- replay.lua: put a dead letter's original fields back on its origin stream and delete the dead letter.
-- The new entry carries "for_group" = the dead letter's group: other groups on the stream, which handled the
-- original already, acknowledge it without handling it again.
-- KEYS[1]  dead-letter stream   KEYS[2] origin stream (same slot: both carry the origin's hash tag)
-- ARGV[1]  dead letter id
-- Idempotent: a dead letter already replayed (gone) replays nothing. Returns the new entry id or false.
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local fields, original = e[1][2], {}
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'f:' then
    original[#original + 1] = string.sub(fields[i], 3)
    original[#original + 1] = fields[i + 1]
  end
end
if #original == 0 then return false end
for i = 1, #fields, 2 do
  if fields[i] == 'group' then
    original[#original + 1] = 'for_group'
    original[#original + 1] = fields[i + 1]
  end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(original))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
