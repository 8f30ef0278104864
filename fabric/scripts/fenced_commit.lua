-- fenced_commit.lua: commit handled entries of an ordered group's owned streams (append their outputs, ack them,
-- drop their failure records) only while the writer's fencing token is its stream's current one, checked in the
-- same atomic step. A paused or partitioned former owner, resumed after its lease moved on, writes nothing: no
-- duplicate and no reordered output.
-- KEYS        per run (consecutive entries of one stream, in order): the stream, its lease hash, its failure hash,
--             then its entries' output streams, in order (one cluster slot per call; a key may repeat)
-- ARGV[1]     group   ARGV[2] wire format version
-- then, per run:    token, number of entries m
--   then m times:   entry id, code (2 × its number of outputs n, plus 1 if it has a failure record to drop),
--                   then n times: type, enc, data
-- (Runs rather than entries: the common entry, an ack, is 2 arguments, and its run checks the token once and acks
-- each stretch of its plain entries, those with neither outputs nor a failure record, in one XACK. Cheaper to
-- pack, to parse and to hand to Lua.)
-- Returns, per entry in order: 1 committed, 0 refused (no longer pending in the group: a commit sent again after
-- its reply was lost), -1 fenced out.
--
-- Whether the entry is still pending in the group decides, not to which consumer (commit.lua checks that with an
-- XPENDING per entry, the costliest command of that script): under a current token nobody else can hold it, since
-- leases move pending entries with their stream (takeover.lua) and nothing XAUTOCLAIMs an ordered group. Without
-- outputs, XACK's own reply decides (1 once: a commit sent again gets 0). A run's consecutive plain entries are
-- acked together, before the entry after them, so they are all 1 or all 0: when only some of them are still
-- pending, which only a consumer outside the ordered mode can cause, they all count as refused. With outputs,
-- XPENDING asks first and the ack comes after them: were the ack first, an XADD refused after it (OOM under
-- maxmemory, which Redis refuses only before a script's first write; a key of the wrong type) would leave the
-- entry acked without its outputs.
--
-- The fence, for every script that writes for an owned stream (this one, fail, claim, deadletter), before any
-- write:   if redis.call('HGET', LEASE, 'token') ~= TOKEN then <refuse: write nothing> end
-- An expired or released lease has no token (HGET gives false), and a newer owner has a higher one.
local group, version = ARGV[1], ARGV[2]
local out = {}
local plain, at = {}, {}  -- a stretch of plain entries (neither outputs nor a failure record), and their places in out

local function ack_plain(stream)  -- the stretch in one XACK, before anything after it is written
  if #plain == 0 then return end
  local acked = 0
  for i = 1, #plain, 1000 do
    acked = acked + redis.call('XACK', stream, group, unpack(plain, i, math.min(i + 999, #plain)))
  end
  local status = acked == #plain and 1 or 0
  for _, i in ipairs(at) do
    out[i] = status
  end
  plain, at = {}, {}
end

local a, k = 3, 1
while a <= #ARGV do
  local stream, lease, failures = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local current = redis.call('HGET', lease, 'token') == ARGV[a]
  local m = tonumber(ARGV[a + 1])
  k = k + 3
  a = a + 2
  for _ = 1, m do
    local id, code = ARGV[a], ARGV[a + 1]
    a = a + 2
    local status = -1  -- fenced out: nothing written
    if code == '0' then
      if current then
        plain[#plain + 1] = id
        at[#at + 1] = #out + 1
      end
    else
      code = tonumber(code)
      local n = math.floor(code / 2)
      if current then
        ack_plain(stream)
        if n == 0 then
          status = redis.call('XACK', stream, group, id)
        elseif #redis.call('XPENDING', stream, group, id, id, 1) > 0 then
          for j = 0, n - 1 do
            local b = a + 3 * j
            redis.call('XADD', KEYS[k + j], '*', 'type', ARGV[b], 'v', version, 'enc', ARGV[b + 1], 'data', ARGV[b + 2])
          end
          status = redis.call('XACK', stream, group, id)
        else
          status = 0
        end
      end
      if status == 1 and code % 2 == 1 then
        redis.call('HDEL', failures, group .. '/' .. id)
      end
      k = k + n
      a = a + 3 * n
    end
    out[#out + 1] = status
  end
  ack_plain(stream)
end
return out
