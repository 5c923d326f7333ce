--[[ reserve.lua — decide purchase attempts on one product in one atomic step: the only place
the purchase rules exist. A single attempt is a batch of one.

Each attempt, in the order given, at one instant (Redis TIME), goes through the same checks in
the same order:
  1 paused (a forced rebuild)          -> 7        2 unknown product (not preheated) -> 8
  2b behind the caller's fence: Redis went back in time (a failover to a replica that had
     not received the last writes), or part of the sale is gone (after a win, the buyers hash
     and the outbox stream always exist): the state is deleted, so every process finds the
     product lost and it is rebuilt by counting                                      -> 9
  3 sale window: before / after        -> 5 / 6    4 the user's rate window          -> 3
  5 the product's admission gate (GCRA)-> 4        6 dedup: the user already won     -> 1
  7 stock left                         -> 2        else won                          -> 0
An attempt that passes 4 and 5 counts against the user's window and the product's gate. Two
attempts of one user in one batch see each other (the second finds the first's win, or its
window used). Every key is read before the first write and the writes come at the end, so an
attempt is all or nothing (Redis does not roll a script back).

KEYS (all share the product's hash tag, e.g. "seckill:{p42}:…", so a batch is one slot):
  1 state    hash: stock, remaining, starts_ms, ends_ms, paused, epoch, seq (the product's
             Redis epoch, set when a sale is loaded, and its win sequence: +1 per win)
  2 buyers   hash: user_id -> reservation_id (one win per user, ever)
  3 pending  set:  reservation ids won but not yet persisted
  4 outbox   stream: one entry per winner (r, u, p, t, e = epoch, s = its win sequence)
  5 status   hash: reservation_id -> "pending" | JSON
  6 gate     string: the product's GCRA "theoretical arrival time" in µs
  6+i        hash: the rate window of attempt i's user (s = window start ms, c = attempts),
             i = 1..n (expires after the window)
ARGV:
  1 product_id  2 user_limit  3 user_window_ms  4 gate_count  5 gate_period_us
  6 now_us: "" in production (Redis TIME is used); tests pass a controlled clock
  7 fence_epoch  8 fence_seq: the latest moment (epoch, seq) the caller saw of this product
    (in a reply, or relayed to RabbitMQ); a state behind it went back in time
  then for attempt i: ARGV[7+2i] user_id, ARGV[8+2i] reservation_id (fresh UUID v7)
RETURNS a flat array: for each attempt in order, seven values
  {code, reservation_id|"", remaining, rl_limit, rl_remaining, rl_reset_ms, retry_ms},
  then the product's moment after the call: epoch, seq (-1, -1 when it has no state)
  code: 0 won, 1 already reserved (with the earlier id), 2 sold out, 3 user rate limited,
        4 product gate full, 5 not started, 6 ended, 7 paused, 8 unknown product,
        9 went back in time
]]
local pid = ARGV[1]
local user_limit, window_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local gate_count, gate_period_us = tonumber(ARGV[4]), tonumber(ARGV[5])
local fence_epoch, fence_seq = tonumber(ARGV[7]), tonumber(ARGV[8])
local n = #KEYS - 6

local now_us
if ARGV[6] ~= nil and ARGV[6] ~= "" then
  now_us = tonumber(ARGV[6])
else
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now_us / 1000)

local out = {}
local function answer(code, id, remaining, limit_left, reset_ms, retry_ms)
  if limit_left < 0 then limit_left = 0 end
  local k = #out
  out[k + 1] = code
  out[k + 2] = id or ""
  out[k + 3] = remaining or -1
  out[k + 4] = user_limit
  out[k + 5] = limit_left
  out[k + 6] = reset_ms
  out[k + 7] = retry_ms or 0
end

-- Each user's window, read once per distinct key and then kept here as the attempts use it.
local windows = {}
local function window_of(key)
  local w = windows[key]
  if not w then
    local raw = redis.call("HMGET", key, "s", "c")
    w = {start = tonumber(raw[1] or "-1"), count = tonumber(raw[2] or "0"), touched = false}
    windows[key] = w
  end
  return w
end
-- A window at now: fresh (a new one starts), attempts used, ms to reset.
local function judge(w)
  local fresh = w.start < 0 or now_ms >= w.start + window_ms or now_ms < w.start
  if fresh then
    return true, 0, window_ms
  end
  return false, w.count, w.start + window_ms - now_ms
end

-- 1.-3. paused, unknown, sale window: one answer for the whole batch.
local state = redis.call("HMGET", KEYS[1], "stock", "remaining", "starts_ms", "ends_ms", "paused",
  "epoch", "seq")
