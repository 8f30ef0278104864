-- fenced_read.lua: read new entries of owned streams for their owner, each stream only while the reader's token
-- is still its current one, checked in the same atomic step. A former owner resumed after a pause reads nothing,
-- so no entry becomes pending to it behind the new owner's back (the new owner would skip it: order broken).
-- Used on a Redis Cluster; a single Redis reads in a transaction watching the leases instead (``Leases.read``),
-- which spares Redis the Lua tables each entry read here goes through both ways.
-- KEYS[2i-1]  stream i   KEYS[2i] its lease hash   (all in one cluster slot)
-- ARGV[1]     group   ARGV[2] consumer   ARGV[3] count per stream   ARGV[3 + i] the token for stream i
-- Non-blocking (scripts cannot block): wait for new entries outside, e.g. with XREAD BLOCK (no group, no effect).
-- Returns, per stream in order: false when fenced out (nothing read); {{id, fields}...}, oldest first; or, when
-- there was nothing new, the stream's last entry id ("0-0" if empty): where XREAD BLOCK waits for the next.
local group, consumer, count = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 1, #KEYS / 2 do
  local stream, lease = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('HGET', lease, 'token') ~= ARGV[3 + i] then
    out[i] = false
  else
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, '>')
    if r and #r[1][2] > 0 then
      out[i] = r[1][2]
    else
      local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      out[i] = #last > 0 and last[1][1] or '0-0'
    end
  end
end
return out
