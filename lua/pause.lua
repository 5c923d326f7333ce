--[[ pause.lua — pause or resume reservations of one product (reserve.lua answers "paused").

KEYS: 1 state hash
ARGV: 1 "1" to pause, "0" to resume
RETURNS 1, or 0 when the product is not in Redis: nothing is written then (a hash holding only
the flag would outlive the sale, with no expiry, and hide a lost product behind "paused")
]]
if redis.call("HEXISTS", KEYS[1], "stock") == 0 then
  return 0
end
redis.call("HSET", KEYS[1], "paused", ARGV[1])
return 1
