--[[ reserve.lua — decide one purchase attempt for (user, product) in one atomic step.

KEYS (all share the product's hash tag, e.g. "seckill:{p42}:…"):
  1 state    hash: stock, remaining, starts_ms, ends_ms, paused
  2 buyers   hash: user_id -> reservation_id (one win per user, ever)
  3 pending  set:  reservation ids won but not yet persisted
  4 outbox   stream: one entry per winner (r, u, p, t)
  5 status   hash: reservation_id -> "pending" | JSON
  6 userrate hash: s = window start (ms), c = attempts in it (expires after the window)
  7 gate     string: the product's GCRA "theoretical arrival time" in µs
ARGV:
  1 user_id  2 reservation_id (fresh UUID v7)  3 product_id
  4 user_limit  5 user_window_ms
  6 gate_count  7 gate_period_us
  8 now_us: "" in production (Redis TIME is used); tests pass a controlled clock
RETURNS {code, reservation_id|"", remaining, rl_limit, rl_remaining, rl_reset_ms, retry_ms}
  code: 0 won, 1 already reserved, 2 sold out, 3 user rate limited, 4 product gate full,
        5 not started, 6 ended, 7 paused, 8 unknown product
Every check happens before the first write; Redis does not roll a script back.
]]
local user, rid, pid = ARGV[1], ARGV[2], ARGV[3]
local user_limit, window_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local gate_count, gate_period_us = tonumber(ARGV[6]), tonumber(ARGV[7])

local now_us
if ARGV[8] ~= nil and ARGV[8] ~= "" then
  now_us = tonumber(ARGV[8])
else
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now_us / 1000)

-- The user's window, read first so every decided answer carries the rate-limit figures.
local window = redis.call("HMGET", KEYS[6], "s", "c")
local window_start = tonumber(window[1] or "-1")
local used, reset_ms = 0, window_ms
local fresh = window_start < 0 or now_ms >= window_start + window_ms or now_ms < window_start
if not fresh then
  used = tonumber(window[2] or "0")
  reset_ms = window_start + window_ms - now_ms
end
local function answer(code, id, remaining, consumed, retry_ms)
  local left = user_limit - used - (consumed or 0)
  if left < 0 then left = 0 end
  return {code, id or "", remaining or -1, user_limit, left, reset_ms, retry_ms or 0}
end

-- 1. product known and preheated
local state = redis.call("HMGET", KEYS[1], "stock", "remaining", "starts_ms", "ends_ms", "paused")
if state[5] == "1" then
  return answer(7)
end
if not state[1] then
  return answer(8)
end
local remaining = tonumber(state[2])
-- 3. sale window (Redis time)
if now_ms < tonumber(state[3]) then
  return answer(5, nil, remaining)
end
if now_ms >= tonumber(state[4]) then
  return answer(6, nil, remaining)
end
-- 4. per-user rate window
if used >= user_limit then
  return answer(3, nil, remaining, 0, reset_ms)
end
-- 5. product admission gate: GCRA, burst = gate_count per gate_period_us
local interval = math.max(1, math.floor(gate_period_us / gate_count))
local tat = tonumber(redis.call("GET", KEYS[7]) or "0")
if tat < now_us then tat = now_us end
local tolerance = gate_period_us - interval
if tat - now_us > tolerance then
  local wait_us = tat - now_us - tolerance
  return answer(4, nil, remaining, 0, math.ceil(wait_us / 1000))
end

-- From here the attempt counts against the user's window and the product's gate.
local function consume()
  if fresh then
    redis.call("HSET", KEYS[6], "s", now_ms, "c", 1)
  else
    redis.call("HINCRBY", KEYS[6], "c", 1)
  end
  -- Expiry only reclaims memory (the window itself is judged by script time above).
  redis.call("PEXPIRE", KEYS[6], window_ms + 60000)
  redis.call("SET", KEYS[7], tat + interval, "PX", math.ceil(gate_period_us / 1000) + 60000)
end

-- 6. the user already won this product
local earlier = redis.call("HGET", KEYS[2], user)
if earlier then
  consume()
  return answer(1, earlier, remaining, 1)
end
-- 7. stock left
if remaining <= 0 then
  consume()
  return answer(2, nil, 0, 1)
end

consume()
remaining = redis.call("HINCRBY", KEYS[1], "remaining", -1)
redis.call("HSET", KEYS[2], user, rid)
redis.call("SADD", KEYS[3], rid)
redis.call("HSET", KEYS[5], rid, "pending")
redis.call("XADD", KEYS[4], "*", "r", rid, "u", user, "p", pid, "t", tostring(now_ms))
return answer(0, rid, remaining, 1)
