-- deadletter.lua: move an entry to its dead-letter stream and ack it, in one atomic step.
-- KEYS[1]  origin stream
-- KEYS[2]  failure hash of the origin stream (field GROUP/ENTRY_ID)
-- KEYS[3]  dead-letter stream (ns:dlq:TAG)
-- ARGV[1]  group    ARGV[2] consumer    ARGV[3] entry id    ARGV[4] handler
-- ARGV[5]  error type (empty: take the last recorded failure's)   ARGV[6] error message
-- ARGV[7]  delivery count
-- KEYS[4]  (ordered groups) the origin stream's lease hash   ARGV[8] the writer's fencing token
-- The dead letter holds the origin, the failure facts, and the original fields under "f:NAME".
-- Returns the dead letter's id, or false when the entry is no longer pending for this consumer or (ordered
-- groups) the token is no longer the stream's.
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
if KEYS[4] and redis.call('HGET', KEYS[4], 'token') ~= ARGV[8] then
  return false
end
if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) == 0 then
  return false
end
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
local field = group .. '/' .. id
local first, handler, etype, message = now, ARGV[4], ARGV[5], ARGV[6]
local prev = redis.call('HGET', KEYS[2], field)
if prev then
  local f, _, h, e, m = string.match(prev, '^(%d+)|(%d+)|([^|]*)|([^|]*)|(.*)$')
  if f then
    first = f
    if etype == '' then handler, etype, message = h, e, m end
  end
end
if etype == '' then
  etype, message = 'MaxDeliveriesExceeded', 'delivered too often without an ack (the worker may have died while handling it)'
end
local fields = {'origin_stream', KEYS[1], 'origin_id', id, 'group', group, 'consumer', consumer,
  'handler', handler, 'error_type', etype, 'error', message, 'deliveries', ARGV[7],
  'first_failure_ms', first, 'last_failure_ms', now}
local entry = redis.call('XRANGE', KEYS[1], id, id)
if #entry > 0 then
  local original = entry[1][2]
  for i = 1, #original, 2 do
    fields[#fields + 1] = 'f:' .. original[i]
    fields[#fields + 1] = original[i + 1]
  end
else
  fields[#fields + 1] = 'origin_missing'
  fields[#fields + 1] = '1'
end
local dead = redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('XACK', KEYS[1], group, id)
redis.call('HDEL', KEYS[2], field)
return dead
