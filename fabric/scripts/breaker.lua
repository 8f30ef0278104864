-- breaker.lua: one circuit breaker shared by every process of a fleet; every decision on Redis's clock.
-- KEYS[1]  state hash: state, since (ms), forced, consecutive, trials, successes, gen
-- KEYS[2]  window hash: per-second buckets, field SECOND -> calls and SECOND:f -> failures
-- KEYS[3]  the system stream BreakerStateChanged events go to
-- ARGV[1]  op: "get" | "record" | "admit" | "force"
-- ARGV[2]  breaker name    ARGV[3] channel PUBLISHed the name on every transition
-- ARGV[4..11] policy: failure_threshold (0: off), failure_rate (0: off), window_ms, min_calls, recovery_ms,
--          half_open_trials, close_after, trial_timeout_ms
-- record:  ARGV[12] calls  ARGV[13] failures  ARGV[14] failures after the batch's last success (all of them if
--          none succeeded)  ARGV[15] trial successes  ARGV[16] trial failures
-- force:   ARGV[12] "open" | "closed" | "reset"   ARGV[13] reason
-- Returns {state, gen, wait_ms, admitted, forced}: wait_ms is how long an OPEN breaker has before it admits
-- trials (0 otherwise); admitted is 1 when "admit" granted a trial call (or the breaker is CLOSED).
-- One script for every operation, because each may cause a transition, and a transition (state, its event on
-- the system stream, its notice on the channel) must be written the same way, atomically, wherever it happens.
local op, name, channel = ARGV[1], ARGV[2], ARGV[3]
local threshold, rate, window_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local min_calls, recovery_ms, trials_max = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local close_after, trial_timeout_ms = tonumber(ARGV[10]), tonumber(ARGV[11])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local raw = redis.call('HGETALL', KEYS[1])
local st = {state = 'CLOSED', since = now, forced = 0, consecutive = 0, trials = 0, successes = 0, gen = 0}
for i = 1, #raw, 2 do
  st[raw[i]] = raw[i + 1]
end
for _, f in ipairs({'since', 'forced', 'consecutive', 'trials', 'successes', 'gen'}) do
  st[f] = tonumber(st[f])
end

local function transition(new, reason)
  local old = st.state
  st.state, st.since, st.gen, st.trials, st.successes, st.forced = new, now, st.gen + 1, 0, 0, 0
  if new == 'CLOSED' then st.consecutive = 0 end
  -- The event, in the wire format (README): JSON data; ts_ns spliced in as digits (beyond a Lua number's
  -- precision), event_id = 12 hex digits of ms + 20 of a hash of what makes this transition unique.
  local id = string.format('%012x', now) .. string.sub(redis.sha1hex(name .. ':' .. st.gen .. ':' .. now), 1, 20)
  local data = cjson.encode({type = 'BreakerStateChanged', event_id = id, correlation_id = '', causation_id = '',
    producer = 'redis:breaker.lua', schema_version = 1, breaker = name, old_state = old, new_state = new,
    reason = reason})
  local ts_ns = t[1] .. string.format('%06d', tonumber(t[2])) .. '000'
  data = string.sub(data, 1, -2) .. ',"ts_ns":' .. ts_ns .. ',"symbol":null}'
  redis.call('XADD', KEYS[3], '*', 'type', 'BreakerStateChanged', 'v', '1', 'enc', 'json', 'data', data)
  redis.call('PUBLISH', channel, name)
end

local function window_counts()
  local second, oldest = math.floor(now / 1000), math.floor((now - window_ms) / 1000)
  local calls, failures, old = 0, 0, {}
  local buckets = redis.call('HGETALL', KEYS[2])
  for i = 1, #buckets, 2 do
    local s = tonumber(string.match(buckets[i], '^(%d+)'))
    if s <= oldest then
      old[#old + 1] = buckets[i]
    elseif string.find(buckets[i], ':f', 1, true) then
      failures = failures + tonumber(buckets[i + 1])
    else
      calls = calls + tonumber(buckets[i + 1])
    end
  end
  if #old > 0 then redis.call('HDEL', KEYS[2], unpack(old)) end
  return calls, failures
end

local admitted = 0
if op == 'record' then
  local calls, failures, trailing = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
  local trial_ok, trial_failed = tonumber(ARGV[15]), tonumber(ARGV[16])
  if calls > 0 then
    local second = tostring(math.floor(now / 1000))
    redis.call('HINCRBY', KEYS[2], second, calls)
    if failures > 0 then redis.call('HINCRBY', KEYS[2], second .. ':f', failures) end
    redis.call('PEXPIRE', KEYS[2], window_ms + 2000)
  end
  if st.state == 'CLOSED' then
    if failures < calls then st.consecutive = trailing else st.consecutive = st.consecutive + failures end
    local in_window, failed_in_window = window_counts()
    if threshold > 0 and st.consecutive >= threshold then
      transition('OPEN', st.consecutive .. ' consecutive failures')
    elseif rate > 0 and in_window >= min_calls and failed_in_window >= rate * in_window then
      transition('OPEN', failed_in_window .. ' of ' .. in_window .. ' calls failed in ' .. window_ms .. ' ms')
    end
  elseif st.state == 'HALF_OPEN' then
    if trial_failed > 0 then
      transition('OPEN', 'a trial call failed')
    elseif trial_ok > 0 then
      st.successes = st.successes + trial_ok
      if st.successes >= close_after then transition('CLOSED', st.successes .. ' trial calls succeeded') end
    end
  end
elseif op == 'admit' then
  if st.state == 'OPEN' and st.forced == 0 and now - st.since >= recovery_ms then
    transition('HALF_OPEN', 'recovery time of ' .. recovery_ms .. ' ms passed')
  end
  if st.state == 'CLOSED' then
    admitted = 1
  elseif st.state == 'HALF_OPEN' then
    if st.trials < trials_max then
      st.trials = st.trials + 1
      admitted = 1
    elseif now - st.since >= trial_timeout_ms then
      transition('OPEN', 'no trial call reported back within ' .. trial_timeout_ms .. ' ms')
    end
  end
elseif op == 'force' then
  local target, reason = ARGV[12], ARGV[13]
  if target == 'open' then
    if st.state ~= 'OPEN' or st.forced == 0 then transition('OPEN', reason) end  -- an OPEN made forced: noted too
    st.forced = 1
    redis.call('PUBLISH', channel, name)
  elseif target == 'closed' or target == 'reset' then
    if st.state ~= 'CLOSED' then transition('CLOSED', reason) end
    st.consecutive = 0
    if target == 'reset' then redis.call('DEL', KEYS[2]) end
  end
end

redis.call('HSET', KEYS[1], 'state', st.state, 'since', st.since, 'forced', st.forced, 'consecutive',
  st.consecutive, 'trials', st.trials, 'successes', st.successes, 'gen', st.gen)
local wait_ms = 0
if st.state == 'OPEN' then
  if st.forced == 1 then wait_ms = -1 else wait_ms = math.max(0, recovery_ms - (now - st.since)) end
end
return {st.state, st.gen, wait_ms, admitted, st.forced}
