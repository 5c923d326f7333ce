--[[ pause.lua — pause or resume reservations of one product (reserve.lua answers "paused").

KEYS: 1 state hash
ARGV: 1 "1" to pause, "0" to resume
RETURNS 1
]]
redis.call("HSET", KEYS[1], "paused", ARGV[1])
return 1