local epoch, seq = tonumber(state[6] or "0"), tonumber(state[7] or "0")
local early
if state[5] == "1" then
  early = {7, nil}
elseif not state[1] then
  early = {8, nil}
  epoch, seq = -1, -1
elseif epoch < fence_epoch or (epoch == fence_epoch and seq < fence_seq)
    or (seq > 0 and (redis.call("EXISTS", KEYS[2]) == 0 or redis.call("EXISTS", KEYS[4]) == 0)) then
  -- Redis is behind a moment someone outside it saw, or lost part of the sale: what it holds
  -- can no longer be trusted to count units. Deleting the state makes it a lost product
  -- everywhere.
  redis.call("DEL", KEYS[1])
  early = {9, nil}
  epoch, seq = -1, -1
elseif now_ms < tonumber(state[3]) then
  early = {5, tonumber(state[2])}
elseif now_ms >= tonumber(state[4]) then
  early = {6, tonumber(state[2])}
end
if early then
  for i = 1, n do
    local _, used, reset_ms = judge(window_of(KEYS[6 + i]))
    answer(early[1], nil, early[2], user_limit - used, reset_ms)
  end
  out[#out + 1] = epoch
  out[#out + 1] = seq
  return out
end

local remaining = tonumber(state[2])
local interval = math.max(1, math.floor(gate_period_us / gate_count))
local tolerance = gate_period_us - interval
local tat = tonumber(redis.call("GET", KEYS[6]) or "0")
local gate_moved = false
local known = {}      -- user -> reservation id won before or in this batch
local wins = {}       -- {user, rid} in order

for i = 1, n do
  local key = KEYS[6 + i]
  local user, rid = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local w = window_of(key)
  local fresh, used, reset_ms = judge(w)
  -- 4. per-user rate window
  if used >= user_limit then
    answer(3, nil, remaining, user_limit - used, reset_ms, reset_ms)
  else
    -- 5. product admission gate (GCRA)
    local t = tat
    if t < now_us then t = now_us end
    if t - now_us > tolerance then
      answer(4, nil, remaining, user_limit - used, reset_ms, math.ceil((t - now_us - tolerance) / 1000))
    else
      -- The attempt counts against the user's window and the product's gate.
      tat = t + interval
      gate_moved = true
      if fresh then
        w.start, w.count = now_ms, 1
      else
        w.count = w.count + 1
      end
      w.touched = true
      local left = user_limit - used - 1
      -- 6. the user already won this product
      local earlier = known[user]
      if earlier == nil then
        earlier = redis.call("HGET", KEYS[2], user) or false
        known[user] = earlier
      end
      if earlier then
        answer(1, earlier, remaining, left, reset_ms)
      elseif remaining <= 0 then
        -- 7. stock left
        answer(2, nil, 0, left, reset_ms)
      else
        remaining = remaining - 1
        known[user] = rid
        wins[#wins + 1] = {user, rid}
        answer(0, rid, remaining, left, reset_ms)
      end
    end
  end
end

-- The writes, all after every read.
for key, w in pairs(windows) do
  if w.touched then
    redis.call("HSET", key, "s", w.start, "c", w.count)
    -- Expiry only reclaims memory (the window itself is judged by script time above).
    redis.call("PEXPIRE", key, window_ms + 60000)
  end
end
if gate_moved then
  redis.call("SET", KEYS[6], tat, "PX", math.ceil(gate_period_us / 1000) + 60000)
end
if #wins > 0 then
  redis.call("HINCRBY", KEYS[1], "remaining", -#wins)
  redis.call("HINCRBY", KEYS[1], "seq", #wins)
  local buyers, ids, statuses = {}, {}, {}
  for j, win in ipairs(wins) do
    buyers[2 * j - 1], buyers[2 * j] = win[1], win[2]
    ids[j] = win[2]
    statuses[2 * j - 1], statuses[2 * j] = win[2], "pending"
  end
  redis.call("HSET", KEYS[2], unpack(buyers))
  redis.call("SADD", KEYS[3], unpack(ids))
  redis.call("HSET", KEYS[5], unpack(statuses))
  local t = tostring(now_ms)
  for j, win in ipairs(wins) do
    redis.call("XADD", KEYS[4], "*", "r", win[2], "u", win[1], "p", pid, "t", t, "e", epoch,
      "s", seq + j)
  end
  seq = seq + #wins
end
out[#out + 1] = epoch
out[#out + 1] = seq
return out
