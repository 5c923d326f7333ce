--[[ preheat.lua — load a product's sale into Redis (idempotent), or rebuild it from Postgres.

KEYS (the product's hash tag):
  1 state     hash: stock, remaining, starts_ms, ends_ms, paused, epoch, seq, rseq
  2 buyers    hash: user_id -> reservation_id (loaded before this call, in chunks)
  3 released  set: reservation ids whose unit went back on sale
  4 status    hash: reservation_id -> status (status.lua may have created it, with the grace
              as its expiry, while the sale was lost)
Every one of them lasts as long as the sale: an expiry on it is removed.
ARGV:
  1 stock  2 remaining  3 starts_ms  4 ends_ms  5 force ("1" rebuilds a live sale)
  6 pub/sub channel  7 product_id
  8 epoch: the product's Redis epoch for a state this call creates (the caller bumped it in
    Postgres); a state that exists keeps its epoch and its win and release sequences
  9… every reservation id Postgres had as cancelled or expired when the caller read it
RETURNS {code, remaining, buyers}
  code: 1 loaded, 0 refused: the sale is live in Redis (starts_ms <= now) and force is not set
The caller computes remaining = stock - live orders - units won but not yet persisted, from
what it read (paused, for a forced rebuild; this call lifts the pause). Units returned since
then must neither be lost nor counted twice, so in this one atomic step:
  - every closed reservation it read is marked released: a later release.lua of it is a no-op
    (its unit is already counted as on sale);
  - a reservation released but not among them was closed after the read, so the caller counted
    it as sold while release.lua already added its unit to the old remaining: add it back.
]]
local stock, remaining = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call("TIME")
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= "1" and now_ms >= tonumber(ARGV[3]) and redis.call("HEXISTS", KEYS[1], "stock") == 1 then
  return {0, tonumber(redis.call("HGET", KEYS[1], "remaining")), redis.call("HLEN", KEYS[2])}
end
local fresh = redis.call("HEXISTS", KEYS[1], "stock") == 0
local closed = {}
for i = 9, #ARGV do
  closed[ARGV[i]] = true
end
for _, rid in ipairs(redis.call("SMEMBERS", KEYS[3])) do
  if not closed[rid] then
    remaining = remaining + 1
  end
end
for i = 9, #ARGV, 1000 do
  redis.call("SADD", KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if remaining < 0 then remaining = 0 end
if remaining > stock then remaining = stock end
redis.call("HSET", KEYS[1], "stock", stock, "remaining", remaining, "starts_ms", ARGV[3],
  "ends_ms", ARGV[4], "paused", "0")
if fresh then
  redis.call("HSET", KEYS[1], "epoch", ARGV[8], "seq", 0, "rseq", 0)
end
for i = 1, 4 do
  redis.call("PERSIST", KEYS[i])
end
redis.call("PUBLISH", ARGV[6], "stock:" .. ARGV[7])
return {1, remaining, redis.call("HLEN", KEYS[2])}
