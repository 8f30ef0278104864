-- publish.lua: append a batch of events to their streams, in order, exactly once per producer sequence.
-- Each producer session numbers its events per stream 1, 2, 3...; the stream's producer hash keeps the last
-- number written. A resend of a batch that already landed (its reply was lost) adds nothing, and a batch that
-- would leave a hole (an earlier one did not land) is refused whole with GAP, before anything is written.
-- KEYS[2i-1]  stream i                                (ns:s:TOPIC:PRIORITY:TAG)
-- KEYS[2i]    its producer hash: PRODUCER → last seq  (ns:p:TOPIC:PRIORITY:TAG)
-- KEYS[2S+j]  dedup mark of event j, only when ARGV[3] > 0 (ns:d:TOPIC:TAG:EVENT_ID)
-- ARGV[1] producer session id   ARGV[2] wire format version   ARGV[3] event_id dedup window, ms (0: off)
-- ARGV[4] producer state TTL, ms   ARGV[5] enc of every event (msgpack or json)   ARGV[6] S, the number of streams
-- ARGV[5+2i], ARGV[6+2i]  the sequence number of the first event of stream i in this batch, and its count
-- then the events grouped by stream (stream 1's in order, then stream 2's...), each as: type, data
-- (Grouped, an event needs no stream index of its own: a third fewer arguments to parse and to hand to Lua.)
-- A producer session id starts with its creation time (12 hex digits of Unix ms). When a new session joins a
-- hash of more than 64, sessions older than the TTL are dropped (a live one dropped this way gets one GAP and
-- renews its session: nothing is lost or doubled).
-- Returns, per event in that grouped order, its new entry id, or false when it was already written (a resend,
-- or a duplicate event_id within the window).
local producer, version, window, ttl, enc = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local nstreams = tonumber(ARGV[6])
local last = {}
for i = 1, nstreams do
  local first = tonumber(ARGV[5 + 2 * i])
  local written = tonumber(redis.call('HGET', KEYS[2 * i], producer) or '0')
  if first > written + 1 then
    return redis.error_reply('GAP producer ' .. producer .. ' wrote up to ' .. written .. ' on ' .. KEYS[2 * i - 1]
      .. ', this batch starts at ' .. first)
  end
  last[i] = written
end
local out = {}
local a, j = 7 + 2 * nstreams, 0
local marks = 2 * nstreams
for i = 1, nstreams do
  local key, written = KEYS[2 * i - 1], last[i]
  local first = tonumber(ARGV[5 + 2 * i])
  for s = first, first + tonumber(ARGV[6 + 2 * i]) - 1 do
    j = j + 1
    if s <= written or (window > 0 and not redis.call('SET', KEYS[marks + j], '1', 'NX', 'PX', window)) then
      out[j] = false
    else
      out[j] = redis.call('XADD', key, '*', 'type', ARGV[a], 'v', version, 'enc', enc, 'data', ARGV[a + 1])
    end
    a = a + 2
  end
end
for i = 1, nstreams do
  local top = tonumber(ARGV[5 + 2 * i]) + tonumber(ARGV[6 + 2 * i]) - 1
  if top > last[i] then
    if redis.call('HSET', KEYS[2 * i], producer, top) == 1 and redis.call('HLEN', KEYS[2 * i]) > 64 then
      local t = redis.call('TIME')
      local oldest = string.format('%012x', t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ttl))
      for _, p in ipairs(redis.call('HKEYS', KEYS[2 * i])) do
        if string.sub(p, 1, 12) < oldest then redis.call('HDEL', KEYS[2 * i], p) end
      end
    end
    redis.call('PEXPIRE', KEYS[2 * i], ttl)
  end
end
return out
