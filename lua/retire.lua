--[[ retire.lua — give an ended, drained sale's keys an expiry (the grace), exactly once.

KEYS (the product's hash tag): 1 state hash, 2 outbox stream, 3 pending set, then every other
  key that lives as long as the sale (buyers, status, released)
ARGV: 1 grace in ms
RETURNS {code, ttl_ms}
  code: 1 retired (now, or by an earlier call: the expiries already set are kept, never
          pushed back), 0 not yet: the sale has not ended by Redis time, or the outbox or the
          pending set is not empty, -1 not in Redis (nothing to expire)
The caller has checked Postgres (no order that could still change these keys) after it saw
the outbox and the pending set empty; checking them again here makes the expiry atomic with
the facts it rests on. A key without an expiry of its own gets the grace; a key that does
not exist is not created.
]]
local ends = redis.call("HGET", KEYS[1], "ends_ms")
if not ends then
  return {-1, -1}
end
local ttl = redis.call("PTTL", KEYS[1])
if ttl > 0 then
  return {1, ttl}
end
local t = redis.call("TIME")
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms < tonumber(ends) then
  return {0, -1}
end
if redis.call("XLEN", KEYS[2]) > 0 or redis.call("SCARD", KEYS[3]) > 0 then
  return {0, -1}
end
local grace = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call("PTTL", KEYS[i]) == -1 then
    redis.call("PEXPIRE", KEYS[i], grace)
  end
end
return {1, grace}
