--[[ room.lua — a product's waiting room: joins, the draw at the start, and stock-aware admission.

The order is fair: each shopper who joins before the start gets a random key (53 bits, drawn by
the serve process, ARGV) in the `early` sorted set; at the start instant — the first call at or
after `starts_ms` by Redis TIME — the room is frozen, and an early shopper's place is their rank
by key. The keys are independent of when each shopper joined and of each other, so every order
of the early shoppers is equally likely (joining an hour early is worth nothing over joining a
second before the start). Later arrivals queue behind them in arrival order (`late`).

Admission (`admit`, called by every serve process a few times a second): places are admitted in
order while the admitted-but-undecided shoppers are at most `remaining × factor` and at a rate
the operator may cap (a token bucket of one second). An admission lasts `ttl_ms`; one that
expires frees its slot, and a shopper who won (in the buyers hash) is decided.

KEYS (the product's hash tag): 1 room hash (frozen: early count at the start; late; admitted:
  places admitted so far; tokens, tokens_ms), 2 early zset (key -> user), 3 late hash
  (user -> place, and "#<place>" -> user), 4 undecided zset (user -> admission deadline ms),
  5 state hash (remaining), 6 buyers hash
ARGV: 1 op, then
  join:   2 user  3 random key  4 opens_ms  5 starts_ms
          -> {-1} not open yet | {0, joined} in the room, waiting for the draw | {place}
  status: 2 starts_ms  3.. users (a serve process asks for many at once)
          -> {admitted, total, remaining (-1: no sale state), then for each user:
              place (0: not in the room; -1: waiting for the draw),
              deadline (ms, -1: not admitted or expired)}
  admit:  2 starts_ms  3 factor (x1000)  4 rate per second  5 ttl_ms
          -> {admitted, total, undecided, remaining (-1: no sale state)}
]]
local op = ARGV[1]
-- Bounds on one admission pass: winners looked for, places admitted.
local CHECK, PER_PASS = 1000, 10000
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The early count, freezing the room at its first call past the start.
local function frozen(starts_ms)
  local n = redis.call("HGET", KEYS[1], "frozen")
  if n then
    return tonumber(n)
  end
  if now < starts_ms then
    return nil
  end
  n = redis.call("ZCARD", KEYS[2])
  redis.call("HSET", KEYS[1], "frozen", n)
  return n
end

local function place_of(user)
  local rank = redis.call("ZRANK", KEYS[2], user)
  if rank then
    return rank + 1
  end
  local late = redis.call("HGET", KEYS[3], user)
  if late then
    return tonumber(late)
  end
  return nil
end

local function remaining()
  local r = redis.call("HGET", KEYS[5], "remaining")
  return r and tonumber(r) or -1
end

if op == "join" then
  local user, key, opens_ms, starts_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  if now < opens_ms then
    return {-1}
  end
  local early = frozen(starts_ms)
  if not early then
    -- Joining twice keeps the first key: one place per shopper.
    redis.call("ZADD", KEYS[2], "NX", key, user)
    return {0, redis.call("ZCARD", KEYS[2])}
  end
  local place = place_of(user)
  if place then
    return {place}
  end
  place = early + redis.call("HINCRBY", KEYS[1], "late", 1)
  redis.call("HSET", KEYS[3], user, place, "#" .. place, user)
  return {place}
end

if op == "status" then
  local starts_ms = tonumber(ARGV[2])
  local early = frozen(starts_ms)
  local admitted = tonumber(redis.call("HGET", KEYS[1], "admitted") or "0")
  local total = (early or redis.call("ZCARD", KEYS[2])) + tonumber(redis.call("HGET", KEYS[1], "late") or "0")
  local reply = {admitted, total, remaining()}
  for i = 3, #ARGV do
    local user = ARGV[i]
    local place = 0
    if not early then
      if redis.call("ZSCORE", KEYS[2], user) then
        place = -1
      end
    else
      place = place_of(user) or 0
    end
    local deadline = tonumber(redis.call("ZSCORE", KEYS[4], user) or "-1")
    if deadline <= now then
      deadline = -1
    end
    reply[#reply + 1] = place
    reply[#reply + 1] = deadline
  end
  return reply
end

if op == "admit" then
  local starts_ms, factor, rate, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local early = frozen(starts_ms)
  local left = remaining()
  if not early then
    return {0, redis.call("ZCARD", KEYS[2]), 0, left}
  end
  local total = early + tonumber(redis.call("HGET", KEYS[1], "late") or "0")
  local admitted = tonumber(redis.call("HGET", KEYS[1], "admitted") or "0")
  -- Admissions that ran out, and shoppers who won since, are no longer undecided (winners
  -- are looked for among the CHECK admitted longest ago per pass, so a pass stays bounded
  -- however large the stock; a winner beyond them leaves when its admission runs out).
  redis.call("ZREMRANGEBYSCORE", KEYS[4], "-inf", now)
  local waiting = redis.call("ZRANGE", KEYS[4], 0, CHECK - 1)
  for _, user in ipairs(waiting) do
    if redis.call("HEXISTS", KEYS[6], user) == 1 then
      redis.call("ZREM", KEYS[4], user)
    end
  end
  local undecided = redis.call("ZCARD", KEYS[4])
  if left < 0 then
    return {admitted, total, undecided, left}
  end
  -- The token bucket: `rate` a second, at most one second's worth saved up.
  local tokens = tonumber(redis.call("HGET", KEYS[1], "tokens") or tostring(rate))
  local since = tonumber(redis.call("HGET", KEYS[1], "tokens_ms") or tostring(now))
  tokens = math.min(rate, tokens + rate * math.max(0, now - since) / 1000)
  local room = math.floor(left * factor / 1000) - undecided
  local n = math.min(room, math.floor(tokens), total - admitted, PER_PASS)
  for place = admitted + 1, admitted + n do
    local user
    if place <= early then
      user = redis.call("ZRANGE", KEYS[2], place - 1, place - 1)[1]
    else
      user = redis.call("HGET", KEYS[3], "#" .. place)
    end
    if user and redis.call("HEXISTS", KEYS[6], user) == 0 then
      redis.call("ZADD", KEYS[4], now + ttl, user)
    end
  end
  if n > 0 then
    admitted = admitted + n
    tokens = tokens - n
    redis.call("HSET", KEYS[1], "admitted", admitted)
  end
  redis.call("HSET", KEYS[1], "tokens", tokens, "tokens_ms", now)
  return {admitted, total, redis.call("ZCARD", KEYS[4]), left}
end

return redis.error_reply("room.lua: unknown op " .. tostring(op))
