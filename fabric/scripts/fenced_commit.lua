-- fenced_commit.lua: commit handled entries of an ordered group's owned streams (append their outputs, ack them,
-- drop their failure records) only while the writer's fencing token is its stream's current one, checked in the
-- same atomic step. A paused or partitioned former owner, resumed after its lease moved on, writes nothing: no
-- duplicate and no reordered output.
-- KEYS        every stream, lease hash, failure hash and output stream involved, referenced by index from ARGV
--             (one cluster slot per call)
-- ARGV[1]     group   ARGV[2] wire format version
-- then, per entry:  stream index, lease index, token, failure hash index (0: none), entry id, number of outputs n,
--                   then n times: output stream index, type, enc, data
-- Returns, per entry in order: 1 committed, 0 refused (no longer pending in the group: a commit sent again after
-- its reply was lost), -1 fenced out.
--
-- Whether the entry is still pending in the group decides, not to which consumer (commit.lua checks that with an
-- XPENDING per entry, the costliest command of that script): under a current token nobody else can hold it, since
-- leases move pending entries with their stream (takeover.lua) and nothing XAUTOCLAIMs an ordered group. Without
-- outputs, XACK's own reply decides (1 once: a commit sent again gets 0). With outputs, XPENDING asks first and
-- the ack comes after them: were the ack first, an XADD refused after it (OOM under maxmemory, which Redis refuses
-- only before a script's first write; a key of the wrong type) would leave the entry acked without its outputs.
--
-- The fence, for every script that writes for an owned stream (this one, fail, claim, deadletter), before any
-- write:   if redis.call('HGET', LEASE, 'token') ~= TOKEN then <refuse: write nothing> end
-- An expired or released lease has no token (HGET gives false), and a newer owner has a higher one.
local group, version = ARGV[1], ARGV[2]
local out = {}
local a = 3
while a <= #ARGV do
  local stream, lease, token = KEYS[tonumber(ARGV[a])], KEYS[tonumber(ARGV[a + 1])], ARGV[a + 2]
  local failures, id, n = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  a = a + 6
  local status = -1  -- fenced out: nothing written
  if redis.call('HGET', lease, 'token') == token then
    if n == 0 then
      status = redis.call('XACK', stream, group, id)
    elseif #redis.call('XPENDING', stream, group, id, id, 1) > 0 then
      for j = 0, n - 1 do
        local b = a + 4 * j
        redis.call('XADD', KEYS[tonumber(ARGV[b])], '*',
          'type', ARGV[b + 1], 'v', version, 'enc', ARGV[b + 2], 'data', ARGV[b + 3])
      end
      status = redis.call('XACK', stream, group, id)
    else
      status = 0
    end
  end
  if status == 1 then
    if failures > 0 then
      redis.call('HDEL', KEYS[failures], group .. '/' .. id)
    end
  end
  out[#out + 1] = status
  a = a + 4 * n
end
return out
