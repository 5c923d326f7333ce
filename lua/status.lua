--[[ status.lua — record new statuses of one product's reservations, never going back in a
reservation's lifecycle (pending 0 < confirmed 1 < paid | cancelled | expired | rejected 2),
and take each off the pending set once the worker decided it (an order, or rejected). Publishes
a status event per change for the SSE streams. One call carries a whole worker batch for the
product.
Records the shopper as the reservation's buyer when Redis has no buyer entry for them (a winner
replayed from the dead-letter queue after Redis lost its sale): their /me then finds it, and
reserve.lua's dedup refuses them a second unit. An entry already there is never changed.

KEYS (the product's hash tag): 1 status hash  2 pending set  3 state hash  4 buyers hash
ARGV: 1 pub/sub channel, 2 the grace in ms (SECKILL_KEY_GRACE_SECS), then groups of 5:
  reservation_id, status JSON, its rank (1 or 2), event message, user id
RETURNS the number of statuses that changed (the others already had an equal or later one;
only the pending set changed for them)
A retired sale's keys expire (retire.lua): a status or buyers hash this call creates for one
expires with the state hash, so a late write never leaves a key behind for good. With no state
hash at all (a lost sale, or one whose keys already expired) they get the grace: a rebuild
(preheat.lua) makes them lasting again.
]]
local rank = { pending = 0, confirmed = 1, paid = 2, cancelled = 2, expired = 2, rejected = 2 }
local changed = 0
local buyers_added = 0
for i = 3, #ARGV, 5 do
  local rid, new_rank = ARGV[i], tonumber(ARGV[i + 2])
  redis.call("SREM", KEYS[2], rid)
  buyers_added = buyers_added + redis.call("HSETNX", KEYS[4], ARGV[i + 4], rid)
  local current = redis.call("HGET", KEYS[1], rid)
  local current_rank = -1
  if current == "pending" then
    current_rank = 0
  elseif current then
    local ok, doc = pcall(cjson.decode, current)
    if ok and type(doc) == "table" and rank[doc.status] then
      current_rank = rank[doc.status]
    end
  end
  if current_rank < new_rank then
    redis.call("HSET", KEYS[1], rid, ARGV[i + 1])
    redis.call("PUBLISH", ARGV[1], ARGV[i + 3])
    changed = changed + 1
  end
end
if changed > 0 or buyers_added > 0 then
  local ttl = redis.call("PTTL", KEYS[3])
  if ttl == -2 then
    ttl = tonumber(ARGV[2])
  end
  if ttl > 0 then
    for _, key in ipairs({ KEYS[1], KEYS[4] }) do
      if redis.call("PTTL", key) == -1 then
        redis.call("PEXPIRE", key, ttl)
      end
    end
  end
end
return changed
