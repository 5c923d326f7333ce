--[[ status.lua — record a reservation's new status, never going back in its lifecycle
(pending 0 < confirmed 1 < paid | cancelled | expired 2), and take it off the pending set once
it is an order. Publishes a status event for the SSE streams.

KEYS (the product's hash tag): 1 status hash  2 pending set
ARGV: 1 reservation_id  2 status JSON  3 its rank (1 or 2)  4 pub/sub channel  5 event message
RETURNS 1 recorded, 0 an equal or later status was already there (nothing changed but the
pending set)
]]
local rank = { pending = 0, confirmed = 1, paid = 2, cancelled = 2, expired = 2 }
local rid, new_rank = ARGV[1], tonumber(ARGV[3])
redis.call("SREM", KEYS[2], rid)
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
if current_rank >= new_rank then
  return 0
end
redis.call("HSET", KEYS[1], rid, ARGV[2])
redis.call("PUBLISH", ARGV[4], ARGV[5])
return 1
