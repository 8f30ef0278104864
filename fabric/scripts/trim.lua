-- trim.lua: apply one stream's retention without removing what a consumer group has not acknowledged.
-- KEYS[1]  stream
-- ARGV[1]  max entries kept (0: no count limit)
-- ARGV[2]  max age ms (0: no age limit)
-- ARGV[3]  hard cap on entries (0: none); the only rule allowed to drop unacknowledged entries
-- ARGV[4]  at most this many entries removed by count rules in one call (the caller loops)
-- An entry is safe to remove once every group has acknowledged it: it is at or below each group's
-- last-delivered id and not in its pending list. Returns {entries removed, unacknowledged entries dropped};
-- the caller counts the dropped ones (ns:counters lives in another slot). XTRIM is the only write, so the
-- hard cap still frees memory when Redis is out of it.
local stream = KEYS[1]
local max_len, max_age, hard, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local function nth_id(k)  -- id of the (k+1)th entry: cutting below it removes k entries
  local r = redis.call('XRANGE', stream, '-', '+', 'COUNT', k + 1)
  return r[k + 1][1]
end

local len = redis.call('XLEN', stream)
if len == 0 then return {0, 0} end
local cut = nil
if max_len > 0 and len > max_len then
  cut = nth_id(math.min(len - max_len, limit))
end
if max_age > 0 then
  local t = redis.call('TIME')
  local age_cut = tostring(math.max(0, t[1] * 1000 + math.floor(t[2] / 1000) - max_age)) .. '-0'
  if cut == nil or less(cut, age_cut) then cut = age_cut end
end

local groups = redis.call('XINFO', 'GROUPS', stream)
local safe = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local ms, seq = parse(info['last-delivered-id'])
  local bound = ms .. '-' .. (seq + 1)
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', stream, info['name'])
    if less(summary[2], bound) then bound = summary[2] end
  end
  if safe == nil or less(bound, safe) then safe = bound end
end
if cut ~= nil and safe ~= nil and less(safe, cut) then cut = safe end

local dropped = 0
if hard > 0 and len > hard then
  local hard_cut = nth_id(math.min(len - hard, limit))
  if cut == nil or less(cut, hard_cut) then
    local unacked = {}  -- each dropped entry counts once, however many groups had not acknowledged it
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      for _, p in ipairs(redis.call('XPENDING', stream, info['name'], '-', '(' .. hard_cut, limit)) do
        unacked[p[1]] = true
      end
      for _, e in ipairs(redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '(' .. hard_cut,
          'COUNT', limit)) do
        unacked[e[1]] = true
      end
    end
    for _ in pairs(unacked) do dropped = dropped + 1 end
    cut = hard_cut
  end
end
if cut == nil then return {0, dropped} end
return {redis.call('XTRIM', stream, 'MINID', cut), dropped}
