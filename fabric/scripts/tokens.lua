-- tokens.lua: the current fencing token of each of many leases, in one command (a single Redis's fenced read
-- checks them after WATCH and before MULTI: one reply to read instead of one per lease).
-- KEYS[i]  a lease hash (ns:lease:GROUP:...)
-- Returns, per lease in order, its token, or false when the lease is gone.
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGET', KEYS[i], 'token')
end
return out
