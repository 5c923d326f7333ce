--[[ release.lua — return the unit of a cancelled/expired reservation to stock, exactly once.

KEYS (the product's hash tag):
  1 state     hash: stock, remaining, epoch, rseq (release sequence: +1 per unit returned), …
  2 released  set: reservation ids whose unit was returned
  3 status    hash: reservation_id -> "pending" | JSON
  4 pending   set: reservation ids won but not yet persisted (a closed order is not: it leaves
              the set here too, should the write that recorded its order have been lost, e.g.
              by a failover)
ARGV:
  1 reservation_id  2 status JSON to record  3 product_id  4 pub/sub channel
A retired sale's keys expire (retire.lua): a key this call creates expires with the state hash.
RETURNS {code, remaining, epoch, rseq}
  code: 1 returned now, 0 returned before (no-op), -1 product not preheated (no-op: the next
        preheat rebuilds remaining from Postgres; epoch and rseq are -1)
  epoch, rseq: the state's epoch and release sequence after the call. The caller records them
  with the order (Postgres): a state later found behind them forgot a returned unit (a failover
  to a replica that had not received the release, a rollback) and is rebuilt by counting, as
  one behind a relayed win is (behind.lua).
]]
local rid = ARGV[1]
local state = redis.call("HMGET", KEYS[1], "stock", "remaining", "epoch", "rseq")
if not state[1] then
  return {-1, -1, -1, -1}
end
local stock, remaining = tonumber(state[1]), tonumber(state[2])
local epoch, rseq = tonumber(state[3] or "0"), tonumber(state[4] or "0")
if redis.call("SISMEMBER", KEYS[2], rid) == 1 then
  redis.call("SREM", KEYS[4], rid)
  return {0, remaining, epoch, rseq}
end
redis.call("SADD", KEYS[2], rid)
if remaining < stock then
  remaining = redis.call("HINCRBY", KEYS[1], "remaining", 1)
end
rseq = redis.call("HINCRBY", KEYS[1], "rseq", 1)
redis.call("HSET", KEYS[3], rid, ARGV[2])
redis.call("SREM", KEYS[4], rid)
local ttl = redis.call("PTTL", KEYS[1])
if ttl > 0 then
  for i = 2, 3 do
    if redis.call("PTTL", KEYS[i]) == -1 then
      redis.call("PEXPIRE", KEYS[i], ttl)
    end
  end
end
-- Tell every API process that this product is no longer sold out.
redis.call("PUBLISH", ARGV[4], "stock:" .. ARGV[3])
return {1, remaining, epoch, rseq}
