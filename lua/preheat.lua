--[[ preheat.lua — load a product's sale into Redis (idempotent).

KEYS (the product's hash tag):
  1 state   hash: stock, remaining, starts_ms, ends_ms, paused
  2 buyers  hash: user_id -> reservation_id (loaded before this call, in chunks)
ARGV:
  1 stock  2 remaining  3 starts_ms  4 ends_ms  5 force ("1" rebuilds a live sale)
  6 pub/sub channel  7 product_id
RETURNS {code, remaining, buyers}
  code: 1 loaded, 0 refused: the sale is live in Redis (starts_ms <= now) and force is not set
The caller computes remaining = stock - live orders - units won but not yet persisted; a
forced rebuild runs while the product is paused (pause.lua) and this call lifts the pause.
]]
local stock, remaining = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call("TIME")
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= "1" and now_ms >= tonumber(ARGV[3]) and redis.call("HEXISTS", KEYS[1], "stock") == 1 then
  return {0, tonumber(redis.call("HGET", KEYS[1], "remaining")), redis.call("HLEN", KEYS[2])}
end
if remaining < 0 then remaining = 0 end
if remaining > stock then remaining = stock end
redis.call("HSET", KEYS[1], "stock", stock, "remaining", remaining, "starts_ms", ARGV[3],
  "ends_ms", ARGV[4], "paused", "0")
redis.call("PUBLISH", ARGV[6], "stock:" .. ARGV[7])
return {1, remaining, redis.call("HLEN", KEYS[2])}
