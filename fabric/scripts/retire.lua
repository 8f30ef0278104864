-- retire.lua: remove a group's consumers that have been idle long and hold nothing (left by dead processes).
-- KEYS[1]  stream
-- ARGV[1]  group   ARGV[2] min idle ms   ARGV[3] a consumer never to remove (the caller itself)
-- A consumer is removed only when its pending list is empty, checked in the same atomic step: XGROUP
-- DELCONSUMER drops a consumer's pending entries, and those would never be delivered again. A live consumer
-- removed while idle is harmless: its next XREADGROUP creates it again. Returns the names removed.
local group, min_idle, keep = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local retired = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return retired
end
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group)) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  if info['name'] ~= keep and tonumber(info['pending']) == 0 and tonumber(info['idle']) >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, info['name'])
    retired[#retired + 1] = info['name']
  end
end
return retired
