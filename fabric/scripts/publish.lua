-- publish.lua: append events to their streams, each at most once per dedup window.
-- KEYS[2i-1]  stream of event i                      (ns:s:TOPIC:PRIORITY:TAG)
-- KEYS[2i]    dedup mark of event i                  (ns:d:TOPIC:TAG:EVENT_ID)
-- ARGV[1]     dedup window, ms (0: no dedup, the marks are not written)
-- ARGV[2]     wire format version
-- ARGV[3i..3i+2]  type, enc, data of event i
-- Returns, per event, the new entry id, or false when the event was already published within the window.
local window = tonumber(ARGV[1])
local version = ARGV[2]
local out = {}
for i = 1, #KEYS / 2 do
  local a = 3 * i
  if window > 0 and not redis.call('SET', KEYS[2 * i], '1', 'NX', 'PX', window) then
    out[i] = false
  else
    out[i] = redis.call('XADD', KEYS[2 * i - 1], '*',
      'type', ARGV[a], 'v', version, 'enc', ARGV[a + 1], 'data', ARGV[a + 2])
  end
end
return out
